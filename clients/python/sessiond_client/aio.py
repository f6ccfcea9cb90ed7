"""An asyncio client for sessiond, on grpc.aio: the same API and the same typed errors as
`sessiond_client.SessionClient`, with every call awaited. For FastAPI, Quart, Starlette and
async Django.

    from sessiond_client.aio import SessionClient
    from sessiond_client import NotFound, Conflict

    async with SessionClient("127.0.0.1:7420") as client:
        s = await client.create(attributes={"cart:apple": "1"})
        s = await client.regenerate(s.id, user_id="alice")

Requests are built, and responses and errors read, by the same code as the sync client's;
only the running of a call differs.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio

from ._coalesce import AsyncGetCoalescer, check_max_batch
from ._proto import session_store_pb2_grpc as pb_grpc
from .client import Seconds, Session, Value, _Api, _Call, _Options
from .errors import SessiondError, from_rpc_error, rpc_code

__all__ = ["SessionClient"]


class SessionClient:
    """Asyncio client for one sessiond (or one tenant of it). The arguments are those of the
    sync `sessiond_client.SessionClient`; `channel` is then a `grpc.aio.Channel`.

    The channel is made on the first call, in the event loop making it (grpc.aio channels
    belong to one loop): a call from another loop, or from a forked child, gets a channel of
    its own. Share one client among the tasks of a loop; concurrent calls are multiplexed
    over its one HTTP/2 connection.
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
        channel: Optional[grpc.aio.Channel] = None,
        coalesce_gets: bool = True,
        max_coalesced_gets: int = 64,
    ):
        check_max_batch(max_coalesced_gets)
        self._opts = _Options(
            target, token, root_certificates, private_key, certificate_chain, options
        )
        self._given = channel is not None
        self._channel: Optional[grpc.aio.Channel] = channel
        self._stub_: Optional[pb_grpc.SessionStoreStub] = (
            pb_grpc.SessionStoreStub(channel) if channel is not None else None
        )
        self._owner: Optional[Tuple[int, asyncio.AbstractEventLoop]] = None
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.coalesce_gets = coalesce_gets
        self.max_coalesced_gets = max_coalesced_gets
        self._gets: Optional[Tuple[Tuple[int, asyncio.AbstractEventLoop], AsyncGetCoalescer]] = None

    # --- plumbing ---------------------------------------------------------------------

    def _stub(self) -> pb_grpc.SessionStoreStub:
        if self._given:
            assert self._stub_ is not None
            return self._stub_
        owner = (os.getpid(), asyncio.get_running_loop())
        if self._stub_ is None or self._owner != owner:
            # No await in here, so tasks of one loop cannot race to make two channels. A
            # channel of another loop or process is left alone: it cannot be closed from here.
            self._channel = self._opts.channel(grpc.aio)
            self._stub_ = pb_grpc.SessionStoreStub(self._channel)
            self._owner = owner
        return self._stub_

    async def _invoke(self, call: _Call, timeout: Optional[float] = None) -> Any:
        """Sends one call, retrying a safe one on UNAVAILABLE; returns its parsed result or
        raises the grpc.RpcError of its last attempt. timeout: per attempt (default: the
        client's)."""
        method = getattr(self._stub(), call.rpc)
        attempts = 1 + (self.retries if call.retry else 0)
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(attempts):
            try:
                resp = await method(call.request, timeout=timeout, metadata=self._opts.metadata)
            except grpc.RpcError as err:
                if rpc_code(err) == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    await asyncio.sleep(self.retry_backoff * (2**attempt))
                    continue
                raise
            return call.parse(resp)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run(self, call: _Call) -> Any:
        try:
            return await self._invoke(call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def _get_one(self, session_id: str, peek: bool) -> Session:
        return await self._run(_Api.get(session_id, peek=peek))

    async def _get_many(
        self, session_ids: List[str], peek: bool, timeout: float
    ) -> List[Union[Session, SessiondError]]:
        return await self._invoke(_Api.get_many(session_ids, peek=peek), timeout)

    def _coalescer(self) -> Optional[AsyncGetCoalescer]:
        """This loop's AsyncGetCoalescer (in this process), or None if it is off."""
        if not self.coalesce_gets:
            return None
        owner = (os.getpid(), asyncio.get_running_loop())
        if self._gets is None or self._gets[0] != owner:
            self._gets = (
                owner,
                AsyncGetCoalescer(
                    self._get_one, self._get_many, lambda: self.timeout, self.max_coalesced_gets
                ),
            )
        return self._gets[1]

    async def close(self) -> None:
        """Closes the channel (a later call opens a new one, unless it was passed in)."""
        channel = self._channel
        if not self._given:
            self._channel = self._stub_ = None
            self._owner = None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> "SessionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- the API (documented on the sync client) ----------------------------------------

    async def create(
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
        """Starts a session under a fresh server-generated ID; never retried here."""
        return await self._run(
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

    async def get(self, session_id: str, *, peek: bool = False) -> Session:
        """Reads a session (sliding its idle deadline unless `peek`). Raises NotFound. Gets
        that other tasks start while one is on the wire go out together as one GetMany."""
        gets = self._coalescer() if isinstance(session_id, str) else None
        if gets is None:
            return await self._get_one(session_id, peek)
        return await gets.get(session_id, peek)

    async def touch(self, session_id: str) -> datetime:
        """Slides the idle deadline; returns the new expires_at."""
        return await self._run(_Api.touch(session_id))

    async def update(
        self,
        session_id: str,
        set: Optional[Mapping[str, Value]] = None,
        remove: Iterable[str] = (),
        *,
        expected_version: Optional[int] = None,
        idempotency_key: str = "",
    ) -> Session:
        """Sets and removes attributes atomically; with expected_version, compare-and-set
        (Conflict with .current_version on a mismatch). Never retried here."""
        return await self._run(
            _Api.update(
                session_id,
                set,
                remove,
                expected_version=expected_version,
                idempotency_key=idempotency_key,
            )
        )

    async def regenerate(
        self,
        session_id: str,
        user_id: Optional[str] = None,
        *,
        drop_attributes: bool = False,
        idempotency_key: str = "",
    ) -> Session:
        """Moves the session to a fresh ID (the old one is dead); binds user_id if given."""
        return await self._run(
            _Api.regenerate(
                session_id,
                user_id,
                drop_attributes=drop_attributes,
                idempotency_key=idempotency_key,
            )
        )

    async def destroy(self, session_id: str) -> bool:
        """Ends one session; True if a live session was destroyed."""
        return await self._run(_Api.destroy(session_id))

    async def list_user_sessions(
        self, user_id: str, *, include_attributes: bool = False
    ) -> List[Session]:
        """The user's live sessions, oldest first."""
        return await self._run(
            _Api.list_user_sessions(user_id, include_attributes=include_attributes)
        )

    async def destroy_user_sessions(self, user_id: str, *, except_id: str = "") -> int:
        """Ends every session of the user except `except_id`; returns how many ended."""
        return await self._run(_Api.destroy_user_sessions(user_id, except_id=except_id))

    async def get_many(
        self, session_ids: Sequence[str], *, peek: bool = False
    ) -> List[Union[Session, SessiondError]]:
        """One result per ID, in order: a Session, or the SessiondError (e.g. NotFound) for it."""
        return await self._run(_Api.get_many(session_ids, peek=peek))
