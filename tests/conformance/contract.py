"""The contract's fixed parts, and the checks the cases share: the answers, the routes, the
cookie's rules (for reading Set-Cookie headers by them)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Dict, List, Optional, Tuple

EXPIRED = {"error": "session expired"}
NOT_LOGGED_IN = {"error": "not logged in"}

# Every route, with a body it accepts.
ROUTES = [
    ("POST", "/cart/items", {"sku": "apple", "qty": 1}),
    ("GET", "/cart", None),
    ("POST", "/login", {"user": "mallory"}),
    ("POST", "/logout", None),
    ("POST", "/logout-all", None),
    ("GET", "/devices", None),
]

COOKIE = "__Host-sid"
# The contract's cookie attributes, exactly (names are case-insensitive; none other).
ATTRIBUTES = {"httponly": None, "secure": None, "samesite": "lax", "path": "/"}
# A sessiond session ID: 43 chars of URL-safe base64 (256 bits, no padding).
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


def parse(header: str) -> Tuple[str, str, Dict[str, Optional[str]]]:
    """A Set-Cookie value as (name, value, {attribute name (lower case): value or None})."""
    first, *rest = header.strip().split(";")
    name, _, value = first.strip().partition("=")
    attributes: Dict[str, Optional[str]] = {}
    for part in rest:
        key, eq, val = part.strip().partition("=")
        if key:
            attributes[key.lower()] = val.strip() if eq else None
    return name, value, attributes


def session_cookies(set_cookies: List[str]) -> List[Tuple[str, Dict[str, Optional[str]]]]:
    """The `__Host-sid` cookies among a response's Set-Cookie headers: (value, attributes)."""
    return [(v, a) for n, v, a in map(parse, set_cookies) if n == COOKIE]


def normalized(attributes: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
    return {k: (v.lower() if k == "samesite" and v else v) for k, v in attributes.items()}


def assert_sets_session(set_cookies: List[str], sid: str) -> None:
    """The response sends exactly one `__Host-sid` cookie, holding `sid`, with exactly the
    contract's attributes (no Domain, no Max-Age or Expires)."""
    cookies = session_cookies(set_cookies)
    assert len(cookies) == 1, set_cookies
    value, attributes = cookies[0]
    assert value == sid and SESSION_ID.fullmatch(value), set_cookies
    assert normalized(attributes) == ATTRIBUTES, set_cookies


def assert_clears_session(set_cookies: List[str]) -> None:
    """The response deletes the `__Host-sid` cookie, in a form a browser honours for a
    `__Host-` cookie (Secure, Path=/, no Domain)."""
    cookies = session_cookies(set_cookies)
    assert len(cookies) == 1, set_cookies
    _, attributes = cookies[0]
    expires = attributes.get("expires")
    deleted = attributes.get("max-age") == "0" or (
        expires is not None and parsedate_to_datetime(expires) < datetime.now(timezone.utc)
    )
    assert deleted, set_cookies
    assert "secure" in attributes and attributes.get("path") == "/", set_cookies
    assert "domain" not in attributes, set_cookies


def assert_dead_everywhere(front, sid: str) -> None:
    """Every route answers a cookie naming a dead session with 401 "session expired" and
    leaves the cookie alone: the browser may hold a newer one by the time the answer
    arrives (a late request from before a login in another tab)."""
    for method, path, body in ROUTES:
        r = front.browser().request(method, path, body, sid=sid)
        assert (r.status, r.json) == (401, EXPIRED), (method, path, r)
        assert r.set_cookies == [], (method, path, r.set_cookies)


def cart_lines(attributes: Dict[str, bytes]) -> Dict[str, bytes]:
    """The cart lines among a session's stored attributes, as stored (other attributes are
    an adapter's own bookkeeping)."""
    return {k: v for k, v in attributes.items() if k.startswith("cart:")}
