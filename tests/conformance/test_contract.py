"""The storefront HTTP contract, case by case, against each adapter's storefront (every
case runs once per adapter). Only HTTP is spoken to the
storefronts; the gRPC client only checks what they stored."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import TENANT_MAX_SESSIONS_PER_USER, TENANT_TOKEN
from contract import (
    EXPIRED,
    NOT_LOGGED_IN,
    assert_clears_session,
    assert_dead_everywhere,
    assert_sets_session,
    cart_lines,
)
from harness import wait_until_expired
from sessiond_client import NotFound


def unique(name: str) -> str:
    """A user name no other case (or earlier run against the same sessiond) has used."""
    return f"{name}-{time.monotonic_ns()}"


def test_cart_without_cookie(storefront):
    r = storefront.browser().get("/cart")
    assert (r.status, r.json) == (200, {"cart": {}, "user": None})
    assert r.set_cookies == []


def test_add_and_view(storefront, client):
    b = storefront.browser("Shopper/1.0")
    r = b.post("/cart/items", {"sku": "apple", "qty": 1})
    assert (r.status, r.json) == (200, {"cart": {"apple": 1}})
    assert_sets_session(r.set_cookies, b.sid)  # an anonymous session, started here

    r = b.post("/cart/items", {"sku": "apple", "qty": 2})
    assert (r.status, r.json) == (200, {"cart": {"apple": 3}})
    assert r.set_cookies == []  # the same session: no new cookie
    r = b.post("/cart/items", {"sku": "pear", "qty": 5})
    assert (r.status, r.json) == (200, {"cart": {"apple": 3, "pear": 5}})

    r = b.get("/cart")
    assert (r.status, r.json) == (200, {"cart": {"apple": 3, "pear": 5}, "user": None})
    assert r.set_cookies == []

    stored = client.get(b.sid, peek=True)
    assert cart_lines(stored.attributes) == {"cart:apple": b"3", "cart:pear": b"5"}
    assert stored.user_id == ""
    assert (stored.client_ip, stored.client_user_agent) == ("127.0.0.1", "Shopper/1.0")


def test_cart_reads_only_cart_lines(storefront, client):
    """Attributes other than `cart:<sku>` JSON integers are not cart lines: another
    adapter's bookkeeping, or a value that is not a JSON integer."""
    b = storefront.browser()
    b.post("/cart/items", {"sku": "fig", "qty": 2})
    client.update(b.sid, set={"theme": '"dark"', "cart:odd": "1_000", "passport": '{"user":"x"}'})
    assert b.get("/cart").json == {"cart": {"fig": 2}, "user": None}
    assert b.post("/cart/items", {"sku": "fig", "qty": 1}).json == {"cart": {"fig": 3}}


def test_bad_values_are_400(storefront):
    b = storefront.browser()
    for body in (
        {"sku": "", "qty": 1},
        {"sku": "x" * 65, "qty": 1},
        {"sku": "é" * 33, "qty": 1},  # 33 characters, 66 bytes: the limit is in bytes
        {"sku": "apple", "qty": 0},
        {"sku": "apple", "qty": 1001},
    ):
        r = b.post("/cart/items", body)
        assert r.status == 400 and isinstance(r.json.get("error"), str), (body, r)
        assert r.set_cookies == [] and b.sid is None, body  # no session started
    r = b.post("/cart/items", {"sku": "x" * 64, "qty": 1000})
    assert (r.status, r.json) == (200, {"cart": {"x" * 64: 1000}})
    r = b.post("/cart/items", {"sku": "é" * 32, "qty": 1})
    assert (r.status, r.json) == (200, {"cart": {"x" * 64: 1000, "é" * 32: 1}})

    anonymous = storefront.browser()
    r = anonymous.post("/login", {"user": ""})
    assert (r.status, r.json) == (400, {"error": "user must not be empty"})
    assert r.set_cookies == [] and anonymous.sid is None


def test_bad_shapes_are_400(storefront):
    b = storefront.browser()
    for body in (
        {"sku": "apple"},
        {"qty": 1},
        {"sku": "apple", "qty": "2"},
        {"sku": "apple", "qty": True},
        {"sku": "apple", "qty": 1.5},
        {"sku": 7, "qty": 1},
        ["apple", 1],
    ):
        r = b.post("/cart/items", body)
        assert r.status == 400 and isinstance(r.json, dict), (body, r.status, r.json)
        assert isinstance(r.json.get("error"), str), (body, r.json)
    assert b.sid is None


def test_concurrent_adds_lose_nothing(storefront, client):
    b = storefront.browser()
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    sid, n = b.sid, 16
    start = threading.Barrier(n)
    statuses = []

    def add():
        start.wait(30)
        r = storefront.browser().post("/cart/items", {"sku": "apple", "qty": 1}, sid=sid)
        statuses.append(r.status)

    threads = [threading.Thread(target=add) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * n
    assert b.get("/cart").json["cart"] == {"apple": 1 + n}
    assert client.get(sid, peek=True).attributes["cart:apple"] == str(1 + n).encode()


def test_login_regenerates_and_carries_the_cart(storefront, client):
    user = unique("alice")
    b = storefront.browser()
    b.post("/cart/items", {"sku": "apple", "qty": 2})
    anonymous = b.sid

    r = b.post("/login", {"user": user})
    assert (r.status, r.json) == (200, {"user": user, "cart": {"apple": 2}})
    assert b.sid != anonymous
    assert_sets_session(r.set_cookies, b.sid)  # only the final ID's cookie
    with pytest.raises(NotFound):
        client.get(anonymous, peek=True)  # fixation-safe: the old ID is dead
    stored = client.get(b.sid, peek=True)
    assert stored.user_id == user  # the plain user name
    assert cart_lines(stored.attributes) == {"cart:apple": b"2"}

    assert b.get("/cart").json == {"cart": {"apple": 2}, "user": user}
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    assert b.get("/cart").json == {"cart": {"apple": 3}, "user": user}

    # The pre-login cookie, late: 401 on every route, and the new cookie is left alone.
    assert_dead_everywhere(storefront, anonymous)
    assert b.get("/cart").json == {"cart": {"apple": 3}, "user": user}


# django.contrib.auth's login() flushes a session that another user is logged in to (its
# guard against handing one user's session to the next): the new one starts empty.
DJANGO_SWITCH = "Django's login() does not carry the cart from another user's session"


def test_login_as_another_user(adapter, storefront, client, request):
    if adapter == "django":
        request.applymarker(pytest.mark.xfail(reason=DJANGO_SWITCH, strict=True))
    first, second = unique("fay"), unique("gus")
    b = storefront.browser("Shared/1.0")
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    b.post("/login", {"user": first})
    before = b.sid
    r = b.post("/login", {"user": second})
    assert r.status == 200 and r.json["user"] == second
    assert b.sid != before
    assert_sets_session(r.set_cookies, b.sid)
    with pytest.raises(NotFound):
        client.get(before, peek=True)
    stored = client.get(b.sid, peek=True)
    assert stored.user_id == second
    assert b.get("/devices").json["devices"][0]["user_agent"] == "Shared/1.0"
    assert r.json["cart"] == {"apple": 1}


def test_login_without_cookie(storefront, client):
    user = unique("bea")
    b = storefront.browser("Fresh/1.0")
    r = b.post("/login", {"user": user})
    assert (r.status, r.json) == (200, {"user": user, "cart": {}})
    assert_sets_session(r.set_cookies, b.sid)
    stored = client.get(b.sid, peek=True)
    assert (stored.user_id, stored.client_ip, stored.client_user_agent) == (user, "127.0.0.1", "Fresh/1.0")


def test_logout(storefront, client):
    b = storefront.browser()
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    b.post("/login", {"user": unique("carl")})
    sid = b.sid
    r = b.post("/logout")
    assert (r.status, r.json) == (200, {"ok": True})
    assert_clears_session(r.set_cookies)
    assert b.sid is None
    with pytest.raises(NotFound):
        client.get(sid, peek=True)
    assert_dead_everywhere(storefront, sid)
    assert b.get("/cart").json == {"cart": {}, "user": None}  # anonymous again


def test_devices_and_logout_all(storefront, client):
    user = unique("dana")
    laptop = storefront.browser("Laptop/1.0")
    phone = storefront.browser("Phone/2.0")
    other = storefront.browser("Other/3.0")  # another user: not one of dana's devices
    laptop.post("/cart/items", {"sku": "apple", "qty": 1})
    before = int(time.time() * 1000)
    laptop.post("/login", {"user": user})
    phone.post("/login", {"user": user})
    other.post("/login", {"user": unique("erin")})
    after = int(time.time() * 1000)

    for me, them in ((laptop, phone), (phone, laptop)):
        r = me.get("/devices")
        assert r.status == 200, r
        devices = sorted(r.json["devices"], key=lambda d: d["user_agent"])
        assert [(d["ip"], d["user_agent"], d["current"]) for d in devices] == [
            ("127.0.0.1", "Laptop/1.0", me is laptop),
            ("127.0.0.1", "Phone/2.0", me is phone),
        ]
        for d in devices:
            seen = d["last_seen"]  # unix milliseconds, from the same clock as ours
            assert isinstance(seen, int) and not isinstance(seen, bool), d
            assert before - 60_000 <= seen <= after + 60_000, (before, d, after)

    phone_sid = phone.sid
    r = laptop.post("/logout-all")
    assert (r.status, r.json) == (200, {"destroyed": 2})
    assert_clears_session(r.set_cookies)
    with pytest.raises(NotFound):
        client.get(phone_sid, peek=True)
    r = phone.get("/cart")
    assert (r.status, r.json) == (401, EXPIRED)
    assert r.set_cookies == []
    assert_dead_everywhere(storefront, phone_sid)
    assert other.get("/cart").status == 200  # another user's session lives on


def test_not_logged_in(storefront):
    anonymous = storefront.browser()
    anonymous.post("/cart/items", {"sku": "kiwi", "qty": 1})
    for b in (storefront.browser(), anonymous):  # no cookie, and an anonymous session
        for method, path in (("POST", "/logout-all"), ("GET", "/devices")):
            r = b.request(method, path)
            assert (r.status, r.json) == (401, NOT_LOGGED_IN), (method, path, b.sid)
            assert r.set_cookies == []
    assert anonymous.get("/cart").json["cart"] == {"kiwi": 1}  # still alive


def test_made_up_cookie(storefront):
    """A cookie naming no session sessiond ever issued is a dead session too."""
    assert_dead_everywhere(storefront, "A" * 43)


def test_idle_timeout_expires_sessions(adapter, launch, sessiond, client):
    """STOREFRONT_IDLE_TIMEOUT_SECONDS=1: the session ends after a second unused; the next
    request gets 401 and no Set-Cookie. Polls with peek, which does not slide the deadline.
    (SESSIOND_ADDR in its http://host:port form, here.)"""
    front = launch(adapter, f"http://{sessiond.addr}", STOREFRONT_IDLE_TIMEOUT_SECONDS="1")
    b = front.browser()
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    sid = b.sid
    assert client.get(sid, peek=True).idle_timeout.total_seconds() == 1
    wait_until_expired(client, sid)
    r = b.get("/cart")
    assert (r.status, r.json) == (401, EXPIRED)
    assert r.set_cookies == []


def test_tenant_token_and_limit(adapter, launch, tenant_sessiond):
    """SESSIOND_TOKEN reaches a multi-tenant sessiond; a limit it enforces (sessions per
    user) is 429 with sessiond's message; without the token, 503."""
    front = launch(adapter, tenant_sessiond.addr, SESSIOND_TOKEN=TENANT_TOKEN)
    b = front.browser()
    r = b.post("/cart/items", {"sku": "fig", "qty": 3})
    assert (r.status, r.json) == (200, {"cart": {"fig": 3}})
    assert cart_lines(tenant_sessiond.client().get(b.sid, peek=True).attributes) == {"cart:fig": b"3"}
    user = unique("popular")
    for _ in range(TENANT_MAX_SESSIONS_PER_USER):
        assert front.browser().post("/login", {"user": user}).status == 200
    r = front.browser().post("/login", {"user": user})
    assert r.status == 429 and "max_sessions_per_user" in r.json["error"], (r.status, r.json)

    # Without the token, the store refuses every call: 503.
    front = launch(adapter, tenant_sessiond.addr)
    r = front.browser().post("/cart/items", {"sku": "fig", "qty": 3})
    assert r.status == 503 and isinstance(r.json.get("error"), str), (r.status, r.json)


def test_sessiond_down_is_503(adapter, launch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    front = launch(adapter, f"127.0.0.1:{port}")
    b = front.browser()
    r = b.post("/cart/items", {"sku": "apple", "qty": 1})
    assert r.status == 503 and isinstance(r.json.get("error"), str), (r.status, r.json)
    r = b.get("/cart", sid="A" * 43)
    assert r.status == 503 and isinstance(r.json.get("error"), str), (r.status, r.json)
    assert r.set_cookies == []  # an outage is not an expiry: the cookie is kept


def test_exits_on_sigterm(adapter, launch):
    front = launch(adapter)
    front.process.proc.terminate()
    front.process.proc.wait(timeout=30)  # raises if it is still running
