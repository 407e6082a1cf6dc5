"""Compute planner: every formula against hand-computed values, FLOPs against torch's counter, and the command."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tristage.plan as plan_module
from tristage.config import build_parser, parse
from tristage.model.gpt import ModelConfig, build_model
from tristage.plan import (
    Config,
    activation_bytes_per_token,
    attention_flops_per_token,
    budget_to_flops,
    chinchilla_optimal,
    flops_per_token,
    main,
    matmul_params,
    nearest_depth,
    train_cost,
    train_time,
)

# Llama-2-7B: 32 layers, hidden 4096, 32 heads of 128, MLP 11008, vocab 32000, untied embeddings.
LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=11008, tie_word_embeddings=False)
LLAMA2_HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 11008, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def test_llama2_7b_parameter_counts():
    attn, mlp, norms = 4 * 4096 * 4096, 3 * 4096 * 11008, 2 * 4096  # 67,108,864 + 135,266,304 + 8,192 per layer
    assert LLAMA2_7B.num_params(include_embeddings=False) == 32 * (attn + mlp + norms) + 4096 == 6_476_271_616
    assert LLAMA2_7B.num_params() == 6_476_271_616 + 2 * 32000 * 4096 == 6_738_415_616  # the published 6.74B
    # matmul weights: no norms, no embedding gather, but the lm_head matmul (V*h)
    assert matmul_params(LLAMA2_7B) == 32 * (attn + mlp) + 32000 * 4096 == 6_607_077_376


def test_flops_per_token_llama2_7b():
    six_n = 6 * 6_607_077_376  # 39,642,464,256
    attn = 12 * 32 * (32 * 128) * 4096  # 12 * L * d_attn * T = 6,442,450,944
    assert attention_flops_per_token(LLAMA2_7B, 4096) == attn == 6_442_450_944
    assert flops_per_token(LLAMA2_7B, 4096) == six_n + attn == 46_084_915_200
    assert attention_flops_per_token(LLAMA2_7B, 4096, causal=True) == attn / 2
    assert attn / (six_n + attn) == pytest.approx(0.13979, abs=1e-5)
    # doubling the context doubles attention FLOPs per token (quadratic per sequence); 6N is unchanged
    assert flops_per_token(LLAMA2_7B, 8192) - flops_per_token(LLAMA2_7B, 4096) == attn
    # GQA shrinks the k/v projections (6N) but not the attention matmuls: queries still see T keys per head
    gqa = dataclasses.replace(LLAMA2_7B, num_key_value_heads=8)
    assert matmul_params(gqa) == matmul_params(LLAMA2_7B) - 32 * 2 * 4096 * (4096 - 1024)
    assert attention_flops_per_token(gqa, 4096) == attn


def _math_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **_):
    """Attention as plain matmuls, so FlopCounterMode sees them (it has no CPU SDPA formula)."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    if is_causal:
        attn_mask = torch.ones(T, T, dtype=torch.bool).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return s.softmax(-1) @ v


def test_flops_match_torch_flop_counter(monkeypatch):
    """6 N_matmul + 12 L d_attn T per token is exactly what torch counts for a training step's matmuls."""
    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, tie_word_embeddings=True)
    model = build_model(cfg)
    B, T = 2, 32
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _math_sdpa)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randint(0, 97, (B, T))).float().sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.mm"] == 6 * matmul_params(cfg) * B * T
    assert counts["aten.bmm"] == attention_flops_per_token(cfg, T) * B * T  # the full T x T, causal half included
    assert counter.get_total_flops() == flops_per_token(cfg, T) * B * T


def test_chinchilla_optimal():
    # Chinchilla's own budget: C = 5.76e23, k = 20 -> N = sqrt(5.76e23 / 120) = sqrt(4.8e21) = 6.928e10 (70B),
    # D = 20 N = 1.386e12 (1.4T)
    n, d = chinchilla_optimal(5.76e23, 20.0)
    assert n == pytest.approx(69_282_032_302.755, rel=1e-12)
    assert d == pytest.approx(1_385_640_646_055.10, rel=1e-12)
    assert 6 * n * d == pytest.approx(5.76e23, rel=1e-12)
    n10, d10 = chinchilla_optimal(6e22, 10.0)  # sqrt(6e22 / 60) = 1e10.5 = 3.1623e10, D = 3.1623e11
    assert (n10, d10) == pytest.approx((10**10.5, 10**11.5), rel=1e-12)


def test_time_cost_and_budget():
    # 1e21 FLOPs on 8 x 989e12 at MFU 0.4: 1e21 / 3.1648e15 = 315,975.73 s; 87.77 h x 8 GPUs x $2.50 = $1,755.42
    s = train_time(1e21, 989e12, 8, 0.4)
    assert s == pytest.approx(1e21 / 3.1648e15, rel=1e-12) == pytest.approx(315_975.733, rel=1e-9)
    assert train_cost(s, 8, 2.5) == pytest.approx(1_755.4207, rel=1e-7)
    # $1000 at 8 x $2.50/h = 50 h; 50 * 3600 * 3.1648e15 = 5.69664e20 FLOPs
    c = budget_to_flops(989e12, 8, 0.4, 2.5, dollars=1000)
    assert c == pytest.approx(5.69664e20, rel=1e-12)
    assert budget_to_flops(989e12, 8, 0.4, 2.5, hours=50) == pytest.approx(c, rel=1e-12)
    assert train_cost(train_time(c, 989e12, 8, 0.4), 8, 2.5) == pytest.approx(1000, rel=1e-12)
    with pytest.raises(ValueError):
        budget_to_flops(989e12, 8, 0.4, 0.0, dollars=1000)


def test_nearest_depth_and_memory():
    # depth 112: hidden 7168, MLP 64 * ceil(7168 * 8/3 / 64) = 19136; per layer 4*7168^2 + 3*7168*19136 + 2*7168
    # = 617,035,776; x112 + 7168 + 32000*7168 (tied) = 69,337,390,080, the nearest to Chinchilla's 69.28B
    assert ModelConfig.from_depth(112, 32000).num_params() == 112 * 617_035_776 + 7168 + 32000 * 7168
    assert nearest_depth(69_282_032_302.755, 32000) == 112
    assert nearest_depth(ModelConfig.from_depth(12, 32000).num_params(), 32000) == 12
    # activations: 34 * h * L bytes per token = 34 * 4096 * 32 = 4,456,448 B; x 4096 tokens = 17.0 GiB
    assert activation_bytes_per_token(LLAMA2_7B) * 4096 == 18_253_611_008


def _run(capsys, **kw) -> dict:
    main(Config(json=True, **kw))
    return json.loads(capsys.readouterr().out)


def test_main_json_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_HF))
    p = _run(capsys, model=str(tmp_path), seq_len=4096, tokens=2e12, gpu="h100", num_gpus=64)
    m, f, t, mem = p["model"], p["flops"], p["time"], p["memory"]
    assert (m["params_total"], m["params_non_embedding"], m["params_matmul"]) == (6_738_415_616, 6_476_271_616,
                                                                                 6_607_077_376)
    assert f["per_token"] == 46_084_915_200 and f["per_token_attention"] == 6_442_450_944
    assert f["total"] == pytest.approx(46_084_915_200 * 2e12)  # 9.217e22
    # 9.217e22 / (64 * 989e12 * 0.4) = 3,640,332 s = 42.1 days; 1011.2 h x 64 x $2.50 = $161,797
    assert t["seconds"] == pytest.approx(9.216983e22 / (64 * 989e12 * 0.4), rel=1e-6)
    assert t["cost_usd"] == pytest.approx(t["seconds"] / 3600 * 64 * 2.5) == pytest.approx(161_797, rel=1e-5)
    assert mem["train_states_gib"] == pytest.approx(16 * 6_738_415_616 / 2**30)  # 100.4 GiB
    assert mem["fits"] is True  # 1.57 GiB of sharded states + 17.0 GiB of activations < 80 GiB
    ctx = {r["seq_len"]: r["attention_share"] for r in p["context_scaling"]}
    assert ctx[4096] == pytest.approx(f["attention_share"]) and ctx[512] < ctx[4096] < ctx[131072]
    assert p["budget"] is None


def test_main_budget_only_plans_the_suggested_model(capsys):
    p = _run(capsys, budget_flops=5.76e23)
    b = p["budget"]
    assert b["params_opt"] == pytest.approx(69_282_032_302.755) and b["suggested_depth"] == 112
    assert p["model"]["params_total"] == 69_337_390_080
    assert p["flops"]["total"] == pytest.approx(5.76e23)  # the tokens are what the budget buys for this model
    assert p["flops"]["tokens_per_param"] < 20  # attention's share of the budget leaves fewer than 20 tokens/param
    p = _run(capsys, budget_dollars=1000, num_gpus=8, depth=12)  # 50 h on 8 H100s
    assert p["budget"]["flops"] == pytest.approx(5.69664e20) and p["time"]["cost_usd"] == pytest.approx(1000)
    assert p["model"]["params_total"] == 109_529_856


def test_main_params_only(capsys):
    p = _run(capsys, params=1.3e9, gpu="a100", num_gpus=8)
    assert p["flops"]["per_token"] == 6 * 1.3e9 and p["flops"]["per_token_attention"] == 0
    assert p["flops"]["tokens"] == 20 * 1.3e9  # default: Chinchilla's 20 tokens per parameter
    assert p["time"]["seconds"] == pytest.approx(6 * 1.3e9 * 26e9 / (8 * 312e12 * 0.4))
    assert p["context_scaling"] == [] and p["memory"]["fits"] is None


def test_main_prints_tables(capsys):
    cfg = parse(Config, ["--hidden-size", "4096", "--layers", "32", "--heads", "32", "--intermediate-size", "11008",
                         "--no-tie-embeddings", "--seq-len", "4096", "--tokens", "2e12", "--num-gpus", "64",
                         "--budget-hours", "24", "--causal"])
    main(cfg)
    out = capsys.readouterr().out
    for text in ("6.74B total", "6.48B non-embedding", "FLOPs/token", "attention", "causal half", "39.2 days",
                 "compute-optimal", "N_opt", "AdamW states", "131,072", "context"):
        assert text in out, text
    # --causal: 6N 3.964e10 + attention 3.221e9 = 4.286e10 FLOPs/token instead of 4.608e10, so 42.1 -> 39.2 days


def test_help_explains_every_flag():
    text = build_parser(Config).format_help()
    for f in dataclasses.fields(Config):
        assert f.metadata["help"], f.name
        assert "--" + f.name.replace("_", "-") in text
    for word in ("Kaplan", "Hoffmann", "PaLM"):
        assert word in plan_module.__doc__


@pytest.mark.parametrize("kw", [dict(), dict(depth=4, budget_flops=1e20, budget_hours=1.0), dict(hidden_size=256),
                                dict(depth=4, mfu=1.5)])
def test_bad_requests_are_refused(kw):
    with pytest.raises(SystemExit):
        main(Config(**kw))


def test_suggested_depth_follows_tying(capsys):
    # untied, the lm_head adds 32000 * 7168 = 229,376,000: depth 112 has 69.57B (111 has 67.68B), still the nearest
    tied = _run(capsys, budget_flops=5.76e23)["budget"]
    untied = _run(capsys, budget_flops=5.76e23, tie_embeddings=False)["budget"]
    assert untied["suggested_depth_params"] == ModelConfig.from_depth(
        untied["suggested_depth"], 32000, tie_word_embeddings=False).num_params()
    assert untied["suggested_depth"] == tied["suggested_depth"] == 112
    assert untied["suggested_depth_params"] == 69_566_766_080 == tied["suggested_depth_params"] + 32000 * 7168


def test_forward_and_score_model_flops_match_torch_flop_counter(monkeypatch):
    """A forward pass is a third of training's FLOPs; a score model (h weights of head, no lm_head) as counted."""
    from tristage.flops import forward_flops_per_token
    from tristage.model.score import from_causal_lm

    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, tie_word_embeddings=False)
    B, T = 3, 16
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _math_sdpa)
    ids = torch.randint(0, 97, (B, T))
    for model, lm_head in ((build_model(cfg), True), (from_causal_lm(build_model(cfg)), False)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(ids)
        assert counter.get_total_flops() == forward_flops_per_token(cfg, T, lm_head=lm_head) * B * T
    assert flops_per_token(cfg, T) - flops_per_token(cfg, T, lm_head=False) == 6 * (97 - 1) * 64


def test_rl_step_work_counts_every_pass():
    """tokens = prompt + answer tokens of every answer on all processes; FLOPs = tokens x (one forward per listed
    model + epochs x training per trained model) at the mean sequence length."""
    from types import SimpleNamespace

    from tristage.flops import forward_flops_per_token
    from tristage.stages.rl import step_work

    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    b = SimpleNamespace(prompt_ids=[[1, 2, 3], [4, 5]], answer_ids=[[6, 7, 8, 9, 10], [11, 12, 13]])  # 8 and 5 tokens
    tokens, flops = step_work(b, 2, [(cfg, True), (cfg, False)], [(cfg, True)], epochs=4)
    assert tokens == 2 * 13
    per_token = forward_flops_per_token(cfg, 6) + forward_flops_per_token(cfg, 6, lm_head=False) + \
        4 * flops_per_token(cfg, 6)  # round(mean(8, 5)) = 6
    assert flops == pytest.approx(26 * per_token, rel=1e-12)
