"""Rollouts: what every stage that samples from or scores a policy shares (label and eval today; PPO and GRPO next).

    chat = load_chat_model("runs/sft/model")                        # model, tokenizer, stop ids
    params = SamplingParams(max_new_tokens=160, stop_ids=chat.stop_ids, logprobs=True)
    rollouts = sample_answers(Engine(chat.model), chat.tokenizer, messages, k=4, params=params)
    logp = completion_logprobs(model, prompt_ids, completion_ids)  # [N] summed, with gradients
    logp, mask = completion_logprobs(model, prompt_ids, completion_ids, per_token=True, temperature=0.7)
    logp, n = batch_logprobs(model, batch)                          # a collated preference batch (DPO)
    r = reward_scores(rm, rm_tokenizer, prompts, responses)         # [N] the reward model's scalar

Choices, and why:
- Stop ids are resolved one way (`stop_ids`): the tokenizer's (eos and the chat format's end-of-turn token), then the
  eos_token_id(s) of the folder's generation_config.json, which is what transformers' `generate` stops at. For a
  folder tristage saved, generation_config.json lists exactly the tokenizer's stop ids (`save_model`), so both
  give the same ids; they differ only for a folder whose generation_config.json names more.
- `sample_answers` renders each prompt with the chat template (+ generation prompt) and repeats it k times in one
  engine batch: the rows draw different random numbers, so they differ, and one seeded generator makes a run
  reproducible. A rollout keeps what RL needs: prompt and completion ids, the engine's log-probs (when
  `params.logprobs`), the finish reason and the decoded text without the stop token.
- Log-probs of given completions, one gather for every layout: the logits at the positions that predict the
  completion tokens are picked first, then log_softmax (fp32, logits / temperature) and gather there
  (`token_logprobs`), so the [rows, T, vocab] log-softmax is never built. `batch_logprobs` takes the preference
  collators' batches (two rows per pair with `labels`, or the packed pair layout); `completion_logprobs` takes
  (prompt ids, completion ids) lists, right-padded in chunks of `batch_size` with plain causal attention (exact
  for the real tokens). Sums are per sequence: index_add in the packed layout, a sum over each completion's
  slice otherwise. No `torch.no_grad` inside: the policy's log-probs need gradients; callers that only measure
  wrap the call.
- Reward scores are the reward stage's rendering and the folder's one combined scalar (tristage.serve.score,
  re-exported here so the RL stages find every rollout piece in one module).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from tristage.data.chat import render
from tristage.data.records import prompt_messages
from tristage.io import UserError
from tristage.model.gpt import GPT
from tristage.model.hf import load_model
from tristage.model.score import per_row
from tristage.serve.detok import response_text
from tristage.serve.engine import Engine, SamplingParams
from tristage.tokenizer import Tokenizer

__all__ = ["ChatModel", "Rollout", "batch_logprobs", "completion_logprobs", "encode_for_reward", "load_chat_model",
           "folder_config", "packed_token_logprobs", "policy_tokenizer", "reward_scores",
           "reward_tokenizer", "sample_answers", "sampled_reward_ids", "score_texts",
           "sequence_logprobs", "stop_ids", "token_logprobs"]

Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------- loading
def stop_ids(tokenizer: Any, folder: str | Path | None = None) -> list[int]:
    """Ids that end a generation: tokenizer.stop_ids, then the eos_token_id(s) of folder/generation_config.json
    (when a folder is given and has one), without repeats, in that order."""
    ids = list(tokenizer.stop_ids)
    gen = Path(folder) / "generation_config.json" if folder is not None else None
    if gen is not None and gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list(dict.fromkeys(ids))


@dataclass
class ChatModel:
    """A model folder loaded for generation: the model (in eval mode), its tokenizer and its stop ids."""

    model: GPT
    tokenizer: Tokenizer
    stop_ids: list[int]


def folder_config(folder: str | Path) -> dict[str, Any]:
    """A model folder's config.json; a UserError names the folder when there is none or it is not JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object; the folder is damaged")
    return hf


def _is_reward(hf: dict[str, Any]) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def _tokenizer(folder: Path) -> Tokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder}: no tokenizer.json (only the fast tokenizer format is supported)")
    return Tokenizer.load(folder)


def policy_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a causal-LM folder, read before its weights: a UserError names the folder when it is not a
    model folder (no or damaged config.json), is a reward model, or has no tokenizer.json."""
    hf = folder_config(folder)
    if _is_reward(hf):
        raise UserError(f"{folder}: a reward model ({hf['architectures'][0]}); a causal language model (a policy) "
                        "is needed here")
    return _tokenizer(Path(folder))


def reward_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a reward-model folder, read before its weights: a UserError names the folder when it is not
    a model folder, is not a reward model (*ForSequenceClassification), or has no tokenizer.json or chat template
    (which renders prompt + response)."""
    hf = folder_config(folder)
    if not _is_reward(hf):
        raise UserError(f"{folder}: not a reward model (architectures {hf.get('architectures')}; expected "
                        "*ForSequenceClassification); start one with `tristage reward`")
    tok = _tokenizer(Path(folder))
    if not tok.chat_template:
        raise UserError(f"{folder}: the tokenizer has no chat_template; it is needed to render prompt + response")
    return tok


def load_chat_model(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                    require_template: bool = True, tokenizer: Tokenizer | None = None) -> ChatModel:
    """Load a model folder with its tokenizer (`policy_tokenizer`, unless `tokenizer` is the one already read) and
    `stop_ids(tokenizer, folder)`. With require_template, a tokenizer without a chat_template raises UserError
    before the weights are read."""
    folder = Path(folder)
    tok = tokenizer if tokenizer is not None else policy_tokenizer(folder)
    if require_template and not tok.chat_template:
        raise UserError(f"{folder}: the tokenizer has no chat_template (a chat model is needed)")
    model = load_model(folder, device=device, dtype=dtype).eval()
    return ChatModel(model, tok, stop_ids(tok, folder))


# ----------------------------------------------------------------------------- sampling
@dataclass
class Rollout:
    """One sampled answer to one prompt."""

    prompt: list[int]  # the rendered prompt's ids (shared by the k rollouts of a prompt: do not mutate)
    tokens: list[int]  # completion ids; ends with the stop token when finish_reason == "stop"
    finish_reason: Literal["stop", "length"]
    text: str  # the completion decoded without its stop token and special tokens (not stripped)
    logprobs: list[float] | None = None  # the engine's log-probs of `tokens` (raw logits), if params.logprobs


def sample_answers(engine: Engine, tokenizer: Any, messages: Sequence[Messages], k: int, params: SamplingParams,
                   generator: torch.Generator | list[torch.Generator] | None = None) -> list[list[Rollout]]:
    """k rollouts per prompt (each a list of chat messages ending with the user's turn), all in one engine batch."""
    ids = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in messages]
    outs = engine.generate([x for x in ids for _ in range(k)], params, generator=generator)
    rollouts = [Rollout(ids[n // k], o.tokens, o.finish_reason, response_text(tokenizer, o.tokens, o.finish_reason),
                        o.logprobs) for n, o in enumerate(outs)]
    return [rollouts[i * k:(i + 1) * k] for i in range(len(messages))]


# ----------------------------------------------------------------------------- log-probs
def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at `tokens`, in fp32: logits [..., V], tokens [...] -> [...]."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                      temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Sum of log p(label) over the labelled positions of each row, and their count.

    logits [N, T, V]; labels [N, T] pre-shifted (labels[:, t] follows inputs[:, :t+1]), ignore_index elsewhere.
    Returns (logp_sum [N] float32, n_tokens [N] float32).
    """
    mask = labels != ignore_index
    logp = token_logprobs(logits, labels.masked_fill(~mask, 0), temperature)
    return (logp * mask).sum(-1), mask.sum(-1).float()


def packed_token_logprobs(model: Any, batch: Mapping[str, Any], temperature: float = 1.0) -> Tensor:
    """Log-probs [M] of the M completion tokens of a batch: one forward over input_ids [R, T] (with position_ids
    and attn_mask when the batch has them), the logits at (lp_row [M], lp_pos [M]) predict lp_tok [M]."""
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=batch.get("attn_mask"))
    return token_logprobs(logits[batch["lp_row"], batch["lp_pos"]], batch["lp_tok"], temperature)


def batch_logprobs(model: Any, batch: Mapping[str, Any], temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs [N] and completion token counts [N] (fp32, with gradients) of a collated batch:

    - rows (tristage.data.preference.collate_pairs): input_ids [N, T] and labels [N, T] (pre-shifted, -100 off the
      completion), one plain causal forward;
    - packed (collate_pairs_shared / packed): input_ids, position_ids, attn_mask and per completion token lp_row,
      lp_pos, lp_tok, lp_seq (its sequence, 0..N-1); N = num_seqs, or 2 * num_pairs (chosen, then rejected).
    """
    if "lp_seq" not in batch:
        return sequence_logprobs(model(batch["input_ids"]), batch["labels"], temperature=temperature)
    lp = packed_token_logprobs(model, batch, temperature)
    n = batch["num_seqs"] if "num_seqs" in batch else 2 * batch["num_pairs"]
    zeros = torch.zeros(n, device=lp.device, dtype=lp.dtype)
    return zeros.index_add(0, batch["lp_seq"], lp), zeros.index_add(0, batch["lp_seq"], torch.ones_like(lp))


def completion_logprobs(model: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                        temperature: float = 1.0, batch_size: int = 32, pad_id: int = 0,
                        per_token: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs of each completion after its prompt under `model` (fp32, with gradients).

    prompts, completions: N lists of token ids (prompts non-empty); a batch_size chunk is one right-padded forward.
    Returns the sums [N] (0 for an empty completion), or with per_token the log-probs [N, Tc] and a bool mask
    [N, Tc] of the real tokens (Tc = the longest completion; padding is 0).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    dev = next(model.parameters()).device
    per_seq: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        ps, cs = prompts[start:start + batch_size], completions[start:start + batch_size]
        rows = [list(p) + list(c) for p, c in zip(ps, cs)]
        T = max(len(r) for r in rows)
        where = [(b, len(p) - 1 + t, tok) for b, (p, c) in enumerate(zip(ps, cs)) for t, tok in enumerate(c)]
        row, pos, tok = torch.tensor(where, dtype=torch.long).reshape(-1, 3).T.to(dev)
        batch = {"input_ids": torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], device=dev),
                 "lp_row": row, "lp_pos": pos, "lp_tok": tok}
        per_seq += packed_token_logprobs(model, batch, temperature).split([len(c) for c in cs])
    if per_token:
        lens = torch.tensor([len(c) for c in completions], device=dev)
        width = max((len(c) for c in completions), default=0)
        lp = pad_sequence(per_seq, batch_first=True) if per_seq else torch.zeros(0, 0, device=dev)
        return lp, torch.arange(width, device=dev) < lens[:, None]
    return torch.stack([x.sum() for x in per_seq]) if per_seq else torch.zeros(0, device=dev)


# ----------------------------------------------------------------------------- reward
# ----------------------------------------------------------------------------- reward scores of texts
def _encode(tokenizer: Any, prompt: str | Sequence[dict[str, str]], response: str,
            max_len: int) -> tuple[list[int], bool]:
    """(ids, truncated): see encode_for_reward."""
    ids, mask = render(tokenizer, prompt_messages(prompt) + [{"role": "assistant", "content": response}])
    last = max((t for t, m in enumerate(mask) if m), default=-1)
    if last < 0:
        raise ValueError("the response has no tokens in the chat template's assistant mask")
    ids = ids[:last + 1]
    if len(ids) > max_len:
        return ids[len(ids) - max_len:], True
    return ids, False


def encode_for_reward(tokenizer: Any, prompt: str | Sequence[dict[str, str]], response: str, max_len: int, *,
                      with_flag: bool = False) -> list[int] | tuple[list[int], bool]:
    """Token ids a reward model scores: chat.render(prompt messages + [assistant response]) cut right after the
    last assistant token (its end-of-turn token); over max_len, the first tokens are dropped (the end is kept).
    with_flag: (ids, whether it was cut)."""
    ids, cut = _encode(tokenizer, prompt, response, max_len)
    return (ids, cut) if with_flag else ids


@torch.no_grad()
def score_ids(rm: Any, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
              on_batch: Callable[[int], None] | None = None) -> Tensor:
    """Scores [N, num_labels] (fp32, on the CPU, in input order) of already encoded sequences: length-sorted,
    right-padded batches, each read at its last real token. on_batch(n) is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_labels = rm.score.weight.shape[0]
    out = torch.empty(len(ids), n_labels)
    if not ids:
        return out
    dev = next(rm.parameters()).device
    training = rm.training
    rm.eval()
    try:
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            T = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), T), pad_id, dtype=torch.long)
            for b, i in enumerate(idx):
                x[b, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            last = torch.tensor([len(ids[i]) - 1 for i in idx])
            out[idx] = rm(x.to(dev), at=per_row(last.to(dev))).float().cpu()
            if on_batch is not None:
                on_batch(len(idx))
    finally:
        rm.train(training)
    return out


def pad_id(tokenizer: Any) -> int:
    """The id right-padded batches use: the pad token, else end-of-text, else 0 (reads never look there)."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0  # any id: the head reads at last_index


def score_texts(rm: Any, tokenizer: Any, prompts: Sequence[str | Sequence[dict[str, str]]],
                responses: Sequence[str], batch_size: int = 16, max_len: int = 1024, *,
                stats: dict[str, int] | None = None, on_batch: Callable[[int], None] | None = None) -> Tensor:
    """Reward-model scores [N, num_labels] of each (prompt, response), rendered by `encode_for_reward`;
    `rm.combine(scores)` gives the one scalar per response. max_len is capped at the model's
    max_position_embeddings. If `stats` is given, stats["truncated"] is increased by the number of sequences cut."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    limit = min(max_len, rm.config.max_position_embeddings)
    ids, cut = [], 0
    for p, r in zip(prompts, responses):
        x, truncated = _encode(tokenizer, p, r, limit)
        ids.append(x)
        cut += truncated
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + cut
    return score_ids(rm, ids, pad_id(tokenizer), batch_size, on_batch)


def sampled_reward_ids(tokenizer: Any, prompt: str | Sequence[dict[str, str]], prompt_ids: Sequence[int],
                       answers: Sequence[Sequence[int]], stopped: Sequence[bool], max_len: int
                       ) -> list[tuple[list[int], bool]] | None:
    """(ids, truncated) per sampled answer, read as its tokens rather than its decoded text: what `encode_for_reward`
    renders, built from the ids themselves = prompt_ids (the chat template with its generation prompt) + the answer
    without its stop token + the template's end of the assistant turn; over max_len the first tokens are dropped.
    For an answer whose decode-and-encode round trip is exact this equals encode_for_reward(decoded text). None
    when the template does not render prompt_ids + answer that way (then the texts are encoded instead)."""
    probe = tokenizer.encode("ok")
    ids, _ = _encode(tokenizer, prompt, "ok", 1 << 30)
    n = len(prompt_ids)
    if ids[:n] != list(prompt_ids) or ids[n:n + len(probe)] != probe:
        return None
    end = ids[n + len(probe):]
    out = []
    for a, stop in zip(answers, stopped):
        x = list(prompt_ids) + list(a[:-1] if stop else a) + end
        out.append((x[len(x) - max_len:], True) if len(x) > max_len else (x, False))
    return out


def reward_scores(rm: Any, tokenizer: Any, prompts: Sequence[str | Messages], responses: Sequence[str],
                  batch_size: int = 16, max_len: int = 1024, *, stats: dict[str, int] | None = None) -> Tensor:
    """The reward model's one scalar [N] per (prompt, response): `rm.combine` of `score_texts` (the reward stage's
    rendering with the RM folder's own tokenizer; inputs over max_len lose tokens from the left, counted in
    stats["truncated"] when stats is given)."""
    return rm.combine(score_texts(rm, tokenizer, prompts, responses, batch_size, max_len, stats=stats))
