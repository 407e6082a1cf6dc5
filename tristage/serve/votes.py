"""The vote store: arena votes and annotations in one SQLite file, and their export to preference pairs.

    store = VoteStore("votes.db")                      # creates the tables on first use
    store.add_battle(model_a, model_b, "model_a", messages, answer_a, answer_b)
    store.add_annotation(messages, answers, best=0, attributes=[...], ratings=[{...}, {...}], rationale="...")
    store.board(bootstrap=200)                         # the leaderboard of every vote so far
    tristage export-votes votes.db pairs.jsonl         # -> `tristage reward` / `tristage dpo` data

Choices, and why:
- SQLite from the standard library: one file, no server, and safe for many writers when used as below; votes come
  a few a second at most, far below what it sustains.
- WAL journal: readers (the leaderboard) never block the writers, nor the writers the readers. Every vote is one
  `BEGIN IMMEDIATE` ... COMMIT transaction on its own short-lived connection (opening one costs microseconds), so
  there is no connection shared across threads and no state to lose between requests. A writer that finds the
  database locked waits (busy timeout, 30 s) instead of failing. synchronous=FULL: a committed vote survives a
  power cut, and the cost (one fsync per vote) is nothing at human voting rates. Tested with many threads and
  many processes writing at once: every vote is there afterwards.
- A battle is stored as the Chatbot Arena shapes it ({model_a, model_b, winner}), with the prompt (chat messages as
  JSON) and both answers, so a vote can become a training pair later. An annotation keeps the prompt, every answer
  (text and, when known, the model), the index of the best one, the attribute names, one {attribute: 1..5} per
  answer and the annotator's reason. Both are checked here (`check_annotation`), whatever page or script sent them.
- Export (`export_pairs`): an arena vote for A or B is one pair, the winner's answer chosen; a tie or "both bad"
  says nothing about which is better and is skipped (counted in the summary line). An annotation gives one pair per
  other answer, the best answer chosen against each, with both answers' ratings ({"chosen": {...}, "rejected":
  {...}}, the preference format's per-attribute ratings) and the reason as the rationale. Two answers that are the
  same text teach nothing, and an empty answer (a model that ended its turn at once) cannot be a reply of a pair:
  the preference reader refuses both, so they are skipped and counted. Answers are written stripped of surrounding
  white space, as `tristage arena` keeps them. Extra keys (source, models,
  id) land in the pair's `meta` when read back. A database with no pair to export is an error, not an empty file.
- Torch-free: `tristage export-votes` starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tristage.flags.export_votes import Config
from tristage.io import UserError, check_writable, write_jsonl

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
DEFAULT_ATTRIBUTES = ("helpfulness", "honesty", "harmlessness", "instruction_following")
RATING_MIN, RATING_MAX = 1, 5
MAX_RATIONALE = 4000  # characters: "a short reason"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS battles (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
    prompt TEXT NOT NULL,       -- chat messages, JSON
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    prompt TEXT NOT NULL,       -- chat messages, JSON
    answers TEXT NOT NULL,      -- [{"text", "model"}], JSON
    best INTEGER NOT NULL,
    attributes TEXT NOT NULL,   -- [name], JSON
    ratings TEXT NOT NULL,      -- one {attribute: 1..5} per answer, JSON
    rationale TEXT NOT NULL
);
"""


@dataclass
class Battle:
    id: int
    time: float
    model_a: str
    model_b: str
    winner: str
    prompt: list[dict[str, str]]
    answer_a: str
    answer_b: str


@dataclass
class Annotation:
    id: int
    time: float
    prompt: list[dict[str, str]]
    answers: list[dict[str, Any]]  # {"text": str, "model": str | None}
    best: int
    attributes: list[str]
    ratings: list[dict[str, int]]
    rationale: str


# ----------------------------------------------------------------------------- checks
def check_annotation(answers: Sequence[dict[str, Any]], best: Any, attributes: Sequence[str],
                     ratings: Sequence[dict[str, Any]], rationale: Any) -> None:
    """Raise ValueError (a sentence naming the field) unless this is a complete annotation: two or more non-blank
    answers, `best` one of their indices, every answer rated 1..5 (integers) on every attribute, a non-blank reason."""
    if len(answers) < 2:
        raise ValueError(f"answers: an annotation compares two or more answers (got {len(answers)})")
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not a["text"].strip():
            raise ValueError(f"answers[{i}]: expected a non-blank text")
    if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < len(answers):
        raise ValueError(f"best: expected the index of an answer (0 .. {len(answers) - 1}), got {best!r:.40}")
    if not attributes or not all(isinstance(a, str) and a.strip() for a in attributes):
        raise ValueError("attributes: expected a non-empty list of names")
    if len(set(attributes)) != len(attributes):
        raise ValueError("attributes: a name appears twice")
    if len(ratings) != len(answers):
        raise ValueError(f"ratings: expected one object per answer ({len(answers)}), got {len(ratings)}")
    for i, r in enumerate(ratings):
        if not isinstance(r, dict) or set(r) != set(attributes):
            missing = sorted(set(attributes) - set(r)) if isinstance(r, dict) else list(attributes)
            extra = sorted(set(r) - set(attributes)) if isinstance(r, dict) else []
            raise ValueError(f"ratings[{i}]: rate every attribute (missing: {', '.join(missing) or 'none'}; "
                             f"unknown: {', '.join(extra) or 'none'})")
        for k, v in r.items():
            if isinstance(v, bool) or not isinstance(v, int) or not RATING_MIN <= v <= RATING_MAX:
                raise ValueError(f"ratings[{i}].{k}: expected an integer {RATING_MIN}..{RATING_MAX}, got {v!r:.40}")
    if not isinstance(rationale, str) or not rationale.strip():
        raise ValueError("rationale: write a short reason")
    if len(rationale) > MAX_RATIONALE:
        raise ValueError(f"rationale: at most {MAX_RATIONALE} characters (got {len(rationale)})")


# ----------------------------------------------------------------------------- the store
class VoteStore:
    """Votes and annotations in the SQLite file `path` (created with its tables when missing)."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not create:
            _check_database(self.path)
            return
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: set once in the file
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # autocommit: transactions are explicit
        try:
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA synchronous = FULL")
            yield db
        finally:
            db.close()

    def _insert(self, sql: str, values: tuple) -> int:
        """One INSERT in its own IMMEDIATE transaction (the write lock taken up front); returns the row id."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(sql, values)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    def add_battle(self, model_a: str, model_b: str, winner: str, prompt: list[dict[str, str]], answer_a: str,
                   answer_b: str) -> int:
        """Store one arena vote; returns its id."""
        if winner not in WINNERS:
            raise ValueError(f"winner: expected one of {', '.join(WINNERS)}, got {winner!r:.40}")
        if model_a == model_b:
            raise ValueError(f"model_a and model_b are the same model ({model_a!r})")
        return self._insert("INSERT INTO battles (time, model_a, model_b, winner, prompt, answer_a, answer_b) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (time.time(), model_a, model_b, winner, json.dumps(prompt), answer_a, answer_b))

    def add_annotation(self, prompt: list[dict[str, str]], answers: Sequence[dict[str, Any]], best: int,
                       attributes: Sequence[str], ratings: Sequence[dict[str, int]], rationale: str) -> int:
        """Store one annotation (checked by `check_annotation`); returns its id."""
        check_annotation(answers, best, attributes, ratings, rationale)
        answers = [{"text": a["text"], "model": a.get("model") if isinstance(a.get("model"), str) else None}
                   for a in answers]
        return self._insert("INSERT INTO annotations (time, prompt, answers, best, attributes, ratings, rationale) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (time.time(), json.dumps(prompt), json.dumps(answers), best, json.dumps(list(attributes)),
                             json.dumps(list(ratings)), rationale.strip()))

    def battles(self) -> list[Battle]:
        with self._connect() as db:
            rows = db.execute("SELECT id, time, model_a, model_b, winner, prompt, answer_a, answer_b FROM battles "
                              "ORDER BY id").fetchall()
        return [Battle(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    def annotations(self) -> list[Annotation]:
        with self._connect() as db:
            rows = db.execute("SELECT id, time, prompt, answers, best, attributes, ratings, rationale "
                              "FROM annotations ORDER BY id").fetchall()
        return [Annotation(r[0], r[1], json.loads(r[2]), json.loads(r[3]), r[4], json.loads(r[5]), json.loads(r[6]),
                           r[7]) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            return {"battles": db.execute("SELECT COUNT(*) FROM battles").fetchone()[0],
                    "annotations": db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]}

    def board(self, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
        """The Bradley-Terry leaderboard of every vote so far (tristage.eval.arena): {"battles", "rows", "notes"},
        rows best first with rating, 95% bootstrap interval (None where unbounded), battles, wins, losses, ties."""
        from tristage.eval.arena import Battles, leaderboard

        with self._connect() as db:
            rows = db.execute("SELECT model_a, model_b, winner FROM battles ORDER BY id").fetchall()
        if not rows:
            return {"battles": 0, "rows": [], "notes": [], "bootstrap": bootstrap}
        b = Battles.from_lists([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        board = leaderboard(b, bootstrap=bootstrap, seed=seed)
        return {"battles": len(rows), "rows": board.rows(), "notes": board.notes, "bootstrap": bootstrap}


def _check_database(path: Path) -> None:
    """UserError naming `path` unless it is a SQLite file holding this store's tables."""
    if not path.exists():
        raise UserError(f"{path}: no such file (the votes database `tristage serve --db` writes)")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a votes database")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: not a votes database ({e})") from None
    missing = {"battles", "annotations"} - tables
    if missing:
        raise UserError(f"{path}: not a votes database (no {', '.join(sorted(missing))} table)")


# ----------------------------------------------------------------------------- export
def _prompt_out(messages: list[dict[str, str]]) -> str | list[dict[str, str]]:
    """A single user message is written as text (the simplest preference shape), anything longer as messages."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    return messages


def export_pairs(store: VoteStore) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(preference records, counts): arena votes for A or B and annotations (best against each other answer) as
    {prompt, chosen, rejected, [ratings, rationale], source, models, id}; counts of what was written and skipped."""
    pairs: list[dict[str, Any]] = []
    n = {"arena": 0, "annotation": 0, "ties": 0, "same_text": 0, "blank": 0}
    for b in store.battles():
        if b.winner not in ("model_a", "model_b"):
            n["ties"] += 1
            continue
        (cm, ca), (rm, ra) = (((b.model_a, b.answer_a), (b.model_b, b.answer_b)) if b.winner == "model_a"
                              else ((b.model_b, b.answer_b), (b.model_a, b.answer_a)))
        ca, ra = ca.strip(), ra.strip()  # as `tristage arena` keeps answers
        if not ca or not ra:  # a model that said nothing: the preference format needs two replies
            n["blank"] += 1
            continue
        if ca == ra:
            n["same_text"] += 1
            continue
        pairs.append({"prompt": _prompt_out(b.prompt), "chosen": ca, "rejected": ra, "source": "arena",
                      "models": {"chosen": cm, "rejected": rm}, "id": f"battle-{b.id}"})
        n["arena"] += 1
    for a in store.annotations():
        best = a.answers[a.best]
        for j, other in enumerate(a.answers):
            if j == a.best:
                continue
            if best["text"].strip() == other["text"].strip():
                n["same_text"] += 1
                continue
            rec = {"prompt": _prompt_out(a.prompt), "chosen": best["text"].strip(), "rejected": other["text"].strip(),
                   "ratings": {"chosen": a.ratings[a.best], "rejected": a.ratings[j]}, "rationale": a.rationale,
                   "source": "annotation", "id": f"annotation-{a.id}"}
            if best.get("model") or other.get("model"):
                rec["models"] = {"chosen": best.get("model"), "rejected": other.get("model")}
            pairs.append(rec)
            n["annotation"] += 1
    return pairs, n


def export_main(cfg: Config) -> dict[str, int]:
    """`tristage export-votes DB OUT.jsonl` (tristage/flags/export_votes.py)."""
    check_writable(cfg.out, flag="OUT")
    store = VoteStore(cfg.db, create=False)
    pairs, n = export_pairs(store)
    skipped = (f"skipped {n['ties']} ties / both-bad votes, {n['same_text']} pairs of identical answers and "
               f"{n['blank']} votes with an empty answer")
    if not pairs:
        raise UserError(f"{cfg.db}: no preference pair to export (no arena vote for A or B, no annotation; {skipped})")
    write_jsonl(cfg.out, pairs)
    print(f"export-votes: wrote {len(pairs)} pairs to {cfg.out} ({n['arena']} from arena votes, {n['annotation']} "
          f"from annotations); {skipped}")
    return {"pairs": len(pairs), **n}

