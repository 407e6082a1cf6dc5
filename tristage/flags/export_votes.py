"""`tristage export-votes`: the web page's votes as preference pairs (run by tristage/serve/votes.py:export_main)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg


@dataclass
class Config:
    """Export arena votes and annotations from a votes database to the preference JSONL that `tristage reward` and
    `tristage dpo` read: arena votes for A or B become chosen / rejected pairs (ties and both-bad votes are
    skipped and counted); an annotation gives its best answer against each other one, with per-attribute ratings
    and the annotator's reason as the rationale."""

    db: str = arg(help="the votes database (SQLite) that `tristage serve --db` writes", positional=True)
    out: str = arg(help="write the preference pairs here (JSONL)", positional=True)
