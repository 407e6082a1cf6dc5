"""Measure a chat model against the demo world's gold scorer on held-out prompts.

The model answers each prompt through its own chat template (the shared generation engine, batched);
the gold scorer rates every answer per attribute. Also counted: the share of answers that end with the
end-of-turn token rather than running into the token limit (a model that never stops is the classic
SFT failure; stopping on end-of-text instead, as a base model does at once, does not count).
Used by the demo and by the stages' reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tristage.data.preference import collate_pairs, encode_preferences, load_preferences
from tristage.model.score import load_reward_model, per_row
from tristage.rollout import ChatModel, completion_logprobs, load_chat_model, sample_answers
from tristage.serve.engine import Engine, SamplingParams
from tristage.tokenizer import Tokenizer
from tristage.world import read_eval_prompts, score


def _user_turns(prompts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def answer(chat: ChatModel, prompts: list[str], max_new_tokens: int = 160, temperature: float = 0.0,
           seed: int = 0, batch_size: int = 64) -> list[tuple[str, bool]]:
    """(answer text, ended with the end-of-turn token) for each prompt, as a single user turn."""
    engine, tok = Engine(chat.model), chat.tokenizer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=50 if temperature else 0,
                            seed=seed, stop_ids=chat.stop_ids)
    results = []
    for i in range(0, len(prompts), batch_size):
        for (r,) in sample_answers(engine, tok, _user_turns(prompts[i:i + batch_size]), 1, params):
            # ended its turn: stopped on the end-of-turn token, not on end-of-text (a base model's empty answer)
            turn_end = r.finish_reason == "stop" and (r.tokens[-1] != tok.eos_id or len(chat.stop_ids) == 1)
            results.append((r.text.strip(), turn_end))
    return results


def evaluate_chat_model(model_dir: str | Path, prompts_file: str | Path, limit: int | None = None,
                        **kw: Any) -> dict[str, Any]:
    """Mean gold scores (overall and per attribute) and the stop rate on the world's eval prompts."""
    prompts = read_eval_prompts(prompts_file)[:limit]
    outs = answer(load_chat_model(model_dir, require_template=False), prompts, **kw)
    scores = [score(p, a) for p, (a, _) in zip(prompts, outs)]
    attrs = sorted(scores[0].attributes) if scores else []
    return {
        "n": len(prompts),
        "overall": sum(s.overall for s in scores) / len(scores),
        "attributes": {a: sum(s.attributes[a] for s in scores) / len(scores) for a in attrs},
        "stop_rate": sum(stopped for _, stopped in outs) / len(outs),
        "examples": [{"prompt": p, "answer": a, "score": s.overall} for p, (a, _), s in
                     list(zip(prompts, outs, scores))[:5]],
    }


def mean_ci95(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its normal-approximation 95% interval, mean +- 1.96 x sd / sqrt(n) with the
    unbiased sd (a paired comparison passes the per-prompt differences)."""
    n = len(xs)
    mean = sum(xs) / n
    half = 1.96 * (sum((x - mean) ** 2 for x in xs) / max(n - 1, 1) / n) ** 0.5
    return mean, mean - half, mean + half


def compare_to_reference(model_dir: str | Path, ref_dir: str | Path, prompts_file: str | Path,
                         limit: int | None = None, kl_samples: int = 1, seed: int = 0) -> dict[str, Any]:
    """A tuned policy against its reference on held-out prompts, judged by the gold scorer.

    - gold: both answer greedily; mean gold scores of each, the mean gain over prompts with its 95% confidence
      interval (paired: the per-prompt differences, normal approximation), and the policy's win rate
      (gold(policy) > gold(reference) counts 1, a tie 1/2) with its 95% interval over prompts.
    - KL(policy || reference), the price paid for the gain: the mean over sampled answers y ~ policy
      (temperature 1, `kl_samples` per prompt) of log pi(y|x) - log pi_ref(y|x), in nats per answer
      (log pi from the engine, log pi_ref from tristage.rollout.completion_logprobs).
    """
    prompts = read_eval_prompts(prompts_file)[:limit]
    policy = load_chat_model(model_dir, require_template=False)
    ref = load_chat_model(ref_dir, require_template=False)
    ours, theirs = answer(policy, prompts), answer(ref, prompts)
    s_ours = [score(p, a).overall for p, (a, _) in zip(prompts, ours)]
    s_theirs = [score(p, a).overall for p, (a, _) in zip(prompts, theirs)]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(s_ours, s_theirs)]
    params = SamplingParams(max_new_tokens=160, temperature=1.0, seed=seed, stop_ids=policy.stop_ids, logprobs=True)
    sampled = [r for rs in sample_answers(Engine(policy.model), policy.tokenizer, _user_turns(prompts), kl_samples,
                                          params) for r in rs]
    lp_policy = [sum(r.logprobs) for r in sampled]
    with torch.no_grad():
        lp_ref = completion_logprobs(ref.model, [r.prompt for r in sampled], [r.tokens for r in sampled]).tolist()
    n = len(prompts)
    gain, lo, hi = mean_ci95([a - b for a, b in zip(s_ours, s_theirs)])
    return {"n": n, "gold": sum(s_ours) / n, "gold_reference": sum(s_theirs) / n, "gold_gain": gain,
            "gold_gain_ci95": [lo, hi], "win_rate": sum(wins) / n, "win_rate_ci95": list(mean_ci95(wins)[1:]),
            "kl": sum(a - b for a, b in zip(lp_policy, lp_ref)) / len(sampled),
            "stop_rate": sum(s for _, s in ours) / n}


@torch.no_grad()
def reward_gold_agreement(rm_dir: str | Path, pairs_file: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """How often a reward model orders held-out pairs as the gold scorer does, next to the labels themselves.

    Pairs whose two answers have the same gold score are left out. `annotator` is the agreement of the file's
    own chosen/rejected labels with gold (for the demo world: the simulated annotator's noise); `reward` that
    of the reward model's combined score, `reward_bt` that of its Bradley-Terry output alone.
    """
    prefs, _ = load_preferences(pairs_file)
    tok = Tokenizer.load(rm_dir)
    rm = load_reward_model(rm_dir, dtype=torch.float32).eval()
    examples, _ = encode_preferences(tok, prefs, max_len=rm.config.max_position_embeddings)
    if len(examples) != len(prefs):
        raise ValueError(f"{pairs_file}: {len(prefs) - len(examples)} pairs did not encode")
    combined, bt = [], []
    for i in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[i:i + batch_size], tok.pad_id)
        s = rm(batch["input_ids"], at=per_row(batch["last_index"]))
        B = batch["num_pairs"]
        c = rm.combine(s)
        combined += (c[:B] - c[B:]).tolist()
        bt += (s[:B, 0] - s[B:, 0]).tolist()
    agree = {"annotator": 0, "reward": 0.0, "reward_bt": 0.0}
    n = 0
    for p, dc, db in zip(prefs, combined, bt):
        user = p.prompt[-1]["content"]
        gap = score(user, p.chosen).overall - score(user, p.rejected).overall
        if gap == 0:
            continue
        n += 1
        agree["annotator"] += gap > 0
        agree["reward"] += (dc > 0) == (gap > 0)
        agree["reward_bt"] += (db > 0) == (gap > 0)
    return {"n": n, "ties_left_out": len(prefs) - n, **{k: v / max(n, 1) for k, v in agree.items()}}
