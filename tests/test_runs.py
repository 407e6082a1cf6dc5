"""Runs cannot be destroyed, model folders fail with one clear message, context limits fit the model.

- A checkpoint save killed between its renames is put back on the next start (in a real killed process);
  stale temporary folders go after a good save.
- An --out holding a run refuses a fresh start (--overwrite starts over); --resume with other shape flags, a
  damaged training_state.pt or DPO reference cache say so.
- Damaged model folders (config.json, weights, tensors, non-finite values) and the wrong kind of model are one
  UserError naming the folder or file.
- --max-len defaults to the model's context; every pair layout keeps every position inside it; the README's
  commands run in order with their defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SOUNDS, tiny_config, write_jsonl

from tristage.io import UserError, atomic_folder, recover_folder
from tristage.model.gpt import ModelConfig, build_model
from tristage.model.hf import load_model, save_model
from tristage.model.score import from_causal_lm, load_reward_model, save_reward_model
from tristage.stages import dpo, pretrain
from tristage.tokenizer import Tokenizer
from tristage.train import loop


# ----------------------------------------------------------------------------- atomic folders
def test_a_kill_between_the_renames_is_recovered(tmp_path):
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "w.txt").write_text("step 5")
    # a real process saves step 10 and dies (no cleanup runs) right after moving the old folder aside
    script = textwrap.dedent(f"""
        import os
        from tristage import io
        real, calls = os.replace, []
        def replace(a, b):
            real(a, b)
            calls.append(b)
            if len(calls) == 2:  # tmp -> new, then path -> old: killed before new -> path
                os._exit(9)
        io.os.replace = replace
        with io.atomic_folder({str(tmp_path / "model")!r}) as tmp:
            (tmp / "w.txt").write_text("step 10")
    """)
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 9
    assert not (tmp_path / "model").exists()  # the state a kill leaves: only the hidden folders
    note = recover_folder(tmp_path / "model")
    assert note and "put back" in note
    assert (tmp_path / "model" / "w.txt").read_text() == "step 10"  # the complete new save, not the old one
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_recover_puts_the_old_folder_back_when_the_new_one_is_unfinished(tmp_path):
    (tmp_path / ".model.old-abc").mkdir()
    (tmp_path / ".model.old-abc" / "w.txt").write_text("old")
    (tmp_path / ".model.tmp-def").mkdir()  # being written when the kill came: not complete
    assert recover_folder(tmp_path / "model")
    assert (tmp_path / "model" / "w.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert recover_folder(tmp_path / "model") is None  # nothing to do


def test_a_good_save_removes_stale_temporary_folders(tmp_path):
    for stale in (".out.tmp-x1", ".out.old-x2", ".out.new-x3"):
        (tmp_path / stale).mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("one")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ----------------------------------------------------------------------------- runs
def _pre(shards, out, **kw) -> pretrain.Config:
    base = dict(data=str(shards), out=str(out), depth=1, hidden_size=32, num_heads=2, seq_len=32, batch_size=4,
                max_steps=4, lr=3e-3, warmup_steps=1, eval_every=0, eval_batches=1, save_every=2, log_every=1,
                sample_prompts=[], dtype="float32", progress=False, device="cpu")
    return pretrain.Config(**{**base, **kw})


def test_runs_cannot_be_destroyed(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain.main(_pre(tiny_shards, run, stop_at=2))
    with pytest.raises(UserError, match=f"--out {run} already holds a run .*--resume.*--overwrite"):
        pretrain.main(_pre(tiny_shards, run))
    with pytest.raises(UserError, match=r"--hidden-size / --depth gives hidden_size 64 \(checkpoint: 32\)"):
        pretrain.main(_pre(tiny_shards, run, hidden_size=64, resume=True))
    # the kill between the renames, by hand: the step-2 checkpoint only in its complete hidden name
    os.replace(run / "model", run / ".model.new-k1")
    (run / ".model.tmp-k2").mkdir()  # and an unfinished save
    pretrain.main(_pre(tiny_shards, run, resume=True))
    assert "put back the complete save" in capsys.readouterr().out
    assert json.loads((run / "model" / "tristage.json").read_text())["step"] == 4
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    # a damaged training state is named, with what to do
    state = run / "model" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(UserError, match=f"{state}: cannot be read .*damaged.*--overwrite"):
        pretrain.main(_pre(tiny_shards, run, resume=True))
    pretrain.main(_pre(tiny_shards, run, max_steps=1, overwrite=True))  # starts over
    assert json.loads((run / "model" / "tristage.json").read_text())["step"] == 1


def test_resume_without_a_checkpoint_names_the_folder(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="no checkpoint to resume in .*model"):
        pretrain.main(_pre(tiny_shards, tmp_path / "none", resume=True))


def test_divergence_warnings():
    assert loop.warnings((1, 2.0, 1.0), 5, 1.5, 0.5) == []  # a sound run
    assert loop.warnings((1, 0.69, 1.0), 9, 1e-4, 1e-9) == []  # learned: the loss fell, gradients may vanish
    (kind, text), = loop.warnings((1, 2.0, 1.0), 5, 40.0, 0.5)
    assert kind == "rise" and "rose from 2 at step 1 to 40 at step 5" in text and "--lr" in text
    assert [k for k, _ in loop.warnings((1, 2.0, 1.0), 5, 3.0, 1e-9)] == ["vanish"]


def test_weights_gone_nonfinite_are_not_saved_and_the_error_is_the_users(tiny_shards, tmp_path, monkeypatch):
    real = loop.train_step

    def poisoned(s, t, *args, **kw):  # an update that leaves NaN weights behind a finite loss
        m = real(s, t, *args, **kw)
        with torch.no_grad():
            t.model.model.norm.weight[:2] = float("nan")
        return m

    monkeypatch.setattr(loop, "train_step", poisoned)
    with pytest.raises(loop.Diverged, match=r"2 weights are NaN or inf after step 1; .*--lr") as e:
        pretrain.main(_pre(tiny_shards, tmp_path / "r", save_every=1))
    assert isinstance(e.value, UserError) and isinstance(e.value, FloatingPointError)
    assert not (tmp_path / "r" / "model").exists()


def test_nonfinite_weights_are_counted():
    m = build_model(ModelConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2), seed=0)
    assert loop.nonfinite_count(m, torch.device("cpu")).item() == 0
    with torch.no_grad():
        m.model.norm.weight[:3] = float("nan")
    assert loop.nonfinite_count(m, torch.device("cpu")).item() == 3


def test_damaged_reference_cache_is_recomputed(tmp_path, capsys):
    cache = tmp_path / "reference_logps.pt"
    assert dpo.read_reference_cache(cache, True) == {}
    torch.save({"key": "k", "train": torch.zeros(2), "val": torch.zeros(1)}, cache)
    assert dpo.read_reference_cache(cache, True)["key"] == "k"
    cache.write_bytes(cache.read_bytes()[:50])
    assert dpo.read_reference_cache(cache, True) == {}
    assert "cannot be read" in capsys.readouterr().out


# ----------------------------------------------------------------------------- model folders
@pytest.fixture()
def folders(tiny_shards, tmp_path) -> tuple[Path, Path]:
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(build_model(tiny_config(tok, max_position_embeddings=64), seed=0), tmp_path / "lm", tok)
    rm = from_causal_lm(build_model(tiny_config(tok, max_position_embeddings=64), seed=0), 1, 0)
    save_reward_model(rm, tmp_path / "rm")
    return tmp_path / "lm", tmp_path / "rm"


def test_damaged_model_folders_name_what_is_wrong(folders, tmp_path):
    import shutil

    lm, rm = folders
    assert load_model(lm) is not None

    def broken(name: str) -> Path:
        f = tmp_path / name
        shutil.copytree(lm, f)
        return f

    f = broken("no_config")
    (f / "config.json").unlink()
    with pytest.raises(UserError, match="no_config: not a model folder"):
        load_model(f)
    f = broken("cut_config")
    (f / "config.json").write_text((f / "config.json").read_text()[:40])
    with pytest.raises(UserError, match="cut_config/config.json: not readable JSON"):
        load_model(f)
    f = broken("cut_weights")
    w = f / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match="cut_weights/model.safetensors: not a readable safetensors file"):
        load_model(f)
    f = broken("empty_weights")
    (f / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="empty_weights/model.safetensors: empty"):
        load_model(f)
    f = broken("no_weights")
    (f / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no_weights: no weights"):
        load_model(f)
    f = broken("nan")
    m = load_model(lm)
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")
    save_model(m, f)
    with pytest.raises(UserError, match="nan: weight model.norm.weight holds non-finite values"):
        load_model(f)
    f = broken("shape")
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(UserError, match="shape: .*has shape"):
        load_model(f)
    with pytest.raises(UserError, match=r"no_such: no such model folder"):
        load_model(tmp_path / "no_such")


def test_reward_and_policy_folders_are_not_confused(folders):
    lm, rm = folders
    with pytest.raises(UserError, match="a reward model .*not a language model"):
        load_model(rm)
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(lm)
    with pytest.raises(UserError, match="a reward model"):
        loop.model_config(rm)
    with pytest.raises(UserError, match="no tokenizer"):
        loop.chat_tokenizer(rm)  # saved without one


# ----------------------------------------------------------------------------- context limits
def test_max_len_defaults_to_the_model_context_and_may_not_exceed_it(folders):
    lm, rm = folders
    assert loop.fit_max_len(None, lm) == 64
    assert loop.fit_max_len(32, lm) == 32
    with pytest.raises(UserError, match="--max-len 65 exceeds the context of .*lm: 64 positions"):
        loop.fit_max_len(65, lm)
    assert loop.fit_max_len(None, rm, kind="any") == 64


@pytest.mark.parametrize("layout", ["packed", "shared", "rows"])
def test_every_pair_layout_keeps_positions_inside_max_len(folders, layout):
    from tristage.data.preference import PairExample, pair_collator
    from tristage.rollout import batch_logprobs

    lm, _ = folders
    model = load_model(lm)
    max_len = model.config.max_position_embeddings

    def pair(prompt: int, reply: int) -> PairExample:
        ids = list(range(1, prompt + 1))
        c, r = ids + [5] * reply, ids + [6] * reply
        mask = [0] * prompt + [1] * reply
        return PairExample(c, mask, r, list(mask))

    batch = pair_collator(layout)([pair(40, 24), pair(3, 2), pair(10, 5)], 0)  # the first: exactly max_len
    if "position_ids" in batch:
        assert int(batch["position_ids"].max()) < max_len
    logp, _ = batch_logprobs(model, batch)  # no position past the model's context
    assert torch.isfinite(logp).all()


def test_readme_commands_with_their_defaults(tmp_path):
    """tokenizer -> prepare -> pretrain -> sft -> reward -> dpo as the README runs them: only step counts (and
    the validation size) are made tiny; pretrain's default --seq-len 256 gives a 256-position model, and the later
    stages' default --max-len follows it, with records longer than that."""
    from tristage.cli import main

    words = ["the", "dog", "sat", "on", "a", "mat", "and", "cat", "said", "meow", "woof", "then", "slept"]
    text = "\n<|endoftext|>\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    long = " ".join(words * 30)  # several hundred tokens: longer than the model's 256 positions
    chats = [[{"role": "user", "content": f"what does the {a} say?"},
              {"role": "assistant", "content": f"{s}. {long if i == 0 else ''}"}]
             for i, (a, s) in enumerate(list(SOUNDS.items()) * 4)]
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in chats])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"what does the {a} say? {long if i == 0 else ''}",
                                            "chosen": f"the {a} says {s}.", "rejected": f"the {a} says nothing."}
                                           for i, (a, s) in enumerate(list(SOUNDS.items()) * 4)])
    quick = ["--max-steps", "1", "--no-progress", "--device", "cpu"]
    for argv in (["tokenizer", "--files", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "tok"),
                  "--vocab-size", "300"],
                 ["prepare", "--inputs", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok"),
                  "--out", str(tmp_path / "shards"), "--val-fraction", "0.1"],
                 ["pretrain", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "base"), "--depth", "1",
                  "--eval-batches", "1", "--batch-size", "2", "--sample-prompts", *quick],
                 ["sft", str(tmp_path / "base" / "model"), "--data", str(tmp_path / "chats.jsonl"), "--out",
                  str(tmp_path / "sft"), *quick],
                 ["reward", str(tmp_path / "sft" / "model"), "--data", str(tmp_path / "pairs.jsonl"), "--out",
                  str(tmp_path / "rm"), *quick],
                 ["dpo", str(tmp_path / "sft" / "model"), "--data", str(tmp_path / "pairs.jsonl"), "--out",
                  str(tmp_path / "dpo"), *quick]):
        assert main(argv) == 0, argv
    for stage in ("sft", "rm", "dpo"):
        saved = json.loads((tmp_path / stage / "model" / "tristage.json").read_text())["config"]
        assert saved["max_len"] == 256  # the model's own context
