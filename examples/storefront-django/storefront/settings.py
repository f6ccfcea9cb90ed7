"""The Django storefront's settings: sessions in sessiond, users in a throwaway SQLite file.

Read from the contract's environment (see serve.py, which sets STOREFRONT_DB before Django
starts)."""

import os


def _env(name):
    return os.environ.get(name) or None  # empty = unset


# The session auth hash that django.contrib.auth stores in the session is keyed by this:
# Django instances sharing sessions must share it, or each one's AuthenticationMiddleware
# ends (flushes) the sessions the others logged in. A fixed demo default; set your own.
SECRET_KEY = _env("DJANGO_SECRET_KEY") or "storefront-demo-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "storefront",
]
MIDDLEWARE = [
    "storefront.middleware.StorefrontSessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "storefront.urls"

# Users exist only so that django.contrib.auth's login() and logout() run as in any Django
# app; the username is the primary key, so the user bound in sessiond is "alice".
AUTH_USER_MODEL = "storefront.User"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["STOREFRONT_DB"],
        "OPTIONS": {"timeout": 20},
    }
}

# The one setting that puts Django's sessions in sessiond.
SESSION_ENGINE = "sessiond_client.django"
SESSIOND_ADDRESS = _env("SESSIOND_ADDR") or "127.0.0.1:7420"
SESSIOND_TOKEN = _env("SESSIOND_TOKEN")

# The contract's cookie: `__Host-sid`, HttpOnly; Secure; SameSite=Lax; Path=/, no Domain,
# and no Max-Age (a browser-session cookie, as the other storefronts send).
SESSION_COOKIE_NAME = "__Host-sid"
SESSION_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_PATH = "/"
SESSION_COOKIE_DOMAIN = None
SESSION_EXPIRE_AT_BROWSER_CLOSE = True

# New sessions' idle timeout, in seconds (None: the daemon's default). The engine also takes
# SESSION_COOKIE_AGE as the idle timeout of the sessions it creates itself.
_idle = _env("STOREFRONT_IDLE_TIMEOUT_SECONDS")
STOREFRONT_IDLE_TIMEOUT = int(_idle) if _idle else None
if STOREFRONT_IDLE_TIMEOUT is not None:
    SESSION_COOKIE_AGE = STOREFRONT_IDLE_TIMEOUT

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
