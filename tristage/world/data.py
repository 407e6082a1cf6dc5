"""Data for every stage, from one seed: pre-training text, conversations, preference pairs, eval prompts.

Layout written by `generate(out, ...)` (the formats every stage also reads users' data in):
  pretrain/train.txt, val.txt   stories as plain text, documents separated by a line `<|endoftext|>`
  sft/train.jsonl, val.jsonl    {"messages": [{"role": "user"|"assistant", "content": ...}, ...]}
  preference/train.jsonl, val.jsonl
                                {"prompt", "chosen", "rejected", "ratings": {"chosen": {attr: 1-5}, ...},
                                 "rationale"}
  eval/prompts.jsonl            {"prompt", "messages": [user], "kind"}: held out, shares no prompt with training
  summary.json                  counts, sizes, mean gold score per split, annotator agreement (printed too)

Choices:
- Each split draws from its own `random.Random(f"{seed}/{split}")`, so changing one size does not
  change the others' data, and the same seed gives byte-identical files on every machine.
- Eval prompts are drawn first; training prompts that happen to equal one are redrawn, so the
  held-out set is disjoint from training by construction (and a test checks it).
- The three kinds of text differ only in the Styles they draw:
  pre-training: mostly plausible stories of every shape, `absurd_frac` of them absurd or incoherent
    (as the web is), plus short fact paragraphs so a base model knows where a fish lives;
  SFT: answers that follow the request, usually plainly (a detail half the time, a closing line half
    the time), `imperfect_frac` of them with a flaw (a wrong detail, a flat ending, a missed constraint);
  preferences: two responses of varied polish and flaws, labelled by the simulated annotator; the
    polish (endings, details, mood) is what demonstrations teach only weakly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from tristage.io import DataError, atomic_write_text, read_jsonl, write_json, write_jsonl
from tristage.world.annotator import Annotator, Judgement, expected_agreement
from tristage.world.entities import ANIMALS
from tristage.world.gold import ATTRIBUTES, score, score_request
from tristage.world.prompts import Request, render_prompt, sample_request
from tristage.world.stories import Style, continue_story, make_opening, write_answer, write_facts, write_story

EOT = "<|endoftext|>"
KINDS = (("continue", 0.3), ("story", 0.5), ("fact", 0.2))


class Prompt:
    """A sampled prompt: its text, what it asks for, and how to answer it in a given style."""

    def __init__(self, rng: random.Random):
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        self.first = None
        if kind == "continue":
            opening, self.first = make_opening(rng)
            self.req = Request("continue", opening=opening)
        else:
            self.req = sample_request(rng, kind)
        self.text = render_prompt(rng, self.req)

    def answer(self, rng: random.Random, style: Style) -> str:
        if self.req.kind == "fact":
            return write_answer(rng, self.req, style)
        if self.req.kind == "continue":
            return continue_story(rng, self.req.opening, self.first, style)
        return write_story(rng, self.req, style)


def fresh_prompt(rng: random.Random, banned: set[str]) -> Prompt:
    while True:
        p = Prompt(rng)
        if p.text not in banned:
            return p


def _flaw_for(rng: random.Random, req: Request, flaws: list[str]) -> str:
    if req.kind == "fact":
        return rng.choice(["wrong_fact", "wrong_fact", "wrong_character", "wrong_length"])
    if req.place:
        flaws = flaws + ["wrong_place"]
    if req.mood:
        flaws = flaws + ["wrong_mood"]
    if req.char:
        flaws = flaws + ["wrong_character"]
    return rng.choice(flaws)


def sft_style(rng: random.Random, req: Request, imperfect_frac: float) -> Style:
    """A demonstration: right, usually plain (few details, a closing line a third of the time, the mood said
    once or twice); sometimes (imperfect_frac) with a flaw."""
    flaw = _flaw_for(rng, req, ["absurd", "absurd", "flat", "wrong_length"]) if rng.random() < imperfect_frac else None
    ending = "full" if rng.random() < 0.35 else "plain"
    return Style(details=int(rng.random() < 0.4), ending=ending, mood_lines=rng.choice((1, 2)), flaw=flaw)


def pref_style(rng: random.Random, req: Request) -> Style:
    """One side of a preference pair: any polish, a flaw a third of the time."""
    flaws = ["absurd", "absurd", "pronoun", "switch", "flat", "wrong_length", "repeat", "truncate"]
    flaw = _flaw_for(rng, req, flaws) if rng.random() < 0.35 else None
    ending = rng.choices(("full", "plain", "flat"), (0.5, 0.35, 0.15))[0]
    return Style(details=rng.randint(0, 3), ending=ending, mood_lines=rng.randint(1, 4), flaw=flaw)


def pretrain_doc(rng: random.Random, absurd_frac: float) -> str:
    if rng.random() < 0.08:
        return write_facts(rng, rng.choice(ANIMALS), wrong=rng.random() < absurd_frac)
    req = sample_request(rng, "story")
    flaw = rng.choices(("absurd", "pronoun", "switch"), (0.7, 0.15, 0.15))[0] if rng.random() < absurd_frac else None
    style = Style(
        details=rng.randint(0, 2),
        ending=rng.choices(("full", "plain", "flat"), (0.5, 0.35, 0.15))[0],
        mood_lines=rng.randint(1, 4),
        flaw=flaw,
    )
    return write_story(rng, Request("free", length=req.length, char=req.char, place=req.place, mood=req.mood), style)


def _split(rows: list, val_frac: float) -> tuple[list, list]:
    n_val = max(1, round(len(rows) * val_frac)) if len(rows) > 1 and val_frac > 0 else 0
    return rows[: len(rows) - n_val], rows[len(rows) - n_val :]


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def generate(
    out: str | Path,
    seed: int = 0,
    n_stories: int = 30000,
    n_sft: int = 4000,
    n_pref: int = 4000,
    n_eval: int = 200,
    val_frac: float = 0.05,
    absurd_frac: float = 0.1,
    imperfect_frac: float = 0.1,
    annotator_temperature: float = 0.1,
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    """Write the world's data under `out` and return the summary (also written to out/summary.json). Each part
    draws from its own seeded generator ("{seed}/eval", "/pretrain", "/sft", "/preference"), so the parts do not
    depend on one another's sizes."""
    out = Path(out)
    t0 = time.perf_counter()
    tick = progress or (lambda name, n: None)
    eval_rows = _eval_prompts(random.Random(f"{seed}/eval"), n_eval)  # first, so training can avoid them
    banned = {r["prompt"] for r in eval_rows}
    tick("eval", n_eval)
    rng = random.Random(f"{seed}/pretrain")
    docs = []
    for _ in range(n_stories):
        docs.append(pretrain_doc(rng, absurd_frac))
        tick("pretrain", 1)
    convs, sft_scores = _sft_conversations(random.Random(f"{seed}/sft"), n_sft, banned, imperfect_frac, tick)
    annotator = Annotator(annotator_temperature, seed)
    pairs, judged = _preference_pairs(random.Random(f"{seed}/preference"), n_pref, banned, annotator, tick)
    files, (pre_train, pre_val) = _write(out, docs, convs, pairs, eval_rows, val_frac)

    gold_c, gold_r = [j.gold_chosen for j in judged], [j.gold_rejected for j in judged]
    diffs = [c - r for c, r in zip(gold_c, gold_r) if c != r]
    sample = docs[:: max(1, len(docs) // 1000)]
    summary = {
        "seed": seed,
        "config": {
            "n_stories": n_stories,
            "n_sft": n_sft,
            "n_pref": n_pref,
            "n_eval": n_eval,
            "val_frac": val_frac,
            "absurd_frac": absurd_frac,
            "imperfect_frac": imperfect_frac,
            "annotator_temperature": annotator_temperature,
        },
        "counts": {
            "pretrain_train": len(pre_train),
            "pretrain_val": len(pre_val),
            "sft_conversations": len(convs),
            "sft_turns": len(sft_scores),
            "preference_pairs": len(pairs),
            "eval_prompts": len(eval_rows),
        },
        "files": files,
        "distinct_words": len({w for d in docs for w in d.lower().replace(".", " ").replace(",", " ").split()}),
        "distinct_stories": len(set(docs)),
        "mean_gold": {  # pretrain: on an even sample of up to 1000 documents, scored as free stories
            "pretrain": _mean([score("", d).overall for d in sample]),
            "sft": _mean(sft_scores),
            "preference_chosen": _mean(gold_c),
            "preference_rejected": _mean(gold_r),
        },
        "annotator": {
            "agreement_with_gold": round(sum(d > 0 for d in diffs) / len(diffs), 4) if diffs else None,
            "expected_agreement": round(expected_agreement(diffs, annotator_temperature), 4),
        },
        "eval_kinds": {k: sum(r["kind"] == k for r in eval_rows) for k, _ in KINDS},
        "attributes": list(ATTRIBUTES),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / "summary.json", summary)
    return summary


def _eval_prompts(rng: random.Random, n: int) -> list[dict]:
    """n distinct held-out prompts."""
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        p = fresh_prompt(rng, seen)
        seen.add(p.text)
        rows.append({"prompt": p.text, "messages": [{"role": "user", "content": p.text}], "kind": p.req.kind})
    return rows


def _sft_conversations(rng: random.Random, n: int, banned: set[str], imperfect_frac: float,
                       tick: Callable[[str, int], None]) -> tuple[list[dict], list[float]]:
    """n conversations of 1-3 turns (prompts outside `banned`), and the gold score of every answer."""
    convs, scores = [], []
    for _ in range(n):
        turns = rng.choices((1, 2, 3), (0.8, 0.15, 0.05))[0]
        messages = []
        for _ in range(turns):
            p = fresh_prompt(rng, banned)
            answer = p.answer(rng, sft_style(rng, p.req, imperfect_frac))
            messages += [{"role": "user", "content": p.text}, {"role": "assistant", "content": answer}]
            scores.append(score_request(p.req, answer).overall)
        convs.append({"messages": messages})
        tick("sft", 1)
    return convs, scores


def _preference_pairs(rng: random.Random, n: int, banned: set[str], annotator: Annotator,
                      tick: Callable[[str, int], None]) -> tuple[list[dict], list[Judgement]]:
    """n pairs of two different answers to one prompt, judged by the annotator: the records and the judgements."""
    pairs, judged = [], []
    for _ in range(n):
        p = fresh_prompt(rng, banned)
        a = p.answer(rng, pref_style(rng, p.req))
        b = a
        for _ in range(10):
            b = p.answer(rng, pref_style(rng, p.req))
            if b != a:
                break
        j = annotator.compare(p.text, a, b)
        pairs.append(j.to_record(p.text))
        judged.append(j)
        tick("preference", 1)
    return pairs, judged


def _write(out: Path, docs: list[str], convs: list[dict], pairs: list[dict], eval_rows: list[dict],
           val_frac: float) -> tuple[dict, tuple[list[str], list[str]]]:
    """The world's files (pre-training text, SFT and preference train / val, held-out prompts): -> their sizes by
    path, and the pre-training split."""
    files = {}
    pre_train, pre_val = _split(docs, val_frac)
    for name, part in (("train", pre_train), ("val", pre_val)):
        path = out / "pretrain" / f"{name}.txt"
        atomic_write_text(path, f"\n{EOT}\n".join(part) + "\n" if part else "")
        files[f"pretrain/{name}.txt"] = {"bytes": path.stat().st_size, "rows": len(part)}
    for split, rows in (("sft", convs), ("preference", pairs)):
        for name, part in zip(("train", "val"), _split(rows, val_frac)):
            write_jsonl(out / split / f"{name}.jsonl", part)
            files[f"{split}/{name}.jsonl"] = {"bytes": (out / split / f"{name}.jsonl").stat().st_size,
                                              "rows": len(part)}
    write_jsonl(out / "eval" / "prompts.jsonl", eval_rows)
    files["eval/prompts.jsonl"] = {"bytes": (out / "eval" / "prompts.jsonl").stat().st_size, "rows": len(eval_rows)}
    return files, (pre_train, pre_val)


# ---- loaders for later stages ---------------------------------------------------------------------


def read_documents(path: str | Path) -> list[str]:
    """The documents of a pre-training text file (separated by lines equal to <|endoftext|>)."""
    docs, cur = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.rstrip("\n") == EOT:
                docs.append("".join(cur).strip("\n"))
                cur = []
            else:
                cur.append(line)
    if "".join(cur).strip():
        docs.append("".join(cur).strip("\n"))
    return [d for d in docs if d]


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of any of the world's JSONL files: a "prompt" field, or the first user message."""
    out = []
    for line, row in read_jsonl(path):
        prompt = row.get("prompt")
        if prompt is None and isinstance(row.get("messages"), list):
            prompt = next(
                (m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"), None
            )
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(path, line, "expected a non-empty string prompt (or a user message)", field="prompt")
        out.append(prompt)
    return out


def read_eval_prompts(path: str | Path) -> list[str]:
    """The held-out prompts of eval/prompts.jsonl (each a user message)."""
    out = []
    for line, row in read_jsonl(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(path, line, "expected a non-empty string", field="prompt")
        out.append(prompt)
    return out
