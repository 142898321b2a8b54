"""The engine requests of one HTTP request: submitted together, their events carried from the engine's thread to
the event loop, and read back until each request has finished, the deadline passes or the client leaves.

The engine calls back on its own thread; the events cross to the event loop through `loop.call_soon_threadsafe`
onto one asyncio queue per HTTP request. Whoever stops reading early (a timeout, a client that left) cancels the
engine requests still open, which frees their batch slots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from heft.serve.openai_api import ApiError, timeout_error
from heft.serve.types import (
    EngineClosed,
    Finished,
    GenerationRequest,
    QueueFull,
    TokenEvent,
)

if TYPE_CHECKING:
    from fastapi import Request

__all__ = ["Submitted", "collect", "stream_events"]


class Submitted:
    """The engine requests of one HTTP request: their events arrive on the engine thread and are queued, as
    (choice index, event), on the event loop."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, TokenEvent | Finished]] = asyncio.Queue()
        self.handles: list[Any] = []
        self.open = 0  # requests without their Finished yet
        self._getter: asyncio.Future | None = None  # kept across waits: a wait that times out loses no event

    def submit(self, reqs: list[GenerationRequest]) -> None:
        """Submit every request, or none: a queue that fills half-way cancels those already in."""
        try:
            for i, req in enumerate(reqs):
                self.handles.append(self.engine.submit(req, self._callback(i)))
                self.open += 1
        except QueueFull:
            self.cancel()
            raise ApiError(429, "the server's queue is full (--max-queue); retry later", None, "queue_full",
                           "rate_limit_error") from None
        except EngineClosed:
            self.cancel()
            raise ApiError(503, "the server is shutting down; retry on another instance", None, "shutting_down",
                           "server_error") from None
        except ValueError as e:  # the engine's own checks (the HTTP layer's come first and should catch all)
            self.cancel()
            raise ApiError(400, str(e)) from None

    def _callback(self, i: int) -> Any:
        def on_event(ev: TokenEvent | Finished) -> None:  # engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
            except RuntimeError:  # the event loop is closed: nobody waits for this answer any more
                pass
        return on_event

    def cancel(self) -> None:
        """Cancel every engine request still running (the engine answers each with Finished("cancelled"))."""
        for h in self.handles:
            h.cancel()
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None

    async def next(self, timeout: float) -> tuple[int, TokenEvent | Finished] | None:
        """The next (choice index, event), or None after `timeout` seconds without one."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=max(timeout, 0.0))
        if not done:
            return None
        i, ev = self._getter.result()
        self._getter = None
        if isinstance(ev, Finished):
            self.open -= 1
        return i, ev


async def collect(sub: Submitted, n: int, request: Request, deadline: float
                   ) -> tuple[list[list[TokenEvent]], list[Finished]]:
    """Every event of `n` engine requests; 504 at the deadline and nothing at all if the client leaves (the
    engine requests are cancelled in both cases)."""
    events: list[list[TokenEvent]] = [[] for _ in range(n)]
    finished: list[Finished | None] = [None] * n
    try:
        while sub.open:
            left = deadline - time.monotonic()
            if left <= 0:
                raise timeout_error()
            got = await sub.next(min(left, 1.0))
            if got is None:
                if await request.is_disconnected():  # nobody will read the answer: free the batch slots
                    raise ApiError(400, "the client disconnected", None, "client_disconnected")
                continue
            i, ev = got
            if isinstance(ev, Finished):
                finished[i] = ev
            else:
                events[i].append(ev)
    except BaseException:
        sub.cancel()
        raise
    return events, [f for f in finished if f is not None]


async def stream_events(sub: Submitted, deadline: float) -> AsyncIterator[tuple[int, TokenEvent | Finished]]:
    """The events of `sub` as they come, until each request has finished; at the deadline the requests are
    cancelled and ApiError(504) raised. Whoever stops iterating early (a client that left: the task is cancelled)
    cancels the engine requests."""
    try:
        while sub.open:
            left = deadline - time.monotonic()
            if left <= 0:
                raise timeout_error()
            got = await sub.next(left)
            if got is not None:
                yield got
    finally:
        if sub.open:
            sub.cancel()
