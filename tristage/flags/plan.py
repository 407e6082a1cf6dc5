"""`tristage plan`: the compute planner (run by tristage/plan.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg


@dataclass
class Config:
    """Plan a pre-training run: parameters, FLOPs, time, cost and memory; or split a compute budget."""

    model: str | None = arg(None, help="Hugging Face model folder (its config.json gives the shape)")
    depth: int | None = arg(None, check=">=1", help="shape from ModelConfig.from_depth: DEPTH layers of width 64*DEPTH")
    hidden_size: int | None = arg(None, check=">=1", help="explicit shape: hidden size (with --layers)")
    layers: int | None = arg(None, check=">=1", help="explicit shape: number of layers")
    heads: int | None = arg(None, check=">=1", help="explicit shape: attention heads (default hidden/64)")
    kv_heads: int | None = arg(None, check=">=1", help="explicit shape: key/value heads for GQA (default = heads)")
    intermediate_size: int | None = arg(None, check=">=1",
                                        help="explicit shape: MLP width (default about 8/3 of hidden)")
    vocab_size: int = arg(32000, check=">=1", help="vocabulary size for --depth and explicit shapes")
    tie_embeddings: bool = arg(True, help="explicit/depth shapes share the input embedding and lm_head")
    params: float | None = arg(None, check=">0",
                               help="only a parameter count (e.g. 1.3e9): FLOPs = 6N, no attention term")
    seq_len: int = arg(2048, check=">=1", help="context length T of the training sequences")
    tokens: float | None = arg(None, check=">0",
                               help="training tokens; none: what the budget buys, else tokens-per-param x N")
    causal: bool = arg(False, help="count only the causal half of attention (T/2 keys per query)")
    gpu: Literal["h100", "h200", "a100", "l4", "4090", "a10", "mi300x", "cpu", "cpu-fp32"] = arg(
        "h100", help="hardware preset: peak dense bf16 FLOP/s, memory and an assumed price")
    peak_flops: float | None = arg(None, check=">0", help="peak FLOP/s per GPU, overriding the preset")
    num_gpus: int = arg(1, check=">=1", help="number of GPUs (or machines for cpu)")
    price_per_hour: float | None = arg(None, check=">=0", help="$ per GPU-hour, overriding the preset's assumption")
    mfu: float = arg(0.4, check="(0, 1]", help="assumed model FLOPs utilization (PaLM's definition), 0-1")
    budget_flops: float | None = arg(None, check=">0",
                                     help="compute budget in FLOPs: print the compute-optimal N and D")
    budget_dollars: float | None = arg(None, check=">0", help="compute budget in dollars (at the price, GPUs and MFU)")
    budget_hours: float | None = arg(None, check=">0", help="compute budget in wall-clock hours on --num-gpus GPUs")
    tokens_per_param: float = arg(20.0, check=">0",
                                  help="Chinchilla ratio D/N for the optimal split and default tokens")
    json: bool = arg(False, help="print one JSON object instead of tables")
