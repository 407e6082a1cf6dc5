"""`tristage arena`: an automatic arena (run by tristage/stages/arena.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.flags.base import device_problem, dtype_problem
from tristage.flags.leaderboard import anchor_problem
from tristage.io import UserError


@dataclass
class Config:
    """Answer a prompt set with several models, judge every pair of answers, and rank the models."""

    models: list[str] = arg(help="two or more model folders (chat models), or JSONL files of answers already "
                                 "generated ({prompt | messages, answer | response}); NAME=PATH names one (default: "
                                 "the folder's name, its parent's for a folder called model, or the file's stem)",
                            positional=True)
    prompts: str = arg(help="JSONL of {prompt: text | messages} (or {messages}, cut after the last user turn); the "
                            "demo world's eval/prompts.jsonl works as it is")
    judge: str = arg(help="rm:PATH | gold | world | python:MODULE:FUNCTION | llm:PATH (see the description above)")
    out: str = arg(help="folder for answers/, battles.jsonl and the leaderboard; rerun the same command to resume")
    judge_prompt: str | None = arg(None, help="FILE[:NAME]: the llm: judge's prompt from a JSONL of FastChat's "
                                              "judge prompts (e.g. mt_bench/judge_prompts.jsonl; default NAME: its "
                                              "first pairwise prompt, pair-v2); default: tristage's own")
    limit: int | None = arg(None, check=">=1", help="use only the first N prompts")
    samples: int = arg(1, check=">=1", help="answers per model and prompt; sample j of each model meets sample j of "
                                            "every other (more battles per prompt: finer ratings from few prompts; "
                                            "needs --temperature > 0)")
    max_new_tokens: int = arg(160, check=">=1", help="tokens per answer at most")
    temperature: float = arg(0.7, check=">=0", help="sampling temperature of the answers (0 = greedy)")
    top_p: float = arg(1.0, check="(0, 1]", help="nucleus sampling mass (1 = off)")
    top_k: int = arg(0, check=">=0", help="keep only the k most likely tokens (0 = off)")
    seed: int = arg(0, help="seed of the answers (one per prompt), the sides of each battle, the world judge's "
                            "draws and the bootstrap")
    batch_size: int = arg(16, check=">=1", help="prompts per generation batch (answers are saved per batch)")
    judge_batch_size: int = arg(16, check=">=1", help="sequences per forward pass of an rm: or llm: judge")
    max_len: int = arg(1024, check=">=1", help="longest rm:/llm: judge input in tokens (capped at the judge's max "
                                                "positions); longer inputs lose tokens from the left (counted)")
    annotator_temperature: float = arg(0.1, check=">=0",
                                       help="noise of the world judge's simulated annotator (0 = perfect)")
    bootstrap: int = arg(1000, check=">=0", help="bootstrap rounds for the leaderboard's intervals (0 = none)")
    anchor: str | None = arg(None, check=anchor_problem,
                             help="MODEL=RATING: shift the board so MODEL has this rating (default: mean 1000)")
    style_control: bool = arg(False, help="fit the answers' length and markdown counts jointly with the ratings")
    gold_report: Literal["auto", "on", "off"] = arg("auto", help="report each model's mean gold score and its rank "
                                                                 "agreement with the board (Kendall tau): auto = for "
                                                                 "world prompts / world and gold judges")
    overwrite: bool = arg(False, help="start over in an --out that holds another arena run")
    device: str = arg("cpu", check=device_problem, help="cpu, cuda, cuda:1, mps")
    dtype: str = arg("float32", check=dtype_problem,
                     help="float32, bfloat16, float16, or auto (the models and a model judge)")
    progress: bool = arg(True, help="show a progress bar")

    def check_flags(self) -> None:
        if self.samples > 1 and self.temperature == 0:
            raise UserError(f"--samples {self.samples} with --temperature 0: greedy answers to a prompt are all the "
                            "same; sample (--temperature > 0) or use --samples 1")
