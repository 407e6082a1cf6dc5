"""The demo world: the gold scorer judges as a person would, generated data is what it claims to be,
perturbations lower exactly the attribute they break, the annotator's noise is the configured one,
one seed gives the same bytes everywhere, eval prompts are held out, and the CLI runs end to end."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tristage.io import DataError, read_jsonl
from tristage.world import Annotator, expected_agreement, read_documents, read_eval_prompts, read_prompts, score
from tristage.world.cli import GenerateConfig, ScoreConfig, generate_main, score_main
from tristage.world.data import EOT, Prompt, generate, pref_style, pretrain_doc, sft_style
from tristage.world.entities import CHARACTERS
from tristage.world.gold import ATTRIBUTES
from tristage.world.grammar import SLOT_VALUES, TEMPLATES, Frame, parse_sentence, render, slot_names, slot_type
from tristage.world.prompts import Request, parse_prompt, render_prompt, sample_request
from tristage.world.stories import Style, make_opening, plan_story, write_story

CORE = ("instruction_following", "plausibility", "coherence", "fluency", "length")
DOG = "Help me write a story which starts, 'The dog sat on the...'"
SIZES = dict(n_stories=300, n_sft=150, n_pref=150, n_eval=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, generate(out, seed=7, **SIZES)


def others_equal(a, b, attr: str) -> bool:
    return all(a.attributes[k] == b.attributes[k] for k in ATTRIBUTES if k != attr)


# ---- the scorer judges as a person would ---------------------------------------------------------


def test_patio_nap_beats_cactus_in_outer_space():
    good = score(
        DOG,
        "The dog sat on the patio for a lazy afternoon nap in the sun. The air was warm and sweet. "
        "It fell asleep in the warm sun. It felt happy. It was the best day ever.",
    )
    bad = score(DOG, "The dog sat on the cactus in outer space.")
    assert good.overall > 0.9 and good.attributes["plausibility"] == 1.0
    assert bad.attributes["plausibility"] < 0.2
    assert good.overall > bad.overall + 0.2
    rules = " ".join(bad.reasons)
    assert "[cactus]" in rules and "[absurd_place]" in rules and "there is no cactus in outer space" in rules
    # the same one-sentence answers, without the polish: still the right order
    assert score(DOG, "The dog sat on the patio.").overall > score(DOG, "The dog sat on the cactus.").overall


@pytest.mark.parametrize(
    "prompt, better, worse, attr",
    [
        ("Where does a fish live?", "A fish lives in the water.", "A fish lives in a house.", "plausibility"),
        ("Where does a fish live?", "A fish lives in the water.", "A dog lives in a house.", "instruction_following"),
        ("What sound does a cow make?", "A cow says moo.", "A cow eats grass.", "instruction_following"),
        ("Tell me a story about a fish.", "The fish swam to the pond.", "The fish sat on the patio.", "plausibility"),
        (
            "Tell me a story about a cat at the beach.",
            "One sunny morning, the cat went to the beach. It sat on the sand. It felt happy.",
            "One sunny morning, the dog went to the beach. It sat on the sand. It felt happy.",
            "instruction_following",
        ),
        (
            "Tell me a story about a cat at the beach.",
            "One sunny morning, the cat went to the beach. It sat on the sand. It felt happy.",
            "One sunny morning, the cat went to the kitchen. It sat on the mat. It felt happy.",
            "instruction_following",
        ),
        (
            "Tell me a story about Tom.",
            "Once upon a time, there was a boy named Tom. One sunny morning, he went to the park.",
            "Once upon a time, there was a boy named Tom. One sunny morning, she went to the park.",
            "coherence",
        ),
        (
            "Tell me a story about Lily.",
            "One sunny morning, Lily went to the park.",
            "One sunny night, Lily went to the park.",
            "plausibility",
        ),
        (
            "Write a sad story about a dog.",
            "The dog lost its ball. It looked everywhere for its ball. Its ball was gone for good. It felt sad.",
            "The dog lost its ball. It looked everywhere for its ball. It found its ball at last. It felt happy.",
            "mood",
        ),
        (
            "Write a short story about Anna.",
            "Anna wanted to read a book. She read the whole book. It was a calm and peaceful day.",
            "Anna wanted to read a book. Anna opened her book. She read the whole book. She was very cozy. "
            "She rested quietly. The room was warm and cozy. The air was fresh and cool. It was a calm and "
            "peaceful day.",
            "length",
        ),
    ],
)
def test_hand_written_examples(prompt, better, worse, attr):
    b, w = score(prompt, better), score(prompt, worse)
    assert b.attributes[attr] > w.attributes[attr], (b, w)
    assert b.overall > w.overall
    assert any(r.startswith(attr) for r in w.reasons), w.reasons


def test_grammar_parses_everything_it_writes():
    rng = random.Random(0)
    for t in TEMPLATES:
        for _ in range(20):
            slots = {n: rng.choice(SLOT_VALUES[slot_type(n)]) for n in slot_names(t)}
            frame = parse_sentence(render(Frame(t, slots)))
            assert frame is not None and frame.template == t
            assert frame.slots == {k: v.lower() for k, v in slots.items()}


def test_prompts_are_read_back_from_their_text():
    rng = random.Random(1)
    for _ in range(300):
        req = sample_request(rng, rng.choice(("story", "fact")))
        assert parse_prompt(render_prompt(rng, req)) == req
    opening, _ = make_opening(rng)
    assert parse_prompt(render_prompt(rng, Request("continue", opening=opening))).opening == opening
    assert parse_prompt("hello there").kind == "free"


# ---- generated data ------------------------------------------------------------------------------


def test_every_training_response_scores_high_and_imperfect_ones_lower():
    rng = random.Random(2)
    good, bad = [], []
    for _ in range(250):
        p = Prompt(rng)
        s = score(p.text, p.answer(rng, sft_style(rng, p.req, imperfect_frac=0.0)))
        assert s.overall >= 0.8 and all(s.attributes[a] == 1.0 for a in CORE), (p.text, s)
        good.append(s.overall)
        flawed = score(p.text, p.answer(rng, sft_style(rng, p.req, imperfect_frac=1.0)))
        bad.append(flawed)
    broken = [s for s in bad if any(s.attributes[a] < 1 for a in (*CORE, "ending", "mood"))]
    assert len(broken) >= 0.9 * len(bad)
    assert sum(s.overall for s in bad) / len(bad) < sum(good) / len(good) - 0.05


def test_pretraining_corpus_is_mostly_plausible_with_a_controlled_absurd_minority():
    rng = random.Random(3)
    for _ in range(200):
        s = score("", pretrain_doc(rng, absurd_frac=0.0))
        assert s.attributes["plausibility"] == 1.0 and s.attributes["coherence"] == 1.0, s
    absurd = [score("", pretrain_doc(rng, absurd_frac=1.0)) for _ in range(200)]
    flagged = [s for s in absurd if s.attributes["plausibility"] < 1 or s.attributes["coherence"] < 1]
    assert len(flagged) >= 0.85 * len(absurd)


def test_world_is_rich_but_its_vocabulary_small():
    rng = random.Random(4)
    docs = [pretrain_doc(rng, 0.1) for _ in range(3000)]
    words = {w for d in docs for w in re.findall(r"[a-z]+", d.lower())}
    assert 200 < len(words) < 500
    assert len(set(docs)) > 0.97 * len(docs)
    assert len({d.split(". ")[0] for d in docs}) > 500  # many openings, not a few memorizable ones
    assert sum(len(d.split(". ")) >= 5 for d in docs) > 0.4 * len(docs)


def test_polish_is_what_preferences_reward():
    """Endings, details and a carried mood: worth gold score, and only those attributes move."""
    rng = random.Random(5)
    for _ in range(40):
        req = sample_request(rng, "story")
        seed = rng.random()
        plain = write_story(random.Random(seed), req, Style(details=0, ending="plain", mood_lines=1))
        polished = write_story(random.Random(seed), req, Style(details=2, ending="full", mood_lines=4))
        a, b = score(render_prompt(random.Random(0), req), plain), score(render_prompt(random.Random(0), req), polished)
        assert b.overall >= a.overall
        assert all(b.attributes[k] == a.attributes[k] == 1.0 for k in ("instruction_following", "plausibility"))
        assert b.attributes["ending"] > a.attributes["ending"]


# ---- perturbations lower exactly the attribute they break ----------------------------------------


def _stories(seed: int, n: int, **req):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        r = sample_request(rng, "story")
        r = Request("story", **{**dict(char=r.char, mood=r.mood, length=r.length), **req})
        out.append((r, plan_story(rng, r, Style(details=1))))
    return out


def test_absurd_place_lowers_plausibility_only():
    checked = 0
    for req, frames in _stories(6, 60):
        i = next((i for i, f in enumerate(frames) if "place" in f.slots or "at" in f.slots), None)
        if i is None:
            continue
        prompt = render_prompt(random.Random(0), req)
        swapped = list(frames)
        key, value = ("place", "outer space") if "place" in frames[i].slots else ("at", "in outer space")
        swapped[i] = Frame(frames[i].template, {**frames[i].slots, key: value})
        a = score(prompt, " ".join(map(render, frames)))
        b = score(prompt, " ".join(map(render, swapped)))
        assert a.attributes["plausibility"] == 1.0 and b.attributes["plausibility"] <= 0.5
        assert any("[absurd_place]" in r for r in b.reasons)
        assert others_equal(a, b, "plausibility"), (a, b)
        checked += 1
    assert checked >= 20


def test_broken_pronoun_lowers_coherence_only():
    checked = 0
    for req, frames in _stories(7, 60):
        i = next((i for i, f in enumerate(frames) if f.slots.get("C") in ("he", "she", "it")), None)
        if i is None:
            continue
        hero = CHARACTERS[req.char]
        wrong = {"he": "she", "she": "he", "it": "he"}[hero.pronoun]
        swapped = list(frames)
        swapped[i] = Frame(frames[i].template, {**frames[i].slots, "C": wrong})
        prompt = render_prompt(random.Random(0), req)
        a, b = score(prompt, " ".join(map(render, frames))), score(prompt, " ".join(map(render, swapped)))
        assert a.attributes["coherence"] == 1.0 and b.attributes["coherence"] < 1.0
        assert any("[pronoun_agreement]" in r for r in b.reasons)
        assert others_equal(a, b, "coherence"), (a, b)
        checked += 1
    assert checked >= 20


def test_ignoring_the_requested_character_lowers_instruction_following_only():
    rng = random.Random(8)
    for name, other in (("Lily", "Mia"), ("Tom", "Ben"), ("Emma", "Rosa"), ("Max", "Leo")) * 5:
        req = Request("story", char=name, place=rng.choice(sorted(CHARACTERS[name].places)))
        text = write_story(rng, req, Style(details=1))
        prompt = render_prompt(rng, req)
        a, b = score(prompt, text), score(prompt, re.sub(rf"\b{name}\b", other, text))
        assert a.attributes["instruction_following"] == 1.0
        assert b.attributes["instruction_following"] <= 0.5
        assert any("[wrong_character]" in r for r in b.reasons)
        assert others_equal(a, b, "instruction_following"), (a, b)


# ---- off-grammar text: never a crash, graded partial credit --------------------------------------

ODD = [
    "",
    "   \n\t ",
    "asdf qwer zxcv",
    "the the the the the the",
    "The dog sat on the",
    "The dog sat on the patio. " * 40,
    "!!!???...",
    "Ünïcödé 日本語 🙂 <|endoftext|> \x00",
    "The dog sat on the patio and had a very nice nap in the afternoon.",
    "1234567890 " * 50,
    "THE DOG SAT ON THE PATIO.",
    "the fish sat happily on the patio and ate a cactus in outer space",
]


@pytest.mark.parametrize("text", ODD)
@pytest.mark.parametrize("prompt", [DOG, "Where does a fish live?", "Write a short, sad story about Lily.", ""])
def test_off_grammar_text_is_scored_without_crashing(prompt, text):
    s = score(prompt, text)
    assert 0.0 <= s.overall <= 1.0 and all(0.0 <= v <= 1.0 for v in s.attributes.values())
    assert s == score(prompt, text)  # deterministic


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300), st.text(max_size=120))
def test_any_text_scores_in_range(response, prompt):
    s = score(prompt, response)
    assert 0.0 <= s.overall <= 1.0


def test_off_grammar_text_gets_partial_credit_in_the_right_order():
    good = "The dog sat on the patio for a lazy afternoon nap in the sun. It fell asleep in the warm sun."
    paraphrase = "The dog sat on the patio and had a very nice nap in the afternoon. The dog was so happy."
    scores = [score(DOG, t).overall for t in (good, paraphrase, good[:45], "asdf qwer zxcv.", "")]
    assert scores == sorted(scores, reverse=True) and scores[-1] == 0.0 and scores[-2] > 0
    assert score(DOG, "The dog sat on the patio. " * 5).attributes["fluency"] < 0.5  # repetition
    odd = score("", "the fish sat happily on the patio and then napped on a cactus")
    assert odd.attributes["plausibility"] < 0.5 and any("[cactus]" in r for r in odd.reasons)
    # a continuation written without repeating the opening counts as starting with it
    assert score(DOG, "patio for a lazy afternoon nap in the sun.").attributes["instruction_following"] == 1.0


# ---- the annotator -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str, str]]:
    rng = random.Random(9)
    out = []
    for _ in range(70):
        p = Prompt(rng)
        answers = list(dict.fromkeys(p.answer(rng, pref_style(rng, p.req)) for _ in range(4)))
        out += [(p.text, a, b) for i, a in enumerate(answers) for b in answers[i + 1 :]]
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.05, 0.2])
def test_annotator_agreement_matches_its_noise(pairs, temperature):
    agree, diffs = 0, []
    for seed in range(8):
        annotator = Annotator(temperature, seed=seed)
        for prompt, a, b in pairs:
            j = annotator.compare(prompt, a, b)
            if j.gold_chosen != j.gold_rejected:
                diffs.append(j.gold_chosen - j.gold_rejected)
                agree += j.gold_chosen > j.gold_rejected
    n = len(diffs)
    expected = expected_agreement(diffs, temperature)
    assert n > 1500
    if temperature == 0:
        assert agree == n
    else:
        tolerance = 4 * math.sqrt(expected * (1 - expected) / n) + 0.005
        assert abs(agree / n - expected) < tolerance, (agree / n, expected)
        assert 0.55 < expected < 0.97  # the noise is real, and labels still carry signal


def test_annotator_labels_any_two_responses_with_ratings_and_a_rationale():
    ann = Annotator(0.1, seed=0)
    good = "The dog sat on the patio for a lazy afternoon nap in the sun. It fell asleep in the warm sun."
    bad = "The dog sat on the cactus in outer space."
    j = ann.compare(DOG, bad, good)
    assert j == ann.compare(DOG, bad, good)  # reproducible, independent of call order
    assert 0.9 < 1 - j.p_a and {j.chosen, j.rejected} == {good, bad}
    rec = j.to_record(DOG)
    assert set(rec) == {"prompt", "chosen", "rejected", "ratings", "rationale"}
    for side in ("chosen", "rejected"):
        assert set(rec["ratings"][side]) == set(ATTRIBUTES)
        assert all(isinstance(v, int) and 1 <= v <= 5 for v in rec["ratings"][side].values())
    if j.chosen == good:
        assert "makes more sense" in j.rationale and "cactus" in j.rationale
    assert Annotator(0.0).compare(DOG, bad, good).chosen == good


# ---- files, determinism, held-out prompts, CLI ---------------------------------------------------


def test_files_have_the_documented_formats(world):
    out, summary = world
    docs = read_documents(out / "pretrain/train.txt")
    assert len(docs) == summary["counts"]["pretrain_train"] and all(EOT not in d for d in docs)
    assert (out / "pretrain/train.txt").read_text().count(f"\n{EOT}\n") == len(docs) - 1
    for name in ("train", "val"):
        for _, row in read_jsonl(out / f"sft/{name}.jsonl"):
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        for _, row in read_jsonl(out / f"preference/{name}.jsonl"):
            assert set(row) == {"prompt", "chosen", "rejected", "ratings", "rationale"}
            assert row["chosen"] != row["rejected"]
    multi = [r for _, r in read_jsonl(out / "sft/train.jsonl") if len(r["messages"]) > 2]
    assert multi, "some conversations are multi-turn"
    for _, row in read_jsonl(out / "eval/prompts.jsonl"):
        assert row["messages"] == [{"role": "user", "content": row["prompt"]}]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["mean_gold"]["sft"] > 0.85
    assert summary["mean_gold"]["preference_chosen"] > summary["mean_gold"]["preference_rejected"]
    assert read_prompts(out / "sft/train.jsonl") and read_prompts(out / "preference/val.jsonl")


def test_eval_prompts_are_held_out(world):
    out, _ = world
    held = read_eval_prompts(out / "eval/prompts.jsonl")
    assert len(held) == len(set(held)) == SIZES["n_eval"]
    train = set()
    for split in ("train", "val"):
        for _, row in read_jsonl(out / f"sft/{split}.jsonl"):
            train |= {m["content"] for m in row["messages"] if m["role"] == "user"}
        train |= {row["prompt"] for _, row in read_jsonl(out / f"preference/{split}.jsonl")}
    assert not train & set(held)
    kinds = {parse_prompt(p).kind for p in held}
    assert kinds == {"continue", "story", "fact"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_in_any_process(world, tmp_path):
    out, _ = world
    code = f"from tristage.world.data import generate; generate({str(tmp_path)!r}, seed=7, **{SIZES!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[1])
    a, b = _files(out), _files(tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        if name != "summary.json":
            assert a[name] == b[name], name
    sa, sb = json.loads(a["summary.json"]), json.loads(b["summary.json"])
    sa.pop("seconds"), sb.pop("seconds")
    assert sa == sb
    other = generate(tmp_path / "other", seed=8, **SIZES)
    assert other["mean_gold"] != sa["mean_gold"]


def test_cli_runs_end_to_end(tmp_path, capsys):
    from tristage.cli import main

    out = tmp_path / "world"
    assert generate_main(GenerateConfig(out=out, n_stories=80, n_sft=20, n_pref=20, n_eval=10)) == 0
    printed = capsys.readouterr().out
    assert "mean gold score" in printed and "pretrain/train.txt" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["eval_prompts"] == 10 and summary["files"]["pretrain/train.txt"]["bytes"] > 0

    rows = [
        {"prompt": DOG, "response": "The dog sat on the patio."},
        {"messages": [{"role": "user", "content": DOG}], "response": "The dog sat on the cactus."},
        {"messages": [{"role": "user", "content": DOG}, {"role": "assistant", "content": "The dog sat on the mat."}]},
    ]
    src = tmp_path / "samples.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "scored.jsonl"
    assert main(["world", "score", str(src), "--out", str(scored)]) == 0
    assert "overall" in capsys.readouterr().out
    got = [r for _, r in read_jsonl(scored)]
    assert [r["response"] for r in got] == ["The dog sat on the patio.", "The dog sat on the cactus.",
                                            "The dog sat on the mat."]  # fmt: skip
    assert got[0]["score"]["overall"] > got[1]["score"]["overall"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": DOG}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'response'"):  # a user's mistake: exit 2, one line
        score_main(ScoreConfig(file=bad))
    assert main(["world", "score", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "response" in err and "Traceback" not in err
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    for args, message in (([], "missing required: FILE"), ([str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file"),
                          ([str(tmp_path)], "is a folder"), ([str(tmp_path / "empty.jsonl")], "no records"),
                          ([str(tmp_path / "latin1.jsonl")], "latin1.jsonl:2: not UTF-8")):
        try:
            code = main(["world", "score", *args])
        except SystemExit as e:  # argparse's own errors leave as SystemExit(2), in process
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, (args, err)

    assert main(["world", "generate", "--out", str(tmp_path / "w2"), "--n-stories", "20", "--n-sft", "5",
                 "--n-pref", "5", "--n-eval", "5", "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "w2/eval/prompts.jsonl").exists()


def test_no_fact_answer_is_empty():
    """Regression: a 'wrong character' flaw once picked an animal without a sound and wrote an empty answer."""
    import random

    from tristage.world.entities import ANIMALS
    from tristage.world.prompts import RELATIONS, Request
    from tristage.world.stories import FLAWS, Style, write_answer

    for a in ANIMALS:
        for rel in RELATIONS:
            if rel == "sound" and not a.sound:
                continue
            for flaw in (None, *FLAWS):
                for seed in range(20):
                    req = Request("fact", char=a.word, relation=rel)
                    text = write_answer(random.Random(seed), req, Style(details=0, flaw=flaw))
                    assert text.strip(), (a.word, rel, flaw, seed)
