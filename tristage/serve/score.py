"""Score prompts + responses with a reward model folder.

    tristage score runs/rm/model answers.jsonl --output scored.jsonl
    tristage score runs/rm/model data/preference/val.jsonl          # prints the RM's accuracy on the pairs

Input: JSONL, one record a line, either
  {"prompt": str | [messages], "response": str, ...}   -> the record + "score" (the combined scalar) and
                                                          "scores" {label: value} (every output of the head)
  {"prompt": ..., "chosen": str, "rejected": str, ...} -> the record + "score_chosen" and "score_rejected";
                                                          the summary adds the accuracy (share of pairs with
                                                          score_chosen > score_rejected, a tie counts as wrong)
                                                          and the mean margin (score_chosen - score_rejected).
`messages` may stand in for `prompt` (what `tristage generate` writes back). Prompts are read by the one prompt
parser, tristage.data.records.prompt_messages: a text prompt is one user message; a message list must end with the
user's turn (roles system/user/assistant, a system message only first, no blank content). A bad record stops the
run naming its file, line and field, before the model is loaded.

Choices, and why:
- Rendering is the reward stage's, so a score here is the score the RM was trained and validated with:
  tristage.data.chat.render(tokenizer, prompt messages + [assistant response]) with the RM folder's own tokenizer
  and chat template, ids cut right after the last token of the loss mask (the response's end-of-turn token,
  where the head reads), batches right-padded with tokenizer.pad_id, last_index = that token
  (`encode_for_reward`, `score_texts` in tristage/rollout.py, which the judges and the RL stages use).
- Too long: the ids keep their end and lose tokens from the left (the response and its end-of-turn token are
  what is scored; the start of a long prompt matters least). The limit is min(--max-len, the model's
  max_position_embeddings); truncated records are counted and printed.
- Batches are sorted by length (less padding) and written back in input order. Right padding with plain causal
  attention is exact for the real tokens, so a record's score does not depend on its batch mates (up to float
  rounding of different matmul shapes).
- "score" is the one documented scalar of the folder (`ScoreModel.combine`: output 0 + sum_a w_a * output a);
  "scores" keeps every output by label, so per-attribute heads can be inspected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jinja2
import torch

from tristage.data.records import prompt_field, prompt_messages
from tristage.flags.score import Config
from tristage.io import DataError, UserError, check_writable, read_jsonl, write_jsonl
from tristage.model.score import load_reward_model
from tristage.rollout import (  # noqa: F401 (score_texts: re-exported)
    encode_for_reward,
    folder_config,
    pad_id,
    reward_tokenizer,
    score_ids,
    score_texts,
)
from tristage.runtime import progress, resolve_dtype


# ----------------------------------------------------------------------------- the command
def read_records(path: str, tokenizer: Any, max_len: int) -> tuple[list[dict[str, Any]], list[list[int]],
                                                                    list[tuple[int, str]], int]:
    """(records, encoded sequences, (record index, "response" | "chosen" | "rejected") per sequence, truncated);
    a bad record raises DataError with its file, line and field."""

    records, seqs, where, truncated = [], [], [], 0
    for line, obj in read_jsonl(path):
        try:  # the one prompt parser (tristage.data.records); its errors are located here
            key = prompt_field(obj)
            prompt_messages(obj[key], key)
        except DataError as e:
            raise e.at(path, line) from None
        if "response" in obj:
            fields = ["response"]
        elif "chosen" in obj or "rejected" in obj:
            fields = ["chosen", "rejected"]
        else:
            raise DataError(path, line, "a record needs `response`, or `chosen` and `rejected`")
        for f in fields:
            value = obj.get(f)
            if not isinstance(value, str):
                raise DataError(path, line, f"expected text, got {type(value).__name__}", f)
            try:
                ids, cut = encode_for_reward(tokenizer, obj[key], value, max_len, with_flag=True)
            except (ValueError, jinja2.TemplateError) as e:  # special tokens in the text, or the template refused
                raise DataError(path, line, str(e), f) from None
            seqs.append(ids)
            where.append((len(records), f))
            truncated += cut
        records.append(obj)
    return records, seqs, where, truncated


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def main(cfg: Config) -> dict[str, Any]:
    folder = Path(cfg.rm)
    if cfg.batch_size < 1 or cfg.max_len < 1:
        raise UserError("--batch-size and --max-len must be >= 1")
    if cfg.output:  # before minutes of scoring, not after
        check_writable(cfg.output, flag="--output")
    tok = reward_tokenizer(folder)  # a reward model folder, with a tokenizer and a chat template
    max_len = min(cfg.max_len, int(folder_config(folder).get("max_position_embeddings") or cfg.max_len))
    records, seqs, where, truncated = read_records(cfg.file, tok, max_len)  # validate before loading the model
    if not records:
        raise UserError(f"{cfg.file}: no records to score (0 records)")
    device = torch.device(cfg.device)
    rm = load_reward_model(folder, device=device, dtype=resolve_dtype(cfg.dtype, device)).eval()

    with progress(cfg.progress) as bar:
        task = bar.add_task("score", total=len(seqs), info="")
        scores = score_ids(rm, seqs, pad_id(tok), cfg.batch_size, lambda n: bar.update(task, advance=n))
    combined = rm.combine(scores).tolist()
    per_label = scores.tolist()

    out = [dict(r) for r in records]
    for (i, f), s, row in zip(where, combined, per_label):
        if f == "response":
            out[i]["score"] = s
            out[i]["scores"] = dict(zip(rm.labels, row))
        else:
            out[i][f"score_{f}"] = s
    responses = [o["score"] for o in out if "score" in o and "response" in o]
    pairs = [(o["score_chosen"], o["score_rejected"]) for o in out if "score_chosen" in o]
    summary: dict[str, Any] = {"records": len(out), "sequences": len(seqs), "truncated": truncated,
                               "max_len": max_len, "labels": list(rm.labels)}
    print(f"score: {len(out)} records ({len(responses)} responses, {len(pairs)} pairs) from {cfg.file}; "
          f"{truncated} sequences truncated to {max_len} tokens (from the left)")
    if responses:
        m, s = _mean_std(responses)
        summary.update(responses=len(responses), mean=m, std=s)
        print(f"score: responses: mean {m:.4f}, std {s:.4f}")
    if pairs:
        acc = sum(c > r for c, r in pairs) / len(pairs)
        margin = sum(c - r for c, r in pairs) / len(pairs)
        (mc, sc), (mr, sr) = _mean_std([c for c, _ in pairs]), _mean_std([r for _, r in pairs])
        summary.update(pairs=len(pairs), accuracy=acc, margin=margin, mean_chosen=mc, std_chosen=sc,
                       mean_rejected=mr, std_rejected=sr)
        print(f"score: pairs: accuracy {acc:.4f} (score_chosen > score_rejected), mean margin {margin:.4f}; "
              f"chosen {mc:.4f} +- {sc:.4f}, rejected {mr:.4f} +- {sr:.4f}")
    if cfg.output:
        write_jsonl(cfg.output, out)
        print(f"score: wrote {len(out)} records to {cfg.output}")
        summary["output"] = cfg.output
    return summary
