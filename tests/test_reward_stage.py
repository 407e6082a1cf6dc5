"""Reward stage: learns a preference, exports a model transformers scores identically, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import animal_pairs as pairs
from conftest import pair_world

from tristage.stages import reward
from tristage.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tiny_shards, tmp_path_factory):
    return pair_world(tiny_shards, tmp_path_factory.mktemp("rm"), train=(160, 0), val=(40, 1), rated=(160, 2, True))


def _cfg(root, out, **kw):
    base = dict(model=str(root / "base"), data=[str(root / "train.jsonl")], val_data=[str(root / "val.jsonl")],
                out=str(out), batch_size=16, max_steps=150, lr=3e-3, warmup_steps=5, eval_every=0, log_every=5,
                dtype="float32", progress=False, device="cpu")
    return reward.Config(**{**base, **kw})


def test_reward_model_learns_and_transformers_agrees(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tristage.data.preference import encode_reply
    from tristage.model.score import load_reward_model, per_row

    m = reward.main(_cfg(setup, tmp_path / "rm"))
    assert m["val_accuracy"] >= 0.9, m
    assert m["val_margin"] > 0.5
    rm = load_reward_model(tmp_path / "rm" / "model").eval()
    tok = Tokenizer.load(tmp_path / "rm" / "model")
    prompt = [{"role": "user", "content": "what does the cow say?"}]
    ids = [encode_reply(tok, prompt, t)[0] for t in ("the cow says moo.", "the cow says woof.")]
    T = max(map(len, ids))
    x = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in ids])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model").eval()
    with torch.no_grad():
        ours = rm(x, at=per_row(torch.tensor([len(r) - 1 for r in ids])))
        theirs = hf(input_ids=x, attention_mask=(x != tok.pad_id).long()).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ours[0, 0] > ours[1, 0]  # the true sound scores higher


def test_reward_resume_is_exact(setup, tmp_path):
    full = tmp_path / "full"
    reward.main(_cfg(setup, full, max_steps=12, save_every=0))
    part = tmp_path / "part"
    reward.main(_cfg(setup, part, max_steps=12, stop_at=6, save_every=0))
    reward.main(_cfg(setup, part, max_steps=12, resume=True, save_every=0))
    a = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(r) for r in (part / "metrics.jsonl").read_text().splitlines()]
    la = [(r["step"], r["loss"], r["tokens"]) for r in a if "loss" in r]
    lb = [(r["step"], r["loss"], r["tokens"]) for r in b if "loss" in r]
    assert la == lb and len(la) >= 2
    assert all(0 < r["mfu"] < 1 for r in a if "loss" in r)


def test_attribute_heads_train_on_ratings(setup, tmp_path):
    m = reward.main(_cfg(setup, tmp_path / "rm", data=[str(setup / "rated.jsonl")], val_data=[], val_fraction=0.2,
                         max_steps=100))
    cfg = json.loads((tmp_path / "rm" / "model" / "config.json").read_text())
    assert cfg["tristage_reward"]["labels"] == ["reward", "fluency", "truth"]
    assert cfg["tristage_reward"]["weights"] == [1.0, 0.5, 0.5]
    assert cfg["tristage_reward"]["rating_range"] == {"fluency": [4, 5], "truth": [1, 5]}
    assert m["val_rating_mse"] < 0.2 and m["val_accuracy_combined"] >= 0.9, m


def test_bad_pair_names_file_and_line(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(pairs(1, 0)[0]) + "\n" + json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    with pytest.raises(Exception, match=r"bad\.jsonl:2"):
        reward.main(_cfg(setup, tmp_path / "rm", data=[str(bad)], val_data=[]))


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_shared_prompt_layouts_score_as_a_row_per_answer(setup, layout):
    from tristage.data.preference import Preference, collate_pairs, encode_preferences, pair_collator
    from tristage.model.hf import load_model
    from tristage.model.score import from_causal_lm

    tok = Tokenizer.load(setup / "base")
    rm = from_causal_lm(load_model(setup / "base"), 3, seed=1).eval()
    prefs = [Preference([{"role": "user", "content": "what does the dog say?"}], "the dog says woof.", "moo.",
                        ratings={"chosen": {"a": 5, "b": 4}, "rejected": {"a": 1, "b": 2}}),
             Preference([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
                         {"role": "user", "content": "and the owl?"}], "hoot hoot.", "the owl says quack."),
             Preference([{"role": "user", "content": "x"}], "a", "ab"),
             Preference([{"role": "user", "content": "y?"}], "no", "yes")]
    ex, _ = encode_preferences(tok, prefs, 128)
    rows, other = collate_pairs(ex, tok.pad_id), pair_collator(layout)(ex, tok.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(reward.pair_scores(rm, other, "cpu"), reward.pair_scores(rm, rows, "cpu"),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other["ratings"], rows["ratings"], equal_nan=True)
    assert other["input_ids"].numel() < rows["input_ids"].numel()


def test_packed_and_row_layouts_train_alike(setup, tmp_path):
    a = reward.main(_cfg(setup, tmp_path / "a", max_steps=8, eval_every=8))
    b = reward.main(_cfg(setup, tmp_path / "b", max_steps=8, eval_every=8, layout="rows"))
    assert a["val_accuracy"] == b["val_accuracy"]
    assert a["val_margin"] == pytest.approx(b["val_margin"], abs=1e-4)
