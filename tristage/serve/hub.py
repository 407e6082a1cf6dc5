"""The served models, by name: what the HTTP API (server.py) and the web pages share.

    hub = Hub.load(["sft=runs/demo/sft/model", "runs/demo/dpo/model"])     # names: sft, dpo
    hub.names                                                              # ["sft", "dpo"]
    async for text in hub.chat_stream("sft", [{"role": "user", "content": "hi"}], max_tokens=64):
        print(text, end="")
    async for piece in hub.complete("sft", prompt_ids, n=2, stop=["\\n\\n"], logprobs=True): ...  # the API's
    hub.close()

Choices, and why:
- Models are named as `tristage arena` names them: NAME=PATH, or the folder's name (its parent's for a folder
  called `model`, as `runs/x/model`); two models with one name are refused.
- Each model has its own engine process (`Batcher`, continuous batching); the hub turns its tokens into text. Text
  is detokenized here, on the event loop, with the streaming decoder the terminal chat uses (whole characters
  only; special tokens and the end-of-turn token left out).
- Stop strings are matched on the text: text that could be the start of a stop string is held back until it is
  known not to be one, so a stop string never reaches the client, even split across tokens; when one matches, that
  choice is cancelled in the engine at once.
- A request's rows are cancelled in the engine when its consumer stops iterating (a closed stream, a cancelled
  task, a client that went away): the `finally` of the generator, so the slot is freed whatever the reason.
- max_tokens is capped at the room the context leaves after the prompt (finish_reason "length" there), so a page
  asking for 256 tokens of a model with a short context still gets an answer; a prompt that leaves no room at all
  is refused (`HubError`, 400, code context_length_exceeded).
- Mistakes in a request are a `HubError` with an HTTP status and the OpenAI error fields (param, code), checked
  before anything reaches the engine; the server turns it into the API's error body.
- Each choice samples from its own generator: seed s gives choice i the seed s + i (so n=1 with seed s is choice 0
  of n=2 with seed s); no seed, a random one. A row's tokens depend on its own seed only, not on its neighbours.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tristage.io import UserError
from tristage.rollout import ChatModel, load_chat_model, policy_tokenizer
from tristage.serve.batcher import Batcher, Replicas
from tristage.serve.detok import StreamDecoder
from tristage.serve.engine import Request, SamplingParams, Token

MAX_N = 128  # choices per request at most (OpenAI's limit)
MAX_TOP_LOGPROBS = 20


class HubError(Exception):
    """A request the hub refuses: HTTP status, message, and the OpenAI error body's param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class TokenInfo:
    """One generated token for `logprobs`: its id, its text, its log-prob, and the most likely alternatives."""

    id: int
    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Piece:
    """What one choice produced at one step: new text (often ""), the tokens behind it (with logprobs), and the
    finish reason on the last piece of the choice ("stop": end of turn or a stop string; "length")."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: list[TokenInfo] = field(default_factory=list)
    completion_tokens: int = 0  # on the last piece: the tokens this choice generated


def model_specs(specs: Sequence[str]) -> dict[str, Path]:
    """MODEL arguments (PATH or NAME=PATH) -> {name: folder}; a UserError names the argument that is wrong."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = "", spec
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"MODELS: {path}: no such model folder")
        p = p.resolve()
        name = name or (p.parent.name if p.name == "model" else p.name)
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"MODELS: {spec}: {name!r} cannot name a model; use NAME=PATH")
        if name in out:
            raise UserError(f"MODELS: two models named {name!r}: name them apart with NAME=PATH")
        out[name] = p
    return out


class StopMatcher:
    """Holds back text that could begin a stop string; `push(text)` -> (text safe to emit, whether a stop hit)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held) + 1))
                    if self.held.endswith(s[:k])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Hub:
    """The served models: `names`, `chat_stream` (text deltas of one chat answer), `complete` (the API's choices)."""

    def __init__(self, models: dict[str, ChatModel], *, max_batch: int = 32, prefill_threads: int = 0,
                 replicas: int = 1):
        self.models = models
        self.batchers = {name: Replicas(m.model, replicas, max_rows=max_batch, name=name,
                                        prefill_threads=prefill_threads)
                         if replicas > 1 else Batcher(m.model, max_rows=max_batch, name=name,
                                                      prefill_threads=prefill_threads)
                         for name, m in models.items()}
        for b in self.batchers.values():  # the engine processes start together; serving begins once all can decode
            b.wait_ready()
        self._ids = itertools.count()

    @classmethod
    def load(cls, specs: Sequence[str], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             max_batch: int = 32, prefill_threads: int = 0, replicas: int = 1) -> Hub:
        """Load model folders (PATH or NAME=PATH); every folder is checked before any weights are read.
        prefill_threads > 0: each model's prompts are prefilled in a process of their own (tristage/serve/batcher.py)
        with that many torch threads."""
        folders = model_specs(specs)
        toks = {name: policy_tokenizer(p) for name, p in folders.items()}
        return cls({name: load_chat_model(p, device, dtype, require_template=False, tokenizer=toks[name])
                    for name, p in folders.items()}, max_batch=max_batch, prefill_threads=prefill_threads,
                   replicas=replicas)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def model(self, name: str) -> ChatModel:
        if name not in self.models:
            raise HubError(404, f"The model {name!r} does not exist; served: {', '.join(self.models)}", "model",
                           "model_not_found")
        return self.models[name]

    def context(self, name: str) -> int:
        return self.model(name).model.config.max_position_embeddings

    def chat_prompt(self, name: str, messages: list[dict]) -> list[int]:
        """The prompt ids of a chat: the model's chat template with the generation prompt."""
        tok = self.model(name).tokenizer
        if not messages:
            raise HubError(400, "messages: at least one message is needed", "messages", "invalid_value")
        if not tok.chat_template:
            raise HubError(400, f"The model {name!r} has no chat template; use /v1/completions", "model",
                           "no_chat_template")
        try:
            return list(tok.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # the template's own error (an unknown role, a missing field): the messages' fault
            raise HubError(400, f"messages: the chat template refused them ({e})", "messages") from None

    async def chat_stream(self, model: str, messages: list[dict], *, max_tokens: int = 256,
                          temperature: float = 0.7, top_p: float = 1.0,
                          seed: int | None = None) -> AsyncIterator[str]:
        """Text deltas of the model's answer to a chat; ends at the end of the turn (or max_tokens)."""
        ids = self.chat_prompt(model, messages)
        async with aclosing(self.complete(model, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          seed=seed)) as pieces:
            async for p in pieces:
                if p.text:
                    yield p.text

    def complete(self, model: str, prompt: list[int], *, n: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 logprobs: bool = False, top_logprobs: int = 0) -> AsyncIterator[Piece]:
        """n choices for prompt ids, as pieces in the order they come (choices interleave). The request is checked
        here, at the call (a HubError before any response starts); it reaches the engine when iterated."""
        chat = self.model(model)
        self._check(model, prompt, n, max_tokens, temperature, top_p, top_logprobs)
        room = self.context(model) - len(prompt)
        params = SamplingParams(max_new_tokens=min(max_tokens or room, room), temperature=temperature, top_p=top_p,
                                stop_ids=chat.stop_ids, logprobs=logprobs or top_logprobs > 0)
        dev = chat.model.rope_cos.device
        base = seed if seed is not None else random.getrandbits(62)
        rid = next(self._ids)
        reqs = [Request((rid, i), prompt, params, torch.Generator(dev).manual_seed(base + i), top_logprobs)
                for i in range(n)]
        return self._pieces(model, reqs, stop)

    async def _pieces(self, model: str, reqs: list[Request], stop: Sequence[str]) -> AsyncIterator[Piece]:
        n, rid, params = len(reqs), reqs[0].key[0], reqs[0].params  # type: ignore[index]
        batcher = self.batchers[model]
        sink = batcher.submit(reqs)
        tok = self.models[model].tokenizer
        decoders = [StreamDecoder(tok) for _ in range(n)]
        matchers = [StopMatcher(stop) for _ in range(n)]
        counts = [0] * n
        open_ = set(range(n))
        try:
            while open_:
                t = await sink.get()
                if isinstance(t, Exception):
                    raise t
                i = t.key[1]  # type: ignore[index]
                if i not in open_:  # a choice already ended by a stop string: its last tokens in flight
                    continue
                counts[i] += 1
                end_of_turn = t.finish_reason == "stop"
                text = decoders[i].push(t.token) if not end_of_turn else ""
                if t.finish_reason is not None:
                    text += decoders[i].flush()
                text, hit = matchers[i].push(text)
                reason = "stop" if hit else t.finish_reason
                if reason is not None:
                    text += "" if hit else matchers[i].flush()
                    open_.discard(i)
                    if hit and t.finish_reason is None:
                        batcher.cancel([(rid, i)])
                yield Piece(i, text, reason, self._info(tok, t) if params.logprobs and not end_of_turn else [],
                            counts[i] if reason is not None else 0)
        finally:
            if open_:  # the consumer went away (or the engine failed): free the rows
                batcher.cancel([(rid, i) for i in open_])

    @staticmethod
    def _info(tok, t: Token) -> list[TokenInfo]:
        return [TokenInfo(t.token, tok.decode([t.token]), t.logprob if t.logprob is not None else 0.0,
                          [(tok.decode([i]), lp) for i, lp in t.top_logprobs or []])]

    def _check(self, model: str, prompt: list[int], n: int, max_tokens: int | None, temperature: float,
               top_p: float, top_logprobs: int) -> None:
        def bad(param: str, message: str) -> HubError:
            return HubError(400, f"{param}: {message}", param, "invalid_value")

        if not 1 <= n <= MAX_N:
            raise bad("n", f"must be between 1 and {MAX_N} (got {n})")
        if max_tokens is not None and max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1 (got {max_tokens})")
        if not 0 <= temperature <= 2:
            raise bad("temperature", f"must be between 0 and 2 (got {temperature})")
        if not 0 < top_p <= 1:
            raise bad("top_p", f"must be in (0, 1] (got {top_p})")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS} (got {top_logprobs})")
        if not prompt:
            raise HubError(400, "the prompt is empty", "prompt", "invalid_value")
        limit = self.context(model)
        if len(prompt) >= limit:
            raise HubError(400, f"This model's maximum context length is {limit} tokens; the prompt is "
                                f"{len(prompt)} tokens, which leaves no room for an answer", "messages",
                           "context_length_exceeded")
        vocab = self.model(model).model.config.vocab_size
        if any(not 0 <= x < vocab for x in prompt):
            raise HubError(400, f"prompt: token ids must be in [0, {vocab})", "prompt", "invalid_value")

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()
