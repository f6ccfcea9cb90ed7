"""Typed exceptions for sessiond's gRPC status codes."""

from __future__ import annotations

import re
from typing import Optional

import grpc

__all__ = [
    "SessiondError",
    "NotFound",
    "Conflict",
    "InvalidArgument",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "from_status",
]


class SessiondError(Exception):
    """Any failed sessiond call. `code` is the grpc.StatusCode, `message` the server's text."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str = "", code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, grpc.StatusCode) else str(self.code)
        return f"{name}: {self.message}" if self.message else name


class NotFound(SessiondError):
    """The session is unknown, expired or destroyed (the three are indistinguishable)."""

    code = grpc.StatusCode.NOT_FOUND


class Conflict(SessiondError):
    """Update's expected_version did not match; nothing changed.

    `current_version` is the session's version as the server reported it (None if the
    message did not carry it).
    """

    code = grpc.StatusCode.ABORTED
    _AT = re.compile(r"session is at (\d+)")

    def __init__(self, message: str = "", code: Optional[grpc.StatusCode] = None):
        super().__init__(message, code)
        m = self._AT.search(message or "")
        self.current_version: Optional[int] = int(m.group(1)) if m else None


class InvalidArgument(SessiondError):
    """Malformed ID or request, or a size limit; the message names the field or setting."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(SessiondError):
    """A capacity limit was reached or the server shed load; the message names the limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(SessiondError):
    """Multi-tenant sessiond refused the call's credentials (missing or wrong token)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(SessiondError):
    """sessiond could not be reached, or (fsync = always) its durable log failed."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE = {
    cls.code: cls
    for cls in (NotFound, Conflict, InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable)
}


def from_status(code: grpc.StatusCode, message: str) -> SessiondError:
    cls = _BY_CODE.get(code)
    if cls is None:
        return SessiondError(message, code)
    return cls(message)


def from_rpc_error(err: grpc.RpcError) -> SessiondError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    exc = from_status(code, details or "")
    exc.__cause__ = err
    return exc


_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def code_from_number(number: int) -> grpc.StatusCode:
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
