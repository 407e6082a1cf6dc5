"""The web page: chat, a blind arena with its leaderboard, and preference annotation, served by the same process.

    install(app, "votes.db")        # what `tristage serve MODEL... --db votes.db` does (server.create_app)
    http://127.0.0.1:8000/          chat          /arena    /leaderboard    /annotate

Choices, and why:
- Plain HTML, JavaScript and CSS files (tristage/serve/static/), served as they are: no build step. Not gradio,
  which FastChat and LLaMA-Factory use: gradio is a heavy dependency (its own frontend and about a hundred
  packages) for four small pages; plain files are a few routes on the same fastapi app, one process and one port
  with the OpenAI-compatible API, talking to the same hub; we control exactly how text is rendered (every string
  from a user or a model enters the page through textContent, never as HTML); and plain DOM is easy to drive in a
  real browser for the tests (tests/test_web_browser.py).
- Safety: the pages are static (no server-side templating: no data is ever interpolated into HTML); data goes out
  as JSON or NDJSON only; and every page and script is sent with a Content-Security-Policy that allows only this
  origin's script files (no inline script, no event-handler attributes, no eval) and nosniff, so even text that
  reached the DOM as HTML could not run. With an API key set, the /web/* routes need it too
  (tristage/serve/server.py: KeyGuard), as a header or the `tristage_key` cookie that common.js sets after asking
  for it once.
- Streaming: a POST answered with NDJSON lines, {"delta": text} ... then {"done": true} or {"error": reason}, read
  with fetch's ReadableStream: a POST body (the conversation) is awkward with EventSource, and one line parser
  serves every page. A client that goes away cancels the hub's iteration, which frees its slot in the batch.
- Arena: the server draws two distinct served models at random and keeps their names, and both answers as they
  stream, in a pending battle under a random id; the page only ever sees "A" and "B" (a hub error naming a model
  is reworded). A vote is accepted once per battle and only after both answers are complete; it stores the battle
  with its prompt and answers, and only then are the names returned. Pending battles live in memory (the newest
  10,000): a restart loses unvoted rounds, never a vote.
- Leaderboard: the Bradley-Terry fit of tristage.eval.arena over every vote in the store, with 200 bootstrap rounds
  for the 95% intervals, recomputed per request (milliseconds for thousands of votes).
- Annotate: each answer is rated 1-5 on attributes, the best one picked, and a reason written. The attributes are
  helpfulness, honesty, harmlessness and instruction following by default, and the demo world's
  (tristage.world.gold.ATTRIBUTES) for its prompts, decided per prompt from the prompt file: a record's own
  `attributes` list wins; a record with the world's prompt `kind` (continue, story, fact, free: the shape of the
  world's eval/prompts.jsonl) gets the world's; anything else the defaults. The page can switch the set, and
  `install(..., attributes="world")` makes the world's the default for typed prompts (a demo-world server).
  Uploaded files: {prompt | messages, answers: [text | {text, model}]} records, or the arena's answer files
  ({prompt | messages, answer | response | output}, one file per model, the model named by the file's stem or the
  record's `model`), grouped by prompt; a bad record is refused naming the file, line and field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from tristage.io import DataError, parse_json
from tristage.serve.votes import DEFAULT_ATTRIBUTES, WINNERS, VoteStore

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGES = {"/": "chat.html", "/chat": "chat.html", "/arena": "arena.html", "/leaderboard": "leaderboard.html",
         "/annotate": "annotate.html"}
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
WORLD_KINDS = ("continue", "story", "fact", "free")  # the `kind` of the demo world's prompt records
ANSWER_KEYS = ("answer", "response", "output")  # the arena's answer files (tristage/stages/arena.py)
MAX_PENDING = 10_000
MAX_UPLOAD = 50 * 2**20  # bytes of one annotate upload


def attribute_sets() -> dict[str, list[str]]:
    from tristage.world.gold import ATTRIBUTES

    return {"default": list(DEFAULT_ATTRIBUTES), "world": list(ATTRIBUTES)}


class BadRequest(ValueError):
    """A request the page (or a script) got wrong: answered with its status and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- request fields
def _number(body: dict, key: str, default: float | None, lo: float, hi: float, kind: type = float,
            lo_open: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise BadRequest(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {v!r:.40}")
    if not ((lo < v) if lo_open else (lo <= v)) or v > hi:
        raise BadRequest(f"{key}: must be in {'(' if lo_open else '['}{lo:g}, {hi:g}] (got {v:g})")
    return kind(v)


def sampling(body: dict) -> dict[str, Any]:
    """max_tokens, temperature, top_p, seed of a request body, checked."""
    return {"max_tokens": _number(body, "max_tokens", 256, 1, 4096, int),
            "temperature": _number(body, "temperature", 0.7, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "seed": _number(body, "seed", None, 0, 2**63 - 1, int)}


def messages_of(body: dict, key: str = "messages") -> list[dict[str, str]]:
    """The conversation of a request (text, or messages ending with the user's turn), by the one prompt parser."""
    from tristage.data.records import prompt_messages

    try:
        return prompt_messages(body.get(key), key)
    except DataError as e:
        raise BadRequest(str(e)) from None


async def json_body(request: Request, limit: int = 2 * 2**20) -> dict:
    raw = await request.body()
    if len(raw) > limit:
        raise BadRequest(f"request body over {limit // 2**20} MiB", 413)
    try:  # the project's one JSON reader: too deep a nesting or a lone surrogate is a bad body too, not a 500
        body = parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except DataError as e:
        raise BadRequest(f"the body is not JSON: {e.reason}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


# ----------------------------------------------------------------------------- streaming from the hub
def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


async def _aclose(it: Any) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


def _hub_error(e: BaseException) -> BadRequest:
    """A hub's refusal (too long a prompt, a bad parameter) as a 4xx; anything else as a 500, logged."""
    status = getattr(e, "status_code", getattr(e, "status", None))  # HTTPException's, or the hub's HubError's
    if isinstance(status, int) and 400 <= status < 500:
        return BadRequest(str(getattr(e, "detail", e)), status)
    if isinstance(e, ValueError):
        return BadRequest(str(e))
    log.exception("the hub failed", exc_info=e)
    return BadRequest(f"internal error: {type(e).__name__}: {e}", 500)


async def open_stream(hub: Any, model: str, messages: list[dict[str, str]], params: dict,
                      on_done: Callable[[str], None] | None = None,
                      reword: Callable[[str], str] = lambda s: s) -> StreamingResponse:
    """An NDJSON streaming response of `model`'s answer. The first delta is awaited before answering, so a prompt
    the hub refuses is a plain 4xx; `on_done(full text)` runs when the answer is complete."""
    if model not in hub.names:
        raise BadRequest(reword(f"unknown model {model!r} (served: {', '.join(hub.names)})"), 404)
    it = None
    try:
        it = hub.chat_stream(model, messages, **params).__aiter__()
        first: str | None = await it.__anext__()
    except StopAsyncIteration:
        first = None
    except Exception as e:
        await _aclose(it)
        err = _hub_error(e)
        raise BadRequest(reword(str(err)), err.status) from None

    async def body() -> AsyncIterator[bytes]:
        text = ""
        try:
            if first is not None:
                text += first
                yield _line({"delta": first})
                async for delta in it:
                    text += delta
                    yield _line({"delta": delta})
            if on_done is not None:
                on_done(text)
            yield _line({"done": True})
        except Exception as e:  # the response has started: the error goes in the stream
            yield _line({"error": reword(str(_hub_error(e)))})
        finally:
            await _aclose(it)

    return StreamingResponse(body(), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- the arena's pending battles
@dataclass
class Pending:
    models: tuple[str, str]  # (model_a, model_b): secret until the vote
    messages: list[dict[str, str]]
    answers: dict[str, str | None] = field(default_factory=lambda: {"a": None, "b": None})
    started: set[str] = field(default_factory=set)
    voted: bool = False


class Arena:
    """Pending battles by id, the newest MAX_PENDING kept."""

    def __init__(self) -> None:
        self.pending: OrderedDict[str, Pending] = OrderedDict()
        self.rng = secrets.SystemRandom()

    def new(self, names: list[str], messages: list[dict[str, str]]) -> str:
        if len(set(names)) < 2:
            raise BadRequest(f"the arena needs two or more served models (serving: {', '.join(names) or 'none'})",
                             409)
        bid = secrets.token_urlsafe(12)
        self.pending[bid] = Pending(tuple(self.rng.sample(sorted(set(names)), 2)), messages)  # type: ignore[arg-type]
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)
        return bid

    def get(self, bid: str) -> Pending:
        p = self.pending.get(bid)
        if p is None:
            raise BadRequest("no such battle (unknown, or expired: start a new round)", 404)
        return p


# ----------------------------------------------------------------------------- annotate uploads
def _answer(v: Any, where: str, model: str | None) -> dict[str, Any]:
    if isinstance(v, dict):
        text = next((v[k] for k in ("text", "content", *ANSWER_KEYS) if k in v), None)
        model = v.get("model") if isinstance(v.get("model"), str) else model
    else:
        text = v
    if not isinstance(text, str) or not text.strip():
        raise DataError(None, None, "expected a non-blank answer (text, or an object with `text`)", where)
    return {"text": text, "model": model}


def _attributes(obj: dict, default: str) -> tuple[str, list[str]]:
    """(the attribute set's name, its attributes) for one prompt record."""
    sets = attribute_sets()
    own = obj.get("attributes")
    if own is not None:
        if not isinstance(own, list) or not own or not all(isinstance(a, str) and a.strip() for a in own):
            raise DataError(None, None, "expected a non-empty list of attribute names", "attributes")
        return "custom", list(dict.fromkeys(own))
    name = "world" if obj.get("kind") in WORLD_KINDS else default
    return name, sets[name]


def parse_upload(files: list[tuple[str, str]], default: str = "default") -> tuple[list[dict[str, Any]], int]:
    """Annotation items from uploaded files [(name, text)]: {prompt: messages, answers: [{text, model}],
    attribute_set, attributes}; a record with `answers` is an item, records with one answer each are grouped by
    prompt. Returns (items with two or more answers, how many prompts had fewer). A bad record raises DataError
    naming the file, line and field."""
    from tristage.data.records import record_prompt

    items: list[dict[str, Any]] = []
    grouped: dict[str, dict[str, Any]] = {}
    for name, text in files:
        stem, text = Path(name).stem, text.removeprefix("\ufeff")  # a byte-order mark the browser kept
        n = 0
        lines = text.splitlines()
        records: list[tuple[int, Any]]
        if text.lstrip().startswith("["):
            try:
                data = parse_json(text)
            except DataError as e:
                raise e.at(name, e.line) from None
            records = list(enumerate(data if isinstance(data, list) else [data], 1))
        else:
            records = []
            for i, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        records.append((i, parse_json(line)))
                    except DataError as e:
                        raise e.at(name, i) from None
        for i, obj in records:
            n += 1
            try:
                if not isinstance(obj, dict):
                    raise DataError(None, None, f"expected a JSON object, got {type(obj).__name__}")
                _, messages = record_prompt(obj)
                set_name, attrs = _attributes(obj, default)
                if "answers" in obj:
                    answers = obj["answers"]
                    if not isinstance(answers, list):
                        raise DataError(None, None, "expected a list of answers", "answers")
                    items.append({"prompt": messages, "answers": [_answer(a, f"answers[{j}]", None)
                                                                  for j, a in enumerate(answers)],
                                  "attribute_set": set_name, "attributes": attrs})
                    continue
                key = next((k for k in ANSWER_KEYS if k in obj), None)
                if key is None:
                    raise DataError(None, None, "a record needs `answers` (a list) or one of "
                                                f"{', '.join(ANSWER_KEYS)}")
                model = obj.get("model") if isinstance(obj.get("model"), str) else stem
                item = grouped.setdefault(json.dumps(messages), {"prompt": messages, "answers": [],
                                                                 "attribute_set": set_name, "attributes": attrs})
                item["answers"].append(_answer(obj[key], key, model))
                if item not in items:
                    items.append(item)
            except DataError as e:
                raise e.at(name, i) from None
        if not n:
            raise DataError(name, None, "no records (the file is empty)")
    keep = [it for it in items if len(it["answers"]) >= 2]
    return keep, len(items) - len(keep)


# ----------------------------------------------------------------------------- the routes
def _static(name: str) -> Response:
    path = STATIC / name
    return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"),
                        headers=SECURITY_HEADERS)


def install(app: FastAPI, db_path: str | Path, *, attributes: str = "default", bootstrap: int = 200) -> VoteStore:
    """Add the pages, their JSON / streaming routes under /web/ and the vote store at `db_path` to `app` (whose
    `state.hub` serves the models). Returns the store (also `app.state.votes`)."""
    sets = attribute_sets()
    if attributes not in sets:
        raise ValueError(f"attributes must be one of {', '.join(sets)} (got {attributes!r})")
    store = VoteStore(db_path)
    arena = Arena()
    app.state.votes, app.state.web_arena = store, arena
    r = APIRouter()
    _page_routes(r, store, sets, attributes)
    _arena_routes(r, store, arena, bootstrap)
    _annotate_routes(r, store, attributes)
    app.include_router(r)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(e)}, e.status)

    return store


def _hub(request: Request) -> Any:
    return request.app.state.hub


def _page_routes(r: APIRouter, store: VoteStore, sets: dict, attributes: str) -> None:
    """The pages, their static files, the pages' configuration and the chat stream."""
    files = {p.name for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA}
    for route, page in PAGES.items():
        r.add_api_route(route, lambda page=page: _static(page), methods=["GET"], include_in_schema=False)

    @r.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in files:
            return JSONResponse({"error": "not found"}, 404)
        return _static(name)

    @r.get("/web/config")
    def config(request: Request) -> dict:
        return {"models": list(_hub(request).names), "attribute_sets": sets, "default_attributes": attributes,
                "winners": list(WINNERS), "counts": store.counts()}

    @r.post("/web/chat")
    async def chat(request: Request) -> Response:
        body = await json_body(request)
        model = body.get("model")
        if not isinstance(model, str):
            raise BadRequest("model: expected a model name")
        return await open_stream(_hub(request), model, messages_of(body), sampling(body))


def _arena_routes(r: APIRouter, store: VoteStore, arena: Arena, bootstrap: int) -> None:
    """A battle (two anonymous answers), its vote, and the leaderboard of every vote."""

    @r.post("/web/arena/new")
    async def arena_new(request: Request) -> dict:
        body = await json_body(request)
        return {"battle": arena.new(list(_hub(request).names), messages_of(body))}

    @r.post("/web/arena/{bid}/answer/{side}")
    async def arena_answer(bid: str, side: str, request: Request) -> Response:
        body = await json_body(request)
        p = arena.get(bid)
        if side not in ("a", "b"):
            raise BadRequest("side: a or b", 404)
        if side in p.started:
            raise BadRequest(f"answer {side.upper()} was already requested", 409)
        params = sampling(body)
        p.started.add(side)
        model = p.models[side == "b"]
        label = f"model {side.upper()}"

        def done(text: str) -> None:
            p.answers[side] = text

        return await open_stream(_hub(request), model, p.messages, params, on_done=done,
                                 reword=lambda s: s.replace(model, label))

    @r.post("/web/arena/{bid}/vote")
    async def arena_vote(bid: str, request: Request) -> dict:
        body = await json_body(request)
        winner = body.get("winner")
        if winner not in WINNERS:
            raise BadRequest(f"winner: expected one of {', '.join(WINNERS)}")
        p = arena.get(bid)
        if p.voted:
            raise BadRequest("this battle has its vote already", 409)
        if p.answers["a"] is None or p.answers["b"] is None:
            raise BadRequest("both answers must be complete before the vote", 409)
        p.voted = True
        try:
            vid = await asyncio.to_thread(store.add_battle, p.models[0], p.models[1], winner, p.messages,
                                          p.answers["a"], p.answers["b"])
        except BaseException:
            p.voted = False
            raise
        return {"id": vid, "model_a": p.models[0], "model_b": p.models[1], "winner": winner}

    @r.get("/web/leaderboard")
    async def board() -> dict:
        return await asyncio.to_thread(store.board, bootstrap)


def _annotate_routes(r: APIRouter, store: VoteStore, attributes: str) -> None:
    """Uploaded answers parsed for the annotate page, and an annotation saved."""

    @r.post("/web/annotate/parse")
    async def annotate_parse(request: Request) -> dict:
        body = await json_body(request, MAX_UPLOAD)
        files = body.get("files")
        if not isinstance(files, list) or not files or not all(
                isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("text"), str)
                for f in files):
            raise BadRequest("files: expected a list of {name, text}")
        try:
            items, fewer = parse_upload([(f["name"], f["text"]) for f in files], attributes)
        except DataError as e:
            raise BadRequest(str(e)) from None
        if not items:
            raise BadRequest(f"no prompt with two or more answers in {', '.join(f['name'] for f in files)} "
                             f"({fewer} prompts with fewer)")
        return {"items": items, "fewer": fewer}

    @r.post("/web/annotate")
    async def annotate(request: Request) -> dict:
        body = await json_body(request)
        messages = messages_of(body, "prompt")
        answers, ratings = body.get("answers"), body.get("ratings")
        attrs = body.get("attributes")
        if not isinstance(answers, list) or not isinstance(ratings, list) or not isinstance(attrs, list):
            raise BadRequest("answers, attributes and ratings: expected lists")
        try:
            aid = await asyncio.to_thread(store.add_annotation, messages, answers, body.get("best"), attrs, ratings,
                                          body.get("rationale"))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return {"id": aid, "counts": store.counts()}
