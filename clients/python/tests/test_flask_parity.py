"""SessiondSessionInterface behaves as Flask's own session does, against a real sessiond:
any value Flask's tagged JSON can encode (so flash() works), session.permanent with
PERMANENT_SESSION_LIFETIME, the SESSION_COOKIE_* settings, and a real Flask-Login login and
logout that regenerate the session."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest
from flask import Flask, flash, get_flashed_messages, jsonify, request, session
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from sessiond_client import NotFound
from sessiond_client.flask import SessiondSessionInterface, regenerate_on_login
from test_flask_session import COOKIE, Tab


def cookie_attributes(header: str) -> dict:
    """'n=v; Secure; Path=/' -> {'n': 'v', 'secure': True, 'path': '/'} (names lowercased
    but the first)."""
    first, *rest = [p.strip() for p in header.split(";")]
    name, _, value = first.partition("=")
    attrs = {name: value}
    for part in rest:
        key, eq, val = part.partition("=")
        attrs[key.lower()] = val if eq else True
    return attrs


def make_app(client, **config) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    app.session_interface = SessiondSessionInterface(client)

    @app.post("/set")
    def set_():
        for k, v in request.get_json().items():
            session[k] = v
        return "ok"

    @app.post("/flash/<message>")
    def flash_(message):
        flash(message, "info")
        return "ok"

    @app.get("/flashes")
    def flashes():
        return jsonify(get_flashed_messages(with_categories=True))

    @app.post("/typed")
    def typed():
        session["tuple"] = (1, "two")
        session["bytes"] = b"\x00\xff"
        session["when"] = datetime(2026, 12, 1, 3, 4, 5, tzinfo=timezone.utc)
        session["uuid"] = uuid.UUID(int=7)
        session["nested"] = {"list": [1, 2.5, None, True], "text": "Zoë"}
        return "ok"

    @app.get("/typed")
    def typed_read():
        return jsonify(
            tuple=session["tuple"] == (1, "two"),
            bytes=session["bytes"] == b"\x00\xff",
            when=session["when"] == datetime(2026, 12, 1, 3, 4, 5, tzinfo=timezone.utc),
            uuid=session["uuid"] == uuid.UUID(int=7),
            nested=session["nested"],
        )

    @app.post("/append/<item>")
    def append(item):
        session["nested"]["list"].append(item)  # changed in place, not set again
        return "ok"

    @app.post("/set-then-change")
    def set_then_change():
        cart = []
        session["cart"] = cart
        cart.append("set")  # after the assignment, as Flask's own session allows
        session["cart"].append("read")  # and through the session
        return "ok"

    @app.get("/read/<key>")
    def read(key):
        value = session.get(key)
        return jsonify(type=type(value).__name__, value=repr(value))

    @app.post("/permanent/<on>")
    def permanent(on):
        session.permanent = on == "on"
        return "ok"

    return app


@pytest.fixture(scope="module")
def app(client):
    return make_app(client, PERMANENT_SESSION_LIFETIME=timedelta(days=3))


def test_flash_messages_survive_one_redirect(app):
    tab = Tab(app)
    assert tab.call("POST", "/flash/saved").status_code == 200
    tab.call("POST", "/flash/again")
    assert tab.call("GET", "/flashes").json == [["info", "saved"], ["info", "again"]]
    assert tab.call("GET", "/flashes").json == []  # shown once, then gone


def test_tagged_json_values_round_trip_and_in_place_changes_are_written(app, client):
    tab = Tab(app)
    tab.call("POST", "/typed")
    assert tab.call("GET", "/typed").json == {
        "tuple": True,
        "bytes": True,
        "when": True,
        "uuid": True,
        "nested": {"list": [1, 2.5, None, True], "text": "Zoë"},
    }
    # Plain values are plain JSON, readable by any client.
    assert client.get(tab.sid, peek=True).attributes["nested"] == (
        b'{"list":[1,2.5,null,true],"text":"Zo\\u00eb"}'
    )
    v = client.get(tab.sid, peek=True).version
    tab.call("POST", "/append/x")
    assert tab.call("GET", "/typed").json["nested"]["list"] == [1, 2.5, None, True, "x"]
    assert client.get(tab.sid, peek=True).version == v + 1
    tab.call("GET", "/typed")  # reading a list without changing it writes nothing
    assert client.get(tab.sid, peek=True).version == v + 1


def test_a_value_changed_after_it_was_set_is_written_as_it_ends_up(app, client):
    tab = Tab(app)
    tab.call("POST", "/set-then-change")
    assert client.get(tab.sid, peek=True).attributes["cart"] == b'["set","read"]'


def test_values_stored_raw_by_earlier_versions_still_read(app, client):
    s = client.create(attributes={"text": "dark", "blob": b"\xff\x00", "digits": "2"})
    tab = Tab(app, s.id)
    assert tab.call("GET", "/read/text").json == {"type": "str", "value": "'dark'"}
    assert tab.call("GET", "/read/blob").json == {"type": "bytes", "value": "b'\\xff\\x00'"}
    # Raw text that is valid JSON reads as that JSON.
    assert tab.call("GET", "/read/digits").json == {"type": "int", "value": "2"}


def test_permanent_session_gets_a_persistent_cookie(app, client):
    tab = Tab(app)
    tab.call("POST", "/set", json={"a": "1"})
    (first,) = tab.set_cookies
    assert "expires" not in cookie_attributes(first)  # a browser-session cookie

    before = datetime.now(timezone.utc)
    tab.call("POST", "/permanent/on")
    (header,) = tab.set_cookies
    attrs = cookie_attributes(header)
    assert attrs[COOKIE] == tab.sid
    expires = parsedate_to_datetime(attrs["expires"])
    lifetime = timedelta(days=3)
    assert before + lifetime - timedelta(seconds=1) <= expires
    assert expires <= datetime.now(timezone.utc) + lifetime + timedelta(seconds=1)
    assert client.get(tab.sid, peek=True).attributes["_permanent"] == b"true"

    tab.call("POST", "/set", json={"b": "2"})
    assert tab.set_cookies == []  # same ID, same permanence: the cookie is not sent again

    tab.call("POST", "/permanent/off")
    (header,) = tab.set_cookies
    assert "expires" not in cookie_attributes(header)


def test_cookie_settings_from_the_app_config(client):
    app = make_app(
        client,
        SESSION_COOKIE_NAME="shop_sid",
        SESSION_COOKIE_DOMAIN="shop.example",
        SESSION_COOKIE_PATH="/shop",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=False,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PARTITIONED=True,
    )
    tab = Tab(app, cookie="shop_sid")
    tab.call("POST", "/set", json={"a": "1"})
    (header,) = tab.set_cookies
    assert cookie_attributes(header) == {
        "shop_sid": tab.sid,
        "domain": "shop.example",
        "secure": True,
        "path": "/shop",
        "samesite": "Strict",
        "partitioned": True,
    }
    assert tab.call("GET", "/read/a").json == {"type": "str", "value": "'1'"}  # read back

    # Flask's defaults (HttpOnly on, Secure off) apply to a name without a prefix.
    plain = make_app(client, SESSION_COOKIE_NAME="sid")
    tab = Tab(plain, cookie="sid")
    tab.call("POST", "/set", json={"a": "1"})
    (header,) = tab.set_cookies
    assert cookie_attributes(header) == {
        "sid": tab.sid,
        "httponly": True,
        "path": "/",
        "samesite": "Lax",
    }


def test_a_host_prefixed_cookie_with_a_domain_is_refused_by_name(client):
    app = make_app(client, SESSION_COOKIE_DOMAIN="shop.example")
    app.testing = True
    with pytest.raises(ValueError, match="SESSION_COOKIE_DOMAIN.*__Host-"):
        Tab(app).call("POST", "/set", json={"a": "1"})


class User(UserMixin):
    def __init__(self, name: str):
        self.id = name


@pytest.fixture(scope="module")
def login_app(client):
    app = make_app(client)
    app.secret_key = "test only"  # Flask-Login's remember-me and flash need one
    manager = LoginManager(app)
    manager.user_loader(User)
    regenerate_on_login(app)

    @app.post("/login/<name>")
    def login(name):
        assert login_user(User(name), remember=request.args.get("remember") == "1")
        return jsonify(sid=session.sid)

    @app.post("/logout")
    def logout():
        logout_user()
        return jsonify(sid=session.sid)

    @app.get("/me")
    def me():
        return jsonify(user=current_user.get_id(), sessiond_user=session.user_id)

    return app


def test_flask_login_login_and_logout_regenerate_the_session(login_app, client):
    tab = Tab(login_app)
    tab.call("POST", "/set", json={"cart": ["apple"]})
    anonymous = tab.sid
    assert tab.call("GET", "/me").json == {"user": None, "sessiond_user": None}

    r = tab.call("POST", "/login/alice")
    assert r.status_code == 200
    logged_in = tab.sid
    assert logged_in == r.json["sid"] != anonymous
    with pytest.raises(NotFound):
        client.get(anonymous)
    s = client.get(logged_in, peek=True)
    assert s.user_id == "alice"
    assert s.attributes["_user_id"] == b'"alice"' and s.attributes["cart"] == b'["apple"]'
    assert tab.call("GET", "/me").json == {"user": "alice", "sessiond_user": "alice"}

    r = tab.call("POST", "/logout")
    logged_out = tab.sid
    assert logged_out == r.json["sid"] not in (anonymous, logged_in)
    with pytest.raises(NotFound):
        client.get(logged_in)
    s = client.get(logged_out, peek=True)
    assert s.user_id == "" and "_user_id" not in s.attributes
    assert s.attributes["cart"] == b'["apple"]'
    assert tab.call("GET", "/me").json == {"user": None, "sessiond_user": None}
    # The logged-in cookie replayed: nobody.
    assert Tab(login_app, logged_in).call("GET", "/me").json == {"user": None, "sessiond_user": None}


def test_a_remember_me_cookie_logs_in_with_a_fresh_bound_session(login_app, client):
    tab = Tab(login_app)
    tab.call("POST", "/login/bob?remember=1")
    remember = [h for h in tab.set_cookies if h.startswith("remember_token=")]
    assert remember, tab.set_cookies
    token = remember[0].split(";", 1)[0]

    # The browser restarted: the session cookie is gone, the remember-me cookie is not.
    later = Tab(login_app)
    r = later.call("GET", "/me", headers={"Cookie": token})
    assert r.json == {"user": "bob", "sessiond_user": "bob"}
    assert later.sid and later.sid != tab.sid
    assert client.get(later.sid, peek=True).user_id == "bob"


def test_values_read_by_the_fast_path_equal_what_flasks_serializer_reads(client):
    from flask.sessions import session_json_serializer

    from sessiond_client.flask import _tagged_json_loads

    app = make_app(client)
    values = [
        "3", 3, 2.5, None, True, "Zoë", "a{b", [1, "two", None], [[1], []], {"a": 1},
        (1, "two"), b"\x00\xff", uuid.UUID(int=7), {"list": [(1,), {"x": b"y"}]},
        datetime(2026, 12, 1, 3, 4, 5, tzinfo=timezone.utc),
    ]
    with app.app_context():
        assert app.session_interface._value_loads(app) is _tagged_json_loads
        for value in values:
            text = session_json_serializer.dumps(value)
            assert _tagged_json_loads(text) == session_json_serializer.loads(text) == value, text

        class Provider(type(app.json)):
            def loads(self, s, **kwargs):
                return "custom"

        app.json = Provider(app)  # an app's own JSON provider is used as it is
        assert app.session_interface._value_loads(app) == session_json_serializer.loads
