"""Policy-vs-reference evaluation: sequence log-probs, KL estimate and win rate."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tristage.eval.world import compare_to_reference, mean_ci95
from tristage.model.gpt import build_model
from tristage.model.hf import save_model
from tristage.rollout import completion_logprobs
from tristage.serve.engine import Engine, SamplingParams
from tristage.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def two_models(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalw")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    cfg = tiny_config(tok, max_position_embeddings=256)
    save_model(build_model(cfg, seed=0), root / "a", tok)
    save_model(build_model(cfg, seed=1), root / "b", tok)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me a story about a {a}."}) + "\n"
                                                for a in ("dog", "cat", "fish", "bird")))
    return root, tok


def test_reference_logprobs_equal_the_engines(two_models):
    """compare_to_reference's log pi_ref (the rollout module's completion_logprobs, once eval's answer_logprobs)."""
    root, tok = two_models
    from tristage.model.hf import load_model

    model = load_model(root / "a").eval()
    prompts = [tok.encode("the dog"), tok.encode("a cat sat on")]
    outs = Engine(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, logprobs=True))
    with torch.no_grad():
        ours = completion_logprobs(model, prompts, [c.tokens for c in outs]).tolist()
    assert ours == pytest.approx([sum(c.logprobs) for c in outs], abs=1e-4)
    assert all(x < 0 for x in ours)


def test_kl_to_itself_is_zero_and_to_another_model_positive(two_models):
    root, _ = two_models
    same = compare_to_reference(root / "a", root / "a", root / "prompts.jsonl", kl_samples=2)
    assert abs(same["kl"]) < 1e-3 and same["win_rate"] == 0.5 and same["gold"] == same["gold_reference"]
    assert same["gold_gain"] == 0 and same["gold_gain_ci95"] == [0, 0] and same["win_rate_ci95"] == [0.5, 0.5]
    other = compare_to_reference(root / "a", root / "b", root / "prompts.jsonl", kl_samples=2)
    assert other["kl"] > 0.1
    assert other["n"] == 4
    # the interval is the paired one: mean difference +- 1.96 x its standard error
    assert other["gold_gain"] == pytest.approx(other["gold"] - other["gold_reference"])
    lo, hi = other["gold_gain_ci95"]
    assert lo <= other["gold_gain"] <= hi and (hi - lo) / 2 >= 0
    wlo, whi = other["win_rate_ci95"]
    assert wlo <= other["win_rate"] <= whi and 0 <= other["win_rate"] <= 1


def test_mean_ci95_by_hand():
    mean, lo, hi = mean_ci95([1.0, 2.0, 3.0, 4.0])  # sd = sqrt(5/3), se = sd / 2
    assert mean == 2.5 and hi - mean == pytest.approx(1.96 * (5 / 3) ** 0.5 / 2)
    assert mean - lo == pytest.approx(hi - mean)
    assert mean_ci95([0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
