"""A small, synchronous wrapper over the sessiond.v1.SessionStore gRPC API.

The requests are built (and the responses read) by `_Api`, which the asyncio client in
`sessiond_client.aio` shares; each client only runs the calls its own way."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import grpc
from google.protobuf.duration_pb2 import Duration

from ._proto import session_store_pb2 as pb
from ._proto import session_store_pb2_grpc as pb_grpc
from ._coalesce import GetCoalescer, check_max_batch
from .errors import SessiondError, code_from_number, from_rpc_error, from_status, rpc_code

__all__ = ["Session", "SessionClient", "to_unix_ms"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
Value = Union[bytes, str]
Seconds = Union[timedelta, int, float]


def to_unix_ms(dt: datetime) -> int:
    """Milliseconds since the Unix epoch, exactly (no float rounding)."""
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _ts(ts) -> datetime:
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def _encode(value: Value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"attribute values must be bytes or str, not {type(value).__name__}")


def _encode_map(values: Optional[Mapping[str, Value]]) -> Dict[str, bytes]:
    return {k: _encode(v) for k, v in (values or {}).items()}


def _duration(value: Seconds) -> Duration:
    d = Duration()
    d.FromTimedelta(value if isinstance(value, timedelta) else timedelta(seconds=value))
    return d


@dataclass(frozen=True)
class Session:
    """A session as sessiond returned it. Attribute values are raw bytes."""

    id: str
    user_id: str
    version: int
    attributes: Dict[str, bytes] = field(default_factory=dict)
    created_at: datetime = _EPOCH
    last_access_at: datetime = _EPOCH
    expires_at: datetime = _EPOCH
    absolute_expires_at: datetime = _EPOCH
    idle_timeout: timedelta = timedelta(0)
    client_ip: str = ""
    client_user_agent: str = ""

    @classmethod
    def from_proto(cls, s) -> "Session":
        return cls(
            id=s.id,
            user_id=s.user_id,
            version=s.version,
            attributes=dict(s.attributes),
            created_at=_ts(s.created_at),
            last_access_at=_ts(s.last_access_at),
            expires_at=_ts(s.expires_at),
            absolute_expires_at=_ts(s.absolute_expires_at),
            idle_timeout=timedelta(seconds=s.idle_timeout.seconds, microseconds=s.idle_timeout.nanos // 1000),
            client_ip=s.client.ip,
            client_user_agent=s.client.user_agent,
        )

    def text(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """An attribute decoded as UTF-8, or `default` if absent."""
        value = self.attributes.get(key)
        return default if value is None else value.decode("utf-8")


def _split_target(target: str) -> Tuple[str, Optional[bool]]:
    """'http://h:p' -> ('h:p', False); 'https://h:p' -> ('h:p', True); 'h:p' -> ('h:p', None)."""
    for scheme, secure in (("http://", False), ("https://", True)):
        if target.startswith(scheme):
            return target[len(scheme):].rstrip("/"), secure
    return target, None


class _Call(NamedTuple):
    """One API call, built once for both clients: the RPC's name on the stub, its request,
    how to turn the response into the method's result, and whether it is safe to retry."""

    rpc: str
    request: Any
    parse: Callable[[Any], Any]
    retry: bool


def _parse_get_many(resp) -> List[Union[Session, SessiondError]]:
    out: List[Union[Session, SessiondError]] = []
    for r in resp.results:
        if r.WhichOneof("result") == "session":
            out.append(Session.from_proto(r.session))
        else:
            version = r.error.current_version if r.error.HasField("current_version") else None
            out.append(from_status(code_from_number(r.error.code), r.error.message, version))
    return out


class _Api:
    """The API's methods as `_Call`s, shared by the sync and the asyncio client (each runs
    them its own way in `_run`). The public methods and their docs are on SessionClient."""

    @staticmethod
    def create(
        user_id: str = "",
        attributes: Optional[Mapping[str, Value]] = None,
        *,
        idle_timeout: Optional[Seconds] = None,
        absolute_timeout: Optional[Seconds] = None,
        ip: str = "",
        user_agent: str = "",
        idempotency_key: str = "",
    ) -> _Call:
        req = pb.CreateRequest(
            user_id=user_id,
            attributes=_encode_map(attributes),
            client=pb.ClientInfo(ip=ip or "", user_agent=user_agent or ""),
            idempotency_key=idempotency_key,
        )
        if idle_timeout is not None:
            req.idle_timeout.CopyFrom(_duration(idle_timeout))
        if absolute_timeout is not None:
            req.absolute_timeout.CopyFrom(_duration(absolute_timeout))
        return _Call("Create", req, Session.from_proto, False)

    @staticmethod
    def get(session_id: str, *, peek: bool = False) -> _Call:
        return _Call("Get", pb.GetRequest(id=session_id, peek=peek), Session.from_proto, True)

    @staticmethod
    def touch(session_id: str) -> _Call:
        return _Call("Touch", pb.TouchRequest(id=session_id), lambda r: _ts(r.expires_at), True)

    @staticmethod
    def update(
        session_id: str,
        set: Optional[Mapping[str, Value]] = None,
        remove: Iterable[str] = (),
        *,
        expected_version: Optional[int] = None,
        idempotency_key: str = "",
    ) -> _Call:
        req = pb.UpdateRequest(
            id=session_id,
            set=_encode_map(set),
            remove=list(remove),
            idempotency_key=idempotency_key,
        )
        if expected_version is not None:
            req.expected_version = expected_version
        return _Call("Update", req, Session.from_proto, False)

    @staticmethod
    def regenerate(
        session_id: str,
        user_id: Optional[str] = None,
        *,
        drop_attributes: bool = False,
        idempotency_key: str = "",
    ) -> _Call:
        req = pb.RegenerateRequest(
            id=session_id, drop_attributes=drop_attributes, idempotency_key=idempotency_key
        )
        if user_id is not None:
            req.user_id = user_id
        return _Call("Regenerate", req, Session.from_proto, False)

    @staticmethod
    def destroy(session_id: str) -> _Call:
        return _Call("Destroy", pb.DestroyRequest(id=session_id), lambda r: r.existed, False)

    @staticmethod
    def list_user_sessions(user_id: str, *, include_attributes: bool = False) -> _Call:
        req = pb.ListUserSessionsRequest(user_id=user_id, include_attributes=include_attributes)
        return _Call(
            "ListUserSessions", req, lambda r: [Session.from_proto(s) for s in r.sessions], True
        )

    @staticmethod
    def destroy_user_sessions(user_id: str, *, except_id: str = "") -> _Call:
        req = pb.DestroyUserSessionsRequest(user_id=user_id, except_id=except_id)
        return _Call("DestroyUserSessions", req, lambda r: r.destroyed, False)

    @staticmethod
    def get_many(session_ids: Sequence[str], *, peek: bool = False) -> _Call:
        req = pb.GetManyRequest(ids=list(session_ids), peek=peek)
        return _Call("GetMany", req, _parse_get_many, True)


class _Options:
    """Connection settings shared by both clients (see SessionClient for their meaning)."""

    def __init__(
        self,
        target: str,
        token: Optional[str],
        root_certificates: Optional[bytes],
        private_key: Optional[bytes],
        certificate_chain: Optional[bytes],
        options: Optional[Sequence[tuple]],
    ):
        self.address, secure = _split_target(target)
        if secure is None:
            secure = any(x is not None for x in (root_certificates, private_key, certificate_chain))
        self.secure = secure
        self.root_certificates = root_certificates
        self.private_key = private_key
        self.certificate_chain = certificate_chain
        self.options = list(options or [])
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def channel(self, grpc_module) -> Any:
        """A new channel from `grpc` or `grpc.aio` (the two have the same constructors)."""
        if self.secure:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.root_certificates,
                private_key=self.private_key,
                certificate_chain=self.certificate_chain,
            )
            return grpc_module.secure_channel(self.address, creds, options=self.options)
        return grpc_module.insecure_channel(self.address, options=self.options)


class SessionClient:
    """Client for one sessiond (or one tenant of it).

    target: "host:port", "http://host:port" (plaintext) or "https://host:port" (TLS).
    token: the tenant's bearer token, sent as `authorization: Bearer <token>` on every call.
    root_certificates / private_key / certificate_chain: PEM bytes for TLS / mutual TLS;
    giving any of them turns TLS on.
    timeout: per-call deadline in seconds.
    retries: how many times the idempotent reads (get, touch, list_user_sessions, get_many)
    are retried on UNAVAILABLE. Writes are never retried.
    channel: a grpc.Channel of your own (an intercepted one, say); target is then unused.
    coalesce_gets: gets that threads start while another get of this client is on the wire
    wait for it, then go out together as one GetMany of at most max_coalesced_gets IDs
    (a gRPC call costs a Python process far more CPU than the read it carries). A get with
    nothing in flight is a plain Get. Each get keeps its own result, error and deadline
    (its timeout counts from when it was called); see sessiond_client._coalesce.

    Thread-safe: share one client per process. Fork-safe: the channel is made on first use
    in each process, so a client made before a fork (gunicorn --preload, multiprocessing)
    gets a fresh channel in each child; gRPC channels must not cross a fork. A `channel`
    passed in is the caller's and is used as is.
    """

    def __init__(
        self,
        target: str,
        token: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
        *,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        timeout: float = 5.0,
        retries: int = 2,
        retry_backoff: float = 0.05,
        options: Optional[Sequence[tuple]] = None,
        channel: Optional[grpc.Channel] = None,
        coalesce_gets: bool = True,
        max_coalesced_gets: int = 64,
    ):
        check_max_batch(max_coalesced_gets)
        self._opts = _Options(
            target, token, root_certificates, private_key, certificate_chain, options
        )
        self._metadata = self._opts.metadata
        self._lock = threading.Lock()
        self._given = channel is not None
        self._channel: Optional[grpc.Channel] = channel
        self._stub_: Optional[pb_grpc.SessionStoreStub] = (
            pb_grpc.SessionStoreStub(channel) if channel is not None else None
        )
        self._pid = os.getpid()
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.coalesce_gets = coalesce_gets
        self.max_coalesced_gets = max_coalesced_gets
        self._gets: Optional[Tuple[int, GetCoalescer]] = None

    # --- plumbing ---------------------------------------------------------------------

    def _stub(self) -> pb_grpc.SessionStoreStub:
        pid = os.getpid()
        stub = self._stub_
        if stub is not None and (self._given or self._pid == pid):
            return stub
        with self._lock:
            if self._stub_ is None or (not self._given and self._pid != pid):
                # First use, or first use after a fork: the parent's channel (and its
                # threads) did not come along, so it is dropped unclosed, never used here.
                self._channel = self._opts.channel(grpc)
                self._stub_ = pb_grpc.SessionStoreStub(self._channel)
                self._pid = pid
            return self._stub_

    def _invoke(self, call: _Call, timeout: Optional[float] = None) -> Any:
        """Sends one call, retrying a safe one on UNAVAILABLE; returns its parsed result or
        raises the grpc.RpcError of its last attempt. timeout: per attempt (default: the
        client's)."""
        method = getattr(self._stub(), call.rpc)
        attempts = 1 + (self.retries if call.retry else 0)
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(attempts):
            try:
                resp = method(call.request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                if rpc_code(err) == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    time.sleep(self.retry_backoff * (2**attempt))
                    continue
                raise
            return call.parse(resp)
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, call: _Call) -> Any:
        try:
            return self._invoke(call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _get_one(self, session_id: str, peek: bool) -> Session:
        return self._run(_Api.get(session_id, peek=peek))

    def _get_many(
        self, session_ids: List[str], peek: bool, timeout: float
    ) -> List[Union[Session, SessiondError]]:
        return self._invoke(_Api.get_many(session_ids, peek=peek), timeout)

    def _coalescer(self) -> Optional[GetCoalescer]:
        """This process's GetCoalescer (a fork starts a fresh one), or None if it is off."""
        if not self.coalesce_gets:
            return None
        pid = os.getpid()
        mine = self._gets
        if mine is not None and mine[0] == pid:
            return mine[1]
        with self._lock:
            if self._gets is None or self._gets[0] != pid:
                self._gets = (
                    pid,
                    GetCoalescer(
                        self._get_one, self._get_many, lambda: self.timeout, self.max_coalesced_gets
                    ),
                )
            return self._gets[1]

    def close(self) -> None:
        """Closes this process's channel (a later call opens a new one)."""
        with self._lock:
            channel, mine = self._channel, self._given or self._pid == os.getpid()
            if not self._given:
                self._channel = self._stub_ = None
        if channel is not None and mine:
            channel.close()

    def __enter__(self) -> "SessionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the API ----------------------------------------------------------------------

    def create(
        self,
        user_id: str = "",
        attributes: Optional[Mapping[str, Value]] = None,
        *,
        idle_timeout: Optional[Seconds] = None,
        absolute_timeout: Optional[Seconds] = None,
        ip: str = "",
        user_agent: str = "",
        idempotency_key: str = "",
    ) -> Session:
        """Starts a session under a fresh server-generated ID. Never retried here; with an
        idempotency_key (a fresh UUID per session you mean to start), calling it again with
        the same key returns the session the first call created, never a second one."""
        return self._run(
            _Api.create(
                user_id,
                attributes,
                idle_timeout=idle_timeout,
                absolute_timeout=absolute_timeout,
                ip=ip,
                user_agent=user_agent,
                idempotency_key=idempotency_key,
            )
        )

    def get(self, session_id: str, *, peek: bool = False) -> Session:
        """Reads a session (sliding its idle deadline unless `peek`). Raises NotFound.

        Gets that other threads start while one is on the wire are sent together as one
        GetMany (see `coalesce_gets`); each still returns its own session or raises its
        own error."""
        gets = self._coalescer() if isinstance(session_id, str) else None
        if gets is None:
            return self._get_one(session_id, peek)
        return gets.get(session_id, peek)

    def touch(self, session_id: str) -> datetime:
        """Slides the idle deadline; returns the new expires_at."""
        return self._run(_Api.touch(session_id))

    def update(
        self,
        session_id: str,
        set: Optional[Mapping[str, Value]] = None,
        remove: Iterable[str] = (),
        *,
        expected_version: Optional[int] = None,
        idempotency_key: str = "",
    ) -> Session:
        """Sets and removes attributes atomically. With expected_version: compare-and-set,
        raising Conflict (with .current_version) on a mismatch. Never retried here; with an
        idempotency_key, calling it again with the same key returns the session without a
        second change (a compare-and-set that succeeded returns that success)."""
        return self._run(
            _Api.update(
                session_id,
                set,
                remove,
                expected_version=expected_version,
                idempotency_key=idempotency_key,
            )
        )

    def regenerate(
        self,
        session_id: str,
        user_id: Optional[str] = None,
        *,
        drop_attributes: bool = False,
        idempotency_key: str = "",
    ) -> Session:
        """Moves the session to a fresh ID (the old one is dead); binds user_id if given.
        Never retried here (a lost reply would leave the caller with a dead ID); with an
        idempotency_key, calling it again with the same old ID and key returns the session
        under the ID the first call moved it to."""
        return self._run(
            _Api.regenerate(
                session_id,
                user_id,
                drop_attributes=drop_attributes,
                idempotency_key=idempotency_key,
            )
        )

    def destroy(self, session_id: str) -> bool:
        """Ends one session; True if a live session was destroyed."""
        return self._run(_Api.destroy(session_id))

    def list_user_sessions(self, user_id: str, *, include_attributes: bool = False) -> List[Session]:
        """The user's live sessions, oldest first."""
        return self._run(_Api.list_user_sessions(user_id, include_attributes=include_attributes))

    def destroy_user_sessions(self, user_id: str, *, except_id: str = "") -> int:
        """Ends every session of the user except `except_id`; returns how many ended."""
        return self._run(_Api.destroy_user_sessions(user_id, except_id=except_id))

    def get_many(
        self, session_ids: Sequence[str], *, peek: bool = False
    ) -> List[Union[Session, SessiondError]]:
        """One result per ID, in order: a Session, or the SessiondError (e.g. NotFound) for it."""
        return self._run(_Api.get_many(session_ids, peek=peek))
