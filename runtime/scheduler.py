"""The request queue in front of the model: one thread owns the llama.cpp context, requests wait in order.

A llama.cpp context is not thread-safe, so generation runs in one worker thread. The event loop
stays free to answer other requests and to notice clients that hang up: their generation is
stopped (or, if still queued, never started), so it does not hold up the requests behind it.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .request import ChatRequest

if TYPE_CHECKING:
    from .model import Model


_END = object()


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
    """Runs requests on the model one at a time in a single thread; the executor's queue is the request queue."""

    def __init__(self, model: "Model"):
        self.model = model
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r7b-generate")
        self._streams: set[EventStream] = set()
        self._lock = threading.Lock()

    def submit(self, request: ChatRequest) -> EventStream:
        stream = EventStream()
        with self._lock:
            self._streams.add(stream)
        self._pool.submit(self._run, request, stream)
        return stream

    def close(self) -> None:
        """Stop every queued or running generation and wait for the thread to let go of the model."""
        with self._lock:
            for stream in self._streams:
                stream.cancel()
        self._pool.shutdown(wait=True)

    def _run(self, request: ChatRequest, stream: EventStream) -> None:
        try:
            if not stream.cancelled.is_set():
                self._generate(request, stream)
        except BaseException as exc:  # handed to the request, which decides what the client sees
            stream.put(exc)
        finally:
            stream.put(_END)
            with self._lock:
                self._streams.discard(stream)

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
