"""An automatic arena: several models answer a prompt set, a judge decides every pair of answers, a leaderboard ranks
the models.

    tristage arena runs/demo/base/model runs/demo/sft/model runs/demo/dpo/model \\
        --prompts data/world/eval/prompts.jsonl --judge world --out runs/arena --limit 100
    tristage arena sft=runs/sft/model dpo=runs/dpo/model --prompts p.jsonl --judge rm:runs/rm/model --out runs/arena
    tristage arena a=answers_a.jsonl b=answers_b.jsonl --prompts p.jsonl --judge llm:path/to/judge \\
        --judge-prompt shared/data/arena/mt_bench/judge_prompts.jsonl:pair-v2 --out runs/arena2

The algorithm:
1. Answers. Each model folder answers every prompt --samples times (default once) through the shared engine
   (tristage.rollout.sample_answers: its chat template + generation prompt, its stop ids), --batch-size prompts at a
   time; each answer is drawn from its own generator seeded by (--seed, its slot), so it does not depend on the
   other prompts of its batch, and every model draws with the same seeds (common random numbers). A
   file of answers already generated ({prompt | messages, answer | response} records, matched to the prompts by
   their messages; the arena's own answers/NAME.jsonl are such files) is read instead. Answers are stripped.
2. Battles. Every prompt x every pair of models is one battle, and which model is shown as A is drawn per battle
   (seeded by --seed, the prompt and the pair). Two identical answers are a tie, without asking the judge.
     scalar judges (rm:, gold, python:)  each answer is scored once; the higher score wins, equal scores tie.
     llm:PATH                 asked in both orders (a model judge has a position bias): each order's verdict is the
                              answer it gives P > 1/2; verdicts that agree win, verdicts that disagree are a tie
                              (MT-bench's rule for inconsistent verdicts); both probabilities are recorded.
     world                    the demo world's simulated annotator draws its choice once (it has no position
                              bias); its probability and both gold scores are recorded.
   A battle is a Chatbot Arena-shaped record {question_id, model_a, model_b, winner, judge, style_a, style_b, ...}
   (style_*: length and markdown counts of each answer, for --style-control), so `tristage leaderboard` reads
   battles.jsonl as it is.
3. The leaderboard (tristage/eval/arena.py has the method): Bradley-Terry ratings with --bootstrap intervals over
   the battles between the models of this command, printed, and written as leaderboard.json, leaderboard.png and
   matrices.json (battle counts, win fractions, predicted win rates). With the gold report (the demo world), each
   model's mean gold score over its answers (95% interval), Kendall's tau between the ratings and those means, and
   for every pair of models the paired gold difference with its interval: the board is checked on the pairs that
   gold itself orders on these answers (a gap inside the noise is no test of the board).
   summary.json holds it all.

Resuming: --out keeps arena.json (the settings), answers/NAME.jsonl and battles.jsonl, appended a batch at a time
and flushed to disk. The same command again skips what is there (answers batch by batch, battles one by one; the
torn last line of an interrupted write is dropped): an interrupted run continues, a finished one only redraws the
board. A model added to the command joins the run (only its answers and battles are computed); other prompts,
sampling settings or judge are refused (--overwrite starts over), as is a name bound to another path.
--samples K: prompt i has K answer slots i*K .. i*K + K-1 (the question_id of answers and battles), each drawn with
its own seed; the battles pair slot by slot, so K multiplies the battles per prompt. Differences of a few thousandths
of gold need thousands of battles per pair; more prompts are better than more samples, but a prompt set is finite.
Simplified: the models are loaded one at a time, the judge alongside.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from tristage.data.records import PromptRow, check_rendering, read_prompt_file, record_prompt
from tristage.eval.arena import Battles, kendall_tau, leaderboard, parse_anchor, style_features
from tristage.eval.judges import AnnotatorJudge, GoldJudge, Messages, PairwiseJudge, ScalarJudge, make_judge
from tristage.eval.leaderboard import print_board, write_outputs
from tristage.eval.world import mean_ci95
from tristage.flags.arena import Config
from tristage.io import DataError, UserError, check_writable, read_jsonl, write_json, write_jsonl
from tristage.rollout import folder_config, load_chat_model, policy_tokenizer, sample_answers
from tristage.runtime import progress, resolve_dtype
from tristage.serve.engine import Engine, SamplingParams
from tristage.world import score
from tristage.world.prompts import parse_prompt

ANSWER_KEYS = ("answer", "response", "output")
OUR_FILES = ("arena.json", "answers", "battles.jsonl", "leaderboard.json", "leaderboard.png", "matrices.json",
             "summary.json")


# ----------------------------------------------------------------------------- entrants and settings
@dataclass
class Entrant:
    name: str
    path: Path
    kind: str  # "model": a folder that answers; "answers": a file of answers already generated


def parse_entrants(specs: Sequence[str]) -> list[Entrant]:
    """MODEL arguments -> entrants: `PATH` or `NAME=PATH`, a model folder or a file of answers."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = "", spec
        p = Path(path).resolve()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise UserError(f"MODELS: {path} is a folder but not a model folder (no config.json)")
            kind, default = "model", p.parent.name if p.name == "model" else p.name
        elif p.is_file():
            kind, default = "answers", p.name.split(".")[0]
        else:
            raise UserError(f"MODELS: {path}: no such model folder or file of answers")
        name = name or default
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"MODELS: {spec}: {name!r} cannot name a model (it names a file); use NAME=PATH")
        out.append(Entrant(name, p, kind))
    names = [e.name for e in out]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(f"MODELS: two models named {dup[0]!r}: name them apart with NAME=PATH")
    if len(out) < 2:
        raise UserError(f"MODELS: an arena needs at least two models (got {len(out)})")
    return out


def _key(messages: Messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def run_settings(cfg: Config, rows: Sequence[PromptRow]) -> dict[str, Any]:
    """What answers and battles depend on: a rerun must match it to resume."""
    sha = hashlib.sha256("\n".join(_key(r.messages) for r in rows).encode()).hexdigest()
    return {"prompts": {"count": len(rows), "sha256": sha},
            "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                         "top_k": cfg.top_k, "seed": cfg.seed, "samples": cfg.samples},
            "judge": {"spec": cfg.judge, "judge_prompt": cfg.judge_prompt, "max_len": cfg.max_len,
                      "annotator_temperature": cfg.annotator_temperature}}


def open_run(cfg: Config, rows: Sequence[PromptRow], entrants: Sequence[Entrant]) -> Path:
    """--out ready for this run: a new folder, or the same run's to resume (its arena.json checked and updated)."""
    out = Path(cfg.out)
    new = run_settings(cfg, rows)
    state = out / "arena.json"
    if cfg.overwrite:
        for name in OUR_FILES:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            elif (out / name).exists():
                (out / name).unlink()
    models: dict[str, Any] = {}
    if state.exists():
        try:
            old = json.loads(state.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{state}: damaged (not JSON); --overwrite starts over") from None
        for part in ("prompts", "sampling", "judge"):
            for k, v in new[part].items():
                was = old.get(part, {}).get(k, 1 if k == "samples" else None)  # runs from before --samples: 1
                if was == v:
                    continue
                what = (f"another {part} setting, {k} {was!r} (now {v!r})" if part != "prompts" else
                        f"other prompts ({was} prompts, now {v})" if k == "count" else
                        "other prompts (as many, other text)")
                raise UserError(f"--out {out} holds an arena run with {what}: rerun it as it was to resume, or "
                                "--overwrite to start over")
        models = old.get("models", {})
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: a folder with other files and no arena run (arena.json); use another folder")
    for e in entrants:
        was = models.get(e.name)
        if was is not None and (was["path"], was["kind"]) != (str(e.path), e.kind):
            raise UserError(f"--out {out}: {e.name!r} was {was['path']} in this run, now {e.path}; name it apart "
                            "with NAME=PATH, or --overwrite to start over")
        models[e.name] = {"path": str(e.path), "kind": e.kind}
    write_json(state, {**new, "prompts_file": cfg.prompts, "models": models})
    return out


# ----------------------------------------------------------------------------- our append-only files
def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one of the run's JSONL files; a torn last line (a write cut short) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines):  # the last line, without its newline
                break
            raise DataError(path, i, "invalid JSON: the file is damaged (--overwrite starts over)") from None
    return rows


def _ends_clean(path: Path) -> bool:
    """No file, an empty one, or one whose last line was written whole."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows and flush them to disk (an interruption loses at most the line being written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- answers
def answer_seed(seed: int, index: int) -> int:
    """The seed of the answer to prompt `index` (the same for every model: common random numbers)."""
    return seed * 1_000_003 + index


def check_prompts(e: Entrant, rows: Sequence[PromptRow], prompts_file: str) -> None:
    """A model's tokenizer renders every prompt, and each leaves room to answer in its context."""
    tok = policy_tokenizer(e.path)
    if not tok.chat_template:
        raise UserError(f"{e.path}: the tokenizer has no chat_template (a chat model is needed)")
    check_rendering(tok, rows, prompts_file)
    ctx = folder_config(e.path).get("max_position_embeddings")
    for r in rows:
        n = len(tok.apply_chat_template(r.messages, add_generation_prompt=True))
        if ctx is not None and n >= ctx:
            raise DataError(prompts_file, r.line, f"the prompt is {n} tokens, with no room to answer in {e.name}'s "
                                                  f"context of {ctx}")


def generate_answers(e: Entrant, cfg: Config, rows: Sequence[PromptRow], out: Path, device: torch.device,
                     dtype: torch.dtype, bar: Any) -> dict[str, int]:
    """answers/NAME.jsonl complete for model folder `e`: the batches missing are generated and appended."""
    path = out / "answers" / f"{e.name}.jsonl"
    raw = read_rows(path)
    have = {r["question_id"]: r for r in raw}
    n, size = len(rows), cfg.batch_size
    batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    todo = [c for c in batches if not all(i in have for i in c)]
    kept = [have[i] for c in batches if c not in todo for i in c]
    if len(kept) != len(raw) or not _ends_clean(path):
        write_jsonl(path, kept)  # drop a torn line and the rows of an unfinished batch: it is drawn again whole
    task = bar.add_task(f"answers {e.name}", total=n, completed=len(kept), info="")
    if todo:
        chat = load_chat_model(e.path, device, dtype)
        engine = Engine(chat.model)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=cfg.top_p, stop_ids=chat.stop_ids)
        for c in todo:
            gens = [torch.Generator(device).manual_seed(answer_seed(cfg.seed, i)) for i in c]
            outs = sample_answers(engine, chat.tokenizer, [rows[i].messages for i in c], 1, params, gens)
            append_rows(path, [{"question_id": i, "prompt": rows[i].prompt, "answer": r.text.strip(),
                                "finish_reason": r.finish_reason, "tokens": len(r.tokens)}
                               for i, (r,) in zip(c, outs)])
            bar.update(task, advance=len(c))
        del chat, engine
    return {"generated": sum(len(c) for c in todo), "kept": len(kept)}


def file_answers(e: Entrant, rows: Sequence[PromptRow], prompts_file: str, samples: int = 1) -> list[str]:
    """The answers of a file ({prompt | messages, answer | response | output}) to each prompt, matched by its
    messages (a messages list is cut after its last user turn, as prompt files are read); with `samples` K, the
    first K answers to each prompt in file order, as slots i*K .. i*K + K-1."""
    found: dict[str, list[str]] = {}
    for line, obj in read_jsonl(e.path):
        try:
            _, messages = record_prompt(obj)
            field = next((k for k in ANSWER_KEYS if k in obj), "answer")
            if not isinstance(obj.get(field), str):
                raise DataError(None, None, f"expected the answer as a string, got {type(obj.get(field)).__name__}",
                                field)
        except DataError as err:
            raise err.at(e.path, line) from None
        found.setdefault(_key(messages), []).append(obj[field].strip())
    answers = []
    for r in rows:
        have = found.get(_key(r.messages), [])
        if len(have) < samples:
            raise UserError(f"{e.path}: {'no answer' if not have else f'{len(have)} answer(s)'} to the prompt at "
                            f"{prompts_file}:{r.line}" + (f"; --samples {samples} needs {samples}" if have else ""))
        answers.extend(have[:samples])
    return answers


# ----------------------------------------------------------------------------- battles
def battle_plan(names: Sequence[str], n: int, seed: int) -> list[tuple[int, str, str]]:
    """(prompt index, model_a, model_b) for every prompt x pair of models, sides drawn per battle (seeded)."""
    plan = []
    for i in range(n):
        for x, y in combinations(sorted(names), 2):
            swap = random.Random(f"{seed}/{i}/{x}/{y}").random() < 0.5
            plan.append((i, y, x) if swap else (i, x, y))
    return plan


def _verdict(p_first: float) -> int:
    """+1: the answer shown first is better; -1: the second; 0: even."""
    return 1 if p_first > 0.5 else -1 if p_first < 0.5 else 0


def judge_battles(judge: ScalarJudge | PairwiseJudge, todo: Sequence[tuple[int, str, str]],
                  rows: Sequence[PromptRow], answers: dict[str, list[str]],
                  cache: dict[tuple[int, str], float]) -> list[dict[str, Any]]:
    """Battle records for `todo` (see the module docstring); `cache` keeps a scalar judge's scores."""
    recs = []
    for i, a, b in todo:
        x, y = answers[a][i], answers[b][i]
        recs.append({"question_id": i, "model_a": a, "model_b": b, "winner": "tie", "judge": judge.spec,
                     "style_a": style_features(x), "style_b": style_features(y)})
        if x == y:
            recs[-1]["identical"] = True
    live = [(r, t) for r, t in zip(recs, todo) if not r.get("identical")]
    if isinstance(judge, ScalarJudge):
        need = sorted({(i, m) for _, (i, a, b) in live for m in (a, b)} - set(cache))
        by_prompt: dict[int, list[str]] = {}
        for i, m in need:
            by_prompt.setdefault(i, []).append(m)
        idx = sorted(by_prompt)
        scores = judge.scores([rows[i].messages for i in idx], [[answers[m][i] for m in by_prompt[i]] for i in idx])
        for i, s in zip(idx, scores):
            cache.update({(i, m): float(v) for m, v in zip(by_prompt[i], s)})
        for r, (i, a, b) in live:
            sa, sb = cache[(i, a)], cache[(i, b)]
            r.update(winner="model_a" if sa > sb else "model_b" if sb > sa else "tie", score_a=sa, score_b=sb)
    elif isinstance(judge, AnnotatorJudge):
        for r, (i, a, b) in live:
            j = judge.judgement(rows[i].messages, answers[a][i], answers[b][i])
            ga, gb = (j.gold_chosen, j.gold_rejected) if j.a_preferred else (j.gold_rejected, j.gold_chosen)
            r.update(winner="model_a" if j.a_preferred else "model_b", p_a=j.p_a, gold_a=ga, gold_b=gb)
    else:  # a model judge: both orders
        msgs = [rows[i].messages for _, (i, _, _) in live]
        xs, ys = [answers[a][i] for _, (i, a, _) in live], [answers[b][i] for _, (i, _, b) in live]
        p = judge.compare(msgs + msgs, xs + ys, ys + xs)
        for k, (r, _) in enumerate(live):
            first, second = p[k], p[len(live) + k]
            v = (_verdict(first), -_verdict(second))  # +1 = model_a better, in each order
            r.update(winner={1: "model_a", -1: "model_b"}.get(v[0], "tie") if v[0] == v[1] else "tie",
                     p_a_first=first, p_b_first=second)
            if v[0] != v[1]:
                r["inconsistent"] = True
    return recs


def gold_pairs(models: Sequence[str], ratings: Sequence[float], gold: dict[str, list[float]]) -> list[dict[str, Any]]:
    """For every pair of models (the better-rated first): the paired mean gold difference over the same answer slots
    with its 95% interval, whether that interval excludes 0 (gold resolves the pair on these answers), and whether
    the board orders the pair as the gold means do."""
    out = []
    for (a, ra), (b, rb) in combinations(sorted(zip(models, ratings), key=lambda t: -t[1]), 2):
        d, lo, hi = mean_ci95([x - y for x, y in zip(gold[a], gold[b])])
        out.append({"model_a": a, "model_b": b, "rating_diff": ra - rb, "gold_diff": d, "low": lo, "high": hi,
                    "gold_resolved": lo > 0 or hi < 0, "agree": (d > 0) == (ra > rb) and d != 0})
    return out


# ----------------------------------------------------------------------------- the command
def main(cfg: Config) -> dict[str, Any]:
    entrants = parse_entrants(cfg.models)
    check_writable(cfg.out, folder=True, flag="--out")
    anchor = parse_anchor(cfg.anchor) if cfg.anchor else None
    if anchor is not None and anchor[0] not in {e.name for e in entrants}:
        raise UserError(f"--anchor {anchor[0]}: no such model among {', '.join(e.name for e in entrants)}")
    prompts = read_prompt_file(cfg.prompts)[:cfg.limit]
    rows = [r for r in prompts for _ in range(cfg.samples)]  # slot i*K + j: sample j of prompt i
    out = open_run(cfg, rows, entrants)
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    answers: dict[str, list[str]] = {}
    for e in entrants:  # every file and model checked before minutes of generation
        if e.kind == "answers":
            answers[e.name] = file_answers(e, prompts, cfg.prompts, cfg.samples)
        else:
            check_prompts(e, prompts, cfg.prompts)
    judge = make_judge(cfg.judge, device=device, dtype=dtype, batch_size=cfg.judge_batch_size, max_len=cfg.max_len,
                       annotator_temperature=cfg.annotator_temperature, seed=cfg.seed, judge_prompt=cfg.judge_prompt)
    counts: dict[str, Any] = {"answers": {}}
    battles_path = out / "battles.jsonl"
    with progress(cfg.progress) as bar:
        for e in entrants:
            if e.kind == "model":
                counts["answers"][e.name] = generate_answers(e, cfg, rows, out, device, dtype, bar)
                answers[e.name] = [r["answer"] for r in sorted(read_rows(out / "answers" / f"{e.name}.jsonl"),
                                                               key=lambda r: r["question_id"])]
        have = read_rows(battles_path)
        if not _ends_clean(battles_path):
            write_jsonl(battles_path, have)  # drop the torn last line of an interrupted write
        done = {(r["question_id"], frozenset((r["model_a"], r["model_b"]))) for r in have}
        plan = battle_plan([e.name for e in entrants], len(rows), cfg.seed)
        todo = [t for t in plan if (t[0], frozenset(t[1:])) not in done]
        task = bar.add_task("battles", total=len(plan), completed=len(plan) - len(todo), info="")
        cache: dict[tuple[int, str], float] = {}
        step = 4 * cfg.judge_batch_size
        for s in range(0, len(todo), step):
            append_rows(battles_path, judge_battles(judge, todo[s:s + step], rows, answers, cache))
            bar.update(task, advance=len(todo[s:s + step]))
    counts.update(battles_judged=len(todo), battles_kept=len(plan) - len(todo))
    return finish(cfg, out, rows, entrants, answers, judge, anchor, counts)


def finish(cfg: Config, out: Path, rows: Sequence[PromptRow], entrants: Sequence[Entrant],
           answers: dict[str, list[str]], judge: ScalarJudge | PairwiseJudge, anchor: tuple[str, float] | None,
           counts: dict[str, Any]) -> dict[str, Any]:
    """The board of this run's battles (printed, JSON, PNG, matrices), the gold report and summary.json."""
    names = {e.name for e in entrants}
    recs = [r for r in read_rows(out / "battles.jsonl")
            if r["model_a"] in names and r["model_b"] in names and r["question_id"] < len(rows)]
    battles = Battles.from_lists([r["model_a"] for r in recs], [r["model_b"] for r in recs],
                                 [r["winner"] for r in recs], [r["style_a"] for r in recs],
                                 [r["style_b"] for r in recs])
    board = leaderboard(battles, bootstrap=cfg.bootstrap, seed=cfg.seed, anchor=anchor,
                        style=[] if cfg.style_control else None)
    title = f"arena: {len(rows)} prompts, {len(recs)} battles, judge {cfg.judge}"
    print_board(board, title=title)
    wrote = write_outputs(board, battles, out / "leaderboard.json", out / "leaderboard.png", out / "matrices.json",
                          title)
    summary: dict[str, Any] = {
        "prompts": len(rows), "models": [e.name for e in entrants], "judge": cfg.judge, "battles": len(recs),
        "ties": sum(r["winner"].startswith("tie") for r in recs),
        "identical": sum(bool(r.get("identical")) for r in recs),
        "inconsistent": sum(bool(r.get("inconsistent")) for r in recs), **counts,
        "board": board.rows(), "style": dict(zip(board.style, board.style_coef.tolist())), "notes": board.notes}
    if "truncated" in judge.stats:
        summary["judge_truncated"] = judge.stats["truncated"]
    gold_on = cfg.gold_report == "on" or (cfg.gold_report == "auto" and (
        isinstance(judge, (AnnotatorJudge, GoldJudge)) or 2 * sum(parse_prompt(r.text).kind != "free" for r in rows)
        >= len(rows)))
    if gold_on:
        each = {m: [score(r.text, answers[m][i]).overall for i, r in enumerate(rows)] for m in board.models}
        gold = {m: mean_ci95(g) for m, g in each.items()}
        summary["gold"] = {m: {"mean": g[0], "low": g[1], "high": g[2]} for m, g in gold.items()}
        summary["kendall_tau"] = kendall_tau(board.rating, [gold[m][0] for m in board.models])
        summary["gold_pairs"] = pairs = gold_pairs(board.models, board.rating.tolist(), each)
        for m in board.models:
            print(f"arena: gold {m}: {gold[m][0]:.4f} [{gold[m][1]:.4f}, {gold[m][2]:.4f}]")
        print(f"arena: Kendall tau between the ratings and the mean gold scores: {summary['kendall_tau']:.3f}")
        resolved = [p for p in pairs if p["gold_resolved"]]
        print(f"arena: the board orders {sum(p['agree'] for p in resolved)} of the {len(resolved)} model pairs whose "
              f"gold means differ (paired 95% interval excluding 0) as gold does; {len(pairs) - len(resolved)} "
              "pair(s) gold itself cannot order on these answers")
    write_json(out / "summary.json", summary)
    print(f"arena: {counts['battles_judged']} battles judged now, {counts['battles_kept']} kept from before; "
          f"{summary['ties']} ties ({summary['identical']} identical answers"
          + (f", {summary['inconsistent']} inconsistent verdicts" if summary["inconsistent"] else "") + "); wrote "
          + ", ".join(wrote + [f"summary {out / 'summary.json'}"]))
    return summary
