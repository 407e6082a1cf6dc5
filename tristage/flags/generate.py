"""`tristage generate`: sample from a model (run by tristage/serve/generate.py:main)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg
from tristage.flags.base import device_problem, dtype_problem


@dataclass
class Config:
    """Sample completions from a model folder (prompt mode, or JSONL in / JSONL out)."""

    model: str = arg(help="model folder (Hugging Face format: config.json, model.safetensors, tokenizer.json)",
                     positional=True)
    prompt: str | None = arg(None, help="a prompt: prints its completion")
    chat: bool = arg(False, help="treat --prompt (and `prompt` lines) as a user message in the chat template")
    input: str | None = arg(None, help="JSONL of {prompt | messages, ...} lines")
    output: str | None = arg(None, help="JSONL to write: the input fields + response, finish_reason, num_tokens")
    max_new_tokens: int = arg(256, check=">=1", help="tokens to generate at most per prompt")
    temperature: float = arg(0.8, check=">=0", help="sampling temperature; 0 = greedy")
    top_k: int = arg(0, check=">=0", help="keep only the k most likely tokens (0 = off)")
    top_p: float = arg(0.95, check="(0, 1]",
                       help="nucleus sampling: keep the most likely tokens up to this mass (1 = off)")
    seed: int = arg(0, help="random seed (the same seed and inputs give the same outputs)")
    batch_size: int = arg(16, check=">=1", help="prompts decoded together in JSONL mode")
    device: str = arg("cpu", check=device_problem, help="cpu, cuda, cuda:1, mps")
    dtype: str = arg("float32", check=dtype_problem, help="float32, bfloat16, float16, or auto")
    compile: bool = arg(False, help="torch.compile the decode step (pays off for long JSONL runs only)")
