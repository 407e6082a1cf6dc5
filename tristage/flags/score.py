"""`tristage score`: score with a reward model (run by tristage/serve/score.py:main)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg
from tristage.flags.base import device_problem, dtype_problem


@dataclass
class Config:
    """Score prompts + responses (or preference pairs) with a reward model folder."""

    rm: str = arg(help="reward model folder (`tristage reward` output, or a Hugging Face *ForSequenceClassification)",
                  positional=True)
    file: str = arg(help="JSONL of {prompt | messages, response} or {prompt, chosen, rejected} records (.gz ok)",
                    positional=True)
    output: str | None = arg(None, help="write each record + score/scores (or score_chosen/score_rejected) here")
    batch_size: int = arg(16, check=">=1", help="sequences per forward pass")
    max_len: int = arg(1024, check=">=1",
                       help="longest sequence in tokens (capped at the model's max_position_embeddings); "
                                  "longer ones lose tokens from the left (counted)")
    device: str = arg("cpu", check=device_problem, help="cpu, cuda, cuda:1, mps")
    dtype: str = arg("float32", check=dtype_problem, help="float32, bfloat16, float16, or auto")
    progress: bool = arg(True, help="show a progress bar")
