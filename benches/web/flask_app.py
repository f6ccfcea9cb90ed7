"""The storefront's session routes in Flask, for benches/web-compare.sh (FLASK=1): the same
handlers over sessiond (sessiond_client.flask.SessiondSessionInterface) or over Redis
(Flask-Session's Redis interface), served by gunicorn.

Routes (the storefront's contract, as in benches/web/src/shop.rs):
  GET  /cart                                  -> {"cart": {sku: qty}, "user": ...}
  POST /cart/items {"sku": "apple", "qty": 1} -> {"cart": {...}}
  POST /login {"user": "alice"}               -> {"user": "alice", "cart": {...}}

Each side does what its interface does by default. On sessiond, a cart line is the attribute
"cart:<sku>" and a request writes back only the keys it changed (one Update); login is
session.regenerate(user). On Flask-Session, the cart is one dict under "cart", the whole
session is serialized and SET after every request (its defaults: permanent sessions,
refreshed on each request), and login is session_interface.regenerate plus the user stored.

Environment: WEB_STORE (sessiond or redis), SESSIOND_ADDR (127.0.0.1:7420), REDIS_URL
(redis://127.0.0.1:6379). The cookie is "sid" (plain HTTP on loopback: not Secure).

  WEB_STORE=sessiond gunicorn -b 127.0.0.1:8080 'flask_app:create_app()'
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Dict, Optional

from flask import Flask, jsonify, request, session

COOKIE = "sid"
IDLE = timedelta(minutes=30)
CART_PREFIX = "cart:"
MAX_SKU_BYTES = 64
MAX_QTY = 1000


class SessiondCart:
    """Cart lines as sessiond attributes; the interface writes back the changed keys."""

    def user(self) -> Optional[str]:
        return session.user_id or None

    def cart(self) -> Dict[str, int]:
        return {
            k[len(CART_PREFIX):]: int(v)
            for k, v in session.items()
            if k.startswith(CART_PREFIX) and str(v).isdigit()
        }

    def line(self, sku: str) -> int:
        v = session.get(CART_PREFIX + sku)
        return int(v) if v is not None and str(v).isdigit() else 0

    def set_line(self, sku: str, qty: int) -> None:
        session[CART_PREFIX + sku] = str(qty)

    def login(self, user: str) -> None:
        session.regenerate(user)


class FlaskSessionCart:
    """The cart as one dict in a Flask-Session session, saved whole."""

    def __init__(self, app: Flask):
        self.app = app

    def user(self) -> Optional[str]:
        return session.get("user")

    def cart(self) -> Dict[str, int]:
        return dict(session.get("cart") or {})

    def line(self, sku: str) -> int:
        return int(self.cart().get(sku, 0))

    def set_line(self, sku: str, qty: int) -> None:
        cart = self.cart()
        cart[sku] = qty
        session["cart"] = cart

    def login(self, user: str) -> None:
        self.app.session_interface.regenerate(session)
        session["user"] = user


def create_app(store: Optional[str] = None) -> Flask:
    store = store or os.environ.get("WEB_STORE") or ""
    app = Flask(__name__)
    if store == "sessiond":
        from sessiond_client import SessionClient
        from sessiond_client.flask import SessiondSessionInterface

        client = SessionClient(os.environ.get("SESSIOND_ADDR") or "127.0.0.1:7420")
        app.session_interface = SessiondSessionInterface(
            client, idle_timeout=IDLE, cookie_name=COOKIE, secure=False
        )
        carts = SessiondCart()
    elif store == "redis":
        import redis
        from flask_session import Session

        app.config.update(
            SESSION_TYPE="redis",
            SESSION_REDIS=redis.Redis.from_url(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379"),
            SESSION_COOKIE_NAME=COOKIE,
            PERMANENT_SESSION_LIFETIME=IDLE,
        )
        Session(app)
        carts = FlaskSessionCart(app)
    else:
        raise SystemExit(f"WEB_STORE must be sessiond or redis, not {store!r}")

    def error(status: int, message: str):
        return jsonify({"error": message}), status

    @app.get("/cart")
    def view_cart():
        return jsonify({"cart": carts.cart(), "user": carts.user()})

    @app.post("/cart/items")
    def add_to_cart():
        body = request.get_json(silent=True)
        sku = body.get("sku") if isinstance(body, dict) else None
        qty = body.get("qty") if isinstance(body, dict) else None
        if (
            not isinstance(sku, str)
            or not 1 <= len(sku.encode("utf-8")) <= MAX_SKU_BYTES
            or not isinstance(qty, int)
            or isinstance(qty, bool)
            or not 1 <= qty <= MAX_QTY
        ):
            return error(400, f"sku must be 1-{MAX_SKU_BYTES} bytes and qty 1-{MAX_QTY}")
        carts.set_line(sku, carts.line(sku) + qty)
        return jsonify({"cart": carts.cart()})

    @app.post("/login")
    def login():
        body = request.get_json(silent=True)
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            return error(400, "user must not be empty")
        carts.login(user)
        return jsonify({"user": user, "cart": carts.cart()})

    return app
