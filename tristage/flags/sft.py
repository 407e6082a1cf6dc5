"""`tristage sft`: stage 2, instruction tuning (run by tristage/stages/sft.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.flags.base import FinetuneConfig, LoRAArgs


@dataclass(kw_only=True)
class Config(FinetuneConfig, LoRAArgs):
    """Instruction-tune a model on chat data (assistant tokens only), fully or with LoRA."""

    data: list[str] = arg([], help="training chats: JSONL/JSON of {messages}, Alpaca or ShareGPT records (.gz ok)")
    val_data: list[str] = arg([], help="validation chats (default: hold out --val-fraction of --data)")
    out: str = arg("runs/sft", help="run folder: config.yaml, metrics.jsonl, model/ (and adapter/ with LoRA)")
    max_len: int | None = arg(None, help="longest conversation in tokens (default: the model's context, "
                                         "max_position_embeddings); longer ones are truncated (counted)")
    truncation: Literal["truncate", "drop"] = arg("truncate", help="what to do with conversations over --max-len")
    mode: Literal["packed", "padded"] = arg("packed", help="pack several conversations per row, or pad each")
    tokens_per_batch: int = arg(8192, check=">=1", help="token slots per micro-batch per process (rows x length)")
    epochs: float = arg(2.0)
    lr: float = arg(1e-4, help="peak learning rate (LoRA typically wants ~10x more)")
    warmup_steps: int = arg(20)
