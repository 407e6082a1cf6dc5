"""`tristage report`: a pipeline run's report (run by tristage/report.py:main). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg


@dataclass
class Config:
    """Write report.md and report.html (one self-contained file) from a pipeline run folder alone."""

    run: str = arg(help="a run folder written by `tristage pipeline`", positional=True)
    examples: int = arg(3, check=">=1", help="held-out prompts whose answers from every model are shown side by side")
