"""Runtime helpers every command shares, training or not: precision, seeding and RNG state, devices, progress.

Choices, and why:
- `--dtype auto` means bf16 only where the hardware computes it natively (CUDA with bf16, or a CPU with
  avx512_bf16 / AMX, where oneDNN runs bf16 matmuls about 2x faster than fp32); elsewhere fp32, because
  emulated bf16 is slower and less exact.
- Mixed precision is autocast around the forward pass: weights, gradients and optimizer state stay fp32, so a
  resumed run continues bit for bit.
- RNG state covers Python, numpy, torch and CUDA, so a resumed run draws the same numbers.
- Progress bars are rich's, with a free-text field for loss, tokens/s and MFU.
- `--device` and `--dtype` are checked with the other flags, before any work (`device_problem`, `dtype_problem`,
  defined in tristage/flags/base.py with the fields they check and re-exported here): `--device cuda` on a machine
  without CUDA is a one-line error, not a traceback from deep inside torch after the data has been read.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tristage.flags.base import device_problem, dtype_problem  # noqa: F401 (dtype_problem: re-exported)
from tristage.io import UserError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' picks bf16 where the hardware computes it natively, else fp32; other names map directly."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return _DTYPES[name]


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device `--device NAME` means ('auto': CUDA if available, else the CPU); a device this machine
    does not have is a UserError naming the flag."""
    if problem := device_problem(name):
        raise UserError(f"{flag} {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a batch dict on `device`; other values (counts, index lists) unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def progress(enabled: bool = True) -> Progress:
    """A rich progress bar with room for loss, tokens/s and MFU in its `info` field."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    disable=not enabled, refresh_per_second=4)
