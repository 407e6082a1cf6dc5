"""Each served model's engine runs in a process of its own: requests go to it through a pipe, its tokens come back
to each request's asyncio queue.

    batcher = Batcher(model, max_rows=32, name="sft")   # starts the engine process (and a prefill process:
                                                        # prefill_threads > 0)
    batcher.wait_ready()                # optional: until it can decode (the first request waits for it anyway)
    tokens = batcher.submit([Request(key, prompt_ids, params, generator)])  # from a coroutine: an asyncio.Queue
    token = await tokens.get()          # engine.Token, or an Exception when the engine failed
    batcher.cancel([key])               # the row leaves the batch at the next step (a client went away)
    batcher.close()

Choices, and why:
- The engine (`ContinuousBatch`) runs in a process, not in a thread of the server. A decode step is some 150 small
  torch ops; each releases the GIL and takes it back, so an engine thread and the event loop's HTTP work (tokens
  to text, events out) waited on each other at every op. Measured on 2 idle cores with bench/bench_serve.py's
  load at 16 clients, runs taking turns: 790 and 1050 tok/s with a thread, 1120-1230 with a process (the engine's
  CPU per token 0.84-1.13 ms, then 0.79-0.86); the HTTP side (0.1 ms of CPU per token) runs beside it.
- The weights are moved to shared memory (torch.multiprocessing) and the process maps them: no second copy of the
  model (on a GPU, CUDA's IPC shares them; other devices' tensors cannot be shared, so the process gets a copy).
  Where /dev/shm has no room for them (a container's default is 64 MB) the server says so and does not start.
  The process is spawned, not forked (a fork of a process with threads and OpenMP state can deadlock), so
  a program that embeds the server needs the usual `if __name__ == "__main__":` guard. Its torch threads are
  `threads` (default: the parent's torch threads, which `tristage serve --threads` sets).
- The engine process blocks on its pipe when nothing runs (an idle server uses no CPU); between steps it drains the
  commands (add, cancel, close), so a request joins at the next step and a cancelled one leaves there. After each
  step it sends one message: every row's token and its counts (rows running, requests cancelled).
- A reader thread here waits on the pipe and hands each step's tokens to the event loop with one
  `loop.call_soon_threadsafe` (not one per token), into each request's own `asyncio.Queue`. Commands are sent from
  the caller's thread; the reader never sends, so a full pipe one way cannot block the other.
- On a CPU, a second process can prefill the prompts (`prefill_threads` > 0; `tristage serve --prefill-process
  on`): the prompt's forward pass runs there, beside the decode steps, and its keys, values and first logits go
  to the engine process (as bytes through a pipe), which copies them into a free row at its next step
  (`ContinuousBatch.add_prefilled`). Profiled under bench/bench_serve.py's load at 16 clients, the prefill was a
  quarter of the engine process's time, on a core the decode steps never used; yet on 2 shared cores moving it
  changed tokens/s by -13% to +11% between runs and cost 10-20 ms of TTFT, so `tristage serve` leaves it off by
  default. Requests go to the
  prefill process, which sends the engine every prefilled request in order (or its error: an empty or too long
  prompt), and every cancel it did not resolve itself after them, so the engine always knows the request a cancel
  names. The engine waits for the prefill process to be ready before it is. The process maps the shared weights
  and packs its own copy of the linear layers' (serve/packed.py): memory for them once more.
- `Replicas`: several engine processes for one model (`tristage serve --replicas`, 2 by default for a CPU model on
  2 CPUs or more), each with its own rows; a request goes to the one with the fewest requests in flight. A decode step
  of a small model is some 150 small ops that one thread runs best (a second torch thread in the same process did
  not pay), so two engines are what puts two cores to work: at 16 clients 1790-2334 tok/s against 1414 with one.
- A step that raises fails the requests then in the batch (they get the exception) and the engine goes on: one bad
  request cannot take the model's endpoint down. If the process itself dies (killed, out of memory), its requests
  and later ones fail with `EngineGone` (a 500), and the log says so.
- The process ignores Ctrl-C (the server stops it through `close`) and exits when its pipe closes (the server
  went away without closing it).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import pickle
import queue as stdqueue
import shutil
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

import numpy as np
import torch
import torch.multiprocessing as mp

from tristage.io import UserError
from tristage.model.gpt import GPT
from tristage.serve.engine import ContinuousBatch, Prefilled, Request, Token, check_prompt, prefill, prefill_count
from tristage.serve.packed import packed

log = logging.getLogger(__name__)


class EngineGone(RuntimeError):
    """The engine process exited: the requests it held, and later ones, fail with this."""


class Batcher:
    def __init__(self, model: GPT, *, max_rows: int = 32, name: str = "model", threads: int | None = None,
                 prefill_threads: int = 0):
        self.name = name
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        device = model.rope_cos.device
        if device.type not in ("cpu", "cuda"):  # tensors there cannot be shared: the process gets a CPU copy
            model = copy.deepcopy(model).cpu()
        _check_shared_memory(model, name)
        model.share_memory()  # what pickling to the process would do anyway; said here
        self.prefiller: mp.Process | None = None
        self.pconn: Connection | None = None
        prefilled = None  # the prefill process's pipe to the engine process (its receiving end)
        if prefill_threads > 0:
            self.pconn, p_child = ctx.Pipe()
            prefilled, p_out = ctx.Pipe(duplex=False)
            self.prefiller = ctx.Process(target=_prefill_process, name=f"prefill-{name}", daemon=True,
                                         args=(model, device, prefill_threads, p_child, p_out))
            self.prefiller.start()
            p_child.close()
            p_out.close()
        self.proc = ctx.Process(target=_engine_process, name=f"engine-{name}", daemon=True,
                                args=(model, device, max_rows, threads or torch.get_num_threads(), child, prefilled))
        self.proc.start()
        child.close()  # the process holds its end; ours closed, its exit is an EOF here
        if prefilled is not None:
            prefilled.close()
        self.lock = threading.Lock()  # sinks and gone: the event loop's thread and the reader's
        self.send_lock = threading.Lock()  # one message at a time on the pipe (cancel may come from any thread)
        self.sinks: dict[object, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.ready, self.gone, self.closing = threading.Event(), False, False
        self.running = 0  # rows in the batch at the engine's last message
        self.cancelled = 0  # requests cancelled while waiting or running (a count for tests and logs)
        self.peak = 0  # the most requests in the batch (running or waiting) at one step
        self.reader = threading.Thread(target=self._read, name=f"tokens-{name}", daemon=True)
        self.reader.start()

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the engine process can decode; RuntimeError if it died or did not start in time."""
        if not self.ready.wait(timeout) or self.gone:
            raise RuntimeError(f"the engine process of model {self.name!r} did not start (see the log above)")

    def submit(self, reqs: Sequence[Request]) -> asyncio.Queue:
        """Queue requests (from a coroutine); their tokens arrive in the returned queue, in order per request."""
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        with self.lock:
            gone = self.gone
            if not gone:
                self.sinks.update((q.key, (loop, tokens)) for q in reqs)
        if gone or not self._send(("add", [_by_pipe(q) for q in reqs]), self.pconn or self.conn):
            for _ in reqs:
                tokens.put_nowait(EngineGone(f"the engine process of model {self.name!r} has exited"))
        return tokens

    def cancel(self, keys: Sequence[object]) -> None:
        """Drop these requests (those already finished are ignored). Safe from any thread."""
        with self.lock:
            keys = [k for k in keys if self.sinks.pop(k, None) is not None]
        if keys:  # with a prefill process, through it: it drops them or passes the cancel on after them
            self._send(("cancel", keys), self.pconn or self.conn)

    def close(self) -> None:
        self.closing = True
        for conn, proc in [(self.pconn, self.prefiller), (self.conn, self.proc)]:
            if conn is not None and proc is not None:
                self._send(("close",), conn)
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        self.reader.join(timeout=10)

    def _send(self, msg: tuple, conn: Connection | None = None) -> bool:
        with self.send_lock:
            try:
                (conn or self.conn).send(msg)
                return True
            except OSError:  # the process is gone: the reader fails its requests
                return False

    # ---- the reader thread ----------------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return self._lost()
            if msg == "ready":
                self.ready.set()
                continue
            out, self.running, waiting, self.cancelled = msg
            self.peak = max(self.peak, self.running + waiting)
            self._deliver(out)

    def _deliver(self, out: list[tuple[object, Token | Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Token | Exception]]] = {}
        with self.lock:
            for key, item in out:
                where = self.sinks.get(key)
                if where is None:  # cancelled meanwhile
                    continue
                if isinstance(item, Exception) or item.finish_reason is not None:
                    del self.sinks[key]
                by_loop.setdefault(where[0], []).append((where[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop was closed (the server is shutting down)
                pass

    def _lost(self) -> None:
        """The pipe closed: after `close`, or because the process died (then its requests fail)."""
        with self.lock:
            self.gone, keys = True, list(self.sinks)
        self.running = 0
        self.ready.set()
        if not self.closing:
            log.error("the engine process of model %r exited (code %s)", self.name, self.proc.exitcode)
        self._deliver([(k, EngineGone(f"the engine process of model {self.name!r} has exited")) for k in keys])


class Replicas:
    """Several engine processes for one model, each with its own rows: a request goes to the one with the fewest
    requests in flight (all of a request's n choices to the same one). Their weights are the same shared memory; each
    packs its own copy of the linear layers (serve/packed.py). The same calls as a Batcher."""

    def __init__(self, model: GPT, replicas: int, **kwargs):
        self.batchers = [Batcher(model, **kwargs) for _ in range(replicas)]
        self.name = self.batchers[0].name

    def wait_ready(self, timeout: float = 300.0) -> None:
        for b in self.batchers:
            b.wait_ready(timeout)

    def submit(self, reqs: Sequence[Request]) -> asyncio.Queue:
        alive = [b for b in self.batchers if not b.gone] or self.batchers  # a dead engine gets no more requests
        return min(alive, key=lambda b: len(b.sinks)).submit(reqs)

    def cancel(self, keys: Sequence[object]) -> None:
        for b in self.batchers:  # each drops only the keys it holds
            b.cancel(keys)

    def close(self) -> None:
        for b in self.batchers:
            b.close()

    @property
    def running(self) -> int:
        return sum(b.running for b in self.batchers)

    @property
    def cancelled(self) -> int:
        return sum(b.cancelled for b in self.batchers)

    @property
    def peak(self) -> int:
        return max(b.peak for b in self.batchers)

    @peak.setter
    def peak(self, value: int) -> None:
        for b in self.batchers:
            b.peak = value

    @property
    def prefiller(self) -> mp.Process | None:
        return self.batchers[0].prefiller


def _check_shared_memory(model: GPT, name: str) -> None:
    """A UserError when the weights cannot fit in /dev/shm (a container's default is 64 MB): filling it would kill
    the server with a bus error rather than an exception."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu" and not t.is_shared()]
    need = sum(t.numel() * t.element_size() for t in tensors)
    if need and os.path.isdir("/dev/shm") and need > (free := shutil.disk_usage("/dev/shm").free):
        raise UserError(f"model {name!r}: its engine process maps the weights from shared memory, which needs "
                        f"{need / 2**20:.0f} MiB in /dev/shm and {free / 2**20:.0f} MiB are free; give it room "
                        "(docker run --shm-size=...)")


def _by_pipe(q: Request) -> tuple[Request, bytes | None]:
    """A request as the pipe carries it: its generator's state as bytes (pickled, a generator's state tensor would
    go through a shared-memory file and a file descriptor per request), none for a greedy one (it draws nothing)."""
    g = q.generator
    state = bytes(g.get_state().numpy()) if g is not None and q.params.temperature > 0 else None
    return dataclasses.replace(q, generator=None), state


def _put_all(items: list[tuple[asyncio.Queue, Token | Exception]]) -> None:
    for sink, item in items:
        sink.put_nowait(item)


# ----------------------------------------------------------------------------- the engine process
def _engine_process(model: GPT, device: torch.device, max_rows: int, threads: int, conn: Connection,
                    prefilled: Connection | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    batch = ContinuousBatch(model.to(device), max_rows=max_rows)
    cancelled = 0
    try:
        if prefilled is not None and prefilled.recv() != "ready":
            return
        conn.send("ready")
        inputs = [conn] if prefilled is None else [conn, prefilled]
        while True:
            if not batch.busy:
                wait(inputs)  # an idle engine sleeps here
            out: list[tuple[object, Token | Exception]] = []
            while conn.poll():
                cmd = conn.recv()
                if cmd[0] == "close":
                    return
                if cmd[0] == "add":
                    for q, state in cmd[1]:
                        try:
                            batch.add(_restore(q, state, device))
                        except ValueError as e:
                            out.append((q.key, e))
                else:
                    cancelled += sum(batch.cancel(key) for key in cmd[1])
            while prefilled is not None and prefilled.poll():
                msg = prefilled.recv()
                if msg[0] == "failed":
                    out.append((msg[1], msg[2]))
                    continue
                if msg[0] == "cancel":  # and how many the prefill process dropped itself
                    cancelled += sum(batch.cancel(key) for key in msg[1]) + msg[2]
                    continue
                for q, state, *kvl in msg[1]:
                    batch.add_prefilled(Prefilled(_restore(q, state, device), *(_from_pipe(x, device) for x in kvl)))
            if batch.prefilled:  # their first tokens now, not after a decode step
                try:
                    first = [(t.key, t) for t in batch.admit()]
                except Exception as e:  # an internal failure: fail who was in the batch, keep serving
                    log.exception("engine step failed")
                    first = [(key, _sendable(e)) for key in batch.reset()]
                if first:
                    conn.send(_report(first, batch, cancelled))
            if batch.busy:
                try:
                    out += [(t.key, t) for t in batch.step()]
                except Exception as e:  # an internal failure: fail who was in the batch, keep serving
                    log.exception("engine step failed")
                    out += [(key, _sendable(e)) for key in batch.reset()]
            conn.send(_report(out, batch, cancelled))
    except (EOFError, OSError):  # the server (or the prefill process) went away
        return


def _report(out: list, batch: ContinuousBatch, cancelled: int) -> tuple:
    """The engine's message after a step: its tokens (or errors), rows running, requests waiting, cancels so far."""
    return out, batch.running, len(batch.waiting) + len(batch.prefilled), cancelled


def _to_pipe(t: torch.Tensor) -> tuple[np.ndarray, torch.dtype, tuple[int, ...]]:
    """A tensor as a pipe carries it: its bytes as a numpy array (any dtype, bfloat16 too), dtype and shape."""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy(), t.dtype, tuple(t.shape)


def _from_pipe(x: tuple[np.ndarray, torch.dtype, tuple[int, ...]], device: torch.device) -> torch.Tensor:
    data, dtype, shape = x
    return torch.from_numpy(data).view(dtype).reshape(shape).to(device)


def _restore(q: Request, state: bytes | None, device: torch.device) -> Request:
    """A request from the pipe with its generator back (`_by_pipe`)."""
    if state is not None:
        q.generator = torch.Generator(device)
        q.generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return q


# ----------------------------------------------------------------------------- the prefill process
def _prefill_process(model: GPT, device: torch.device, threads: int, conn: Connection, engine: Connection) -> None:
    """Prompts through the model, for the engine process: every request from `conn` goes to `engine` prefilled
    (keys, values and logits as numpy arrays: a pipe carries them as bytes), or failed (its ValueError). A batch's
    requests go in one message (the engine reads its pipe between decode steps: one message per request would
    let the last of a batch wait a step for each before it), sent by a thread, so a send that waits for the engine
    to read does not hold up the next prefill."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    fast = packed(model.to(device))
    context = model.config.max_position_embeddings
    queue: list[tuple[Request, bytes | None]] = []
    outbox: stdqueue.SimpleQueue = stdqueue.SimpleQueue()

    def sender() -> None:
        try:
            while (msg := outbox.get()) is not None:
                engine.send(msg)
        except (EOFError, OSError):
            return

    thread = threading.Thread(target=sender, name="prefilled", daemon=True)
    thread.start()
    try:
        engine.send("ready")
        while True:
            if not queue:
                wait([conn])  # idle: sleeps here
            while conn.poll():
                cmd = conn.recv()
                if cmd[0] == "close":
                    return
                if cmd[0] == "cancel":  # those not prefilled yet leave; the engine hears of the others after them
                    keys = set(cmd[1])
                    cancelled = [q.key for q, _ in queue if q.key in keys]
                    queue = [(q, st) for q, st in queue if q.key not in keys]
                    outbox.put(("cancel", [k for k in cmd[1] if k not in cancelled], len(cancelled)))
                    continue
                for q, state in cmd[1]:
                    try:
                        check_prompt(q.prompt, context)
                        queue.append((q, state))
                    except ValueError as e:
                        outbox.put(("failed", q.key, e))
            take = prefill_count([q for q, _ in queue], len(queue))  # the first, within the prefill budget
            batch, queue = queue[:take], queue[take:]
            if batch:
                try:
                    done = prefill(fast, [q for q, _ in batch])
                except Exception as e:  # an internal failure: fail these requests, keep serving
                    log.exception("prefill failed")
                    for q, _ in batch:
                        outbox.put(("failed", q.key, _sendable(e)))
                    continue
                outbox.put(("prefilled", [(q, state, _to_pipe(p.k), _to_pipe(p.v), _to_pipe(p.logits))
                                          for (q, state), p in zip(batch, done)]))
    except (EOFError, OSError):  # the server went away
        return
    finally:
        outbox.put(None)
        thread.join(timeout=10)


def _sendable(e: Exception) -> Exception:
    """The exception itself when it pickles, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
