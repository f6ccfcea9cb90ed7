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
    "CURRENT_VERSION_HEADER",
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

    `current_version` is the session's version now, from the server's
    `sessiond-current-version` response metadata (a Pipeline error's `current_version`),
    or, from a server too old to send it, from the message text; None if neither has it.
    """

    code = grpc.StatusCode.ABORTED
    _AT = re.compile(r"session is at (\d+)")

    def __init__(
        self,
        message: str = "",
        code: Optional[grpc.StatusCode] = None,
        current_version: Optional[int] = None,
    ):
        super().__init__(message, code)
        if current_version is None:
            m = self._AT.search(message or "")
            current_version = int(m.group(1)) if m else None
        self.current_version: Optional[int] = current_version


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


CURRENT_VERSION_HEADER = "sessiond-current-version"
"""Response metadata of an ABORTED version mismatch: the session's version, ASCII decimal."""


def from_status(
    code: grpc.StatusCode, message: str, current_version: Optional[int] = None
) -> SessiondError:
    """The typed exception for a status code and message (and, for a version mismatch, the
    session's current version if the server sent it)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return SessiondError(message, code)
    if cls is Conflict:
        return Conflict(message, current_version=current_version)
    return cls(message)


_DECIMAL = re.compile(r"[0-9]{1,20}")


def _metadata_version(err: grpc.RpcError) -> Optional[int]:
    for getter in ("trailing_metadata", "initial_metadata"):
        try:
            pairs = getattr(err, getter)() or ()
        except Exception:  # not a grpc.Call (a channel-level failure)
            continue
        for key, value in pairs:
            if key == CURRENT_VERSION_HEADER:
                text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
                return int(text) if _DECIMAL.fullmatch(text) else None
    return None


def rpc_code(err: grpc.RpcError) -> grpc.StatusCode:
    """A failed call's status code; UNKNOWN for an error that is not a grpc.Call."""
    return err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN


def from_rpc_error(err: grpc.RpcError) -> SessiondError:
    """The typed exception for a failed call (sync or grpc.aio)."""
    code = rpc_code(err)
    details = err.details() if hasattr(err, "details") else str(err)
    version = _metadata_version(err) if code == grpc.StatusCode.ABORTED else None
    exc = from_status(code, details or "", version)
    exc.__cause__ = err
    return exc


_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def code_from_number(number: int) -> grpc.StatusCode:
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
