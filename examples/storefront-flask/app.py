"""Storefront demo: a cart and a login kept in sessiond, behind a Flask app.

It speaks the same HTTP contract as the Rust (axum) storefront, so both can run against one
sessiond and share sessions through the same cookie:

  POST /cart/items {"sku": "apple", "qty": 1}  -> {"cart": {"apple": 1}}
  GET  /cart                                   -> {"cart": {...}, "user": "alice" | null}
  POST /login {"user": "alice"}                -> {"user": "alice", "cart": {...}}
  POST /logout                                 -> {"ok": true}
  POST /logout-all                             -> {"destroyed": n}
  GET  /devices                                -> {"devices": [{"ip", "user_agent", "last_seen", "current"}]}

Session conventions: the cookie `__Host-sid` holds the session ID; cart lines are the
attributes `cart:<sku>` = quantity in decimal ASCII; the logged-in user is the session's
user_id (bound by Regenerate at login). A cookie whose session is gone gets 401
{"error": "session expired"} on every endpoint, and no Set-Cookie: the request may be a late
one from before a login in another tab, and clearing the cookie would delete the new one.

Configuration (environment): SESSIOND_ADDR (127.0.0.1:7420 or http://127.0.0.1:7420),
PORT (0 = ephemeral), SESSIOND_TOKEN (multi-tenant sessiond), STOREFRONT_IDLE_TIMEOUT_SECONDS
(idle timeout asked for at Create). Prints `listening on http://127.0.0.1:PORT` once ready.

Run:  SESSIOND_ADDR=127.0.0.1:7420 PORT=8080 target/python-venv/bin/python examples/storefront-flask/app.py
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from typing import Dict, Mapping, Optional

from flask import Flask, jsonify, request
from flask import session as _session
from werkzeug.serving import make_server

from sessiond_client import (
    Conflict,
    ResourceExhausted,
    SessionClient,
    SessiondError,
    Unauthenticated,
    Unavailable,
    to_unix_ms,
)
from sessiond_client.flask import SessiondSession, SessiondSessionInterface

CART_PREFIX = "cart:"
MAX_SKU_BYTES = 64
MAX_QTY = 1000
DIGITS = re.compile(rb"[0-9]{1,19}")


def session() -> SessiondSession:
    return _session._get_current_object()  # type: ignore[return-value]


def error(status: int, message: str):
    return jsonify({"error": message}), status


def cart_of(attributes: Mapping[str, bytes]) -> Dict[str, int]:
    """The cart lines of a session's attributes, by SKU: {"apple": 2}. Unparsable lines
    (not decimal ASCII) are skipped."""
    cart = {}
    for key, value in sorted(attributes.items()):
        qty = parse_qty(value)
        if key.startswith(CART_PREFIX) and qty is not None:
            cart[key[len(CART_PREFIX):]] = qty
    return cart


def parse_qty(value: bytes) -> Optional[int]:
    """A cart line's quantity: decimal ASCII digits, nothing else (no sign, space or "_")."""
    return int(value) if DIGITS.fullmatch(value) else None


def create_app(client: SessionClient, idle_timeout: Optional[float] = None) -> Flask:
    app = Flask(__name__)
    app.json.sort_keys = False
    app.session_interface = SessiondSessionInterface(client, idle_timeout=idle_timeout)

    @app.before_request
    def refuse_dead_sessions():
        # A cookie whose session is gone: 401, and the cookie is left alone (a newer one may
        # have replaced it in the browser already).
        s = session()
        if s.had_cookie and s.expired:
            return error(401, "session expired")
        return None

    @app.post("/cart/items")
    def add_item():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, "expected a JSON object")
        sku, qty = body.get("sku"), body.get("qty")
        # The same limits as the Rust storefront.
        if (
            not isinstance(sku, str)
            or not 1 <= len(sku.encode("utf-8")) <= MAX_SKU_BYTES
            or not isinstance(qty, int)
            or isinstance(qty, bool)
            or not 1 <= qty <= MAX_QTY
        ):
            return error(400, f"sku must be 1-{MAX_SKU_BYTES} bytes and qty 1-{MAX_QTY}")
        key = CART_PREFIX + sku

        def add(attributes: Dict[str, bytes]):
            have = parse_qty(attributes.get(key, b"0")) or 0
            return {key: str(have + qty)}

        # Get (already done by the 401 check) + Update with expected_version, again on
        # Conflict: concurrent adds to one cart never lose one. Creates the session if none.
        written = session().compare_and_set(add)
        return jsonify({"cart": cart_of(written.attributes)})

    @app.get("/cart")
    def get_cart():
        remote = session().remote
        if remote is None:
            return jsonify({"cart": {}, "user": None})
        return jsonify({"cart": cart_of(remote.attributes), "user": remote.user_id or None})

    @app.post("/login")
    def login():
        body = request.get_json(silent=True)
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            return error(400, "user must not be empty")
        # Fixation-safe: a fresh ID bound to the user, the cart carried over, the old ID dead.
        fresh = session().regenerate(user_id=user)
        return jsonify({"user": fresh.user_id, "cart": cart_of(fresh.attributes)})

    @app.post("/logout")
    def logout():
        session().destroy()
        return jsonify({"ok": True})

    @app.post("/logout-all")
    def logout_all():
        if session().user_id is None:
            return error(401, "not logged in")
        return jsonify({"destroyed": session().destroy_all_for_user()})

    @app.get("/devices")
    def devices():
        s = session()
        user = s.user_id
        if user is None:
            return error(401, "not logged in")
        listed = client.list_user_sessions(user)
        return jsonify(
            {
                "devices": [
                    {
                        "ip": d.client_ip,
                        "user_agent": d.client_user_agent,
                        "last_seen": to_unix_ms(d.last_access_at),
                        "current": d.id == s.sid,
                    }
                    for d in listed
                ]
            }
        )

    @app.errorhandler(SessiondError)
    def sessiond_failed(err: SessiondError):
        # As the Rust storefront: a limit is 429 with its message, anything else 503.
        app.logger.warning("sessiond call failed: %s", err)
        if isinstance(err, ResourceExhausted):
            return error(429, err.message)
        if isinstance(err, Unavailable):
            return error(503, "session store unavailable")
        if isinstance(err, Conflict):
            return error(503, "too much contention on this session, try again")
        if isinstance(err, Unauthenticated):
            return error(503, "session store refused our credentials")
        return error(503, f"session store error: {err}")

    return app


def main() -> int:
    def env(name: str) -> Optional[str]:
        return os.environ.get(name) or None  # empty = unset

    addr = env("SESSIOND_ADDR") or "127.0.0.1:7420"
    port = int(env("PORT") or "8080")
    token = env("SESSIOND_TOKEN")
    idle = env("STOREFRONT_IDLE_TIMEOUT_SECONDS")
    idle_timeout = float(idle) if idle else None
    if idle_timeout is not None and idle_timeout <= 0:
        print("STOREFRONT_IDLE_TIMEOUT_SECONDS must be positive", file=sys.stderr)
        return 2

    client = SessionClient(addr, token=token)
    app = create_app(client, idle_timeout=idle_timeout)
    server = make_server("127.0.0.1", port, app, threaded=True)

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
