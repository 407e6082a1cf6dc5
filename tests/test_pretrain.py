"""Pre-training: token-mean accumulation, exact resume, NaN stop, continuation from a HF folder, DDP/FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tristage.model.gpt import ModelConfig, build_model
from tristage.stages import pretrain


def _cfg(shards, out, **kw) -> pretrain.Config:
    base = dict(data=str(shards), out=str(out), depth=1, hidden_size=32, num_heads=2, seq_len=32, batch_size=4,
                max_steps=6, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2, save_every=3, log_every=1,
                sample_prompts=["the dog"], dtype="float32", progress=False, device="cpu")
    base.update(kw)
    return pretrain.Config(**base)


def _losses(run_dir) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


class _Capture(torch.optim.SGD):
    """Records the gradients it is asked to apply, applies nothing."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def test_accumulation_1x8_equals_4x2_gradient():
    from types import SimpleNamespace

    from tristage.train import distributed as dist
    from tristage.train import loop

    m = build_model(ModelConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2), seed=0)
    x = torch.randint(0, 40, (8, 16))
    y = torch.randint(0, 40, (8, 16))
    cfg = SimpleNamespace(lr=0.0, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, grad_clip=0.0)
    s = loop.Session(cfg, "test", dist.Dist(0, 1, 0, torch.device("cpu")), torch.float32, None, None, None)
    grads = []
    for n_micro in (1, 4):
        t = loop.Trainee(m, m, _Capture(m.parameters(), lr=0.0))
        rows = 8 // n_micro
        micro = [{"input_ids": x[i:i + rows], "labels": y[i:i + rows]} for i in range(0, 8, rows)]
        out = loop.train_step(s, t, micro, lambda mdl, b: (loop.lm_loss_sum(mdl, b), {}), loop.target_count, 0, 1)
        grads.append(t.opt.grads)
        assert out["count"] == 8 * 16
        assert out["loss"] == pytest.approx(
            torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).item(), rel=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    # and it is the gradient of the plain mean loss
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
    for a, p in zip(grads[0], m.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-7, rtol=1e-5)


def test_resume_continues_exactly(tiny_shards, tmp_path):
    full = tmp_path / "full"
    pretrain.main(_cfg(tiny_shards, full))
    split = tmp_path / "split"
    pretrain.main(_cfg(tiny_shards, split, stop_at=3))
    assert json.loads((split / "model" / "tristage.json").read_text())["step"] == 3
    pretrain.main(_cfg(tiny_shards, split, resume=True))
    a, b = _losses(full), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a == b  # bit for bit, step for step
    tokens = [[r["tokens"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "tokens" in r]
              for run in (full, split)]
    assert tokens[0] == tokens[1] and tokens[0][-1] == 6 * tokens[0][0]
    # the run's folder is a Hugging Face model folder
    from tristage.model.hf import load_model

    m1, m2 = load_model(full / "model"), load_model(split / "model")
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert (full / "config.yaml").exists() and (full / "samples.jsonl").exists()


def test_nan_loss_stops_without_a_checkpoint(tiny_shards, tmp_path, monkeypatch):
    real = pretrain.lm_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, ignore_index=-100):
        calls["n"] += 1
        out = real(model, batch, ignore_index)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(pretrain, "lm_loss_sum", poisoned)
    with pytest.raises(FloatingPointError, match="at step 3"):
        pretrain.main(_cfg(tiny_shards, tmp_path / "r", save_every=1, eval_every=0))
    assert json.loads((tmp_path / "r" / "model" / "tristage.json").read_text())["step"] == 2


def test_continue_from_a_hugging_face_folder(tiny_shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tristage.tokenizer import Tokenizer

    vocab = Tokenizer.load(tiny_shards / "tokenizer").vocab_size
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "hf")
    metrics = pretrain.main(_cfg(tiny_shards, tmp_path / "r", init_from=str(tmp_path / "hf"), max_steps=3))
    meta = json.loads((tmp_path / "r" / "model" / "tristage.json").read_text())
    assert meta["parent"] == str(tmp_path / "hf") and metrics["val_loss"] > 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model")
    assert back.config.intermediate_size == 64


def test_loss_falls(tiny_shards, tmp_path):
    metrics = pretrain.main(_cfg(tiny_shards, tmp_path / "r", max_steps=40, eval_every=0, lr=1e-2))
    losses = _losses(tmp_path / "r")
    assert losses[40] < 0.6 * losses[1]
    assert metrics["val_bpb"] < 3


def _torchrun(n: int, args: list[str], tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--standalone",
           "-m", "tristage.cli", "pretrain", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(tiny_shards, tmp_path, parallel):
    common = ["--data", str(tiny_shards), "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--seq-len", "32",
              "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "2", "--log-every", "1",
              "--dtype", "float32", "--no-progress", "--sample-prompts", "--device", "cpu", "--save-every", "4"]
    single = tmp_path / "single"
    pretrain.main(pretrain.parse_args(common + ["--out", str(single), "--batch-size", "4"]))
    _torchrun(2, common + ["--out", str(tmp_path / "two"), "--batch-size", "2", "--parallel", parallel], tmp_path)
    a, b = _losses(single), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
