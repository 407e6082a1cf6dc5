"""`tristage chat MODEL`: a terminal chat with streaming tokens and multi-turn history.

Commands inside the chat: /reset (forget the history), /system TEXT (set a system prompt and reset),
/exit (or Ctrl-D). Each turn renders the whole history with the model's chat template and streams the
answer from the shared generation engine, stopping at the end-of-turn token. A line that is not valid UTF-8 (a
terminal in another encoding, a binary file piped in) is refused with a note and the chat goes on: stdin is read
with surrogateescape, so the bad bytes reach the loop as a line it can recognise instead of a decoding error.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch

from tristage.flags.chat import Config
from tristage.io import UserError
from tristage.rollout import load_chat_model
from tristage.serve.detok import stream_text
from tristage.serve.engine import Engine, SamplingParams


def chat_loop(model, tok, params, system: str | None, stdin: TextIO, stdout: TextIO) -> list[dict[str, str]]:
    """Run the chat until /exit or end of input; returns the final history."""
    engine = Engine(model)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    generator = torch.Generator(next(model.parameters()).device).manual_seed(params.seed or 0)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return history
        line = line.rstrip("\n")
        if not valid_utf8(line):
            stdout.write("(that line is not valid UTF-8 text; it was ignored)\n")
            continue
        if line.strip() == "/reset":
            history = history[:1] if system else []
            stdout.write("(history cleared)\n")
            continue
        if line.startswith("/system "):
            system = line[len("/system "):].strip()
            history = [{"role": "system", "content": system}]
            stdout.write("(system prompt set, history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(history, add_generation_prompt=True)
        stdout.write("model> ")
        answer = ""
        for text, reason in stream_text(tok, engine.stream(ids, params, generator=generator)):
            answer += text
            end = "" if reason is None else "\n" if reason == "stop" else " [cut at --max-new-tokens]\n"
            stdout.write(text + end)
            stdout.flush()
        history.append({"role": "assistant", "content": answer.strip()})


def valid_utf8(line: str) -> bool:
    """False for a line holding undecodable bytes (read with errors="surrogateescape")."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def main(cfg: Config) -> int:
    try:
        chat = load_chat_model(cfg.model, device=cfg.device, dtype=torch.float32)
    except UserError as e:
        if "chat_template" in str(e):
            raise UserError(f"{e}; use `tristage generate` for a base model") from None
        raise
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes become a line chat_loop refuses, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, stop_ids=chat.stop_ids, seed=cfg.seed)
    print(f"chatting with {cfg.model} ({sum(p.numel() for p in chat.model.parameters()) / 1e6:.1f}M params); "
          "/reset, /system TEXT, /exit")
    chat_loop(chat.model, chat.tokenizer, params, cfg.system, sys.stdin, sys.stdout)
    return 0
