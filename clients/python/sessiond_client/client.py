"""A small, synchronous wrapper over the sessiond.v1.SessionStore gRPC API."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TypeVar, Union

import grpc
from google.protobuf.duration_pb2 import Duration

from ._proto import session_store_pb2 as pb
from ._proto import session_store_pb2_grpc as pb_grpc
from .errors import SessiondError, Unavailable, code_from_number, from_rpc_error, from_status

__all__ = ["Session", "SessionClient", "to_unix_ms"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
T = TypeVar("T")
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


def _split_target(target: str) -> tuple:
    """'http://h:p' -> ('h:p', False); 'https://h:p' -> ('h:p', True); 'h:p' -> ('h:p', None)."""
    for scheme, secure in (("http://", False), ("https://", True)):
        if target.startswith(scheme):
            return target[len(scheme):].rstrip("/"), secure
    return target, None


class SessionClient:
    """Client for one sessiond (or one tenant of it).

    target: "host:port", "http://host:port" (plaintext) or "https://host:port" (TLS).
    token: the tenant's bearer token, sent as `authorization: Bearer <token>` on every call.
    root_certificates / private_key / certificate_chain: PEM bytes for TLS / mutual TLS;
    giving any of them turns TLS on.
    timeout: per-call deadline in seconds.
    retries: how many times the idempotent reads (get, touch, list_user_sessions, get_many)
    are retried on UNAVAILABLE. Writes are never retried.

    Thread-safe: share one client per process.
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
    ):
        address, secure = _split_target(target)
        if secure is None:
            secure = any(x is not None for x in (root_certificates, private_key, certificate_chain))
        if channel is None:
            opts = list(options or [])
            if secure:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=root_certificates,
                    private_key=private_key,
                    certificate_chain=certificate_chain,
                )
                channel = grpc.secure_channel(address, creds, options=opts)
            else:
                channel = grpc.insecure_channel(address, options=opts)
        self._channel = channel
        self._stub = pb_grpc.SessionStoreStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff

    # --- plumbing ---------------------------------------------------------------------

    def _call(self, method: Callable, request, retry: bool):
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if isinstance(exc, Unavailable) and attempt + 1 < attempts:
                    time.sleep(self.retry_backoff * (2**attempt))
                    continue
                raise exc from err
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._channel.close()

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
        return Session.from_proto(self._call(self._stub.Create, req, retry=False))

    def get(self, session_id: str, *, peek: bool = False) -> Session:
        """Reads a session (sliding its idle deadline unless `peek`). Raises NotFound."""
        req = pb.GetRequest(id=session_id, peek=peek)
        return Session.from_proto(self._call(self._stub.Get, req, retry=True))

    def touch(self, session_id: str) -> datetime:
        """Slides the idle deadline; returns the new expires_at."""
        resp = self._call(self._stub.Touch, pb.TouchRequest(id=session_id), retry=True)
        return _ts(resp.expires_at)

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
        req = pb.UpdateRequest(
            id=session_id,
            set=_encode_map(set),
            remove=list(remove),
            idempotency_key=idempotency_key,
        )
        if expected_version is not None:
            req.expected_version = expected_version
        return Session.from_proto(self._call(self._stub.Update, req, retry=False))

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
        req = pb.RegenerateRequest(
            id=session_id, drop_attributes=drop_attributes, idempotency_key=idempotency_key
        )
        if user_id is not None:
            req.user_id = user_id
        return Session.from_proto(self._call(self._stub.Regenerate, req, retry=False))

    def destroy(self, session_id: str) -> bool:
        """Ends one session; True if a live session was destroyed."""
        resp = self._call(self._stub.Destroy, pb.DestroyRequest(id=session_id), retry=False)
        return resp.existed

    def list_user_sessions(self, user_id: str, *, include_attributes: bool = False) -> List[Session]:
        """The user's live sessions, oldest first."""
        req = pb.ListUserSessionsRequest(user_id=user_id, include_attributes=include_attributes)
        resp = self._call(self._stub.ListUserSessions, req, retry=True)
        return [Session.from_proto(s) for s in resp.sessions]

    def destroy_user_sessions(self, user_id: str, *, except_id: str = "") -> int:
        """Ends every session of the user except `except_id`; returns how many ended."""
        req = pb.DestroyUserSessionsRequest(user_id=user_id, except_id=except_id)
        return self._call(self._stub.DestroyUserSessions, req, retry=False).destroyed

    def get_many(self, session_ids: Sequence[str], *, peek: bool = False) -> List[Union[Session, SessiondError]]:
        """One result per ID, in order: a Session, or the SessiondError (e.g. NotFound) for it."""
        req = pb.GetManyRequest(ids=list(session_ids), peek=peek)
        resp = self._call(self._stub.GetMany, req, retry=True)
        out: List[Union[Session, SessiondError]] = []
        for r in resp.results:
            if r.WhichOneof("result") == "session":
                out.append(Session.from_proto(r.session))
            else:
                out.append(from_status(code_from_number(r.error.code), r.error.message))
        return out
