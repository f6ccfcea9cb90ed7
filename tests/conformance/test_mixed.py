"""The mixed run: four adapters' storefronts behind one sessiond serve one visitor, which
works only through the shared session encoding (README.md, "The interop contract"):

- a cart filled on the Express instance;
- a login on the Django one;
- items added on Flask and seen on axum;
- four tabs adding concurrently through all four, with no item lost;
- "log out all devices" on one of them, killing the sessions seen through the others."""

from __future__ import annotations

import threading
import time
from typing import Dict

import pytest

from contract import EXPIRED, assert_dead_everywhere, cart_lines
from sessiond_client import NotFound

# Who does what in the scenario: the adapter for each role.
FOUR = {"fill": "express", "login": "django", "add": "flask", "view": "axum"}
CASTS = [pytest.param(FOUR, id="express+django+flask+axum")]

TAB_ADDS = 10  # adds per tab in the concurrent part


@pytest.mark.parametrize("cast", CASTS)
def test_one_session_through_every_adapter(cast: Dict[str, str], running, client):
    fronts = {role: running(adapter) for role, adapter in cast.items()}
    every = list({id(f): f for f in fronts.values()}.values())  # each storefront once
    user = f"alice-{time.monotonic_ns()}"

    # A cart filled on one instance (Express's)...
    tab = fronts["fill"].browser("Laptop/1.0")
    tab.post("/cart/items", {"sku": "apple", "qty": 2})
    assert tab.post("/cart/items", {"sku": "pear", "qty": 1}).json == {"cart": {"apple": 2, "pear": 1}}
    anonymous = tab.sid

    # ... carried into a login on the Django one: a fresh ID, bound to the plain user name.
    # (The tab keeps its cookie jar as a load balancer sends it from one instance to the
    # next: here, the storefronts differ only by port.)
    tab.port = fronts["login"].port
    r = tab.post("/login", {"user": user})
    assert (r.status, r.json) == (200, {"user": user, "cart": {"apple": 2, "pear": 1}})
    assert tab.sid != anonymous
    with pytest.raises(NotFound):
        client.get(anonymous, peek=True)
    assert client.get(tab.sid, peek=True).user_id == user

    # Items added on Flask, seen on axum, and through every storefront alike.
    tab.port = fronts["add"].port
    assert tab.post("/cart/items", {"sku": "kiwi", "qty": 3}).status == 200
    cart = {"apple": 2, "kiwi": 3, "pear": 1}
    tab.port = fronts["view"].port
    assert tab.get("/cart").json == {"cart": cart, "user": user}
    for front in every:
        r = front.browser().get("/cart", sid=tab.sid)
        assert (r.status, r.json) == (200, {"cart": cart, "user": user})

    # Four tabs adding to the one cart at once, one through each role's storefront: none
    # lost.
    tab_fronts = [fronts[role] for role in FOUR]
    start = threading.Barrier(len(tab_fronts))
    statuses = []

    def shop(front):
        b = front.browser()
        start.wait(30)
        for _ in range(TAB_ADDS):
            statuses.append(b.post("/cart/items", {"sku": "apple", "qty": 1}, sid=tab.sid).status)

    tabs = [threading.Thread(target=shop, args=(front,)) for front in tab_fronts]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join(120)
    assert statuses == [200] * (TAB_ADDS * len(tabs))
    apples = 2 + TAB_ADDS * len(tabs)
    cart = {**cart, "apple": apples}
    for front in every:
        assert front.browser().get("/cart", sid=tab.sid).json == {"cart": cart, "user": user}
    stored = client.get(tab.sid, peek=True)
    assert cart_lines(stored.attributes) == {
        "cart:apple": str(apples).encode(),
        "cart:kiwi": b"3",
        "cart:pear": b"1",
    }

    # Another device of the user's, logged in elsewhere, and another user's session.
    phone = fronts["view"].browser("Phone/2.0")
    phone.post("/login", {"user": user})
    bystander = fronts["login"].browser()
    bystander.post("/login", {"user": f"bob-{time.monotonic_ns()}"})
    # A login on axum is a login on Django too (and on the others): the user is sessiond's.
    r = fronts["login"].browser().post("/cart/items", {"sku": "fig", "qty": 1}, sid=phone.sid)
    assert (r.status, r.json) == (200, {"cart": {"fig": 1}})
    for front in every:
        assert front.browser().get("/cart", sid=phone.sid).json == {"cart": {"fig": 1}, "user": user}
    for front in every:  # both devices, through any storefront
        r = front.browser().get("/devices", sid=tab.sid)
        devices = sorted(r.json["devices"], key=lambda d: d["user_agent"])
        assert [(d["user_agent"], d["current"]) for d in devices] == [
            ("Laptop/1.0", True),
            ("Phone/2.0", False),
        ], front

    # "Log out all devices" on one storefront ends both sessions, as every other sees them.
    tab.port = fronts["add"].port
    r = tab.post("/logout-all")
    assert (r.status, r.json) == (200, {"destroyed": 2})
    for front in every:
        r = front.browser().get("/cart", sid=phone.sid)
        assert (r.status, r.json) == (401, EXPIRED)
        assert_dead_everywhere(front, phone.sid)
        r = front.browser().get("/cart", sid=bystander.sid)
        assert r.status == 200 and r.json["user"].startswith("bob-"), front
