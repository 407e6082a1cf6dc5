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


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 160, temperature: float = 0.0,
           seed: int = 0, batch_size: int = 64) -> list[tuple[str, bool]]:
    """(answer text, ended with the end-of-turn token) for each prompt, as a single user turn."""
    from tristage.serve.engine import Engine, SamplingParams

    engine = Engine(model)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=50 if temperature else 0,
                            seed=seed, stop_ids=tokenizer.stop_ids)
    results = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in chunk]
        for c in engine.generate(ids, params):
            # ended its turn: stopped on the end-of-turn token, not on end-of-text (a base model's empty answer)
            turn_end = c.finish_reason == "stop" and (c.tokens[-1] != tokenizer.eos_id or len(tokenizer.stop_ids) == 1)
            results.append((tokenizer.decode(c.tokens, skip_special_tokens=True).strip(), turn_end))
    return results


def evaluate_chat_model(model_dir: str | Path, prompts_file: str | Path, limit: int | None = None,
                        **kw: Any) -> dict[str, Any]:
    """Mean gold scores (overall and per attribute) and the stop rate on the world's eval prompts."""
    from tristage.model.hf import load_model
    from tristage.tokenizer import Tokenizer
    from tristage.world import read_eval_prompts, score

    prompts = read_eval_prompts(prompts_file)[:limit]
    tok = Tokenizer.load(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    outs = answer(model, tok, prompts, **kw)
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


@torch.no_grad()
def answer_logprobs(model, prompt_ids: list[list[int]], answer_ids: list[list[int]],
                    batch_size: int = 32) -> list[float]:
    """Summed log-probs of each answer after its prompt under `model` (one right-padded forward per batch)."""
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        rows = [p + a for p, a in zip(prompt_ids[i:i + batch_size], answer_ids[i:i + batch_size])]
        T = max(len(r) for r in rows)
        x = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        logp = torch.log_softmax(model(x).float(), -1)
        for b, (p, a) in enumerate(zip(prompt_ids[i:i + batch_size], answer_ids[i:i + batch_size])):
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)
            out.append(logp[b, pos, torch.tensor(a, dtype=torch.long)].sum().item() if a else 0.0)
    return out


def compare_to_reference(model_dir: str | Path, ref_dir: str | Path, prompts_file: str | Path,
                         limit: int | None = None, kl_samples: int = 1, seed: int = 0) -> dict[str, Any]:
    """A tuned policy against its reference on held-out prompts, judged by the gold scorer.

    - gold: both answer greedily; mean gold scores of each, and the policy's win rate (gold(policy) >
      gold(reference) counts 1, a tie 1/2).
    - KL(policy || reference), the price paid for the gain: the mean over sampled answers y ~ policy
      (temperature 1, `kl_samples` per prompt) of log pi(y|x) - log pi_ref(y|x), in nats per answer.
    """
    from tristage.model.hf import load_model
    from tristage.serve.engine import Engine, SamplingParams
    from tristage.tokenizer import Tokenizer
    from tristage.world import read_eval_prompts, score

    prompts = read_eval_prompts(prompts_file)[:limit]
    tok = Tokenizer.load(model_dir)
    policy = load_model(model_dir, dtype=torch.float32).eval()
    ref = load_model(ref_dir, dtype=torch.float32).eval()
    ours = answer(policy, tok, prompts)
    theirs = answer(ref, tok, prompts)
    s_ours = [score(p, a).overall for p, (a, _) in zip(prompts, ours)]
    s_theirs = [score(p, a).overall for p, (a, _) in zip(prompts, theirs)]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(s_ours, s_theirs))
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    ids = [x for x in ids for _ in range(kl_samples)]
    sampled = Engine(policy).generate(ids, SamplingParams(max_new_tokens=160, temperature=1.0, seed=seed,
                                                          stop_ids=tok.stop_ids, logprobs=True))
    lp_policy = [sum(c.logprobs) for c in sampled]
    lp_ref = answer_logprobs(ref, ids, [c.tokens for c in sampled])
    n = len(prompts)
    return {"n": n, "gold": sum(s_ours) / n, "gold_reference": sum(s_theirs) / n, "win_rate": wins / n,
            "kl": sum(a - b for a, b in zip(lp_policy, lp_ref)) / len(sampled),
            "stop_rate": sum(s for _, s in ours) / n}


@torch.no_grad()
def reward_gold_agreement(rm_dir: str | Path, pairs_file: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """How often a reward model orders held-out pairs as the gold scorer does, next to the labels themselves.

    Pairs whose two answers have the same gold score are left out. `annotator` is the agreement of the file's
    own chosen/rejected labels with gold (for the demo world: the simulated annotator's noise); `reward` that
    of the reward model's combined score, `reward_bt` that of its Bradley-Terry output alone.
    """
    from tristage.data.preference import collate_pairs, encode_preferences, load_preferences
    from tristage.model.score import load_reward_model, per_row
    from tristage.tokenizer import Tokenizer
    from tristage.world import score

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
