"""Loop helpers shared by every training stage: precision, metrics, progress, throughput, RNG state.

No Trainer class: each stage writes its own loop top to bottom and calls these functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' picks bf16 where the hardware computes it natively (CUDA with bf16, or a CPU with
    avx512_bf16 / AMX, where oneDNN runs bf16 matmuls about 2x faster than fp32), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return _DTYPES[name]


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass: weights and optimizer stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- the loss and its accumulation
def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the targets that are not `ignore_index`.

    batch: input_ids [B, T]; labels [B, T] already aligned with the inputs (labels[:, t] is the token that
    should follow input_ids[:, :t+1]); optional position_ids [B, T] and attn_mask [B, 1, T, T] (packing).
    """
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=batch.get("attn_mask"))
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=ignore_index,
                           reduction="sum")


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], n_global: int,
                         world_size: int, device: torch.device, dtype: torch.dtype,
                         loss_fn=None) -> torch.Tensor:
    """Backward over micro-batches so the gradient is that of the mean loss over all `n_global` target
    tokens of the global batch (every process, every micro-batch), whatever the split. Returns this
    process's loss sum (detached). `loss_fn(model, batch) -> sum` defaults to lm_loss_sum."""
    from tristage.train.distributed import no_sync

    loss_fn = loss_fn or lm_loss_sum
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        with no_sync(model, i == len(micro_batches) - 1), autocast(device, dtype):
            s = loss_fn(model, batch)
            # DDP/FSDP average gradients over processes: * world_size turns that into a global token mean
            (s * (world_size / n_global)).backward()
        loss_sum += s.detach()
    return loss_sum


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                  dtype: torch.dtype, d: Any = None) -> float:
    """Mean next-token loss over all target tokens of fixed validation batches (on every process, under DDP)."""
    from tristage.train.distributed import all_reduce_sum

    was = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            total[0] += lm_loss_sum(model, batch).double()
        total[1] += (batch["labels"] != -100).sum()
    if d is not None:
        all_reduce_sum(total, d)
    model.train(was)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- throughput
_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}
_GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "A10": 125e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense matmul FLOP/s for MFU: a table for known GPUs; on CPU, measured once with a
    1024^3 matmul on the threads torch uses (the machine's practical roofline, not a datasheet)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in _GPU_PEAKS.items():
            if key in name:
                return v if dtype != torch.float32 else v / 2
        return float("nan")
    key = (device.type, dtype)
    if key not in _PEAK_CACHE:
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        _PEAK_CACHE[key] = 2 * n**3 / sorted(times)[len(times) // 2]
    return _PEAK_CACHE[key]


# ----------------------------------------------------------------------------- metrics
class MetricsLog:
    """metrics.jsonl (one JSON object per logged step, appended and flushed) + TensorBoard if installed."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop records past the checkpoint we resume from: they will be produced again
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.fh = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except Exception:  # tensorboard not installed: jsonl only
            self.tb = None

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v)
                                for k, v in values.items()}}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def progress(enabled: bool = True):
    """A rich progress bar with room for loss, tokens/s and MFU in its description."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    disable=not enabled, refresh_per_second=4)
