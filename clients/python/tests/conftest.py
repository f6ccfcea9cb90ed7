"""Fixtures: real sessiond daemons (and the Flask storefront) on ephemeral loopback ports,
started by harness.py.

SESSIOND_BIN names the sessiond binary (default: <repo>/target/debug/sessiond). Every
process started here is killed at the end of the test session.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from harness import (
    REPO,
    Storefront,
    start_sessiond,
    start_storefront_process,
    start_tenant_sessiond,
)
from sessiond_client import SessionClient

STOREFRONT_APP = REPO / "examples" / "storefront-flask" / "app.py"

TENANT_TOKEN = "test-tenant-token"
TENANT_MAX_SESSIONS_PER_USER = 3


def pytest_configure(config):
    """Django for test_django.py (pytest-django sets it up from here): an in-memory SQLite
    database for the auth users and the sessiond engine; the test module points it at its
    daemon and its views."""
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            "django.contrib.messages",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        SESSION_ENGINE="sessiond_client.django",
        MESSAGE_STORAGE="django.contrib.messages.storage.session.SessionStorage",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # fast
        SECRET_KEY="test-only",
        USE_TZ=True,
    )


@pytest.fixture(scope="session")
def workdir():
    with tempfile.TemporaryDirectory(prefix="sessiond-pytest-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def sessiond(workdir):
    """A single-tenant, in-memory sessiond."""
    d = start_sessiond(workdir / "single")
    yield d
    d.stop()


@pytest.fixture(scope="session")
def tenant_sessiond(workdir):
    """A multi-tenant sessiond with one tenant "t" (TENANT_TOKEN), at most
    TENANT_MAX_SESSIONS_PER_USER sessions per user."""
    d = start_tenant_sessiond(workdir / "tenant", TENANT_TOKEN, TENANT_MAX_SESSIONS_PER_USER)
    yield d
    d.stop()


@pytest.fixture(scope="session")
def client(sessiond) -> SessionClient:
    return sessiond.client()


# --- the Flask storefront as a real server ----------------------------------------------


def start_storefront(workdir: Path, sessiond_addr: str, **env_extra: str) -> Storefront:
    return start_storefront_process(
        [sys.executable, str(STOREFRONT_APP)], workdir, sessiond_addr, **env_extra
    )


@pytest.fixture(scope="session")
def storefront(sessiond, workdir):
    s = start_storefront(workdir, sessiond.addr)
    yield s
    s.process.stop()
