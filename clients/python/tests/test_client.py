"""SessionClient against a real sessiond: every method and every typed error."""

from __future__ import annotations

import socket
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from conftest import TENANT_MAX_SESSIONS_PER_USER
from sessiond_client import (
    Conflict,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Session,
    SessionClient,
    SessiondError,
    Unauthenticated,
    Unavailable,
    to_unix_ms,
)
from sessiond_client.errors import CURRENT_VERSION_HEADER, from_rpc_error

# Well-formed (43 URL-safe base64 chars) but never issued.
UNKNOWN_ID = "A" * 43


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def test_create_and_get(client):
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    s = client.create(
        user_id="",
        attributes={"theme": "dark", "blob": b"\x00\xff"},
        ip="10.1.2.3",
        user_agent="pytest/1",
    )
    assert isinstance(s, Session)
    assert len(s.id) == 43
    assert s.user_id == ""
    assert s.version == 1
    assert s.attributes == {"theme": b"dark", "blob": b"\x00\xff"}
    assert s.client_ip == "10.1.2.3" and s.client_user_agent == "pytest/1"
    assert before <= s.created_at <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert s.created_at <= s.last_access_at < s.expires_at <= s.absolute_expires_at
    assert s.idle_timeout == timedelta(minutes=30)  # the server's default
    assert s.text("theme") == "dark" and s.text("missing", "x") == "x"

    got = client.get(s.id)
    assert got.id == s.id and got.attributes == s.attributes and got.version == 1
    assert got.client_ip == "10.1.2.3"


def test_create_with_timeouts_and_user(client):
    user = unique("carol")
    s = client.create(user_id=user, idle_timeout=timedelta(minutes=5), absolute_timeout=3600)
    assert s.user_id == user
    assert s.idle_timeout == timedelta(minutes=5)
    assert s.absolute_expires_at - s.created_at == timedelta(hours=1)


def test_get_peek_does_not_slide(client):
    s = client.create(idle_timeout=600)
    peeked = client.get(s.id, peek=True)
    assert peeked.last_access_at == s.last_access_at
    assert peeked.expires_at == s.expires_at


def test_touch_returns_new_deadline(client):
    s = client.create(idle_timeout=600)
    expires = client.touch(s.id)
    assert isinstance(expires, datetime)
    assert expires >= s.expires_at
    assert client.get(s.id, peek=True).expires_at == expires


def test_update_sets_and_removes_only_named_keys(client):
    s = client.create(attributes={"a": "1", "b": "2", "c": "3"})
    u = client.update(s.id, set={"a": "10", "d": "é"}, remove=["b", "never-there"])
    assert u.version == 2
    assert u.attributes == {"a": b"10", "c": b"3", "d": "é".encode("utf-8")}
    assert client.get(s.id).attributes == u.attributes


def test_update_compare_and_set(client):
    s = client.create(attributes={"n": "1"})
    ok = client.update(s.id, set={"n": "2"}, expected_version=1)
    assert ok.version == 2
    client.update(s.id, set={"other": "x"})  # version 3
    with pytest.raises(Conflict) as info:
        client.update(s.id, set={"n": "99"}, expected_version=2)
    assert info.value.current_version == 3
    assert info.value.code == grpc.StatusCode.ABORTED
    assert "version mismatch" in str(info.value)
    after = client.get(s.id)
    assert after.version == 3 and after.attributes["n"] == b"2"  # nothing changed


def test_conflict_version_comes_from_the_metadata_not_the_text(client):
    s = client.create()
    client.update(s.id, set={"a": "1"})  # version 2
    with pytest.raises(Conflict) as info:
        client.update(s.id, set={"a": "2"}, expected_version=1)
    metadata = dict(info.value.__cause__.trailing_metadata())
    assert metadata[CURRENT_VERSION_HEADER] == "2"
    assert info.value.current_version == 2

    class Failed(grpc.RpcError):
        """A failed call whose metadata and text disagree: the metadata wins."""

        def code(self):
            return grpc.StatusCode.ABORTED

        def details(self):
            return "version mismatch: expected 1, session is at 3"

        def trailing_metadata(self):
            return ((CURRENT_VERSION_HEADER, "7"),)

    assert from_rpc_error(Failed()).current_version == 7
    # An older server sends only the text.
    assert Conflict("version mismatch: expected 1, session is at 3").current_version == 3
    assert Conflict("a request with this idempotency key is still in progress").current_version is None


def test_writes_sent_again_with_their_idempotency_key_change_nothing_twice(client):
    key = unique("checkout")
    s = client.create(attributes={"cart": "apple"}, idempotency_key=key)
    assert client.create(attributes={"cart": "apple"}, idempotency_key=key).id == s.id
    u = client.update(s.id, {"cart": "pear"}, expected_version=1, idempotency_key=key + "-u")
    again = client.update(s.id, {"cart": "pear"}, expected_version=1, idempotency_key=key + "-u")
    assert (u.version, again.version) == (2, 2)
    user = unique("alice")
    r = client.regenerate(s.id, user, idempotency_key=key + "-r")
    assert client.regenerate(s.id, user, idempotency_key=key + "-r").id == r.id
    with pytest.raises(InvalidArgument):
        client.update(r.id, {"x": "y"}, idempotency_key=key)


def test_regenerate_moves_to_fresh_id(client):
    user = unique("alice")
    s = client.create(attributes={"cart:apple": "2"})
    r = client.regenerate(s.id, user_id=user)
    assert r.id != s.id and len(r.id) == 43
    assert r.user_id == user
    assert r.attributes == {"cart:apple": b"2"}
    assert r.version == s.version + 1
    with pytest.raises(NotFound):
        client.get(s.id)
    # Plain rotation keeps the user; drop_attributes empties the session.
    r2 = client.regenerate(r.id, drop_attributes=True)
    assert r2.user_id == user and r2.attributes == {}
    with pytest.raises(NotFound):
        client.regenerate(r.id)


def test_destroy(client):
    s = client.create()
    assert client.destroy(s.id) is True
    with pytest.raises(NotFound):
        client.get(s.id)
    assert client.destroy(s.id) is False


def test_user_sessions(client):
    user = unique("bob")
    a = client.create(user_id=user, ip="1.1.1.1", user_agent="laptop", attributes={"k": "v"})
    b = client.create(user_id=user, ip="2.2.2.2", user_agent="phone")
    client.create(user_id=unique("someone-else"))

    listed = client.list_user_sessions(user)
    assert [x.id for x in listed] == [a.id, b.id]  # oldest first
    assert [x.client_user_agent for x in listed] == ["laptop", "phone"]
    assert all(x.attributes == {} for x in listed)  # not asked for
    assert client.list_user_sessions(user, include_attributes=True)[0].attributes == {"k": b"v"}
    assert isinstance(to_unix_ms(listed[0].last_access_at), int)

    assert client.destroy_user_sessions(user, except_id=b.id) == 1
    assert [x.id for x in client.list_user_sessions(user)] == [b.id]
    assert client.destroy_user_sessions(user) == 1
    assert client.list_user_sessions(user) == []
    with pytest.raises(NotFound):
        client.get(b.id)


def test_get_many(client):
    a = client.create(attributes={"x": "1"})
    results = client.get_many([a.id, UNKNOWN_ID, "bad"])
    assert isinstance(results[0], Session) and results[0].id == a.id
    assert isinstance(results[1], NotFound)
    assert isinstance(results[2], InvalidArgument)


def test_not_found_and_invalid_argument(client):
    for call in (
        lambda: client.get(UNKNOWN_ID),
        lambda: client.touch(UNKNOWN_ID),
        lambda: client.update(UNKNOWN_ID, set={"a": "b"}),
        lambda: client.regenerate(UNKNOWN_ID),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert isinstance(info.value, SessiondError)
        assert info.value.code == grpc.StatusCode.NOT_FOUND

    with pytest.raises(InvalidArgument):
        client.get("not-an-id")
    with pytest.raises(InvalidArgument):
        client.list_user_sessions("")
    s = client.create()
    with pytest.raises(InvalidArgument):
        client.update(s.id, set={"k": "v"}, remove=["k"])  # a key in both
    with pytest.raises(TypeError):
        client.create(attributes={"n": 1})


def test_idle_timeout_expiry(client):
    """A 1 s idle timeout: the session is NOT_FOUND once it passes (bounded poll, peek so
    polling does not keep it alive)."""
    s = client.create(idle_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.get(s.id, peek=True)
        except NotFound:
            break
        assert time.monotonic() < deadline, "session outlived its 1 s idle timeout by 9 s"
        time.sleep(0.05)
    with pytest.raises(NotFound):
        client.touch(s.id)


# --- tenants ---------------------------------------------------------------------------


def test_unauthenticated_without_or_with_a_wrong_token(tenant_sessiond):
    with pytest.raises(Unauthenticated) as info:
        tenant_sessiond.client(token=None).create()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(Unauthenticated):
        tenant_sessiond.client(token="wrong-token").get(UNKNOWN_ID)


def test_tenant_token_works_and_isolates(tenant_sessiond, sessiond):
    c = tenant_sessiond.client()
    s = c.create(attributes={"a": "1"})
    assert c.get(s.id).attributes == {"a": b"1"}
    # The same ID means nothing to another daemon, and the tenant's sessions are its own.
    with pytest.raises(NotFound):
        sessiond.client().get(s.id)


def test_resource_exhausted_at_the_per_user_limit(tenant_sessiond):
    c = tenant_sessiond.client()
    user = unique("busy")
    for _ in range(TENANT_MAX_SESSIONS_PER_USER):
        c.create(user_id=user)
    with pytest.raises(ResourceExhausted) as info:
        c.create(user_id=user)
    assert "max_sessions_per_user" in info.value.message


# --- transport failures and retries -----------------------------------------------------


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.calls = []

    def intercept_unary_unary(self, continuation, details, request):
        self.calls.append(details.method.rsplit("/", 1)[1])
        return continuation(details, request)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_unavailable_reads_retried_writes_not():
    counter = CountingInterceptor()
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{closed_port()}"), counter)
    c = SessionClient("unused", channel=channel, timeout=2, retries=2, retry_backoff=0.01)
    with pytest.raises(Unavailable):
        c.get(UNKNOWN_ID)
    assert counter.calls == ["Get"] * 3
    counter.calls.clear()
    with pytest.raises(Unavailable):
        c.touch(UNKNOWN_ID)
    with pytest.raises(Unavailable):
        c.list_user_sessions("u")
    assert counter.calls == ["Touch"] * 3 + ["ListUserSessions"] * 3
    for name, call in [
        ("Create", lambda: c.create()),
        ("Regenerate", lambda: c.regenerate(UNKNOWN_ID)),
        ("Update", lambda: c.update(UNKNOWN_ID, set={"a": "b"})),
        ("Destroy", lambda: c.destroy(UNKNOWN_ID)),
    ]:
        counter.calls.clear()
        with pytest.raises(Unavailable):
            call()
        assert counter.calls == [name], name
    c.close()


def test_target_forms(sessiond):
    for target in (sessiond.addr, f"http://{sessiond.addr}", f"http://{sessiond.addr}/"):
        with SessionClient(target) as c:
            s = c.create()
            assert c.get(s.id).id == s.id
