"""`tristage leaderboard`: ratings from battles (run by tristage/eval/leaderboard.py:main)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tristage.config import arg
from tristage.io import UserError


def anchor_problem(spec: str) -> str | None:
    """What is wrong with `--anchor MODEL=RATING` (None when nothing)."""
    model, sep, value = spec.rpartition("=")
    try:
        ok = bool(sep and model) and math.isfinite(float(value))
    except ValueError:
        ok = False
    return None if ok else f"must be MODEL=RATING with a finite number (got {spec!r})"


@dataclass
class Config:
    """Rank models from pairwise battles: Bradley-Terry ratings with bootstrap intervals."""

    battles: str = arg(help="JSONL (or a JSON list) of {model_a, model_b, winner: model_a | model_b | tie | "
                            "tie (bothbad)} battles, the Chatbot Arena's shape (.gz ok)", positional=True)
    json: str | None = arg(None, help="write the board here: a JSON list, one object per model (rank, model, "
                                      "rating, lower, upper, median, battles, wins, losses, ties, online_elo, "
                                      "style_control)")
    png: str | None = arg(None, help="plot the ratings with their intervals here (needs matplotlib)")
    matrices: str | None = arg(None, help="write the battle-count, win-fraction and predicted win-rate matrices "
                                          "here (JSON)")
    bootstrap: int = arg(1000, check=">=0",
                         help="bootstrap rounds for the intervals (2.5 and 97.5 percentiles; 0 = none)")
    seed: int = arg(0, help="seed of the bootstrap resampling")
    anchor: str | None = arg(None, check=anchor_problem,
                             help="MODEL=RATING: shift the board so MODEL has this rating (default: mean 1000)")
    style_control: bool = arg(False, help="fit style covariates (answer length, markdown counts, ...) jointly "
                                          "with the ratings, so style alone does not climb the board")
    style_features: list[str] = arg([], help="the style features to control for (default: every feature the "
                                             "battles carry in style_a / style_b or conv_metadata)")
    prior_sd: float = arg(1000.0, check=">0", help="sd in rating points of the Gaussian prior on the ratings "
                                                   "(keeps a model that never lost finite)")
    models: list[str] = arg([], help="rate only the battles between these models (default: all)")

    def check_flags(self) -> None:
        if self.style_features and not self.style_control:
            raise UserError("--style-features needs --style-control")
