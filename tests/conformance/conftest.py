"""The conformance suite's fixtures: one sessiond on an ephemeral loopback port, and every
adapter's storefront started against it by the contract's environment (PORT=0, the
`listening on` line). Every process started here is stopped at the end.

SESSIOND_BIN names the sessiond binary (default: <repo>/target/debug/sessiond); adapters.py
says how each storefront starts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "clients" / "python" / "tests"))

from adapters import ADAPTERS  # noqa: E402
from harness import (  # noqa: E402
    Daemon,
    Storefront,
    start_sessiond,
    start_storefront_process,
    start_tenant_sessiond,
)
from sessiond_client import SessionClient  # noqa: E402


@pytest.fixture(scope="session")
def workdir():
    with tempfile.TemporaryDirectory(prefix="sessiond-conformance-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def sessiond(workdir) -> Daemon:
    d = start_sessiond(workdir / "sessiond")
    yield d
    d.stop()


# The tenant of `tenant_sessiond`, and the limit it enforces.
TENANT_TOKEN = "conformance-tenant-token"
TENANT_MAX_SESSIONS_PER_USER = 2


@pytest.fixture(scope="session")
def tenant_sessiond(workdir) -> Daemon:
    """A multi-tenant sessiond: one tenant (TENANT_TOKEN), at most
    TENANT_MAX_SESSIONS_PER_USER sessions per user."""
    d = start_tenant_sessiond(workdir / "tenant", TENANT_TOKEN, TENANT_MAX_SESSIONS_PER_USER)
    yield d
    d.stop()


@pytest.fixture(scope="session")
def client(sessiond) -> SessionClient:
    """A gRPC client, only to check what the storefronts stored (and to peek at expiry)."""
    return sessiond.client()


@pytest.fixture(scope="session")
def launch(sessiond, workdir):
    """launch(adapter, sessiond_addr=None, **env) starts one more storefront of that
    adapter against the suite's sessiond, or the one at sessiond_addr, with more environment;
    all are stopped at the end."""
    started: List[Storefront] = []

    def start(adapter: str, sessiond_addr: Optional[str] = None, **env: str) -> Storefront:
        args = ADAPTERS[adapter]()
        front = start_storefront_process(args, workdir, sessiond_addr or sessiond.addr, **env)
        started.append(front)
        return front

    yield start
    for front in started:
        front.process.stop()


@pytest.fixture(scope="session")
def running(launch):
    """running(adapter): the adapter's shared storefront (started on first use)."""
    fronts: Dict[str, Storefront] = {}

    def get(adapter: str) -> Storefront:
        if adapter not in fronts:
            fronts[adapter] = launch(adapter)
        return fronts[adapter]

    return get


@pytest.fixture(params=list(ADAPTERS))
def adapter(request) -> str:
    """Each adapter's name in turn: a case that takes it runs once per adapter."""
    return request.param


@pytest.fixture
def storefront(adapter, running) -> Storefront:
    """The adapter's shared storefront."""
    return running(adapter)
