"""Sample from a model folder: one prompt to the terminal, or a JSONL file of prompts to a JSONL file of answers.

    tristage generate runs/sft/final --prompt "Where did the dog sit?" --chat
    tristage generate runs/sft/final --input prompts.jsonl --output answers.jsonl --temperature 0 --batch-size 32

Each input line has `prompt` (text, continued as is, or as a user turn with --chat) or `messages` (a chat,
rendered with the tokenizer's chat template and a generation prompt); output lines keep every input field and add
`response`, `finish_reason` ("stop" or "length") and `num_tokens`. A `messages` chat is checked by the one prompt
parser (tristage.data.records.prompt_messages: roles system/user/assistant, a system message only first, no blank
content, ending with the user's turn). Generation stops at the tokenizer's stop ids (eos and the end-of-turn
token) and at the eos ids in generation_config.json. A bad line stops the run with its file and line number.
Prompts are batched by length (less padding) and written back in input order.
"""

from __future__ import annotations

import sys
from typing import Any

import jinja2
import torch

from tristage.data.records import prompt_messages
from tristage.flags.generate import Config
from tristage.io import DataError, UserError, check_writable, read_jsonl, write_jsonl
from tristage.rollout import load_chat_model, policy_tokenizer
from tristage.runtime import progress, resolve_dtype
from tristage.serve.detok import response_text, stream_text
from tristage.serve.engine import Engine, SamplingParams


def encode_prompt(tok: Any, prompt: str | None, messages: list[dict] | None, chat: bool) -> list[int]:
    if messages is None and chat:
        messages = [{"role": "user", "content": prompt}]
    if messages is not None:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tok.encode(prompt, add_special_tokens=True)
    if not ids:  # an empty prompt starts a new document
        ids = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    return list(ids)


def read_prompts(path: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, obj in read_jsonl(path):
        if "messages" in obj:
            try:  # the one prompt parser: a chat prompt ends with the user's turn
                prompt_messages(obj["messages"], "messages")
            except DataError as e:
                raise e.at(path, line) from None
        elif "prompt" in obj:  # text continued as is (an empty one starts a new document)
            if not isinstance(obj["prompt"], str):
                raise DataError(path, line, f"expected text, got {type(obj['prompt']).__name__}", "prompt")
        else:
            raise DataError(path, line, "a line needs `prompt` (text) or `messages` (a chat)")
        rows.append((line, obj))
    return rows


def encode_all(tok: Any, rows: list[tuple[int, dict[str, Any]]], chat: bool, path: str) -> list[list[int]]:
    """Every prompt's ids; a prompt the chat template refuses (or text with special tokens) raises DataError at
    its file and line."""
    encoded = []
    for line, o in rows:
        try:
            encoded.append(encode_prompt(tok, o.get("prompt"), o.get("messages"), chat))
        except (ValueError, jinja2.TemplateError) as e:
            raise DataError(path, line, str(e), "messages" if "messages" in o else "prompt") from None
    return encoded


def main(cfg: Config) -> int:
    if (cfg.prompt is None) == (cfg.input is None):
        raise UserError("give either --prompt TEXT or --input FILE.jsonl (with --output FILE.jsonl)")
    if cfg.input is not None and cfg.output is None:
        raise UserError("--input needs --output FILE.jsonl")
    if cfg.input is not None:  # before minutes of sampling, not after
        check_writable(cfg.output, flag="--output")
    rows = read_prompts(cfg.input) if cfg.input else []  # validate the whole file before loading the model
    if cfg.input is not None and not rows:
        raise UserError(f"{cfg.input}: no prompts (0 records)")
    tok = policy_tokenizer(cfg.model)
    if (cfg.chat or any("messages" in o for _, o in rows)) and not tok.chat_template:
        raise UserError(f"{cfg.model}: the tokenizer has no chat_template (needed by --chat and `messages` lines)")
    if cfg.prompt is not None:
        try:
            ids = encode_prompt(tok, cfg.prompt, None, cfg.chat)
        except (ValueError, jinja2.TemplateError) as e:
            raise UserError(f"--prompt: {e}") from None
    else:  # every prompt rendered before the weights are read: a refused one stops the run here
        encoded = encode_all(tok, rows, cfg.chat, cfg.input)
    device = torch.device(cfg.device)
    chat = load_chat_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device), require_template=False,
                           tokenizer=tok)
    engine = Engine(chat.model, compile=cfg.compile)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, stop_ids=chat.stop_ids, seed=cfg.seed)

    if cfg.prompt is not None:  # stream to the terminal, printing only whole characters
        for text, _ in stream_text(tok, engine.stream(ids, params)):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))  # similar lengths together: less padding
    answers: list[dict[str, Any] | None] = [None] * len(rows)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    n_tokens = 0
    with progress() as bar:
        task = bar.add_task("generate", total=len(rows), info="")
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            outs = engine.generate([encoded[i] for i in idx], params, generator=generator)
            for i, o in zip(idx, outs):
                answers[i] = {**rows[i][1], "response": response_text(tok, o.tokens, o.finish_reason),
                              "finish_reason": o.finish_reason, "num_tokens": len(o.tokens)}
                n_tokens += len(o.tokens)
            bar.update(task, advance=len(idx), info=f"{n_tokens} tokens")
    write_jsonl(cfg.output, answers)  # type: ignore[arg-type]
    print(f"wrote {len(answers)} answers to {cfg.output}")
    return 0
