"""`tristage world generate` and `tristage world score`: the demo world (run by tristage/world/cli.py:
generate_main and score_main)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tristage.config import arg


@dataclass
class GenerateConfig:
    """Write the demo world's data for every stage."""

    out: Path = arg(help="output folder")
    seed: int = arg(0, help="one seed gives byte-identical data on every machine")
    n_stories: int = arg(30000, check=">=0", help="pre-training documents (train + val)")
    n_sft: int = arg(4000, check=">=0", help="instruction conversations (train + val)")
    n_pref: int = arg(4000, check=">=0", help="preference pairs (train + val)")
    n_eval: int = arg(200, check=">=0", help="held-out evaluation prompts")
    val_frac: float = arg(0.05, check="[0, 1]", help="share of each training split kept for validation")
    absurd_frac: float = arg(0.1, check="[0, 1]", help="share of pre-training stories that are absurd or incoherent")
    imperfect_frac: float = arg(0.1, check="[0, 1]", help="share of SFT answers with a flaw")
    annotator_temperature: float = arg(0.1, check=">=0",
                                       help="Bradley-Terry noise of the simulated annotator (0 = perfect)")
    quiet: bool = arg(False, help="no progress bar or summary table")


@dataclass
class ScoreConfig:
    """Score a JSONL of prompts and responses with the gold scorer."""

    file: Path = arg(help="JSONL with prompt/response (or messages) per line", positional=True)
    out: Path | None = arg(None, help="write each row with its score here (JSONL)")
    quiet: bool = arg(False, help="no table")
