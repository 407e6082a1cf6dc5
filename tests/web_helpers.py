"""What the web tests share: a fake hub (scripted answers, no model) and an app holding only the web routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

PROMPT = [{"role": "user", "content": "what does the dog say?"}]
INJECTION = '<script>alert("x")</script><img src=x onerror="alert(1)"><b>bold</b>'


class FakeHub:
    """Serves `names`; each answer is `answers[model]` (default "answer of MODEL to: PROMPT") in chunks of 4
    characters, `delay` seconds apart; `fail` (an exception, or a function of the model giving one) is raised
    instead. `cancelled` counts iterations abandoned before their end."""

    def __init__(self, names=("alpha", "beta", "gamma"), answers=None, delay=0.0, fail=None):
        self.names = list(names)
        self.answers = dict(answers or {})
        self.delay, self.fail = delay, fail
        self.calls: list[dict] = []
        self.cancelled = 0

    async def chat_stream(self, model: str, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.7,
                          top_p: float = 1.0, seed: int | None = None) -> AsyncIterator[str]:
        self.calls.append({"model": model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature, "top_p": top_p, "seed": seed})
        if self.fail is not None:
            raise self.fail(model) if callable(self.fail) else self.fail
        text = self.answers.get(model, f"answer of {model} to: {messages[-1]['content']}")
        finished = False
        try:
            for i in range(0, len(text), 4):
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield text[i:i + 4]
            finished = True
        finally:
            if not finished:
                self.cancelled += 1


def web_app(hub, db: Path):
    """A fastapi app with the hub and only the web routes (what server.create_app adds them to)."""
    from fastapi import FastAPI

    from tristage.serve import web

    app = FastAPI()
    app.state.hub = hub
    web.install(app, db)
    return app


def cast_vote(store, writer: int, k: int) -> None:
    """Writer `writer`'s k-th vote: a battle on even k, an annotation on odd k, tagged so each can be found."""
    tag = f"w{writer}-{k}"
    if k % 2 == 0:
        store.add_battle("a", "b", "model_a", PROMPT, f"A {tag}", f"B {tag}")
    else:
        store.add_annotation(PROMPT, [{"text": f"X {tag}"}, {"text": f"Y {tag}"}], 0, ["helpfulness", "honesty"],
                             [{"helpfulness": 5, "honesty": 4}, {"helpfulness": 2, "honesty": 3}], f"because {tag}")


def write_votes(path: str, writer: int, n: int, start) -> None:
    """A writer process (spawned: this module imports no torch, so it starts fast): n votes once `start` is set."""
    from tristage.serve.votes import VoteStore

    store = VoteStore(path)
    start.wait()
    for k in range(n):
        cast_vote(store, writer, k)
