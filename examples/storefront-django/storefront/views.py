"""The storefront's HTTP contract over Django (the routes are the same as the axum and Flask
storefronts'; see tests/conformance/README.md).

Django's session (`request.session`, the sessiond engine) carries the login: /login and
/logout are django.contrib.auth's own login() and logout(). What the other adapters read
from sessiond directly is read here directly too, through the engine's client: the session
behind the cookie (its attributes, its version and its bound user, `request.sessiond`), and
the cart lines, which are changed with compare-and-set, not through `request.session`
(whose save() writes values computed from what the request read, whatever another process
wrote in between). The session behind the cookie is read, and a dead one refused, by
middleware.py."""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Mapping, Optional

from django.conf import settings
from django.contrib import auth
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from sessiond_client import Conflict, Session, to_unix_ms
from sessiond_client.django import SessionStore, client

from .middleware import error
from .models import User

CART_PREFIX = "cart:"
MAX_SKU_BYTES = 64
MAX_QTY = 1000
# How many times an add re-reads the cart after losing a compare-and-set race.
CAS_ATTEMPTS = 64
# A cart line's value: a JSON integer, in decimal ASCII digits.
DIGITS = re.compile(rb"[0-9]{1,19}")


def json_object(request: HttpRequest) -> Optional[Dict[str, Any]]:
    try:
        body = json.loads(request.body)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def parse_qty(value: bytes) -> Optional[int]:
    """A cart line's quantity, or None if the value is not one."""
    return int(value) if DIGITS.fullmatch(value) else None


def cart_of(attributes: Mapping[str, bytes]) -> Dict[str, int]:
    """The cart lines among a session's attributes (raw values), by SKU."""
    cart = {}
    for key, value in sorted(attributes.items()):
        qty = parse_qty(value)
        if key.startswith(CART_PREFIX) and qty is not None:
            cart[key[len(CART_PREFIX):]] = qty
    return cart


def cart_in_session(request: HttpRequest) -> Dict[str, int]:
    """The cart lines in Django's session, whose values the engine has JSON-decoded."""
    return {
        key[len(CART_PREFIX):]: value
        for key, value in sorted(request.session.items())
        if key.startswith(CART_PREFIX)
        and isinstance(value, int)
        and not isinstance(value, bool)
        and value >= 0
    }


def start_session(request: HttpRequest, attributes: Optional[Mapping[str, str]] = None) -> Session:
    """Creates the session here rather than leaving it to the engine, because Create is
    where sessiond records the client's IP and User-Agent (for /devices), which a Django
    session engine never sees. Django's session then names it, modified, so that
    SessionMiddleware sends its cookie."""
    remote = client().create(
        "",
        attributes,
        idle_timeout=settings.STOREFRONT_IDLE_TIMEOUT,
        ip=request.META.get("REMOTE_ADDR", ""),
        user_agent=request.META.get("HTTP_USER_AGENT", ""),
    )
    request.session = SessionStore(remote.id)
    request.session.modified = True
    request.sessiond = remote
    return remote


def add_to_line(remote: Session, key: str, qty: int) -> Session:
    """Adds `qty` to the cart line `key`: Update with expected_version, re-reading on a
    conflict, so concurrent adds (through any adapter) never lose one."""
    for _ in range(CAS_ATTEMPTS):
        have = parse_qty(remote.attributes.get(key, b"0")) or 0
        try:
            return client().update(
                remote.id, set={key: str(have + qty)}, expected_version=remote.version
            )
        except Conflict:
            remote = client().get(remote.id)
    raise Conflict(f"lost {CAS_ATTEMPTS} compare-and-set races on {key}")


@require_POST
def add_item(request: HttpRequest) -> HttpResponse:
    body = json_object(request)
    if body is None:
        return error(400, "expected a JSON object")
    sku, qty = body.get("sku"), body.get("qty")
    if (
        not isinstance(sku, str)
        or not 1 <= len(sku.encode("utf-8")) <= MAX_SKU_BYTES
        or not isinstance(qty, int)
        or isinstance(qty, bool)
        or not 1 <= qty <= MAX_QTY
    ):
        return error(400, f"sku must be 1-{MAX_SKU_BYTES} bytes and qty 1-{MAX_QTY}")
    key = CART_PREFIX + sku
    if request.sessiond is None:
        written = start_session(request, {key: str(qty)})
    else:
        # request.session has not been read in this request, so it holds nothing that this
        # write makes stale: were it read later, it would load the version written here.
        written = add_to_line(request.sessiond, key, qty)
        request.sessiond = written
    return JsonResponse({"cart": cart_of(written.attributes)})


@require_GET
def view_cart(request: HttpRequest) -> HttpResponse:
    remote = request.sessiond
    if remote is None:
        return JsonResponse({"cart": {}, "user": None})
    return JsonResponse({"cart": cart_of(remote.attributes), "user": remote.user_id or None})


@require_POST
def login(request: HttpRequest) -> HttpResponse:
    body = json_object(request)
    name = body.get("user") if body is not None else None
    if not isinstance(name, str) or not name:
        return error(400, "user must not be empty")
    if request.session.get(auth.SESSION_KEY) not in (None, name):
        # Another user is logged in to this session: Django's login() would flush it (its
        # guard against handing one user's session to the next) and leave a new one to the
        # engine. End it here instead, so that the new one is made with the client's IP and
        # User-Agent.
        auth.logout(request)
    if request.session.session_key is None:
        start_session(request)
    user, _ = User.objects.get_or_create(username=name)
    # Django's login(): cycle_key() (Regenerate: a fresh ID, the cart carried, the old ID
    # dead), then `_auth_user_id`; saving the session binds it to the user in sessiond.
    auth.login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return JsonResponse({"user": name, "cart": cart_in_session(request)})


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    auth.logout(request)  # flush(): Destroy; SessionMiddleware clears the cookie
    return JsonResponse({"ok": True})


def current_user(request: HttpRequest) -> Optional[str]:
    """The logged-in user: the one sessiond has the session bound to, whichever adapter
    logged it in (one that is not Django sets no `_auth_user_id`)."""
    remote = request.sessiond
    return remote.user_id if remote is not None and remote.user_id else None


@require_POST
def logout_all(request: HttpRequest) -> HttpResponse:
    user = current_user(request)
    if user is None:
        return error(401, "not logged in")
    destroyed = client().destroy_user_sessions(user)
    auth.logout(request)  # this session was one of them: Django forgets it, clears the cookie
    return JsonResponse({"destroyed": destroyed})


@require_GET
def devices(request: HttpRequest) -> HttpResponse:
    user = current_user(request)
    if user is None:
        return error(401, "not logged in")
    return JsonResponse(
        {
            "devices": [
                {
                    "ip": s.client_ip,
                    "user_agent": s.client_user_agent,
                    "last_seen": to_unix_ms(s.last_access_at),
                    "current": s.id == request.sessiond.id,
                }
                for s in client().list_user_sessions(user)
            ]
        }
    )
