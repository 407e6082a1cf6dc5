"""Reward and DPO stages: two processes (gloo, DDP) and gradient accumulation equal one process's big batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import pair_world

from tristage.stages import dpo, reward

STAGES = {"reward": reward, "dpo": dpo}


@pytest.fixture(scope="module")
def setup(tiny_shards, tmp_path_factory):
    return pair_world(tiny_shards, tmp_path_factory.mktemp("prefdist"), train=(64, 0), val=(16, 1))


def _args(root, out, batch: int, accum: int = 1) -> list[str]:
    return [str(root / "base"), "--data", str(root / "train.jsonl"), "--val-data", str(root / "val.jsonl"),
            "--out", str(out), "--batch-size", str(batch), "--grad-accum", str(accum), "--max-steps", "4",
            "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "4", "--log-every", "1", "--save-every", "0",
            "--dtype", "float32", "--no-progress", "--device", "cpu"]


def _losses(run) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_accumulation_equals_one_big_batch(setup, tmp_path, stage):
    from tristage.config import parse

    mod = STAGES[stage]
    mod.main(parse(mod.Config, _args(setup, tmp_path / "big", 8)))
    mod.main(parse(mod.Config, _args(setup, tmp_path / "acc", 4, accum=2)))
    a, b = _losses(tmp_path / "big"), _losses(tmp_path / "acc")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (stage, s, a[s], b[s])


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_two_processes_equal_one(setup, tmp_path, stage):
    from tristage.config import parse

    mod = STAGES[stage]
    mod.main(parse(mod.Config, _args(setup, tmp_path / "single", 8)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "tristage.cli",
           stage, *_args(setup, tmp_path / "two", 4), "--parallel", "ddp"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (stage, s, a[s], b[s])
