"""The OpenAI-compatible HTTP API over a `Hub` (`tristage serve`), and the web pages when a vote database is given.

    app = create_app(hub, api_key="sk-local", db="votes.sqlite")
    uvicorn.run(app, host="127.0.0.1", port=8000)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "hi"}], stream=True)

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions; streaming is server-sent events
(`data: {chunk}` lines, then `data: [DONE]`), with a usage chunk when `stream_options.include_usage` is set.

Choices, and why:
- fastapi + uvicorn: request bodies are pydantic models, so a wrong type is found before the handler runs, and its
  message names the field. Ranges (max_tokens >= 1, 0 < top_p <= 1, 0 <= temperature <= 2, 1 <= n <= 128, ...)
  are checked once, in the hub, which the web pages call too.
- Every mistake is an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with its status: 400 for
  malformed JSON, a wrong type, a value out of range or a prompt longer than the context; 401 for a missing or
  wrong API key; 404 for an unknown model or path. Nothing a client sends can stop the server (tested). An
  internal failure is a 500 with the same body (and its traceback in the server's log).
- The API key guards /v1/* and the web pages' own routes (/web/*: chat, arena, votes, annotations), so a key set
  for a server on a public address protects the models and the vote store alike. A browser cannot send a bearer
  header from a page it loaded, so /web/* also takes the key as a cookie (`tristage_key`), which the pages set
  after asking for it once on a 401. The page files themselves (HTML, JS, CSS) are public: they hold no data.
- Supported: temperature, top_p, max_tokens (max_completion_tokens in chat), stop (a string or a list), seed, n,
  logprobs and top_logprobs (raw model log-probs, as in the engine), usage counts, several prompts in one
  /v1/completions request. Refused with a 400 instead of silently ignored: presence / frequency penalties,
  logit_bias, echo, suffix, tools, non-text message parts. Other OpenAI fields (user, metadata, ...) are ignored.
- A client that goes away frees its rows in the engine at once: streaming responses are cancelled by the server
  when the connection closes (the hub's generator then cancels the rows), and a non-streaming request watches
  for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from http.cookies import CookieError, SimpleCookie
from typing import Any, Literal
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from tristage.flags.serve import Config
from tristage.serve.hub import Hub, HubError, Piece

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use (user, metadata, ...) are ignored

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


# ----------------------------------------------------------------------------- errors
def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _api(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _refuse(param: str, why: str = "is not supported by this server") -> HubError:
    return HubError(400, f"{param} {why}", param, "unsupported_parameter")


# ----------------------------------------------------------------------------- the app
def create_app(hub: Hub, *, api_key: str | None = None, db: str | None = None) -> FastAPI:
    """The API over `hub` (at app.state.hub); with `db`, the web pages and their vote store too."""
    app = FastAPI(title="tristage", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    _error_handlers(app)
    if api_key is not None:
        app.add_middleware(KeyGuard, api_key=api_key)
    app.include_router(_v1(hub, int(time.time())))
    if db is not None:
        _install_web(app, db)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error of the API as an OpenAI-style error body (the pages keep FastAPI's own)."""

    @app.exception_handler(HubError)
    async def hub_error(request: Request, e: HubError) -> JSONResponse:
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        if not _api(request):
            return await request_validation_exception_handler(request, e)
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return _error(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                          None, "invalid_json")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            return _error(400, "the request body must be a JSON object (Content-Type: application/json)", None,
                          "invalid_json")
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg', 'invalid')}" if param else f"the request body: {err.get('msg', 'invalid')}"
        return _error(400, msg, param, "missing_required_parameter" if err.get("type") == "missing" else
                      "invalid_type")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if not _api(request):
            return await http_exception_handler(request, e)
        return _error(e.status_code, str(e.detail), None, None)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal server error ({type(e).__name__})", None, "internal_error")


def _v1(hub: Hub, created: int) -> APIRouter:
    """/v1/models, /v1/chat/completions and /v1/completions."""
    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(n, created) for n in hub.names]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict:
        hub.model(name)
        return _model_card(name, created)

    @v1.post("/chat/completions")
    async def chat(body: ChatBody, request: Request):
        _common(body)
        if body.tools:
            raise _refuse("tools")
        ids = hub.chat_prompt(body.model, [_message(m, i) for i, m in enumerate(body.messages)])
        if body.top_logprobs and not body.logprobs:
            raise HubError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        pieces = _complete(hub, body, ids, max_tokens, param, logprobs=body.logprobs,
                           top_logprobs=body.top_logprobs or 0)
        reply = _Reply("chat", body, len(ids), pieces)
        return await _respond(reply, request)

    @v1.post("/completions")
    async def completions(body: CompletionBody, request: Request):
        _common(body)
        if body.echo:
            raise _refuse("echo")
        if body.suffix:
            raise _refuse("suffix")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise HubError(400, f"logprobs must be between 0 and 5 (got {body.logprobs})", "logprobs",
                           "invalid_value")
        tok = hub.model(body.model).tokenizer
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise HubError(400, "prompt: empty list", "prompt", "invalid_value")
        ids = [tok.encode(x, add_special_tokens=True) if isinstance(x, str) else list(x) for x in prompts]
        lp = body.logprobs is not None
        streams = [_complete(hub, body, x, body.max_tokens, "max_tokens", logprobs=lp,
                             top_logprobs=body.logprobs or 0) for x in ids]
        reply = _Reply("text", body, sum(map(len, ids)), _merge(streams, body.n))
        return await _respond(reply, request)

    return v1


class KeyGuard:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY`, /web/* that or the cookie `tristage_key=KEY` (401
    otherwise), checked before the body is read, so a request without the key learns nothing else. A plain ASGI
    class rather than `@app.middleware("http")`, whose wrapper gets between a streaming response and the connection
    (and the news that a client left)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path.startswith(("/v1/", "/web/")):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not given and path.startswith("/web/"):
                given = _cookie(headers.get(b"cookie", b""), "tristage_key")
            if not hmac.compare_digest(given, self.key):
                await _error(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`.", None,
                             "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _cookie(header: bytes, name: str) -> bytes:
    """The value of cookie `name` in a Cookie header (percent-decoded, as the pages encode it), or b""."""
    jar = SimpleCookie()
    try:
        jar.load(header.decode("latin-1"))
    except CookieError:
        return b""
    return unquote(jar[name].value).encode() if name in jar else b""


def _install_web(app: FastAPI, db: str) -> None:
    """The web pages and their vote store (tristage/serve/web.py), when that module is there."""
    try:
        from tristage.serve import web
    except ModuleNotFoundError as e:
        if e.name != "tristage.serve.web":
            raise
        log.warning("no web pages in this installation (tristage.serve.web is missing); serving the API only")
        return
    web.install(app, db)


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tristage"}


def _common(body: _Body) -> None:
    """What both endpoints refuse rather than ignore."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise _refuse(name)
    if body.logit_bias:
        raise _refuse("logit_bias")
    if body.seed is not None and not -(2 ** 63) <= body.seed < 2 ** 64:
        raise HubError(400, "seed must fit in 64 bits", "seed", "invalid_value")


def _message(m: Message, i: int) -> dict:
    """A chat message as the chat template reads it: text parts joined into one string."""
    out = m.model_dump(exclude_none=True)
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _refuse(f"messages.{i}.content", "holds a part that is not text (only text is supported)")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    return out


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise HubError(400, f"stop: at most 16 sequences (got {len(stops)})", "stop", "invalid_value")
    return stops


def _complete(hub: Hub, body: _Body, ids: list[int], max_tokens: int | None, param: str, *, logprobs: bool,
              top_logprobs: int) -> AsyncIterator[Piece]:
    try:
        return hub.complete(body.model, ids, n=body.n, max_tokens=max_tokens, temperature=body.temperature,
                            top_p=body.top_p, seed=None if body.seed is None else body.seed % (1 << 62),
                            stop=_stops(body.stop), logprobs=logprobs, top_logprobs=top_logprobs)
    except HubError as e:  # name what the client sent: max_completion_tokens, the prompt of a text completion
        named = {"max_tokens": param, "messages": "messages" if isinstance(body, ChatBody) else "prompt"}
        if e.param in named and named[e.param] != e.param:
            raise HubError(e.status, e.message.replace(e.param, named[e.param]), named[e.param], e.code) from None
        raise


async def _merge(streams: list[AsyncIterator[Piece]], n: int) -> AsyncIterator[Piece]:
    """The pieces of several prompts' streams as one, choice indices renumbered prompt * n + choice."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as s:  # type: ignore[type-var]
            async for p in s:
                yield p
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(j: int, s: AsyncIterator[Piece]) -> None:
        try:
            async with aclosing(s):  # type: ignore[type-var]
                async for p in s:
                    p.index += j * n
                    q.put_nowait(p)
            q.put_nowait(None)
        except Exception as e:
            q.put_nowait(e)

    tasks = [asyncio.create_task(pump(j, s)) for j, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            p = await q.get()
            if p is None:
                left -= 1
            elif isinstance(p, Exception):
                raise p
            else:
                yield p
    finally:
        for t in tasks:
            t.cancel()


# ----------------------------------------------------------------------------- responses
class _Reply:
    """One request's pieces, rendered as an OpenAI chat or text completion, whole or as stream chunks."""

    def __init__(self, kind: Literal["chat", "text"], body: _Body, prompt_tokens: int,
                 pieces: AsyncIterator[Piece]):
        self.kind, self.body, self.pieces = kind, body, pieces
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.logprobs = bool(getattr(body, "logprobs", None) is not None and body.logprobs is not False)
        self.offsets: dict[int, int] = {}  # text completions: characters so far, per choice (text_offset)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _logprobs(self, p: Piece) -> dict | None:
        if not self.logprobs:
            return None
        if self.kind == "chat":
            def entry(text: str, lp: float) -> dict:
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(a, b) for a, b in t.top]}
                                for t in p.tokens]}
        off = self.offsets.get(p.index, 0)
        offsets = []
        for t in p.tokens:
            offsets.append(off)
            off += len(t.text)
        self.offsets[p.index] = off
        return {"tokens": [t.text for t in p.tokens], "token_logprobs": [t.logprob for t in p.tokens],
                "top_logprobs": [dict(t.top) for t in p.tokens] if self.body.logprobs else None,
                "text_offset": offsets}

    async def whole(self) -> dict:
        n = self.body.n * (1 if self.kind == "chat" else self._prompts())
        texts, reasons = [""] * n, [None] * n
        lps: list[list] = [[] for _ in range(n)]
        async with aclosing(self.pieces) as pieces:  # type: ignore[type-var]
            async for p in pieces:
                texts[p.index] += p.text
                reasons[p.index] = p.finish_reason or reasons[p.index]
                self.completion_tokens += p.completion_tokens
                if self.logprobs:
                    lps[p.index].append(p)
        choices = []
        for i in range(n):
            lp = None
            if self.logprobs:
                parts = [self._logprobs(p) for p in lps[i]]
                lp = ({"content": [c for x in parts for c in x["content"]]} if self.kind == "chat" else
                      {k: ([v for x in parts for v in x[k]] if parts[0][k] is not None else None)
                       for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")} if parts else None)
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lp,
                                "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": reasons[i]})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.body.model,
                "choices": choices, "usage": self.usage()}

    def _prompts(self) -> int:
        p = self.body.prompt  # type: ignore[attr-defined]
        return 1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p)

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece (a first role chunk per choice in chat), usage, [DONE]."""
        opts = self.body.stream_options or {}
        with_usage = bool(opts.get("include_usage"))
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"

        def chunk(choices: list[dict], **extra: Any) -> str:
            c = {"id": self.id, "object": obj, "created": self.created, "model": self.body.model, "choices": choices}
            if with_usage:
                c["usage"] = None
            c.update(extra)
            return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

        if self.kind == "chat":
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(self.body.n)])
        try:
            async with aclosing(self._chunks(chunk)) as chunks:
                async for c in chunks:
                    yield c
        except Exception as e:  # after the 200 has gone out: the error as the stream's last event
            log.exception("internal error in a stream")
            yield f"data: {json.dumps(error_body(f'internal server error ({type(e).__name__})', 'server_error'))}\n\n"
            return
        if with_usage:
            yield chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"

    async def _chunks(self, chunk) -> AsyncIterator[str]:
        async with aclosing(self.pieces) as pieces:  # type: ignore[type-var]
            async for p in pieces:
                self.completion_tokens += p.completion_tokens
                if not p.text and p.finish_reason is None and not (self.logprobs and p.tokens):
                    continue
                if self.kind == "chat":
                    delta = {"content": p.text} if p.text else {}
                    yield chunk([{"index": p.index, "delta": delta, "logprobs": self._logprobs(p),
                                  "finish_reason": p.finish_reason}])
                else:
                    yield chunk([{"index": p.index, "text": p.text, "logprobs": self._logprobs(p),
                                  "finish_reason": p.finish_reason}])


async def _respond(reply: _Reply, request: Request):
    if reply.body.stream:
        return StreamingResponse(reply.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    task = asyncio.create_task(reply.whole())
    while True:  # a client that goes away cancels the work (and so frees its rows)
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)


# ----------------------------------------------------------------------------- the command
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve `app` with uvicorn in a daemon thread (port 0: a free one) -> (base url, stop function): for a program
    that embeds the server, the tests and the screenshots."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        if not thread.is_alive():
            raise OSError(f"could not serve on {host}:{port}")
        time.sleep(0.01)

    def stop() -> None:
        srv.should_exit = True
        thread.join(timeout=10)

    return f"http://{host}:{srv.servers[0].sockets[0].getsockname()[1]}", stop


def main(cfg: Config) -> int:
    """`tristage serve`: check the flags and folders, load the models, serve until interrupted."""
    import os
    import socket
    from pathlib import Path

    import uvicorn

    from tristage.io import UserError
    from tristage.runtime import resolve_device, resolve_dtype
    from tristage.serve.hub import model_specs

    model_specs(cfg.models)  # every folder checked before a port is taken or a weight read
    if cfg.db is not None and not Path(cfg.db).resolve().parent.is_dir():
        raise UserError(f"--db {cfg.db}: its folder does not exist")
    try:  # the port, before minutes of loading: a busy port is the user's to fix
        with socket.create_server((cfg.host, cfg.port)):
            pass
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({why})") from None
    device = resolve_device(cfg.device)
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    on_cpu = torch.device(device).type == "cpu"
    prefill = cfg.prefill_process == "on" or (cfg.prefill_process == "auto" and cpus >= 2)
    if prefill and not on_cpu:
        if cfg.prefill_process == "on":
            raise UserError(f"--prefill-process on: only for a CPU model (the device is {device})")
        prefill = False
    replicas = cfg.replicas or (2 if on_cpu and cpus >= 2 else 1)
    # threads: the prefill process's, then the engines' (decode) share the rest but one, the HTTP process's
    prefill_threads = max(1, (cpus - 1) // 3) if prefill else 0
    torch.set_num_threads(cfg.threads or max(1, (cpus - 1 - prefill_threads) // replicas))
    hub = Hub.load(cfg.models, device=device, dtype=resolve_dtype(cfg.dtype, device), max_batch=cfg.max_batch,
                   prefill_threads=prefill_threads, replicas=replicas)
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("TRISTAGE_API_KEY") or None
    app = create_app(hub, api_key=api_key, db=cfg.db)
    print(f"serving {', '.join(hub.names)} at http://{cfg.host}:{cfg.port}/v1"
          + (f", pages at http://{cfg.host}:{cfg.port}/" if cfg.db is not None else "")
          + (" (API key required)" if api_key else ""), flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        hub.close()
    return 0
