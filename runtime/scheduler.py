"""The request queue in front of the model: as many request threads as the model has slots.

With one slot, one thread runs each request in turn (a llama.cpp context is not thread-safe);
with `parallel` slots, that many run at once and the model batches their steps (slots.py). The
event loop stays free to answer other requests and to notice clients that hang up: their
generation is stopped (or, if still queued, never started). Past `max_queue` waiting requests a
new one is refused with `QueueFull`, which says when to retry.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .request import ChatRequest

if TYPE_CHECKING:
    from .model import Model


_END = object()
DEFAULT_MAX_QUEUE = 16


class QueueFull(Exception):
    """Every slot is busy and the queue is full; `retry_after` is a guess in whole seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class EventStream:
    """One request's model events, passed from the worker thread to the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._finished = False
        self.cancelled = threading.Event()

    def put(self, item: object) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> object:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item


class Scheduler:
    """Runs requests on the model, `model.parallel` at a time; the executor's queue is the request queue."""

    def __init__(self, model: "Model", max_queue: int = DEFAULT_MAX_QUEUE):
        self.model = model
        self.slots = getattr(model, "parallel", 1)
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="r7b-generate")
        self._streams: set[EventStream] = set()
        self._lock = threading.Lock()
        self._waiting = 0
        self._mean_s = 5.0  # running mean of a request's duration, for Retry-After

    def submit(self, request: ChatRequest) -> EventStream:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(self._waiting, self._retry_after())
            stream = EventStream()
            self._streams.add(stream)
            self._waiting += 1
        self._pool.submit(self._run, request, stream)
        return stream

    def _retry_after(self) -> int:
        """Seconds until the queue has moved by one slot's worth, from the mean request time."""
        return max(1, min(60, math.ceil(self._mean_s * (self._waiting / self.slots))))

    def close(self) -> None:
        """Stop every queued or running generation and wait for the thread to let go of the model."""
        with self._lock:
            for stream in self._streams:
                stream.cancel()
        self._pool.shutdown(wait=True)

    def _run(self, request: ChatRequest, stream: EventStream) -> None:
        with self._lock:
            self._waiting -= 1
        started = time.monotonic()
        try:
            if not stream.cancelled.is_set():
                self._generate(request, stream)
        except BaseException as exc:  # handed to the request, which decides what the client sees
            stream.put(exc)
        finally:
            stream.put(_END)
            with self._lock:
                self._streams.discard(stream)
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)

    def _generate(self, request: ChatRequest, stream: EventStream) -> None:
        prompt = self.model.prepare(request)
        events = self.model.generate(prompt, request.sampling)
        try:
            for event in events:
                stream.put(event)
                if stream.cancelled.is_set():
                    return
        finally:
            events.close()
