"""Python client for sessiond, the gRPC session-store daemon.

    from sessiond_client import SessionClient, NotFound
    client = SessionClient("127.0.0.1:7420")
"""

from .client import Session, SessionClient, to_unix_ms
from .errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SessiondError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Session",
    "SessionClient",
    "to_unix_ms",
    "SessiondError",
    "NotFound",
    "Conflict",
    "InvalidArgument",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
__version__ = "0.1.0"
