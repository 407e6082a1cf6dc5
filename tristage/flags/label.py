"""`tristage label`: AI feedback (run by tristage/stages/label.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.flags.base import device_problem, dtype_problem


@dataclass
class Config:
    """Sample k answers per prompt from a policy and let a judge pick a preference pair (AI feedback)."""

    model: str = arg(help="policy model folder (a chat model: its tokenizer needs a chat_template)", positional=True)
    prompts: str = arg(help="JSONL of {prompt: text | messages} (or {messages}, cut after the last user turn); "
                            "the demo world's eval/prompts.jsonl and preference files work as they are")
    out: str = arg(help="JSONL of preference pairs to write (atomically)")
    judge: str = arg(help="rm:PATH | gold | world | python:MODULE:FUNCTION | llm:PATH (see the description above)")
    num_samples: int = arg(4, check=">=2", help="answers sampled per prompt (k >= 2)")
    temperature: float = arg(1.0, check=">=0",
                             help="sampling temperature (0 = greedy: all k samples would be the same)")
    top_p: float = arg(1.0, check="(0, 1]", help="nucleus sampling mass (1 = off)")
    top_k: int = arg(0, check=">=0", help="keep only the k most likely tokens (0 = off)")
    max_new_tokens: int = arg(160, check=">=1", help="tokens per answer at most")
    seed: int = arg(0, help="seed of the sampler and of the world judge's draws: same seed, same file")
    limit: int | None = arg(None, check=">=1", help="use only the first N prompts")
    batch_size: int = arg(16, check=">=1",
                          help="prompts per generation batch (each repeated k times: batch_size * k rows)")
    judge_batch_size: int = arg(16, check=">=1", help="sequences per forward pass of an rm: or llm: judge")
    max_len: int = arg(1024, check=">=1",
                       help="longest rm:/llm: judge input in tokens (capped at the judge's max positions); "
                                  "longer inputs lose tokens from the left (counted)")
    annotator_temperature: float = arg(0.1, check=">=0",
                                       help="noise of the world judge's simulated annotator (0 = perfect)")
    gold_report: Literal["auto", "on", "off"] = arg("auto", help="report gold scores of chosen vs rejected: auto = "
                                                                 "for world prompts / world and gold judges")
    save_samples: bool = arg(False, help="also record all k samples (and their judge scores) in each pair")
    device: str = arg("cpu", check=device_problem, help="cpu, cuda, cuda:1, mps")
    dtype: str = arg("float32", check=dtype_problem,
                     help="float32, bfloat16, float16, or auto (policy and judge models)")
    progress: bool = arg(True, help="show a progress bar")
