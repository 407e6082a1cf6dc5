"""`tristage chat`: a terminal chat (run by tristage/serve/chat.py:main)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg
from tristage.flags.base import device_problem


@dataclass
class Config:
    """Chat with a model in the terminal (streaming, multi-turn, /reset)."""

    model: str = arg(help="model folder with a chat template (e.g. runs/demo/sft/model)", positional=True)
    system: str | None = arg(None, help="system prompt")
    max_new_tokens: int = arg(256, check=">=1", help="tokens per answer at most")
    temperature: float = arg(0.7, check=">=0", help="sampling temperature; 0 = greedy")
    top_k: int = arg(0, check=">=0", help="keep only the k most likely tokens (0 = off)")
    top_p: float = arg(0.9, check="(0, 1]", help="nucleus sampling mass (1 = off)")
    seed: int = arg(0, help="random seed")
    device: str = arg("cpu", check=device_problem, help="cpu, cuda, ...")
