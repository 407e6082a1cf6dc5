"""Optimizer and learning-rate schedules shared by every training stage.

Choices, and why:
- AdamW with weight decay on matrices and embeddings only (dim >= 2); norms and biases are not decayed
  (decaying a norm's gain towards 0 fights the model for no benefit). The fused kernel is used where
  torch has one for the device (CUDA, and CPU since torch 2.4), else foreach.
- The schedule is a pure function of the step (`lr_at`), so a resumed run needs no scheduler state and
  cannot drift: warmup then cosine to `min_lr_ratio * lr`, warmup-stable-decay (linear cool-down over
  the last `decay_frac` of training, as in MiniCPM / nanochat), or constant after warmup.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tristage.flags.base import Schedule


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if fused is None:
        # DTensor parameters (FSDP2) take the foreach path; plain tensors the fused kernel
        fused = not any(type(p).__name__ == "DTensor" for p in params)
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int = 0, schedule: Schedule = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * max_steps))
        start = max_steps - decay_steps
        if step < start:
            return lr
        progress = min(1.0, (step - start) / decay_steps)
        return lr + (floor - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r} (cosine, wsd, constant)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
