"""Concurrent `get`s of one client, sent together as one GetMany: threads of the sync client
(GetCoalescer), tasks of the asyncio client (AsyncGetCoalescer).

A gRPC call from Python costs the calling process far more CPU than the server spends
answering it, and the cost is per call, not per session read. So while one get of a client
is on the wire, the gets that other threads start queue behind it; when it returns, the
first of them sends every queued ID (up to `max_batch`) in one GetMany, and each thread
gets its own session or its own error. A get that finds nothing in flight goes out at once
as a plain Get, so a single-threaded caller sees no change.

One batch is in flight at a time. In the sync client the thread whose get leads a batch sends
it, then hands the lead to the next queued get before it returns; in the asyncio client a
task of the coalescer's own sends the batches, so a cancelled caller strands no one. Each
waiter keeps its own deadline: a batch is sent with what is left of its oldest get's
timeout.

Where a batch cannot answer for its gets they fall back to their own Get, with the client's
retries: a per-ID UNAVAILABLE (a cluster node lost its lease mid-batch), or the whole
GetMany refused as too large (RESOURCE_EXHAUSTED: a reply larger than max_message_bytes, or
than the channel's receive limit) or too long (INVALID_ARGUMENT: more IDs than the server's
max_batch_ids; later batches are then half as long). Any other failure of the GetMany
(UNAVAILABLE after the retries, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED from a server shedding
load) is raised in every waiter, each as its own exception.
"""

from __future__ import annotations

import _thread
import asyncio
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import grpc

from .errors import Unavailable, from_rpc_error, rpc_code

# A waiter's result when its batch could not answer for it: it sends its own Get.
_ALONE = object()


class _Failed:
    """The GetMany itself failed: each waiter raises its own exception for it."""

    __slots__ = ("error",)

    def __init__(self, error: grpc.RpcError):
        self.error = error


class _Waiter:
    """One thread's get: what it asks, and (once `done` is released) its answer or the lead."""

    __slots__ = ("session_id", "peek", "deadline", "done", "result", "lead")

    def __init__(self, session_id: str, peek: bool, deadline: float):
        self.session_id = session_id
        self.peek = peek
        self.deadline = deadline
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.result: Any = _ALONE  # until its batch answers for it
        self.lead = False


def _take(queue: List[Any], max_batch: int) -> Tuple[List[Any], List[Any]]:
    """(batch, rest): up to max_batch queued gets with the head's `peek`, the head first."""
    peek = queue[0].peek
    batch: List[Any] = []
    rest: List[Any] = []
    for waiter in queue:
        if waiter.peek == peek and len(batch) < max_batch:
            batch.append(waiter)
        else:
            rest.append(waiter)
    return batch, rest


def _time_left(batch: List[Any]) -> float:
    """What is left of the batch's oldest get's timeout."""
    return max(0.0, min(w.deadline for w in batch) - time.monotonic())


def _failed(batch: List[Any], err: grpc.RpcError) -> bool:
    """The GetMany failed. Refused for its size, each get goes alone; any other failure (a
    load-shedding RESOURCE_EXHAUSTED among them: no call of N gets there) fails each get.
    True if the server found the batch too long, so later ones should be shorter."""
    code = rpc_code(err)
    details = (err.details() if hasattr(err, "details") else "") or ""
    too_long = code == grpc.StatusCode.INVALID_ARGUMENT  # over max_batch_ids
    too_large = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in details
    result: Any = _ALONE if too_long or too_large else _Failed(err)
    for waiter in batch:
        waiter.result = result
    return too_long


def _answered(batch: List[Any], results: List[Any]) -> None:
    """The GetMany's answer for each get; a per-ID UNAVAILABLE sends that get alone."""
    for waiter, result in zip(batch, results):
        if not isinstance(result, Unavailable):
            waiter.result = result


def _outcome(result: Any) -> Any:
    """A get's result to return, raising its error; _ALONE is left to the caller."""
    if isinstance(result, _Failed):
        raise from_rpc_error(result.error) from result.error
    if isinstance(result, BaseException):  # this get's own (a SessiondError per ID)
        raise result
    return result


def check_max_batch(max_coalesced_gets: int) -> int:
    """max_coalesced_gets, if a client may have it (ValueError otherwise)."""
    if max_coalesced_gets < 1:
        raise ValueError(f"max_coalesced_gets must be at least 1, not {max_coalesced_gets}")
    return max_coalesced_gets


class _Coalescer:
    """What both coalescers hold: the client's own Get and GetMany, its timeout, the longest
    batch to send, and the gets queued."""

    def __init__(
        self,
        get_one: Callable[[str, bool], Any],
        get_many: Callable[[List[str], bool, float], Any],
        timeout: Callable[[], float],
        max_batch: int,
    ):
        self._get_one = get_one
        self._get_many = get_many
        self._timeout = timeout
        self._max_batch = check_max_batch(max_batch)
        self._queue: List[Any] = []

    def _failed(self, batch: List[Any], err: grpc.RpcError) -> None:
        if _failed(batch, err):  # too long for the server: later batches are half as long
            self._max_batch = max(1, len(batch) // 2)


class GetCoalescer(_Coalescer):
    """Gets of one client (in one process), coalesced.

    get_one(session_id, peek) is the client's own Get (with its retries; raises a
    SessiondError). get_many(ids, peek, timeout) sends one GetMany (with the client's
    retries) and returns a Session or a SessiondError per ID, or raises grpc.RpcError.
    """

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._lock = threading.Lock()
        self._busy = False  # a batch is being sent; False means the queue is empty

    def get(self, session_id: str, peek: bool) -> Any:
        me = _Waiter(session_id, peek, time.monotonic() + self._timeout())
        with self._lock:
            self._queue.append(me)
            lead = not self._busy
            self._busy = True
        if not lead:
            try:
                me.done.acquire()
            except BaseException:  # interrupted (KeyboardInterrupt in the main thread)
                self._abandon(me)
                raise
            if not me.lead:
                return self._finish(me)
        # Leading: `me` is first in the queue (the queue was empty, or `me` was promoted
        # from its head), so the batch taken holds it.
        batch = self._take()
        try:
            self._send(batch)
        finally:
            self._hand_off()
            for waiter in batch:
                if waiter is not me:
                    waiter.done.release()
        return self._finish(me)

    def _take(self) -> List[_Waiter]:
        with self._lock:
            batch, self._queue = _take(self._queue, self._max_batch)
            return batch

    def _hand_off(self) -> None:
        """The next queued get leads the next batch; with none queued, nothing is busy."""
        with self._lock:
            if not self._queue:
                self._busy = False
                return
            head = self._queue[0]
            head.lead = True
        head.done.release()

    def _abandon(self, me: _Waiter) -> None:
        """Takes back a get whose thread stopped waiting: out of the queue, and if it had
        just been given the lead, the lead passes on (a get already in a batch is answered
        to no one)."""
        with self._lock:
            if me not in self._queue:
                return
            self._queue.remove(me)
            promoted = me.lead
        if promoted:
            self._hand_off()

    def _send(self, batch: List[_Waiter]) -> None:
        """Sets the result of every waiter the batch answers for: a Session or the exception
        to raise. The others keep _ALONE. Raises nothing but an interrupt (whose waiters
        then go alone too)."""
        if len(batch) == 1:  # a plain Get, sent while this batch holds the lead
            alone = batch[0]
            try:
                alone.result = self._get_one(alone.session_id, alone.peek)
            except BaseException as err:  # raised by _finish, in this same thread
                alone.result = err
            return
        try:
            ids = [w.session_id for w in batch]
            results = self._get_many(ids, batch[0].peek, _time_left(batch))
        except grpc.RpcError as err:
            self._failed(batch, err)
            return
        except Exception:  # not the server's answer: each get finds out on its own
            return
        _answered(batch, results)

    def _finish(self, me: _Waiter) -> Any:
        if me.result is _ALONE:
            return self._get_one(me.session_id, me.peek)
        return _outcome(me.result)


class _AsyncWaiter:
    """One task's get: what it asks, its answer once its batch is sent, and the future the
    task awaits."""

    __slots__ = ("session_id", "peek", "deadline", "future", "result")

    def __init__(self, session_id: str, peek: bool, deadline: float, future: "asyncio.Future[Any]"):
        self.session_id = session_id
        self.peek = peek
        self.deadline = deadline
        self.future = future
        self.result: Any = _ALONE


class AsyncGetCoalescer(_Coalescer):
    """Gets of one asyncio client (in one event loop of one process), coalesced.

    get_one(session_id, peek) and get_many(ids, peek, timeout) are coroutines, as for
    GetCoalescer (the same arguments).
    """

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._sender: Optional["asyncio.Task[None]"] = None  # sends batches while any queue

    async def get(self, session_id: str, peek: bool) -> Any:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self._timeout()
        me = _AsyncWaiter(session_id, peek, deadline, loop.create_future())
        self._queue.append(me)
        if self._sender is None:
            self._sender = loop.create_task(self._send_all())
        result = await me.future
        if result is _ALONE:
            return await self._get_one(session_id, peek)
        return _outcome(result)

    async def _send_all(self) -> None:
        try:
            while True:
                # Cancelled callers' gets are dropped unsent.
                self._queue = [w for w in self._queue if not w.future.done()]
                if not self._queue:
                    return
                batch, self._queue = _take(self._queue, self._max_batch)
                try:
                    await self._send(batch)
                finally:
                    for waiter in batch:
                        if not waiter.future.done():
                            waiter.future.set_result(waiter.result)
        finally:
            self._sender = None
            for waiter in self._queue:  # only if this task itself was cancelled
                if not waiter.future.done():
                    waiter.future.set_result(_ALONE)

    async def _send(self, batch: List[_AsyncWaiter]) -> None:
        if len(batch) == 1:  # a plain Get
            alone = batch[0]
            try:
                alone.result = await self._get_one(alone.session_id, alone.peek)
            except Exception as err:  # raised by the get that asked
                alone.result = err
            return
        try:
            ids = [w.session_id for w in batch]
            results = await self._get_many(ids, batch[0].peek, _time_left(batch))
        except grpc.RpcError as err:
            self._failed(batch, err)
            return
        except Exception:  # not the server's answer: each get finds out on its own
            return
        _answered(batch, results)
