"""SessiondSessionInterface in a Flask app (in process, Flask's test client) against a real
sessiond: lazy loading, changed-keys-only writes, create on first data, regenerate, destroy,
and what each response does to the cookie."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from flask import Flask, jsonify, request, session

from sessiond_client import NotFound, SessionClient
from sessiond_client.flask import SessiondSessionInterface

COOKIE = "__Host-sid"
SET_COOKIE_SUFFIX = "; Secure; HttpOnly; Path=/; SameSite=Lax"
CLEAR_COOKIE = (
    "__Host-sid=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Secure; HttpOnly; Path=/;"
    " SameSite=Lax"
)


def stored(**values):
    """Attributes as the interface stores them: each value as compact (tagged) JSON."""
    return {k: json.dumps(v, separators=(",", ":")).encode() for k, v in values.items()}


class CountingClient(SessionClient):
    """Counts the RPCs the interface makes."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = Counter()

    def _run(self, call):
        self.calls[call.rpc] += 1
        return super()._run(call)


@pytest.fixture(scope="module")
def rpc(sessiond):
    c = CountingClient(sessiond.addr)
    yield c
    c.close()


@pytest.fixture(scope="module")
def gates():
    return {"loaded": threading.Event(), "release": threading.Event()}


@pytest.fixture(scope="module")
def app(rpc, gates):
    app = Flask(__name__)
    app.session_interface = SessiondSessionInterface(rpc)

    @app.get("/nothing")
    def nothing():
        return "ok"

    @app.get("/read")
    def read():
        return jsonify(
            data=dict(session),
            user=session.user_id,
            version=session.version,
            expired=session.expired,
        )

    @app.post("/set")
    def set_():
        for k, v in request.get_json().items():
            session[k] = v
        return "ok"

    @app.post("/delete/<key>")
    def delete(key):
        del session[key]
        return "ok"

    @app.post("/set-after-gate/<key>")
    def set_after_gate(key):
        # Reads the session, then waits while another request changes it, then writes one key.
        assert "keep" in session
        gates["loaded"].set()
        assert gates["release"].wait(30)
        session[key] = "from-slow"
        return "ok"

    @app.post("/end-then-set/<key>")
    def end_then_set(key):
        # Reads the session; it ends elsewhere (a login in another tab, "log out
        # everywhere"); then the request writes: the write-back meets NOT_FOUND.
        sid = session.sid
        assert sid is not None and rpc.destroy(sid)
        session[key] = "written-after-the-end"
        return "ok"

    @app.post("/login/<user>")
    def login(user):
        session["pending"] = "written-after-regenerate"
        fresh = session.regenerate(user)
        return jsonify(id=fresh.id)

    @app.post("/logout")
    def logout():
        return jsonify(existed=session.destroy())

    @app.post("/logout-all")
    def logout_all():
        return jsonify(n=session.destroy_all_for_user())

    @app.post("/interface/login/<user>")
    def interface_login(user):
        return jsonify(id=app.session_interface.regenerate(user).id)

    @app.post("/interface/logout")
    def interface_logout():
        return jsonify(existed=app.session_interface.destroy())

    @app.post("/bad-value")
    def bad_value():
        session["n"] = object()
        return "unreachable"

    return app


class Tab:
    """One browser tab: the Flask test client with the cookie kept by hand, so that the
    exact Set-Cookie headers can be checked."""

    def __init__(self, app, sid=None, cookie=COOKIE):
        self.client = app.test_client(use_cookies=False)
        self.sid = sid
        self.cookie = cookie
        self.set_cookies = []

    def call(self, method, path, **kw):
        headers = kw.pop("headers", {})
        if self.sid:
            headers["Cookie"] = f"{self.cookie}={self.sid}"
        resp = self.client.open(path, method=method, headers=headers, **kw)
        self.set_cookies = resp.headers.getlist("Set-Cookie")
        for h in self.set_cookies:
            name, _, rest = h.partition("=")
            if name == self.cookie:
                self.sid = rest.split(";", 1)[0] or None
        return resp


def fresh_session(app, **data):
    tab = Tab(app)
    tab.call("POST", "/set", json=data or {"keep": "yes"})
    assert tab.sid
    return tab


def test_no_cookie_no_data_means_no_rpc_and_no_cookie(app, rpc):
    rpc.calls.clear()
    tab = Tab(app)
    assert tab.call("GET", "/nothing").status_code == 200
    r = tab.call("GET", "/read")
    assert r.json == {"data": {}, "user": None, "version": None, "expired": False}
    assert tab.set_cookies == []
    assert sum(rpc.calls.values()) == 0


def test_first_data_creates_session_and_sets_cookie(app, rpc, client):
    rpc.calls.clear()
    tab = Tab(app)
    tab.call("POST", "/set", json={"theme": "dark", "name": "Zoë"}, headers={"User-Agent": "ua/1"})
    assert rpc.calls == Counter(Create=1)
    assert len(tab.set_cookies) == 1
    assert tab.set_cookies[0] == f"{COOKIE}={tab.sid}{SET_COOKIE_SUFFIX}"
    s = client.get(tab.sid, peek=True)
    assert s.attributes == stored(theme="dark", name="Zoë")  # each value as JSON
    assert s.version == 1 and s.user_id == ""
    assert s.client_ip == "127.0.0.1" and s.client_user_agent == "ua/1"
    assert tab.call("GET", "/read").json["data"] == {"theme": "dark", "name": "Zoë"}


def test_untouched_session_is_not_loaded(app, rpc):
    tab = fresh_session(app)
    rpc.calls.clear()
    tab.call("GET", "/nothing")
    assert sum(rpc.calls.values()) == 0
    assert tab.set_cookies == []


def test_one_update_per_changing_request_and_version_plus_one(app, rpc, client):
    tab = fresh_session(app, keep="yes", a="1")
    v = client.get(tab.sid, peek=True).version

    rpc.calls.clear()
    tab.call("POST", "/set", json={"b": "2", "c": "3"})
    assert rpc.calls == Counter(Update=1)  # blind write: no Get, one Update
    assert client.get(tab.sid, peek=True).version == v + 1

    rpc.calls.clear()
    tab.call("GET", "/read")
    assert rpc.calls == Counter(Get=1)  # reading changes nothing
    assert client.get(tab.sid, peek=True).version == v + 1

    rpc.calls.clear()
    tab.call("POST", "/delete/a")
    assert rpc.calls == Counter(Get=1, Update=1)
    s = client.get(tab.sid, peek=True)
    assert s.version == v + 2
    assert s.attributes == stored(keep="yes", b="2", c="3")
    assert tab.set_cookies == []  # same ID: the cookie is not re-sent


def test_interleaved_requests_keep_each_others_keys(app, client, gates):
    """A slow request loads the session, a fast one changes other keys meanwhile; the slow
    one then writes only its own key, so nothing the fast one wrote is undone."""
    tab = fresh_session(app, keep="yes", shared="orig")
    v = client.get(tab.sid, peek=True).version
    gates["loaded"].clear()
    gates["release"].clear()

    slow = Tab(app, tab.sid)
    errors = []

    def run_slow():
        try:
            assert slow.call("POST", "/set-after-gate/slow").status_code == 200
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=run_slow)
    t.start()
    assert gates["loaded"].wait(30)
    fast = Tab(app, tab.sid)
    fast.call("POST", "/set", json={"fast": "1", "shared": "from-fast"})
    gates["release"].set()
    t.join(30)
    assert not t.is_alive() and not errors

    s = client.get(tab.sid, peek=True)
    assert s.attributes == stored(keep="yes", shared="from-fast", fast="1", slow="from-slow")
    assert s.version == v + 2  # one per changing request


def test_regenerate_on_login(app, client):
    tab = fresh_session(app, cart="apple")
    old = tab.sid
    r = tab.call("POST", "/login/alice")
    new = r.json["id"]
    assert tab.sid == new != old
    assert tab.set_cookies == [f"{COOKIE}={new}{SET_COOKIE_SUFFIX}"]
    with pytest.raises(NotFound):
        client.get(old)
    s = client.get(new, peek=True)
    assert s.user_id == "alice"
    assert s.attributes == stored(cart="apple", pending="written-after-regenerate")
    assert tab.call("GET", "/read").json["user"] == "alice"
    # The old cookie is dead for the app too, and a late answer to it leaves the cookie alone.
    stale = Tab(app, old)
    assert stale.call("GET", "/read").json["expired"] is True
    assert stale.set_cookies == []


def test_login_without_session_creates_bound_session(app, client):
    tab = Tab(app)
    tab.call("POST", "/login/dave")
    s = client.get(tab.sid, peek=True)
    assert s.user_id == "dave" and s.attributes == stored(pending="written-after-regenerate")


def test_destroy_clears_cookie(app, client):
    tab = fresh_session(app)
    sid = tab.sid
    assert tab.call("POST", "/logout").json == {"existed": True}
    assert tab.set_cookies == [CLEAR_COOKIE] and tab.sid is None
    with pytest.raises(NotFound):
        client.get(sid)


def test_destroy_all_for_user(app, client):
    a, b = fresh_session(app), fresh_session(app)
    a.call("POST", "/login/erin")
    b.call("POST", "/login/erin")
    b_sid = b.sid
    assert a.call("POST", "/logout-all").json == {"n": 2}
    assert a.set_cookies == [CLEAR_COOKIE]
    with pytest.raises(NotFound):
        client.get(b_sid)
    assert b.call("GET", "/read").json["expired"] is True
    assert b.set_cookies == []


def test_gone_cookie_is_left_alone_and_new_data_starts_fresh(app, client):
    tab = fresh_session(app, old="x")
    dead = tab.sid
    client.destroy(dead)
    r = tab.call("GET", "/read")
    assert r.json == {"data": {}, "user": None, "version": None, "expired": True}
    assert tab.set_cookies == []
    assert tab.call("POST", "/logout").json == {"existed": False}
    assert tab.set_cookies == []

    # A write through a dead cookie starts a new session with only the new data.
    tab.sid = dead
    tab.call("POST", "/set", json={"new": "y"})
    assert tab.sid and tab.sid != dead
    assert client.get(tab.sid, peek=True).attributes == stored(new="y")


def test_late_request_with_the_pre_login_cookie_leaves_the_new_one_alone(app, client):
    """A cart gives cookie A; a login with A gives B; a request still carrying A, answered
    after the login, must not clear or replace the cookie: in a browser that deletes B and
    logs the user out right after logging in."""
    tab = fresh_session(app, cart="apple")
    a = tab.sid
    tab.call("POST", "/login/grace")
    b = tab.sid
    assert b != a
    late = Tab(app, a)
    for method, path in (("GET", "/read"), ("POST", "/logout"), ("POST", "/logout-all")):
        late.call(method, path)
        assert late.set_cookies == [], (method, path)
    assert client.get(b, peek=True).user_id == "grace"


def test_writes_to_a_session_ended_during_the_request_start_a_new_one(app, client):
    tab = fresh_session(app, keep="yes")
    ended = tab.sid
    assert tab.call("POST", "/end-then-set/late").status_code == 200
    assert tab.sid and tab.sid != ended
    assert tab.set_cookies == [f"{COOKIE}={tab.sid}{SET_COOKIE_SUFFIX}"]
    assert client.get(tab.sid, peek=True).attributes == stored(late="written-after-the-end")


def test_malformed_cookie_counts_as_gone(app, rpc):
    rpc.calls.clear()
    tab = Tab(app, "not-a-session-id")
    assert tab.call("GET", "/read").json["expired"] is True
    assert tab.set_cookies == []
    assert sum(rpc.calls.values()) == 0


def test_values_json_cannot_encode_are_refused(app):
    app.testing = True  # let the TypeError through the test client
    try:
        with pytest.raises(TypeError, match=r"session\['n'\]: object is not serializable to JSON"):
            Tab(app).call("POST", "/bad-value")
    finally:
        app.testing = False


def test_interface_helpers_act_on_the_current_session(app, client):
    tab = fresh_session(app, keep="yes")
    old = tab.sid
    assert tab.call("POST", "/interface/login/frank").json["id"] == tab.sid != old
    assert client.get(tab.sid, peek=True).user_id == "frank"
    sid = tab.sid
    assert tab.call("POST", "/interface/logout").json == {"existed": True}
    assert tab.set_cookies == [CLEAR_COOKIE]
    with pytest.raises(NotFound):
        client.get(sid)
