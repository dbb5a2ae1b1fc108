"""The engine behind an event loop: many concurrent callers, one stepping thread.

Contract:
- `AsyncEngine.generate(prompt, params, request_id=None)` validates at once (raising
  `InvalidRequestError` in the caller, before any work) and returns an async iterator of
  `RequestOutput` deltas, the last one with `finished=True`.
- Leaving the iteration early (a client that disconnects) or calling `abort(request_id)`
  removes the request before the next step and frees its cache blocks.
- One daemon thread owns the `Engine`; callers only enqueue commands, so no lock is held across
  a model step. `call(fn)` runs `fn(engine)` there between steps (adding or removing adapters).
  An exception in a step fails the requests of that step's batch, not the server.
- Given a function instead of an `Engine`, the engine thread builds it (the constructor waits
  and re-raises a build error). Do that when the process has no other torch work: OpenMP
  (libgomp) keeps one thread team per thread that ever ran a parallel region, and once two
  teams together hold more threads than there are cores, every barrier sleeps instead of
  spinning. A model loaded on one thread and stepped on another decoded at 0.5-0.7x here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any, Callable

from moeray.engine.engine import Engine, RequestOutput
from moeray.engine.params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; the request cannot finish."""


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine]):
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        built = threading.Event()
        failure: list[BaseException] = []

        def build_then_run() -> None:
            try:
                self.engine = engine if isinstance(engine, Engine) else engine()
            except BaseException as err:  # handed to the constructor, which raises it
                failure.append(err)
                return
            finally:
                built.set()
            self._run()

        self._thread = threading.Thread(target=build_then_run, name="moeray-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            self._stopped = True
            raise failure[0]

    # ---- caller side (any event loop) --------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate now, then stream deltas. (Call, then iterate: validation errors raise here.)"""
        if self._stopped:
            raise EngineDeadError("the engine has stopped")
        request_id = request_id or f"req-{next(self._ids)}"
        self.engine.check_adapter(adapter)
        if params.structured is not None:  # a first compile of its grammar may take a while: not on this loop
            prompt_ids, _ = await asyncio.to_thread(self.engine.validate, prompt, params)
        else:
            prompt_ids, _ = self.engine.validate(prompt, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request_id, prompt_ids, params, adapter))
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """`fn(engine)` on the engine thread, between steps (torch work belongs there, see above);
        its result, or its exception raised here."""
        if self._stopped:
            raise EngineDeadError("the engine has stopped")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._send(("call", fn, loop, done))
        return await done

    @property
    def is_running(self) -> bool:
        """The engine thread is alive and accepting requests (what health checks ask)."""
        return not self._stopped and self._thread.is_alive()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self):
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._send(("stop",))
        self._thread.join(timeout=10)

    def _send(self, command: tuple[Any, ...]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """One wake-up per listening event loop, however many requests it has outputs for: each
        cross-thread call writes the loop's wake-up pipe and contends for the GIL."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((request_id, target[1], item))
        for loop, queued in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, queued)
            except RuntimeError:  # the callers' event loop has closed: nobody listens any more
                for request_id, _, _ in queued:
                    self._streams.pop(request_id, None)

    # ---- engine thread -----------------------------------------------------------------------
    def _apply_commands(self) -> bool:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command[0] == "stop":
                return False
            if command[0] == "abort":
                self.engine.abort(command[1])
            elif command[0] == "call":
                _, fn, loop, done = command
                try:
                    result, error = fn(self.engine), None
                except Exception as err:  # noqa: BLE001 - handed to the caller
                    result, error = None, err
                _settle(loop, done, result, error)
            else:
                _, request_id, prompt_ids, params, adapter = command
                try:
                    self.engine.add_request(request_id, prompt_ids, params, adapter)
                except Exception as err:  # validated already; a race (duplicate id) ends up here
                    self._deliver(request_id, err)

    def _run(self) -> None:
        while True:
            if not self._apply_commands():
                break
            if not self.engine.has_unfinished:
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:
                logger.exception("engine step failed; failing its requests")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(request_id, err)
                continue
            self._deliver_all([(output.request_id, output) for output in outputs])
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError("the engine was shut down"))


def _settle(loop: asyncio.AbstractEventLoop, done: asyncio.Future, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop has closed
        pass


def _put_all(items: list[tuple[str, asyncio.Queue, Any]]) -> None:
    for _, stream, item in items:
        stream.put_nowait(item)
