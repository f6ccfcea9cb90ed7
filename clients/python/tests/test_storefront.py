"""The Flask storefront (examples/storefront-flask/app.py) as a real server, end to end
against a real sessiond: the HTTP contract it shares with the Rust storefront."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import TENANT_MAX_SESSIONS_PER_USER, TENANT_TOKEN, start_storefront
from sessiond_client import NotFound

SET_COOKIE_SUFFIX = "; Secure; HttpOnly; Path=/; SameSite=Lax"
CLEAR_COOKIE = (
    "__Host-sid=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Secure; HttpOnly; Path=/;"
    " SameSite=Lax"
)
EXPIRED = {"error": "session expired"}

ENDPOINTS = [
    ("POST", "/cart/items", {"sku": "apple", "qty": 1}),
    ("GET", "/cart", None),
    ("POST", "/login", {"user": "mallory"}),
    ("POST", "/logout", None),
    ("POST", "/logout-all", None),
    ("GET", "/devices", None),
]


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def assert_expired_everywhere(storefront, dead_sid):
    """Every endpoint answers a dead cookie with 401 and leaves the cookie alone: the browser
    may hold a newer one by the time the answer arrives."""
    for method, path, body in ENDPOINTS:
        b = storefront.browser()
        r = b.request(method, path, body, sid=dead_sid)
        assert (r.status, r.json) == (401, EXPIRED), (method, path, r)
        assert r.set_cookies == [], (method, path)


def test_cart_without_cookie(storefront):
    r = storefront.browser().get("/cart")
    assert (r.status, r.json) == (200, {"cart": {}, "user": None})
    assert r.set_cookies == []


def test_add_items_creates_anonymous_session(storefront, client):
    b = storefront.browser("Shopper/1.0")
    r = b.post("/cart/items", {"sku": "apple", "qty": 1})
    assert (r.status, r.json) == (200, {"cart": {"apple": 1}})
    assert r.set_cookies == [f"__Host-sid={b.sid}{SET_COOKIE_SUFFIX}"]

    r = b.post("/cart/items", {"sku": "apple", "qty": 2})
    assert r.json == {"cart": {"apple": 3}}
    assert r.set_cookies == []  # same session, no new cookie
    r = b.post("/cart/items", {"sku": "pear", "qty": 5})
    assert r.json == {"cart": {"apple": 3, "pear": 5}}

    s = client.get(b.sid, peek=True)
    assert s.attributes == {"cart:apple": b"3", "cart:pear": b"5"}  # decimal ASCII
    assert s.user_id == ""
    assert s.client_ip == "127.0.0.1" and s.client_user_agent == "Shopper/1.0"
    assert s.version == 3  # created with apple, then two compare-and-set updates

    r = b.get("/cart")
    assert (r.status, r.json) == (200, {"cart": {"apple": 3, "pear": 5}, "user": None})

    # Lines that are not decimal ASCII are not cart lines; other attributes are ignored.
    client.update(b.sid, set={"cart:bad": "1_000", "cart:neg": "-1", "theme": "dark"})
    assert b.get("/cart").json["cart"] == {"apple": 3, "pear": 5}
    assert b.post("/cart/items", {"sku": "bad", "qty": 2}).json["cart"] == {"apple": 3, "bad": 2, "pear": 5}


def test_bad_requests(storefront):
    b = storefront.browser()
    for body in (
        {"sku": "", "qty": 1},
        {"sku": "x" * 65, "qty": 1},
        {"sku": "apple", "qty": 0},
        {"sku": "apple", "qty": 1001},
        {"sku": "apple"},
        {"qty": 1},
        {"sku": "a", "qty": "2"},
        {"sku": "a", "qty": True},
        ["not", "an", "object"],
    ):
        r = b.post("/cart/items", body)
        assert r.status == 400 and "error" in r.json, body
    r = b.post("/cart/items", {"sku": "x" * 64, "qty": 1000})
    assert (r.status, r.json) == (200, {"cart": {"x" * 64: 1000}})
    b.sid = None
    assert b.post("/login", {"user": ""}).json == {"error": "user must not be empty"}
    assert b.sid is None  # nothing was created


def test_concurrent_adds_lose_nothing(storefront, client):
    b = storefront.browser()
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    sid = b.sid
    n = 16
    start = threading.Barrier(n)
    statuses = []

    def add():
        start.wait(30)
        statuses.append(storefront.browser().post("/cart/items", {"sku": "apple", "qty": 1}, sid=sid).status)

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
    anon = b.sid

    r = b.post("/login", {"user": user})
    assert (r.status, r.json) == (200, {"user": user, "cart": {"apple": 2}})
    assert b.sid and b.sid != anon
    assert r.set_cookies == [f"__Host-sid={b.sid}{SET_COOKIE_SUFFIX}"]
    with pytest.raises(NotFound):
        client.get(anon)  # fixation-safe: the old ID is dead
    assert client.get(b.sid, peek=True).user_id == user

    assert b.get("/cart").json == {"cart": {"apple": 2}, "user": user}
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    assert b.get("/cart").json == {"cart": {"apple": 3}, "user": user}

    # The pre-login cookie is dead on every endpoint.
    assert_expired_everywhere(storefront, anon)


def test_late_request_with_the_pre_login_cookie_does_not_log_the_user_out(storefront, client):
    """The report, step by step: POST /cart/items gives cookie A, POST /login with A gives B,
    and a request still carrying A gets 401 without a Set-Cookie that would delete B."""
    user = unique("ivy")
    b = storefront.browser()
    b.post("/cart/items", {"sku": "apple", "qty": 1})
    a = b.sid
    b.post("/login", {"user": user})
    new = b.sid
    assert new and new != a
    r = b.get("/cart", sid=a)  # the late one
    assert (r.status, r.json) == (401, EXPIRED)
    assert r.set_cookies == []
    assert b.sid == new  # the jar still holds the login's cookie
    assert b.get("/cart").json == {"cart": {"apple": 1}, "user": user}


def test_login_without_cookie_creates_bound_session(storefront, client):
    user = unique("bea")
    b = storefront.browser()
    r = b.post("/login", {"user": user})
    assert (r.status, r.json) == (200, {"user": user, "cart": {}})
    assert r.set_cookies == [f"__Host-sid={b.sid}{SET_COOKIE_SUFFIX}"]
    assert client.get(b.sid, peek=True).user_id == user


def test_logout(storefront, client):
    b = storefront.browser()
    b.post("/login", {"user": unique("carl")})
    sid = b.sid
    r = b.post("/logout")
    assert (r.status, r.json) == (200, {"ok": True})
    assert r.set_cookies == [CLEAR_COOKIE]
    assert b.sid is None
    with pytest.raises(NotFound):
        client.get(sid)
    assert_expired_everywhere(storefront, sid)
    # Logged out, the browser is anonymous again.
    assert b.get("/cart").json == {"cart": {}, "user": None}


def test_devices_and_logout_all(storefront):
    user = unique("dana")
    laptop = storefront.browser("Laptop/1.0")
    phone = storefront.browser("Phone/2.0")
    laptop.post("/cart/items", {"sku": "apple", "qty": 1})
    before = int(time.time() * 1000)
    laptop.post("/login", {"user": user})
    phone.post("/login", {"user": user})
    after = int(time.time() * 1000)

    r = laptop.get("/devices")
    assert r.status == 200
    devices = r.json["devices"]
    assert [(d["ip"], d["user_agent"], d["current"]) for d in devices] == [
        ("127.0.0.1", "Laptop/1.0", True),
        ("127.0.0.1", "Phone/2.0", False),
    ]
    for d in devices:
        assert isinstance(d["last_seen"], int) and before - 1000 <= d["last_seen"] <= after + 5000
    assert [d["current"] for d in phone.get("/devices").json["devices"]] == [False, True]

    phone_sid = phone.sid
    r = laptop.post("/logout-all")
    assert (r.status, r.json) == (200, {"destroyed": 2})
    assert r.set_cookies == [CLEAR_COOKIE]
    # The other device's session is gone: 401, and its cookie is left alone.
    r = phone.get("/cart")
    assert (r.status, r.json) == (401, EXPIRED)
    assert r.set_cookies == []
    assert_expired_everywhere(storefront, phone_sid)


def test_not_logged_in(storefront):
    anon = storefront.browser()
    anon.post("/cart/items", {"sku": "kiwi", "qty": 1})
    for browser in (storefront.browser(), anon):  # no cookie at all, and an anonymous session
        for path, method in (("/logout-all", "POST"), ("/devices", "GET")):
            r = browser.request(method, path)
            assert (r.status, r.json) == (401, {"error": "not logged in"}), (path, browser.sid)
    assert anon.get("/cart").json["cart"] == {"kiwi": 1}  # still alive


def test_idle_timeout_from_env_expires_sessions(sessiond, workdir, client):
    """STOREFRONT_IDLE_TIMEOUT_SECONDS=1: the session dies after a second unused; the next
    request gets 401 and no Set-Cookie. Polls with peek (which does not slide)."""
    app = start_storefront(workdir, f"http://{sessiond.addr}", STOREFRONT_IDLE_TIMEOUT_SECONDS="1")
    try:
        b = app.browser()
        b.post("/cart/items", {"sku": "apple", "qty": 1})
        sid = b.sid
        assert client.get(sid, peek=True).idle_timeout.total_seconds() == 1
        deadline = time.monotonic() + 10
        while True:
            try:
                client.get(sid, peek=True)
            except NotFound:
                break
            assert time.monotonic() < deadline, "session outlived its 1 s idle timeout"
            time.sleep(0.05)
        r = b.get("/cart")
        assert (r.status, r.json) == (401, EXPIRED)
        assert r.set_cookies == []
    finally:
        app.process.stop()


def test_tenant_token_from_env(tenant_sessiond, workdir):
    """SESSIOND_TOKEN reaches a multi-tenant sessiond; without it the store refuses."""
    app = start_storefront(workdir, tenant_sessiond.addr, SESSIOND_TOKEN=TENANT_TOKEN)
    try:
        b = app.browser()
        r = b.post("/cart/items", {"sku": "fig", "qty": 3})
        assert (r.status, r.json) == (200, {"cart": {"fig": 3}})
        assert tenant_sessiond.client().get(b.sid, peek=True).attributes == {"cart:fig": b"3"}
        # A sessiond limit (this tenant allows 3 sessions per user) is 429 with its message.
        user = unique("popular")
        for _ in range(TENANT_MAX_SESSIONS_PER_USER):
            assert app.browser().post("/login", {"user": user}).status == 200
        r = app.browser().post("/login", {"user": user})
        assert r.status == 429 and "max_sessions_per_user" in r.json["error"], r.json
    finally:
        app.process.stop()
    app = start_storefront(workdir, tenant_sessiond.addr)
    try:
        r = app.browser().post("/cart/items", {"sku": "fig", "qty": 3})
        assert r.status == 503 and "credentials" in r.json["error"]
    finally:
        app.process.stop()


def test_sessiond_down_is_503(workdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    app = start_storefront(workdir, f"127.0.0.1:{port}")
    try:
        b = app.browser()
        assert b.get("/cart").json == {"cart": {}, "user": None}  # no cookie: no RPC needed
        r = b.post("/cart/items", {"sku": "apple", "qty": 1})
        assert (r.status, r.json) == (503, {"error": "session store unavailable"})
        r = b.get("/cart", sid="A" * 43)
        assert (r.status, r.json) == (503, {"error": "session store unavailable"})
        assert r.set_cookies == []  # an outage is not an expiry: the cookie is kept
    finally:
        app.process.stop()
