"""FLOPs per token and hardware peaks: one table for the planner (`tristage plan`) and the MFU training logs.

Conventions (the planner's header, tristage/plan.py, gives the sources):
- Training FLOPs per token = 6 * N_matmul + 12 * L * d_attn * T (PaLM's "6N + 12LHQT"); N_matmul counts every
  linear layer plus the output projection, not the embedding lookup, norms or biases; T is the full context
  (the causal half counted, as PaLM does) unless `causal=True`.
- Peaks are dense bf16 tensor FLOP/s from the vendors' datasheets (no sparsity); fp32 is taken as half of it.
  On a CPU the peak is measured once per process: the fastest of three repeats of 512^3, 1024^3 and 2048^3 matmuls
  on the threads torch uses, the machine's practical roofline, which is what an MFU on a CPU can be read against.
- Forward-only work (generation, scoring, reference log-probs) counts a third of the training FLOPs per token.
"""

from __future__ import annotations

import time

import torch

from tristage.model.gpt import ModelConfig

# name: (peak dense bf16 FLOP/s, memory GiB, assumed $ per GPU-hour)
GPUS: dict[str, tuple[float, float, float]] = {
    "h100": (989e12, 80, 2.50),  # SXM
    "h200": (989e12, 141, 3.50),
    "a100": (312e12, 80, 1.50),
    "l4": (121e12, 24, 0.80),
    "4090": (165e12, 24, 0.40),  # bf16 with fp32 accumulate
    "a10": (125e12, 24, 0.75),
    "mi300x": (1307e12, 192, 2.50),
    "cpu": (4.0e11, 23, 0.05),  # measured, 2 threads, bf16
    "cpu-fp32": (1.9e11, 23, 0.05),
}


def matmul_params(cfg: ModelConfig, lm_head: bool = True) -> int:
    """Weights a token multiplies through: q/k/v/o, gate/up/down per layer, plus the lm_head (V*h); a reward or value
    model (`lm_head=False`) has a score head of h weights instead."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (2 * h * (q + kv) + 3 * h * cfg.intermediate_size) + (cfg.vocab_size if lm_head
                                                                                          else 1) * h


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """12 * L * d_attn * T training FLOPs per token (T/2 keys if causal): QK^T and AV, fwd + bwd."""
    keys = seq_len / 2 if causal else seq_len
    return 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * keys


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False, lm_head: bool = True) -> float:
    """Training FLOPs per token: 6 * N_matmul + the attention term (PaLM's 6N + 12LHQT)."""
    return 6.0 * matmul_params(cfg, lm_head) + attention_flops_per_token(cfg, seq_len, causal)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, lm_head: bool = True) -> float:
    """Forward-only FLOPs per token (generation, scoring, reference log-probs): a third of training's, by the same
    convention (sequences of about seq_len tokens)."""
    return flops_per_token(cfg, seq_len, lm_head=lm_head) / 3


_MEASURED: dict[tuple[str, torch.dtype], float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense matmul FLOP/s of `device` in `dtype`, for MFU: the GPUS table for a known GPU (by its name;
    NaN for an unknown one), measured once per process on a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        # longest key first, so "a100" wins over "a10"
        for key in sorted((k for k in GPUS if not k.startswith("cpu")), key=len, reverse=True):
            if key in name:
                peak = GPUS[key][0]
                return peak if dtype != torch.float32 else peak / 2
        return float("nan")
    key = (device.type, dtype)
    if key not in _MEASURED:
        # the best of several sizes and repeats: the roofline is what the machine can do, so a repeat slowed by
        # another process's load must not lower it (a low peak would put MFU above 100%)
        best = 0.0
        for n in (512, 1024, 2048):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            for _ in range(3):
                t = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - t))
        _MEASURED[key] = best
    return _MEASURED[key]
