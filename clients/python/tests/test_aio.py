"""sessiond_client.aio.SessionClient against a real sessiond: every method, the same typed
errors as the sync client, concurrent calls from many tasks, retries of reads only, and a
client shared by two event loops one after the other."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import grpc.aio
import pytest

from conftest import TENANT_MAX_SESSIONS_PER_USER
from sessiond_client import (
    Conflict,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Session,
    Unauthenticated,
    Unavailable,
)
from sessiond_client.aio import SessionClient
from sessiond_client.errors import CURRENT_VERSION_HEADER

UNKNOWN_ID = "A" * 43


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def test_every_method(sessiond):
    async def main():
        async with SessionClient(sessiond.addr) as c:
            s = await c.create(attributes={"cart": "apple"}, idle_timeout=600, ip="10.0.0.1")
            assert isinstance(s, Session) and len(s.id) == 43 and s.version == 1
            assert s.client_ip == "10.0.0.1"
            assert (await c.get(s.id)).attributes == {"cart": b"apple"}
            assert (await c.touch(s.id)) >= s.expires_at
            u = await c.update(s.id, set={"theme": "dark"}, remove=["cart"], expected_version=1)
            assert (u.version, u.attributes) == (2, {"theme": b"dark"})
            user = unique("alice")
            r = await c.regenerate(s.id, user_id=user)
            assert r.id != s.id and r.user_id == user
            other = await c.create(user_id=user)
            listed = await c.list_user_sessions(user, include_attributes=True)
            assert [x.id for x in listed] == [r.id, other.id]
            assert listed[0].attributes == {"theme": b"dark"}
            many = await c.get_many([r.id, UNKNOWN_ID, "bad"], peek=True)
            assert isinstance(many[0], Session) and many[0].id == r.id
            assert isinstance(many[1], NotFound) and isinstance(many[2], InvalidArgument)
            assert await c.destroy_user_sessions(user, except_id=r.id) == 1
            assert await c.destroy(r.id) is True
            assert await c.destroy(r.id) is False

    asyncio.run(main())


def test_typed_errors(sessiond, tenant_sessiond):
    async def main():
        async with SessionClient(sessiond.addr) as c:
            with pytest.raises(NotFound):
                await c.get(UNKNOWN_ID)
            with pytest.raises(InvalidArgument):
                await c.get("not-an-id")
            s = await c.create()
            await c.update(s.id, set={"a": "1"})
            with pytest.raises(Conflict) as info:
                await c.update(s.id, set={"a": "2"}, expected_version=1)
            assert info.value.current_version == 2
            trailers = list(info.value.__cause__.trailing_metadata())
            assert (CURRENT_VERSION_HEADER, "2") in trailers, trailers  # not from the text
            assert info.value.code == grpc.StatusCode.ABORTED
            with pytest.raises(TypeError):
                await c.create(attributes={"n": 1})
        async with SessionClient(tenant_sessiond.addr) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.create()
        async with SessionClient(tenant_sessiond.addr, token=tenant_sessiond.token) as t:
            user = unique("busy")
            for _ in range(TENANT_MAX_SESSIONS_PER_USER):
                await t.create(user_id=user)
            with pytest.raises(ResourceExhausted, match="max_sessions_per_user"):
                await t.create(user_id=user)

    asyncio.run(main())


def test_concurrent_compare_and_set_from_many_tasks_loses_nothing(sessiond):
    async def main():
        async with SessionClient(sessiond.addr) as c:
            s = await c.create(attributes={"n": "0"})

            async def add_one():
                while True:
                    cur = await c.get(s.id, peek=True)
                    n = int(cur.attributes["n"]) + 1
                    try:
                        await c.update(s.id, set={"n": str(n)}, expected_version=cur.version)
                        return
                    except Conflict:
                        continue

            await asyncio.gather(*(add_one() for _ in range(40)))
            end = await c.get(s.id, peek=True)
            assert end.attributes["n"] == b"40" and end.version == 41

    asyncio.run(main())


class Counter(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.calls = []

    async def intercept_unary_unary(self, continuation, details, request):
        method = details.method
        method = method.decode() if isinstance(method, bytes) else method
        self.calls.append(method.rsplit("/", 1)[1])
        return await continuation(details, request)


def test_unavailable_reads_retried_writes_not():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed

    async def main():
        counter = Counter()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[counter])
        c = SessionClient("unused", channel=channel, retries=2, retry_backoff=0.001, timeout=2)
        with pytest.raises(Unavailable):
            await c.get(UNKNOWN_ID)
        assert counter.calls == ["Get"] * 3
        counter.calls.clear()
        with pytest.raises(Unavailable):
            await c.create()
        assert counter.calls == ["Create"]
        await c.close()

    asyncio.run(main())


def test_one_client_serves_one_loop_after_another(sessiond):
    """grpc.aio channels belong to the loop that made them: a client used from a second
    loop (asyncio.run twice, a test runner's loop per test) makes a channel there."""
    c = SessionClient(sessiond.addr)
    s = asyncio.run(c.create())
    assert asyncio.run(c.get(s.id)).id == s.id
    asyncio.run(c.close())


class Gate(grpc.aio.UnaryUnaryClientInterceptor):
    """Records each call's method and holds the first one until `open` is set, so the gets
    started meanwhile queue behind it."""

    def __init__(self):
        self.calls = []
        self.open = asyncio.Event()
        self.holding = asyncio.Event()

    async def intercept_unary_unary(self, continuation, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.calls.append(method.rsplit("/", 1)[1])
        if len(self.calls) == 1:
            self.holding.set()
            await self.open.wait()
        return await continuation(details, request)


def test_gets_from_many_tasks_go_out_together_and_a_cancelled_one_strands_no_one(sessiond):
    async def main():
        setup = SessionClient(sessiond.addr)
        sessions = [await setup.create(attributes={"n": str(i)}) for i in range(4)]
        gate = Gate()
        channel = grpc.aio.insecure_channel(sessiond.addr, interceptors=[gate])
        c = SessionClient("unused", channel=channel)
        first = asyncio.ensure_future(c.get(sessions[0].id))
        await asyncio.wait_for(gate.holding.wait(), 30)
        rest = [asyncio.ensure_future(c.get(s.id)) for s in sessions[1:]]
        unknown = asyncio.ensure_future(c.get(UNKNOWN_ID))
        dropped = asyncio.ensure_future(c.get(sessions[1].id))
        await asyncio.sleep(0)  # every get has queued (each ran to its await)
        dropped.cancel()
        gate.open.set()
        got = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        assert [s.attributes for s in got] == [{"n": str(i).encode()} for i in range(4)]
        with pytest.raises(NotFound):
            await unknown
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert gate.calls == ["Get", "GetMany"]  # the cancelled get was not sent
        await c.close()
        await setup.close()

    asyncio.run(main())


def test_with_coalescing_off_every_get_is_its_own_call(sessiond):
    async def main():
        s = await SessionClient(sessiond.addr).create()
        gate = Gate()
        channel = grpc.aio.insecure_channel(sessiond.addr, interceptors=[gate])
        c = SessionClient("unused", channel=channel, coalesce_gets=False)
        first = asyncio.ensure_future(c.get(s.id))
        await asyncio.wait_for(gate.holding.wait(), 30)
        others = await asyncio.wait_for(asyncio.gather(*(c.get(s.id) for _ in range(3))), 30)
        assert not first.done()  # the others did not wait for it
        gate.open.set()
        assert (await first).id == s.id and all(o.id == s.id for o in others)
        assert gate.calls == ["Get"] * 4
        await c.close()

    asyncio.run(main())
