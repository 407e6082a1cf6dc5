"""DPO stage: precomputed reference log-probs, every loss type, learning, resume, LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import pair_world

from tristage.data.preference import encode_reply
from tristage.model.hf import load_model
from tristage.rollout import batch_logprobs
from tristage.stages import dpo
from tristage.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tiny_shards, tmp_path_factory):
    return pair_world(tiny_shards, tmp_path_factory.mktemp("dpo"), train=(96, 0), val=(24, 1))


def _cfg(root, out, **kw):
    base = dict(model=str(root / "base"), data=[str(root / "train.jsonl")], val_data=[str(root / "val.jsonl")],
                out=str(out), batch_size=8, max_steps=30, lr=2e-3, warmup_steps=3, eval_every=0, log_every=1,
                dtype="float32", progress=False, device="cpu")
    return dpo.Config(**{**base, **kw})


def _log(run):
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


def test_reference_logps_are_answer_token_sums_and_first_loss_is_log2(setup, tmp_path):
    m = dpo.main(_cfg(setup, tmp_path / "run", max_steps=1, lr=1e-9))
    ref = torch.load(tmp_path / "run" / "reference_logps.pt")["train"]
    # by hand: full forward on prompt + answer, sum log p over the answer's tokens only
    tok = Tokenizer.load(setup / "base")
    model = load_model(setup / "base").eval()
    row = json.loads((setup / "train.jsonl").read_text().splitlines()[0])
    for col, key in ((0, "chosen"), (1, "rejected")):
        ids, mask = encode_reply(tok, [{"role": "user", "content": row["prompt"]}], row[key])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
        by_hand = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
        assert ref[0, col].item() == pytest.approx(by_hand, abs=1e-4)
        assert sum(mask) < len(ids) - 5  # the prompt really is excluded
    first = next(r for r in _log(tmp_path / "run") if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert first["margin"] == pytest.approx(0.0, abs=1e-5)
    assert "val_accuracy" in m


def test_dpo_learns_the_preference(setup, tmp_path):
    m = dpo.main(_cfg(setup, tmp_path / "run", max_steps=120, lr=3e-3, beta=0.5))
    assert m["val_accuracy"] >= 0.8 and m["val_margin"] > 0.1, m
    assert m["val_loss"] < math.log(2) - 0.05


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_other_losses_run_and_improve(setup, tmp_path, loss):
    kw = {"ipo": dict(beta=0.5), "simpo": dict(beta=2.0, gamma=0.5), "orpo": dict(beta=0.1)}[loss]
    run = tmp_path / "run"
    m = dpo.main(_cfg(setup, run, loss=loss, max_steps=25, **kw))
    assert (run / "reference_logps.pt").exists() == (loss == "ipo")
    log = [r for r in _log(run) if "loss" in r]
    assert sum(r["loss"] for r in log[-5:]) / 5 < log[0]["loss"] - 0.01, [r["loss"] for r in log]
    if loss != "orpo":  # orpo's loss is mostly its SFT term at first; its odds-ratio margin moves later
        assert sum(r["margin"] for r in log[-5:]) > 0, m


def test_conservative_dpo_first_loss_is_log2_too(setup, tmp_path):
    dpo.main(_cfg(setup, tmp_path / "run", max_steps=1, label_smoothing=0.2))
    assert next(r for r in _log(tmp_path / "run") if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_resume_is_exact(setup, tmp_path):
    dpo.main(_cfg(setup, tmp_path / "full", max_steps=8, save_every=0))
    dpo.main(_cfg(setup, tmp_path / "part", max_steps=8, stop_at=4, save_every=0))
    dpo.main(_cfg(setup, tmp_path / "part", max_steps=8, resume=True, save_every=0))
    la = [(r["step"], r["loss"], r["tokens"]) for r in _log(tmp_path / "full") if "loss" in r]
    lb = [(r["step"], r["loss"], r["tokens"]) for r in _log(tmp_path / "part") if "loss" in r]
    assert la == lb and len(la) == 8
    assert all(0 < r["mfu"] < 1 for r in _log(tmp_path / "full") if "loss" in r)


def test_lora_dpo_writes_adapter_and_merged_model(setup, tmp_path):
    dpo.main(_cfg(setup, tmp_path / "run", max_steps=60, lora_rank=4, lr=1e-2))
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    merged = load_model(tmp_path / "run" / "model")
    base = load_model(setup / "base")
    diff = max((a - b).abs().max().item() for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
    assert diff > 1e-4  # the adapter changed the weights
    log = [r for r in _log(tmp_path / "run") if "loss" in r]
    assert sum(r["loss"] for r in log[-5:]) / 5 < log[0]["loss"] - 0.01, [r["loss"] for r in log]


def test_reference_cache_is_reused_only_for_the_same_reference_and_pairs(setup, tmp_path, capsys):
    run = tmp_path / "run"
    dpo.main(_cfg(setup, run, max_steps=1))
    first = torch.load(run / "reference_logps.pt")
    capsys.readouterr()
    # a rerun in the same folder starts over (--overwrite: the folder holds the first run's model)
    dpo.main(_cfg(setup, run, max_steps=2, beta=0.5, overwrite=True))  # other hyperparameters: reused
    assert "reference log-probs from" in capsys.readouterr().out
    dpo.main(_cfg(setup, run, max_steps=1, data=[str(setup / "val.jsonl")], val_data=[],
                  overwrite=True))  # other pairs: recomputed
    assert "reference log-probs from" not in capsys.readouterr().out
    assert torch.load(run / "reference_logps.pt")["key"] != first["key"]


def test_bf16_policy_and_reference_agree_exactly_at_step_one(setup, tmp_path):
    dpo.main(_cfg(setup, tmp_path / "run", max_steps=1, lr=1e-9, dtype="bfloat16"))
    first = next(r for r in _log(tmp_path / "run") if "loss" in r)
    assert first["margin"] == 0.0  # the reference pass and the training pass compute the same numbers
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def _layout_pairs(tok):
    from tristage.data.preference import Preference, encode_preferences

    prefs = [Preference([{"role": "user", "content": "what does the dog say?"}], "the dog says woof.", "moo."),
             Preference([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
                         {"role": "user", "content": "and the owl?"}], "hoot hoot.", "the owl says quack, i think."),
             Preference([{"role": "user", "content": "x"}], "a", "ab"),
             Preference([{"role": "user", "content": "y?"}], "no", "yes"),
             Preference([{"role": "user", "content": "the cat"}], "sat on the mat.", "sat.")]
    return encode_preferences(tok, prefs, 128)[0]


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_shared_prompt_layouts_give_the_same_logprobs_as_two_rows(setup, layout):
    from tristage.data.preference import collate_pairs, pair_collator

    tok = Tokenizer.load(setup / "base")
    model = load_model(setup / "base").eval()
    ex = _layout_pairs(tok)
    with torch.no_grad():
        two = batch_logprobs(model, collate_pairs(ex, tok.pad_id))
        batch = pair_collator(layout)(ex, tok.pad_id)
        one = batch_logprobs(model, batch)
    torch.testing.assert_close(one[0], two[0], atol=1e-4, rtol=1e-5)
    assert one[1].tolist() == two[1].tolist()  # the same answer tokens are scored
    longest = max(len(e.chosen_ids) + len(e.rejected_ids) for e in ex)
    assert batch["input_ids"].shape[1] < longest  # the prompt is shared, not repeated
    if layout == "shared":
        assert batch["input_ids"].shape[0] == len(ex)  # one row per pair
    else:  # several pairs per row, no row longer than the longest pair
        assert batch["input_ids"].shape[0] < len(ex)
        assert batch["last_row"].unique().numel() < len(ex)


def test_shared_and_two_row_dpo_train_alike(setup, tmp_path):
    a = dpo.main(_cfg(setup, tmp_path / "a", max_steps=6))
    b = dpo.main(_cfg(setup, tmp_path / "b", max_steps=6, layout="rows"))
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
