"""Concurrent gets of one SessionClient go out together as one GetMany, against a real
sessiond; each still gets its own session, its own error and its own deadline."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import grpc
import pytest

from harness import Daemon, start_sessiond
from sessiond_client import InvalidArgument, NotFound, Session, SessionClient, Unavailable

UNKNOWN_ID = "A" * 43  # well-formed, never issued
WAIT = 30.0  # seconds: the most a test waits for its threads


class Gate(grpc.UnaryUnaryClientInterceptor):
    """Records each call's method, and holds the first one until `open` is set, so the
    gets started meanwhile queue behind it."""

    def __init__(self):
        self.calls: List[str] = []
        self.open = threading.Event()
        self.holding = threading.Event()
        self._first = True
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        with self._lock:
            self.calls.append(details.method.rsplit("/", 1)[1])
            first, self._first = self._first, False
        if first:
            self.holding.set()
            assert self.open.wait(WAIT), "the gate was never opened"
        return continuation(details, request)


def closed_address() -> str:
    """A loopback address nothing listens on (a port bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def gated_client(addr: str, **kwargs) -> "tuple[SessionClient, Gate]":
    gate = Gate()
    channel = grpc.intercept_channel(grpc.insecure_channel(addr), gate)
    return SessionClient("unused", channel=channel, **kwargs), gate


class Threads:
    """Calls run on threads of their own; `out` holds what each returned or raised, by name."""

    def __init__(self):
        self.out: Dict[str, object] = {}
        self._threads: List[threading.Thread] = []

    def start(self, calls: Dict[str, Callable[[], object]]) -> None:
        for name, call in calls.items():
            t = threading.Thread(target=self._run, args=(name, call))
            t.start()
            self._threads.append(t)

    def _run(self, name: str, call: Callable[[], object]) -> None:
        try:
            self.out[name] = call()
        except Exception as err:  # the test looks at it
            self.out[name] = err

    def join(self) -> Dict[str, object]:
        for t in self._threads:
            t.join(WAIT)
            assert not t.is_alive(), "a get never returned"
        return self.out


def wait_queued(client: SessionClient, n: int) -> None:
    """Waits until n gets are queued behind the one in flight."""
    gets = client._coalescer()
    deadline = time.monotonic() + WAIT
    while len(gets._queue) < n:
        assert time.monotonic() < deadline, f"{len(gets._queue)} of {n} gets queued"
        time.sleep(0.001)


@contextmanager
def configured_sessiond(workdir: Path, setting: str) -> Iterator[Daemon]:
    """A sessiond of its own with one setting in its config file, stopped afterwards."""
    name = setting.split()[0]
    config = workdir / f"{name}.toml"
    config.write_text(setting + "\n")
    daemon = start_sessiond(workdir / name, "--config", str(config))
    try:
        yield daemon
    finally:
        daemon.stop()


def gated_round(addr: str, first: str, others: Dict[str, str], **kwargs):
    """A gated client's get of `first` held in flight while one get per entry of `others`
    (name -> session ID) queues behind it, then let go: (client, gate, what each returned
    or raised, by name, the first as "first")."""
    client, gate = gated_client(addr, **kwargs)
    threads = Threads()
    threads.start({"first": lambda: client.get(first)})
    assert gate.holding.wait(WAIT)
    threads.start({name: (lambda sid=sid: client.get(sid)) for name, sid in others.items()})
    wait_queued(client, len(others))
    gate.open.set()
    return client, gate, threads.join()


def test_gets_started_while_one_is_in_flight_go_out_as_one_get_many(sessiond):
    setup = sessiond.client()
    sessions = [setup.create(attributes={"n": str(i)}) for i in range(6)]
    client, gate, out = gated_round(
        sessiond.addr,
        sessions[0].id,
        {
            **{f"s{i}": sessions[i].id for i in range(1, 6)},
            "unknown": UNKNOWN_ID,
            "malformed": "not-an-id",
            "again": sessions[1].id,
        },
    )

    assert gate.calls == ["Get", "GetMany"]
    assert out["first"].id == sessions[0].id
    for i in range(1, 6):
        got = out[f"s{i}"]
        assert isinstance(got, Session) and got.id == sessions[i].id
        assert got.attributes == {"n": str(i).encode()}
    assert out["again"].id == sessions[1].id
    assert isinstance(out["unknown"], NotFound)
    assert isinstance(out["malformed"], InvalidArgument)
    assert "id" in str(out["malformed"])


def test_a_batch_holds_one_kind_of_get_peek_or_not(sessiond):
    s = sessiond.client().create()
    client, gate = gated_client(sessiond.addr)
    threads = Threads()
    threads.start({"first": lambda: client.get(s.id)})
    assert gate.holding.wait(WAIT)
    threads.start({"peek": lambda: client.get(s.id, peek=True)})
    wait_queued(client, 1)
    threads.start({"a": lambda: client.get(s.id), "b": lambda: client.get(s.id)})
    wait_queued(client, 3)
    gate.open.set()
    out = threads.join()

    # The peek led the next batch alone (a plain Get); the two others went out together.
    assert gate.calls == ["Get", "Get", "GetMany"]
    assert all(isinstance(out[k], Session) for k in ("first", "peek", "a", "b"))
    assert out["peek"].last_access_at == out["first"].last_access_at  # it did not slide


def test_a_failed_get_many_fails_every_get_in_it_each_with_its_own_error():
    client, gate, out = gated_round(
        closed_address(),
        UNKNOWN_ID,
        {f"g{i}": UNKNOWN_ID for i in range(4)},
        timeout=2,
        retries=1,
        retry_backoff=0.01,
    )

    assert gate.calls == ["Get", "Get", "GetMany", "GetMany"]  # each retried once
    errors = [out[k] for k in ("first", "g0", "g1", "g2", "g3")]
    assert all(isinstance(e, Unavailable) for e in errors), errors
    assert len({id(e) for e in errors}) == len(errors)  # raised in five threads: five objects


def test_gets_over_the_servers_batch_limit_fall_back_to_their_own_get(workdir):
    with configured_sessiond(workdir, "max_batch_ids = 2") as daemon:
        setup = daemon.client()
        sessions = [setup.create(attributes={"n": str(i)}) for i in range(4)]
        others = {f"s{i}": sessions[i].id for i in range(1, 4)}
        client, gate, out = gated_round(daemon.addr, sessions[0].id, others)

    assert gate.calls[:2] == ["Get", "GetMany"] and sorted(gate.calls[2:]) == ["Get"] * 3
    for i in range(4):
        assert out[f"s{i}" if i else "first"].attributes == {"n": str(i).encode()}
    assert client._coalescer()._max_batch == 1  # half of the 3 the server refused


def test_gets_whose_get_many_reply_is_too_large_fall_back_to_their_own_get(workdir):
    with configured_sessiond(workdir, "max_message_bytes = 1024") as daemon:
        setup = daemon.client()
        big = "x" * 600  # one session's reply fits in 1024 bytes, two do not
        sessions = [setup.create(attributes={"v": big, "n": str(i)}) for i in range(3)]
        others = {f"s{i}": sessions[i].id for i in range(1, 3)}
        client, gate, out = gated_round(daemon.addr, sessions[0].id, others)

    assert gate.calls == ["Get", "GetMany", "Get", "Get"]
    for i in (1, 2):
        assert out[f"s{i}"].attributes["n"] == str(i).encode()
    assert client._coalescer()._max_batch == 64  # a size refusal does not shorten batches


def test_with_coalescing_off_every_get_is_its_own_call(sessiond):
    s = sessiond.client().create()
    client, gate = gated_client(sessiond.addr, coalesce_gets=False)
    threads = Threads()
    threads.start({"first": lambda: client.get(s.id)})
    assert gate.holding.wait(WAIT)
    threads.start({f"g{i}": (lambda: client.get(s.id)) for i in range(3)})
    for name in ("g0", "g1", "g2"):  # not queued: each finishes with the first still held
        deadline = time.monotonic() + WAIT
        while name not in threads.out:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    gate.open.set()
    out = threads.join()
    assert gate.calls == ["Get"] * 4
    assert all(isinstance(v, Session) for v in out.values())


def test_many_threads_each_get_their_own_session(sessiond):
    client = sessiond.client()
    sessions = [client.create(attributes={"i": str(i)}) for i in range(16)]
    results: Dict[int, List[bool]] = {}

    def reader(i):
        want = {"i": str(i).encode()}
        results[i] = [client.get(sessions[i].id).attributes == want for _ in range(40)]

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert all(all(r) and len(r) == 40 for r in results.values()) and len(results) == 16


def test_max_coalesced_gets_must_be_positive():
    with pytest.raises(ValueError, match="max_coalesced_gets"):
        SessionClient("127.0.0.1:1", max_coalesced_gets=0)
