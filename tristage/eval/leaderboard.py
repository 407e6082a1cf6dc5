"""Rank models from pairwise battles: Bradley-Terry ratings with bootstrap confidence intervals.

    tristage leaderboard battles.jsonl
    tristage leaderboard battles.jsonl --json board.json --png board.png --bootstrap 1000 --seed 0
    tristage leaderboard battles.jsonl --anchor gpt35=1000 --style-control

Battles: JSONL (or a JSON list, as the Chatbot Arena's public files) of {"model_a", "model_b", "winner"}, winner
one of model_a, model_b, tie, tie (bothbad); other keys are ignored, except style features for --style-control:
"style_a" / "style_b" objects of numbers (what `tristage arena` writes: length, headers, lists, bold) or the
public files' "conv_metadata". A bad record stops the command naming its file, line and field.

The board (tristage/eval/arena.py has the method and its choices):
  rating     Bradley-Terry maximum likelihood on all battles, base 10, 400 points, mean 1000 (or --anchor
             MODEL=RATING), a tie half a win each way
  interval   2.5 and 97.5 percentiles of --bootstrap refits on battles resampled with replacement (--seed);
             unbounded above for a model that never lost (its rating is the prior's: --prior-sd)
  rank       1 + the number of models whose interval lies wholly above this model's (overlapping models share it)
  online     online Elo (K = 4) over the battles in file order, for comparison (it depends on that order)
With --style-control the style covariates are fitted jointly and the board says so, with what each is worth.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tristage.eval.arena import (
    Battles,
    Leaderboard,
    battle_counts,
    leaderboard,
    parse_anchor,
    predicted_win_rates,
    read_battles,
    win_fractions,
)
from tristage.flags.leaderboard import Config
from tristage.io import UserError, check_writable, write_json


def _fmt(x: float) -> str:
    return "-inf" if x == -math.inf else "+inf" if x == math.inf else "-" if math.isnan(x) else f"{x:.0f}"


def print_board(board: Leaderboard, title: str = "leaderboard", file: Any = None) -> None:
    """The board as a rich table (rank, model, rating, 95% interval, battles, W/L/T, online Elo), then the style
    coefficients and the notes."""
    from rich.console import Console
    from rich.table import Table

    style = f"; style control: {', '.join(board.style)}" if board.style else ""
    anchor = f"; {board.anchor[0]} anchored at {board.anchor[1]:g}" if board.anchor else ""
    caption = f"Bradley-Terry, {board.bootstrap} bootstrap rounds (seed {board.seed}){anchor}{style}"
    t = Table(title=title, caption=caption)
    for name, just in [("rank", "right"), ("model", "left"), ("rating", "right"), ("95% interval", "center"),
                       ("battles", "right"), ("W / L / T", "right"), ("online Elo", "right")]:
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    for i, m in enumerate(board.models):
        interval = f"{_fmt(board.lower[i])} .. {_fmt(board.upper[i])}" if board.bootstrap else "-"
        t.add_row(str(board.rank[i]), m, f"{board.rating[i]:.0f}", interval, str(board.battles[i]),
                  f"{board.wins[i]} / {board.losses[i]} / {board.ties[i]}", f"{board.online_elo[i]:.0f}")
    console = Console(file=file or sys.stdout, width=max(100, len(max(board.models, key=len)) + 70))
    console.print(t)
    for f, c, lo, hi in zip(board.style, board.style_coef, board.style_lower, board.style_upper):
        ci = f" [{lo:+.0f}, {hi:+.0f}]" if board.bootstrap else ""
        console.print(f"style control: {f} {c:+.0f} rating points per rms of its normalised difference{ci}")
    for note in board.notes:
        console.print(f"note: {note}", markup=False)


def save_png(board: Leaderboard, path: str | Path, title: str = "leaderboard") -> bool:
    """Ratings with their intervals as a PNG (False when matplotlib is not installed: the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    p = len(board.models)
    y = np.arange(p)[::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * p))
    finite_lo = np.where(np.isfinite(board.lower), board.lower, board.rating)
    finite_hi = np.where(np.isfinite(board.upper), board.upper, board.rating)
    if board.bootstrap:
        err = np.stack([board.rating - finite_lo, finite_hi - board.rating])
        ax.errorbar(board.rating, y, xerr=np.nan_to_num(err), fmt="o", capsize=4)
        for side, bound in ((80, board.upper), (-80, board.lower)):  # an unbounded end: an arrow that way
            for i in np.flatnonzero(np.isinf(bound)):
                ax.annotate("", xy=(board.rating[i] + side, y[i]), xytext=(board.rating[i], y[i]),
                            arrowprops={"arrowstyle": "->"})
    else:
        ax.plot(board.rating, y, "o")
    for i in range(p):
        ax.annotate(f"{board.rating[i]:.0f}", (board.rating[i], y[i]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set_yticks(y, board.models)
    ax.set_xlabel("rating (Bradley-Terry, 95% bootstrap interval)")
    ax.set_title(title + (f" (style control: {', '.join(board.style)})" if board.style else ""), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _matrix(m: np.ndarray, digits: int = 4) -> list[list[float | None]]:
    return [[None if not math.isfinite(x) else round(float(x), digits) for x in row] for row in m]


def matrices(battles: Battles, board: Leaderboard) -> dict[str, Any]:
    """Battle counts, win fractions (ties left out) and predicted win rates, rows and columns in board order."""
    order = [battles.models.index(m) for m in board.models]
    ix = np.ix_(order, order)
    return {"models": board.models, "battles": battle_counts(battles)[ix].tolist(),
            "win_fraction": _matrix(win_fractions(battles)[ix]),
            "predicted_win_rate": _matrix(predicted_win_rates(board.rating))}


def write_outputs(board: Leaderboard, battles: Battles, json_path: str | Path | None = None,
                  png_path: str | Path | None = None, matrices_path: str | Path | None = None,
                  title: str = "leaderboard") -> list[str]:
    """Write the board's files (atomically); returns what was written, in words."""
    done = []
    if json_path:
        write_json(json_path, board.rows())
        done.append(f"board {json_path}")
    if matrices_path:
        write_json(matrices_path, matrices(battles, board))
        done.append(f"matrices {matrices_path}")
    if png_path:
        done.append(f"plot {png_path}" if save_png(board, png_path, title) else
                    "no plot (matplotlib is not installed: pip install 'tristage[plot]')")
    return done


def main(cfg: Config) -> dict[str, Any]:
    for flag, path in (("--json", cfg.json), ("--png", cfg.png), ("--matrices", cfg.matrices)):
        if path:
            check_writable(path, flag=flag)
    anchor = parse_anchor(cfg.anchor) if cfg.anchor else None
    battles = read_battles(cfg.battles)
    if cfg.models:
        missing = [m for m in cfg.models if m not in battles.models]
        if missing:
            raise UserError(f"--models: {', '.join(missing)} not in {cfg.battles} (models: "
                            f"{', '.join(battles.models)})")
        battles = battles.among(cfg.models)
        if not len(battles):
            raise UserError(f"--models: no battle between {', '.join(cfg.models)} in {cfg.battles}")
    board = leaderboard(battles, bootstrap=cfg.bootstrap, seed=cfg.seed, anchor=anchor,
                        style=(cfg.style_features if cfg.style_control else None), prior_sd=cfg.prior_sd)
    print_board(board, title=f"leaderboard: {len(battles)} battles, {len(battles.models)} models ({cfg.battles})")
    for line in write_outputs(board, battles, cfg.json, cfg.png, cfg.matrices):
        print(f"leaderboard: wrote {line}")
    return {"battles": len(battles), "board": board.rows(), "notes": board.notes}
