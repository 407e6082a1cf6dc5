"""Optimizer groups and the learning-rate schedules, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from tristage.model.gpt import ModelConfig, build_model
from tristage.train.optim import build_optimizer, lr_at


def test_cosine_schedule_hand_values():
    # warmup 10 steps to 1.0, then cosine over 90 steps down to 0.1
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_wsd_and_constant_schedule_hand_values():
    # 100 steps, decay over the last 20: flat at 1.0 until step 80, then linear to 0.1
    assert lr_at(50, 100, 1.0, 0, "wsd") == 1.0
    assert lr_at(80, 100, 1.0, 0, "wsd") == pytest.approx(1.0)
    assert lr_at(90, 100, 1.0, 0, "wsd") == pytest.approx(0.55)
    assert lr_at(100, 100, 1.0, 0, "wsd") == pytest.approx(0.1)
    assert lr_at(70, 100, 2.0, 5, "constant") == 2.0
    with pytest.raises(ValueError):
        lr_at(1, 10, 1.0, 0, "linear")


def test_weight_decay_only_on_matrices():
    m = build_model(ModelConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                attention_bias=True))
    opt = build_optimizer(m, 1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in m.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name


def test_lr_scale_gives_a_part_of_the_model_its_own_rate():
    import torch
    from torch import nn

    from tristage.train.optim import build_optimizer, set_lr

    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    opt = build_optimizer(model, 1e-3, 0.1, lr_scale=lambda name: 10.0 if name.startswith("b.") else 1.0)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr"] == pytest.approx(1e-2 if name.startswith("b.") else 1e-3), name
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
    set_lr(opt, 2e-3)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([2e-3, 2e-3, 2e-2, 2e-2])
    plain = build_optimizer(model, 1e-3, 0.1)  # without scales: the decayed group, then the rest, as always
    assert [len(g["params"]) for g in plain.param_groups] == [2, 2] and plain.param_groups[0]["weight_decay"] == 0.1
    assert isinstance(plain, torch.optim.AdamW)
