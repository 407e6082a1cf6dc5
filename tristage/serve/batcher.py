"""One engine thread per served model: requests come in from asyncio through a queue, tokens go back to each
request's asyncio queue.

    batcher = Batcher(model, max_rows=32, name="sft")
    tokens = batcher.submit([Request(key, prompt_ids, params, generator)])  # from a coroutine: an asyncio.Queue
    token = await tokens.get()          # engine.Token, or an Exception when the engine failed
    batcher.cancel([key])               # the row leaves the batch at the next step (a client went away)

Choices, and why:
- The engine (`ContinuousBatch`) is driven by one thread of its own, so the event loop never waits on the model
  and torch's ops (which release the GIL) run beside the loop's HTTP work. One thread per model: two models decode
  in parallel, each with its own batch.
- Commands (add, cancel, close) go in through a `queue.Queue`: the thread drains it between steps, so a request
  joins at the next step and a cancelled one leaves there, and it blocks on the queue when nothing runs (an idle
  server uses no CPU).
- Tokens go out with one `loop.call_soon_threadsafe` per step carrying every row's token (not one per token), into
  each request's own `asyncio.Queue`.
- A step that raises fails the requests then in the batch (they get the exception) and the thread goes on: one
  bad request cannot take the model's endpoint down.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence

from tristage.model.gpt import GPT
from tristage.serve.engine import ContinuousBatch, Request, Token

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, model: GPT, *, max_rows: int = 32, name: str = "model"):
        self.batch = ContinuousBatch(model, max_rows=max_rows)
        self.inbox: queue.Queue = queue.Queue()
        self.sinks: dict[object, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # the thread's own
        self.cancelled = 0  # requests cancelled while waiting or running (a count for tests and logs)
        self.peak = 0  # the most requests in the batch (running or waiting) at one step
        self.thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self.thread.start()

    @property
    def running(self) -> int:
        """Rows in the batch now (read from another thread: a snapshot)."""
        return self.batch.running

    def submit(self, reqs: Sequence[Request]) -> asyncio.Queue:
        """Queue requests (from a coroutine); their tokens arrive in the returned queue, in order per request."""
        tokens: asyncio.Queue = asyncio.Queue()
        self.inbox.put(("add", list(reqs), asyncio.get_running_loop(), tokens))
        return tokens

    def cancel(self, keys: Sequence[object]) -> None:
        """Drop these requests (those already finished are ignored). Safe from any thread."""
        self.inbox.put(("cancel", list(keys)))

    def close(self) -> None:
        self.inbox.put(("close",))
        self.thread.join(timeout=10)

    # ---- the thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            cmds = [self.inbox.get()] if not self.batch.busy else []
            while True:
                try:
                    cmds.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for cmd in cmds:
                if cmd[0] == "close":
                    return
                self._command(cmd)
            if not self.batch.busy:
                continue
            self.peak = max(self.peak, self.batch.running + len(self.batch.waiting))
            try:
                out: list[tuple[object, Token | Exception]] = [(t.key, t) for t in self.batch.step()]
            except Exception as e:  # an internal failure: fail who was in the batch, keep serving
                log.exception("engine step failed")
                out = [(key, e) for key in self.batch.reset()]
            self._deliver(out)

    def _command(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, reqs, loop, sink = cmd
            failed = []
            for q in reqs:
                try:
                    self.batch.add(q)
                    self.sinks[q.key] = (loop, sink)
                except ValueError as e:
                    failed.append(e)
            if failed:
                loop.call_soon_threadsafe(_put_all, [(sink, e) for e in failed])
        elif cmd[0] == "cancel":
            for key in cmd[1]:
                if self.batch.cancel(key):
                    self.cancelled += 1
                self.sinks.pop(key, None)

    def _deliver(self, out: list[tuple[object, Token | Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Token | Exception]]] = {}
        for key, item in out:
            where = self.sinks.get(key)
            if where is None:
                continue
            if isinstance(item, Exception) or item.finish_reason is not None:
                del self.sinks[key]
            by_loop.setdefault(where[0], []).append((where[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop was closed (the server is shutting down)
                pass


def _put_all(items: list[tuple[asyncio.Queue, Token | Exception]]) -> None:
    for sink, item in items:
        sink.put_nowait(item)
