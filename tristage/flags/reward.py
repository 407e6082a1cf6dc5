"""`tristage reward`: stage 3a, reward models (run by tristage/stages/reward.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.flags.base import FinetuneConfig, PairDataArgs


@dataclass(kw_only=True)
class Config(PairDataArgs, FinetuneConfig):
    """Train a reward model on preference pairs (Bradley-Terry), with optional per-attribute rating heads."""

    model: str = arg(help="starting model folder: SFT/base checkpoint, Hugging Face causal LM, or a reward model",
                     positional=True)
    out: str = arg("runs/reward", help="run folder: config.yaml, metrics.jsonl, model/")
    batch_size: int = arg(16, check=">=1", help="pairs per micro-batch per process")
    margin_scale: float = arg(0.0, check=">=0",
                              help="margin = scale x (mean normalised rating of chosen - of rejected), >= 0")
    center_coef: float = arg(0.01, check=">=0",
                             help="reward-centering coefficient: + coef * mean((r_c + r_r)^2); 0: off")
    attribute_heads: Literal["auto", "on", "off"] = arg("auto", help="per-attribute rating heads (auto: when the "
                                                                     "training pairs carry ratings)")
    rating_coef: float = arg(1.0, check=">=0", help="weight of the rating heads' squared error in the loss")
    attribute_weight: float = arg(1.0, check=">=0", help="total weight of the attribute heads in the combined score")
