"""`tristage plan`: what a pre-training run costs (FLOPs, time, dollars, memory), and what a budget buys.

  tristage plan --model path/to/Llama-2-7b-hf --seq-len 4096 --tokens 2e12 --gpu h100 --num-gpus 64
  tristage plan --depth 24 --seq-len 2048 --gpu a100 --num-gpus 8 --json
  tristage plan --budget-dollars 50000 --gpu h100 --num-gpus 32      # compute-optimal model + tokens

Conventions, chosen so the numbers compare with published ones:
- FLOPs per training token = 6*N_matmul + 12*L*d_attn*T, the PaLM convention (Chowdhery et al. 2022,
  App. B, "6N + 12LHQT", which also defines MFU as achieved tokens/s x that count / peak FLOP/s) and the
  sum of Hoffmann et al. 2022's (Chinchilla) App. F table. 6N: a multiply-add is 2 FLOPs, the backward pass
  costs twice the forward (Kaplan et al. 2020, Sec. 2.1). N_matmul = every linear layer plus the output
  projection V*h (a matmul whether tied or not), not the embedding lookup (a gather), norms or biases.
  Attention: per layer and token the forward does QK^T (2*T*d_attn) and AV (2*T*d_attn), x3 for fwd+bwd;
  d_attn = heads*head_dim (GQA shares K/V weights, not this work). T is the full context: the causal
  half is counted as PaLM does (so MFU matches papers). `--causal` counts only T/2 keys per query, what
  flash-attention kernels actually execute (and exactly Kaplan's 6*L*T*d_attn). Sliding windows are
  ignored (an upper bound). Recomputation from activation checkpointing is not counted (it is not
  "model" FLOPs). tests/test_plan.py checks the count against torch's FlopCounterMode on a training step.
  With only `--params`, FLOPs/token is 6N: the attention term needs a shape.
- Time = total FLOPs / (peak x GPUs x MFU); MFU is an assumption (default 0.4; 0.3-0.55 is typical).
- Compute-optimal split (Hoffmann et al. 2022): C = 6*N*D with D = k*N, k about 20 tokens per parameter,
  so N_opt = sqrt(C / 6k), D_opt = k*N_opt; N counts all parameters, embeddings included, as they did.
  The suggested model is the `ModelConfig.from_depth` depth whose total parameters are nearest N_opt.
  Tokens default to what the budget buys for the planned model (budget / FLOPs per token, attention
  included), or without a budget to k tokens per parameter.
- Memory: mixed-precision AdamW keeps 16 bytes per parameter (fp32 weights 4 + grads 4 + Adam m 4 + v 4
  under bf16 autocast; ZeRO's fp16 weights 2 + grads 2 + fp32 master 4 + m 4 + v 4 is also 16). Sharded
  (FSDP/ZeRO-3) that divides by the GPU count. Activations are a rough 34*h*L bytes per token (Korthikanti
  et al. 2022, bf16, flash attention, no recomputation) for one sequence; they scale with micro-batch.
- Presets (tristage/flops.py, shared with the MFU that training logs): peak dense bf16 tensor FLOP/s from the
  vendors' datasheets (no sparsity); `cpu` is this 2-core machine's measured matmul peak (4.0e11 bf16,
  1.9e11 fp32). Prices per GPU-hour are assumptions (typical on-demand cloud rates, 2025), to be overridden
  with `--price-per-hour`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from tristage.flags.plan import Config
from tristage.flops import GPUS, attention_flops_per_token, flops_per_token, matmul_params
from tristage.model.gpt import ModelConfig
from tristage.model.hf import read_config

ADAMW_BYTES_PER_PARAM = 16
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
GiB = 2**30


# ----------------------------------------------------------------------------- the math
def chinchilla_optimal(budget_flops: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """(N_opt, D_opt) with C = 6 N D and D = k N: N = sqrt(C / 6k)."""
    n = math.sqrt(budget_flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


def train_time(total_flops: float, peak_flops: float, num_gpus: int = 1, mfu: float = 0.4) -> float:
    """Wall-clock seconds to execute `total_flops` at `mfu` of the peak of `num_gpus` devices."""
    return total_flops / (peak_flops * num_gpus * mfu)


def train_cost(seconds: float, num_gpus: int, price_per_hour: float) -> float:
    """Dollars for `num_gpus` devices held `seconds`, at `price_per_hour` per device."""
    return seconds / 3600.0 * num_gpus * price_per_hour


def budget_to_flops(peak_flops: float, num_gpus: int, mfu: float, price_per_hour: float, *,
                    hours: float | None = None, dollars: float | None = None) -> float:
    """Useful FLOPs a budget of wall-clock hours (or dollars, bought at the price) executes."""
    if dollars is not None:
        if price_per_hour <= 0:
            raise ValueError("a dollar budget needs a positive --price-per-hour")
        hours = dollars / (price_per_hour * num_gpus)
    if hours is None:
        raise ValueError("give hours or dollars")
    return hours * 3600.0 * peak_flops * num_gpus * mfu


def nearest_depth(n_params: float, vocab_size: int, tie_embeddings: bool = True, max_depth: int = 256) -> int:
    """The ModelConfig.from_depth depth whose total parameter count is nearest `n_params` (in log space)."""
    return min(range(1, max_depth + 1), key=lambda d: abs(math.log(ModelConfig.from_depth(
        d, vocab_size, tie_word_embeddings=tie_embeddings).num_params() / n_params)))


def activation_bytes_per_token(cfg: ModelConfig) -> float:
    """Rough activation memory kept for backward: 34 * h * L bytes (bf16, flash attention, no recompute)."""
    return 34.0 * cfg.hidden_size * cfg.num_hidden_layers


# ----------------------------------------------------------------------------- the command
def resolve_model(cfg: Config) -> ModelConfig | None:
    """The model shape the flags describe; None when only --params (or nothing) is given."""
    if cfg.model:
        return read_config(cfg.model)
    if cfg.depth:
        return ModelConfig.from_depth(cfg.depth, cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.hidden_size or cfg.layers:
        if not (cfg.hidden_size and cfg.layers):
            raise SystemExit("tristage plan: an explicit shape needs both --hidden-size and --layers")
        return ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                           num_attention_heads=cfg.heads or max(1, cfg.hidden_size // 64),
                           num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.intermediate_size,
                           tie_word_embeddings=cfg.tie_embeddings)
    return None


def plan(cfg: Config) -> dict[str, Any]:
    """Every number `tristage plan` prints, as a JSON-ready dict."""
    if not 0 < cfg.mfu <= 1:
        raise SystemExit(f"tristage plan: --mfu must be in (0, 1], got {cfg.mfu}")
    peak, mem_gib, price = GPUS[cfg.gpu]
    peak = cfg.peak_flops or peak
    price = price if cfg.price_per_hour is None else cfg.price_per_hour
    out: dict[str, Any] = {"hardware": dict(gpu=cfg.gpu, peak_flops=peak, num_gpus=cfg.num_gpus, mfu=cfg.mfu,
                                            price_per_gpu_hour=price, gpu_memory_gib=mem_gib), "budget": None}
    budgets = [b for b in (cfg.budget_flops, cfg.budget_dollars, cfg.budget_hours) if b is not None]
    if len(budgets) > 1:
        raise SystemExit("tristage plan: give one of --budget-flops, --budget-dollars, --budget-hours")
    model, source = resolve_model(cfg), cfg.model or (f"depth {cfg.depth}" if cfg.depth else "explicit shape")
    c = None
    if budgets:
        c = cfg.budget_flops or budget_to_flops(peak, cfg.num_gpus, cfg.mfu, price,
                                                 hours=cfg.budget_hours, dollars=cfg.budget_dollars)
        n_opt, d_opt = chinchilla_optimal(c, cfg.tokens_per_param)
        depth = nearest_depth(n_opt, cfg.vocab_size, cfg.tie_embeddings)
        suggested = ModelConfig.from_depth(depth, cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
        out["budget"] = dict(flops=c, params_opt=n_opt, tokens_opt=d_opt, tokens_per_param=cfg.tokens_per_param,
                             suggested_depth=depth, suggested_depth_params=suggested.num_params(),
                             hours=train_time(c, peak, cfg.num_gpus, cfg.mfu) / 3600)
        if model is None and cfg.params is None:  # nothing else to plan: plan the suggested model
            model, source = suggested, f"suggested depth {depth}"
    if model is None and cfg.params is None:
        raise SystemExit("tristage plan: give a model (--model, --depth, --hidden-size/--layers or --params) "
                         "or a budget (--budget-flops/--budget-dollars/--budget-hours)")
    if model is not None:
        n_total, n_nonemb, n_mm = model.num_params(), model.num_params(False), matmul_params(model)
        attn = attention_flops_per_token(model, cfg.seq_len, cfg.causal)
        fpt = flops_per_token(model, cfg.seq_len, cfg.causal)
        shape = dict(layers=model.num_hidden_layers, hidden_size=model.hidden_size,
                     heads=model.num_attention_heads, kv_heads=model.num_key_value_heads, head_dim=model.head_dim,
                     intermediate_size=model.intermediate_size, vocab_size=model.vocab_size)
        act = activation_bytes_per_token(model) * cfg.seq_len
        ctx = [dict(seq_len=t, flops_per_token=flops_per_token(model, t, cfg.causal),
                    attention_share=attention_flops_per_token(model, t, cfg.causal)
                    / flops_per_token(model, t, cfg.causal)) for t in CONTEXTS]
    else:  # a bare parameter count: C = 6N per token, the attention term needs a shape
        n_total, n_nonemb, n_mm, attn, shape, act, ctx = int(cfg.params), None, None, 0.0, None, None, []
        fpt, source = 6.0 * n_total, "params"
    # tokens: as given; else what the budget buys for this model; else Chinchilla's k tokens per parameter
    tokens = cfg.tokens if cfg.tokens is not None else c / fpt if c is not None else cfg.tokens_per_param * n_total
    total = fpt * tokens
    secs = train_time(total, peak, cfg.num_gpus, cfg.mfu)
    states = ADAMW_BYTES_PER_PARAM * n_total
    out.update(
        model=dict(source=source, shape=shape, params_total=n_total, params_non_embedding=n_nonemb,
                   params_matmul=n_mm),
        flops=dict(convention="6*N_matmul + 12*L*d_attn*T (PaLM / Chinchilla)", causal_half_only=cfg.causal,
                   seq_len=cfg.seq_len, per_token=fpt, per_token_attention=attn, attention_share=attn / fpt,
                   tokens=tokens, tokens_per_param=tokens / n_total, total=total),
        time=dict(seconds=secs, days=secs / 86400, cost_usd=train_cost(secs, cfg.num_gpus, price),
                  tokens_per_second=tokens / secs),
        memory=dict(bytes_per_param=ADAMW_BYTES_PER_PARAM, train_states_gib=states / GiB,
                    train_states_per_gpu_sharded_gib=states / cfg.num_gpus / GiB, weights_bf16_gib=2 * n_total / GiB,
                    activations_per_sequence_gib=None if act is None else act / GiB,
                    fits=None if act is None else (states / cfg.num_gpus + act) / GiB <= mem_gib),
        context_scaling=ctx,
    )
    return out


def _duration(s: float) -> str:
    return f"{s / 86400:,.1f} days" if s >= 2 * 86400 else f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.1f} min"


def _n(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}"


def main(cfg: Config) -> dict[str, Any]:
    p = plan(cfg)
    if cfg.json:
        print(json.dumps(p, indent=2))
        return p

    console, hw, b = Console(), p["hardware"], p["budget"]
    hw_s = f"{hw['num_gpus']} x {hw['gpu']} ({hw['peak_flops']:.3g} FLOP/s) at MFU {hw['mfu']:.0%}"
    if b:
        t = Table("compute-optimal split (Hoffmann et al. 2022)", "value", title=f"budget, {hw_s}")
        t.add_row("budget C", f"{b['flops']:.3g} FLOPs = {_duration(b['hours'] * 3600)} wall-clock")
        t.add_row("N_opt = sqrt(C / 6k)", f"{_n(b['params_opt'])} parameters")
        t.add_row(f"D_opt = k N (k = {b['tokens_per_param']:g})", f"{_n(b['tokens_opt'])} tokens")
        t.add_row("nearest --depth", f"{b['suggested_depth']} ({_n(b['suggested_depth_params'])} parameters)")
        console.print(t)
    m, f, tm, mem = p["model"], p["flops"], p["time"], p["memory"]
    t = Table("quantity", "value", title=f"tristage plan: {m['source']}, {hw_s}")
    if m["shape"]:
        t.add_row("shape", ", ".join(f"{k}={v}" for k, v in m["shape"].items()))
        t.add_row("parameters", f"{_n(m['params_total'])} total, {_n(m['params_non_embedding'])} non-embedding, "
                  f"{_n(m['params_matmul'])} in matmuls (N)")
        t.add_row("FLOPs/token (train)", f"{f['per_token']:.3g} = 6N {f['per_token'] - f['per_token_attention']:.3g}"
                  f" + attention {f['per_token_attention']:.3g} ({f['attention_share']:.1%}) at T={f['seq_len']:,}"
                  + (", causal half" if f["causal_half_only"] else ""))
    else:
        t.add_row("parameters", f"{_n(m['params_total'])} (N)")
        t.add_row("FLOPs/token (train)", f"{f['per_token']:.3g} = 6N (no shape: attention term not counted)")
    t.add_row("tokens", f"{_n(f['tokens'])} ({f['tokens_per_param']:.1f} per parameter)")
    t.add_row("total FLOPs", f"{f['total']:.3g}")
    t.add_row("time", f"{_duration(tm['seconds'])} at {_n(tm['tokens_per_second'])} tokens/s")
    t.add_row("cost", f"${tm['cost_usd']:,.0f} at ${hw['price_per_gpu_hour']:.2f}/GPU-hour")
    t.add_row("memory: AdamW states", f"{mem['train_states_gib']:,.1f} GiB ({mem['bytes_per_param']} B/param), "
              f"{mem['train_states_per_gpu_sharded_gib']:,.1f} GiB/GPU sharded (FSDP)")
    if mem["activations_per_sequence_gib"] is not None:
        t.add_row("memory: activations", f"~{mem['activations_per_sequence_gib']:,.1f} GiB per sequence; "
                  f"sharded states + 1 sequence fit in {hw['gpu_memory_gib']} GiB/GPU: "
                  + ("yes" if mem["fits"] else "no"))
    t.add_row("memory: bf16 weights", f"{mem['weights_bf16_gib']:,.1f} GiB (inference)")
    console.print(t)
    if p["context_scaling"]:
        t = Table("context T", "FLOPs/token", "attention/token", "attention share",
                  title="FLOPs/token vs context (attention per token grows with T)")
        for r in p["context_scaling"]:
            t.add_row(f"{r['seq_len']:,}", f"{r['flops_per_token']:.3g}",
                      f"{r['flops_per_token'] * r['attention_share']:.3g}", f"{r['attention_share']:.1%}")
        console.print(t)
    return p
