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
