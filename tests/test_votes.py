"""The vote store: no vote lost under many concurrent writers (threads and processes), the export to preference
pairs (ties skipped and counted, ratings and rationale kept), its errors, and a reward model trained on an export."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading

import pytest
from conftest import SOUNDS, animal_pairs, pair_world
from web_helpers import PROMPT, cast_vote, write_votes

from tristage.cli import main as cli
from tristage.data.preference import load_preferences
from tristage.serve.votes import VoteStore, check_annotation, export_pairs

ATTRS = ["helpfulness", "honesty"]


def _tags(store: VoteStore) -> set[str]:
    return ({b.answer_a.split()[1] for b in store.battles()}
            | {a.rationale.split()[1] for a in store.annotations()})


def test_wal_and_schema(tmp_path):
    store = VoteStore(tmp_path / "v.db")
    db = sqlite3.connect(tmp_path / "v.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store.counts() == {"battles": 0, "annotations": 0}
    VoteStore(tmp_path / "v.db")  # opening it again keeps it
    cast_vote(store, 0, 0)
    assert store.counts() == {"battles": 1, "annotations": 0}


def test_many_threads_writing_at_once_lose_no_vote(tmp_path):
    store = VoteStore(tmp_path / "v.db")
    writers, n = 16, 20
    barrier = threading.Barrier(writers)
    errors = []

    def run(w):
        barrier.wait()
        try:
            for k in range(n):
                cast_vote(store, w, k)
        except Exception as e:  # pragma: no cover - the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.counts() == {"battles": writers * n // 2, "annotations": writers * n // 2}
    assert _tags(store) == {f"w{w}-{k}" for w in range(writers) for k in range(n)}


def test_many_processes_writing_at_once_lose_no_vote(tmp_path):
    path = str(tmp_path / "v.db")
    VoteStore(path)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: separate connections, separate locks
    writers, n = 6, 30
    start = ctx.Event()
    procs = [ctx.Process(target=write_votes, args=(path, w, n, start)) for w in range(writers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * writers
    store = VoteStore(path)
    assert _tags(store) == {f"w{w}-{k}" for w in range(writers) for k in range(n)}
    assert sum(store.counts().values()) == writers * n


def test_board_counts_every_vote(tmp_path):
    store = VoteStore(tmp_path / "v.db")
    assert store.board()["rows"] == []
    for winner in ["model_a"] * 6 + ["model_b"] * 2 + ["tie", "tie (bothbad)"]:
        store.add_battle("strong", "weak", winner, PROMPT, "s", "w")
    board = store.board(bootstrap=50)
    assert board["battles"] == 10
    top, bottom = board["rows"]
    assert (top["model"], bottom["model"]) == ("strong", "weak")
    assert (top["wins"], top["losses"], top["ties"]) == (6, 2, 2)
    assert top["lower"] <= top["rating"] <= top["upper"] and top["rating"] > 1000 > bottom["rating"]


@pytest.mark.parametrize("bad, match", [
    (dict(answers=[{"text": "only one"}]), "two or more"),
    (dict(best=2), "best"),
    (dict(best=True), "best"),
    (dict(ratings=[{"helpfulness": 5, "honesty": 4}, {"helpfulness": 2}]), r"ratings\[1\].*missing: honesty"),
    (dict(ratings=[{"helpfulness": 6, "honesty": 4}, {"helpfulness": 2, "honesty": 1}]), "1..5"),
    (dict(ratings=[{"helpfulness": 4.5, "honesty": 4}, {"helpfulness": 2, "honesty": 1}]), "integer"),
    (dict(rationale="  "), "reason"),
    (dict(answers=[{"text": "x"}, {"text": " "}]), r"answers\[1\]"),
])
def test_incomplete_annotations_are_refused(tmp_path, bad, match):
    args = dict(answers=[{"text": "x"}, {"text": "y"}], best=0, attributes=ATTRS,
                ratings=[{"helpfulness": 5, "honesty": 4}, {"helpfulness": 2, "honesty": 3}], rationale="why")
    check_annotation(**args)
    with pytest.raises(ValueError, match=match):
        check_annotation(**{**args, **bad})
    store = VoteStore(tmp_path / "v.db")
    with pytest.raises(ValueError):
        store.add_annotation(PROMPT, **{**args, **bad})
    assert store.counts()["annotations"] == 0


def test_export_pairs_ties_skipped_ratings_kept(tmp_path, capsys):
    store = VoteStore(tmp_path / "v.db")
    store.add_battle("m1", "m2", "model_a", PROMPT, "woof", "moo")
    store.add_battle("m1", "m2", "model_b", PROMPT, "quack", "the dog says woof")
    store.add_battle("m1", "m2", "tie", PROMPT, "a", "b")
    store.add_battle("m1", "m2", "tie (bothbad)", PROMPT, "a", "b")
    store.add_battle("m1", "m2", "model_a", PROMPT, "same", "same ")
    store.add_battle("m1", "m2", "model_a", PROMPT, "woof", " ")
    ratings = [{"helpfulness": 5, "honesty": 5}, {"helpfulness": 1, "honesty": 2}, {"helpfulness": 3, "honesty": 3}]
    two_turns = PROMPT + [{"role": "assistant", "content": "woof"}, {"role": "user", "content": "and the cat?"}]
    store.add_annotation(two_turns, [{"text": "meow", "model": "m1"}, {"text": "moo"}, {"text": "hoot"}], 0, ATTRS,
                         ratings, "the cat says meow")
    pairs, n = export_pairs(store)
    assert n == {"arena": 2, "annotation": 2, "ties": 2, "same_text": 1, "blank": 1}
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("woof", "moo"), ("the dog says woof", "quack"), ("meow", "moo"), ("meow", "hoot")]
    assert pairs[0]["prompt"] == "what does the dog say?" and pairs[0]["models"] == {"chosen": "m1", "rejected": "m2"}
    assert pairs[1]["models"] == {"chosen": "m2", "rejected": "m1"}
    assert pairs[3]["prompt"] == two_turns
    assert pairs[3]["ratings"] == {"chosen": ratings[0], "rejected": ratings[2]}
    assert pairs[3]["rationale"] == "the cat says meow"

    out = tmp_path / "pairs.jsonl"
    assert cli(["export-votes", str(tmp_path / "v.db"), str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "wrote 4 pairs" in line and "2 from arena votes, 2 from annotations" in line
    assert "skipped 2 ties" in line and "1 pairs of identical answers" in line and "1 votes with an empty" in line
    prefs, errors = load_preferences(out)  # what `tristage reward` and `tristage dpo` read
    assert not errors and len(prefs) == 4
    assert prefs[3].ratings == {"chosen": {"helpfulness": 5.0, "honesty": 5.0},
                                "rejected": {"helpfulness": 3.0, "honesty": 3.0}}
    assert prefs[3].rationale == "the cat says meow" and prefs[3].prompt == two_turns
    assert prefs[0].meta["source"] == "arena"


def test_export_errors_name_the_file(tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")

    def err(*args):
        assert cli(["export-votes", *map(str, args)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tristage export-votes: ")
        return lines[0]

    assert "no such file" in err(tmp_path / "missing.db", out)
    (tmp_path / "text.db").write_text("not sqlite at all\n" * 20)
    assert "text.db: not a votes database" in err(tmp_path / "text.db", out)
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    assert "other.db: not a votes database (no annotations, battles table)" in err(tmp_path / "other.db", out)
    assert "is a folder" in err(tmp_path, out)
    store = VoteStore(tmp_path / "ties.db")
    store.add_battle("m1", "m2", "tie", PROMPT, "a", "b")
    assert "no preference pair to export" in err(tmp_path / "ties.db", out)
    assert "skipped 1 ties" in err(tmp_path / "ties.db", out)
    assert "OUT" in err(tmp_path / "ties.db", tmp_path)  # the output is a folder
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow  # ~15 s on 2 idle cores: 100 reward-model steps
def test_reward_model_trains_on_an_export(tiny_shards, tmp_path):
    """Votes and annotations whose better answer is the animal's true sound, exported, train a reward model that
    tells the true sound from a wrong one on held-out pairs, with an attribute head per rated attribute."""
    from tristage.stages import reward

    root = pair_world(tiny_shards, tmp_path, val=(40, 1))
    store = VoteStore(tmp_path / "v.db")
    for i, p in enumerate(animal_pairs(160, 0)):
        prompt = [{"role": "user", "content": p["prompt"]}]
        if i % 2:  # an arena vote, the true sound on a random side
            if i % 4 == 1:
                store.add_battle("good", "bad", "model_a", prompt, p["chosen"], p["rejected"])
            else:
                store.add_battle("bad", "good", "model_b", prompt, p["rejected"], p["chosen"])
        else:  # an annotation, the true sound rated honest
            store.add_annotation(prompt, [{"text": p["rejected"]}, {"text": p["chosen"]}], 1, ATTRS,
                                 [{"helpfulness": 3, "honesty": 1}, {"helpfulness": 4, "honesty": 5}], "true sound")
    store.add_battle("good", "bad", "tie", [{"role": "user", "content": "hi"}], "x", "y")  # skipped
    assert cli(["export-votes", str(tmp_path / "v.db"), str(tmp_path / "pairs.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 160 and all(r["chosen"].split()[-1].rstrip(".") == SOUNDS[r["chosen"].split()[1]]
                                    for r in rows)
    m = reward.main(reward.Config(model=str(root / "base"), data=[str(tmp_path / "pairs.jsonl")],
                                  val_data=[str(root / "val.jsonl")], out=str(tmp_path / "rm"), batch_size=16,
                                  max_steps=100, lr=3e-3, warmup_steps=5, eval_every=0, log_every=10,
                                  dtype="float32", progress=False, device="cpu"))
    assert m["val_accuracy"] >= 0.85, m
    cfg = json.loads((tmp_path / "rm" / "model" / "config.json").read_text())
    assert cfg["tristage_reward"]["labels"] == ["reward", *sorted(ATTRS)]
