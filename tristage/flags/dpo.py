"""`tristage dpo`: stage 3a, the DPO family (run by tristage/stages/dpo.py:main)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg
from tristage.flags.base import FinetuneConfig, LoRAArgs, LossType, PairDataArgs


@dataclass(kw_only=True)
class Config(PairDataArgs, FinetuneConfig, LoRAArgs):
    """Direct preference optimisation (DPO, IPO, conservative DPO, SimPO, ORPO) on preference pairs."""

    model: str = arg(help="starting policy folder (usually the SFT model; also the reference)", positional=True)
    out: str = arg("runs/dpo", help="run folder: config.yaml, metrics.jsonl, reference_logps.pt, model/")
    ref_model: str | None = arg(None, help="reference model folder (default: the starting policy)")
    loss: LossType = arg("sigmoid", help="sigmoid (DPO; with --label-smoothing: conservative DPO) | ipo | "
                                         "simpo (reference-free) | orpo (reference-free, with an SFT term)")
    beta: float = arg(0.1, check=">0", help="DPO/IPO/SimPO temperature; ORPO's odds-ratio weight lambda")
    label_smoothing: float = arg(0.0, check="[0, 0.5)",
                                 help="assumed label-noise rate for conservative DPO / SimPO (0..0.5)")
    gamma: float = arg(0.5, check="finite", help="SimPO target reward margin")
    batch_size: int = arg(8, check=">=1", help="pairs per micro-batch per process")
    lr: float = arg(5e-6, help="peak learning rate (small: DPO moves a model quickly; LoRA wants ~10x more)")
