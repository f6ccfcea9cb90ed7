"""The Flask storefront (examples/storefront-flask/app.py) as a real server, against a real
sessiond: what is particular to it. The HTTP contract it shares with the other adapters'
storefronts (cart, login, logout, devices, expiry, errors, and a mixed run with them) is
checked by the conformance suite, tests/conformance (run.sh there)."""

from __future__ import annotations

import socket

from conftest import start_storefront

SET_COOKIE_SUFFIX = "; Secure; HttpOnly; Path=/; SameSite=Lax"
CLEAR_COOKIE = (
    "__Host-sid=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Secure; HttpOnly; Path=/;"
    " SameSite=Lax"
)


def test_cart_is_stored_exactly(storefront, client):
    """The cookie as werkzeug writes it; the session holds the cart lines and nothing else,
    written by one Create and then one compare-and-set Update per add."""
    b = storefront.browser("Shopper/1.0")
    r = b.post("/cart/items", {"sku": "apple", "qty": 1})
    assert r.set_cookies == [f"__Host-sid={b.sid}{SET_COOKIE_SUFFIX}"]
    b.post("/cart/items", {"sku": "apple", "qty": 2})
    b.post("/cart/items", {"sku": "pear", "qty": 5})
    s = client.get(b.sid, peek=True)
    assert s.attributes == {"cart:apple": b"3", "cart:pear": b"5"}
    assert s.version == 3

    # A line that is not decimal ASCII counts as 0 when added to.
    client.update(b.sid, set={"cart:bad": "1_000", "cart:neg": "-1"})
    assert b.get("/cart").json["cart"] == {"apple": 3, "pear": 5}
    assert b.post("/cart/items", {"sku": "bad", "qty": 2}).json["cart"] == {"apple": 3, "bad": 2, "pear": 5}


def test_logout_clears_the_cookie(storefront):
    b = storefront.browser()
    b.post("/login", {"user": "carl"})
    assert b.post("/logout").set_cookies == [CLEAR_COOKIE]


def test_tenant_without_token_is_503(tenant_sessiond, workdir):
    """A multi-tenant sessiond refuses a storefront with no SESSIOND_TOKEN: 503, saying so."""
    app = start_storefront(workdir, tenant_sessiond.addr)
    try:
        r = app.browser().post("/cart/items", {"sku": "fig", "qty": 3})
        assert r.status == 503 and "credentials" in r.json["error"]
    finally:
        app.process.stop()


def test_sessiond_down(workdir):
    """No cookie, no RPC: the empty cart is served without sessiond. Otherwise 503 with
    "session store unavailable", and the cookie is kept."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    app = start_storefront(workdir, f"127.0.0.1:{port}")
    try:
        b = app.browser()
        assert b.get("/cart").json == {"cart": {}, "user": None}
        r = b.post("/cart/items", {"sku": "apple", "qty": 1})
        assert (r.status, r.json) == (503, {"error": "session store unavailable"})
        r = b.get("/cart", sid="A" * 43)
        assert (r.status, r.json) == (503, {"error": "session store unavailable"})
        assert r.set_cookies == []
    finally:
        app.process.stop()
