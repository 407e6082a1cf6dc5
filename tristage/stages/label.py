"""AI feedback: preference pairs from a policy's own samples, labelled without a human in the loop.

    tristage label runs/sft/model --prompts world/eval/prompts.jsonl --judge world --out runs/label/pairs.jsonl
    tristage label runs/sft/model --prompts prompts.jsonl --judge rm:runs/rm/model --num-samples 8 --out pairs.jsonl
    tristage label runs/sft/model --prompts prompts.jsonl --judge python:mypkg.judges:brevity --out pairs.jsonl
    tristage label runs/sft/model --prompts prompts.jsonl --judge llm:path/to/Qwen2.5-0.5B-Instruct --out pairs.jsonl

The algorithm: each prompt is rendered with the policy's chat template (+ generation prompt), repeated
--num-samples (k) times in one engine batch and sampled (tristage.rollout.sample_answers: the rows draw different
random numbers, so they differ; one seeded generator makes the run reproducible), then a judge turns the k answers
into one pair. The output is the preference format tristage/data/preference.py reads (for `tristage reward` /
`tristage dpo`): {"prompt", "chosen", "rejected", "judge": SPEC, "scores": {"chosen": x, "rejected": y}, ...}, the
other keys kept there as meta.

Judges (--judge; tristage/eval/judges.py describes each):
  rm:PATH, gold, python:MODULE:FUNCTION   scalar judges: each answer gets a score.
  llm:PATH                a pairwise judge (a chat model asked which of two answers is better): a round robin over
                          the k answers, every ordered pair asked once and both orders averaged, P(i beats j) =
                          (P_A(i, j) + 1 - P_A(j, i)) / 2, which cancels a position bias; an answer's score is its
                          mean P(beats) against the others (k(k-1) forwards per prompt); "p_chosen" records
                          P(chosen beats rejected).
  world                   the demo world's simulated annotator (a noisy Bradley-Terry human stand-in): it labels
                          pairs, not single answers, so as with a real annotator one pair of distinct samples is
                          drawn per prompt (seeded by --seed and the prompt's index) and the annotator chooses; its
                          ratings and rationale are recorded as in the world's own preference data, "scores" are the
                          gold scores its draw was based on, "p_chosen" the probability it had of choosing as it did.

Choices, and why:
- Scored judges (all but world) pair the highest-scored sample against the lowest-scored one: the widest gap,
  the clearest signal. Ties go to the first sample drawn. Samples are deduplicated and blank ones dropped first
  (the preference reader refuses blank or identical replies); a prompt with fewer than two distinct answers
  ("identical"), or whose distinct answers all score the same ("tied"), is skipped and counted.
- Answers are the decoded samples without the stop token and stripped of surrounding whitespace.
- The summary (printed, and returned by main) gives pairs written, skipped, the judge's mean score of chosen vs
  rejected, and, for world prompts (--gold-report auto: when most prompts parse as a world request, or the
  judge is world/gold), the mean gold score of chosen vs rejected and the share of pairs with a gold gap that
  the judge ordered as gold does (agreement).
- Everything is written at the end, atomically (tristage.io): a crash leaves no half file.
Simplified: one judge per run; no judge ensembles; the policy and the judge are both held in memory.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any

import torch

from tristage.data.records import PromptRow, check_rendering, read_prompt_file
from tristage.eval.judges import (
    AnnotatorJudge,
    GoldJudge,
    Messages,
    PairwiseJudge,
    ScalarJudge,
    make_judge,
    round_robin,
)
from tristage.flags.label import Config
from tristage.io import UserError, check_writable, write_jsonl
from tristage.rollout import load_chat_model, policy_tokenizer, sample_answers
from tristage.runtime import progress, resolve_dtype
from tristage.serve.engine import Engine, SamplingParams
from tristage.world import score
from tristage.world.prompts import parse_prompt


# ----------------------------------------------------------------------------- picking a pair
def best_vs_worst(judge: ScalarJudge | PairwiseJudge, prompts: Sequence[Messages],
                  candidates: Sequence[list[str]]) -> list[tuple[dict[str, Any] | None, list[float]]]:
    """(record fields or None where all scores tie, every candidate's score) per prompt: its highest-scored
    candidate chosen, its lowest rejected. A pairwise judge scores a candidate by its mean P(beats) in a round robin."""
    if not prompts:
        return []
    if isinstance(judge, ScalarJudge):
        scores, beats = judge.scores(prompts, candidates), None
    else:
        beats = round_robin(judge, prompts, candidates)
        scores = [(b.sum(1) / max(b.shape[0] - 1, 1)).tolist() for b in beats]
    out: list[tuple[dict[str, Any] | None, list[float]]] = []
    for n, (cs, s) in enumerate(zip(candidates, scores)):
        hi = max(range(len(s)), key=s.__getitem__)
        lo = min(range(len(s)), key=s.__getitem__)
        if s[hi] == s[lo]:
            out.append((None, s))
            continue
        pick = {"chosen": cs[hi], "rejected": cs[lo], "judge": judge.spec,
                "scores": {"chosen": s[hi], "rejected": s[lo]}}
        if beats is not None:
            pick["p_chosen"] = float(beats[n][hi, lo])
        out.append((pick, s))
    return out


def annotated_pair(judge: AnnotatorJudge, prompt: Messages, candidates: list[str], key: str) -> dict[str, Any]:
    """Record fields for one pair of distinct candidates drawn (seeded by `key`) and labelled by the annotator."""
    a, b = random.Random(key).sample(candidates, 2)
    j = judge.judgement(prompt, a, b)
    return {"chosen": j.chosen, "rejected": j.rejected, "judge": judge.spec,
            "scores": {"chosen": j.gold_chosen, "rejected": j.gold_rejected}, "ratings": j.ratings,
            "rationale": j.rationale, "p_chosen": j.p_a if j.a_preferred else 1.0 - j.p_a}


# ----------------------------------------------------------------------------- the command
def main(cfg: Config) -> dict[str, Any]:
    if cfg.num_samples < 2:
        raise UserError("--num-samples must be >= 2 (a pair needs two answers)")
    if cfg.batch_size < 1 or cfg.judge_batch_size < 1 or cfg.max_new_tokens < 1:
        raise UserError("--batch-size, --judge-batch-size and --max-new-tokens must be >= 1")
    check_writable(cfg.out, flag="--out")  # before minutes of sampling, not after
    rows = read_prompt_file(cfg.prompts)[:cfg.limit]
    if not rows:
        raise UserError(f"{cfg.prompts}: no prompts")
    tokenizer = policy_tokenizer(cfg.model)
    if not tokenizer.chat_template:
        raise UserError(f"{cfg.model}: the tokenizer has no chat_template (a chat model is needed)")
    check_rendering(tokenizer, rows, cfg.prompts)
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    policy = load_chat_model(cfg.model, device, dtype, tokenizer=tokenizer)
    judge = make_judge(cfg.judge, device=device, dtype=dtype, batch_size=cfg.judge_batch_size,
                       max_len=cfg.max_len, annotator_temperature=cfg.annotator_temperature, seed=cfg.seed)
    engine = Engine(policy.model)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, stop_ids=policy.stop_ids)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    k = cfg.num_samples

    records: list[dict[str, Any]] = []
    texts: list[str] = []  # the user text of each record's prompt (for the gold report)
    skipped = {"identical": 0, "tied": 0}
    distinct_counts: list[int] = []
    with progress(cfg.progress) as bar:
        task = bar.add_task("label", total=len(rows), info="")
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            rollouts = sample_answers(engine, policy.tokenizer, [r.messages for r in chunk], k, params, generator)
            samples = [[r.text.strip() for r in rs] for rs in rollouts]
            cands = [list(dict.fromkeys(s for s in ss if s)) for ss in samples]  # distinct, non-blank
            distinct_counts += [len(set(ss)) for ss in samples]
            live = [i for i, c in enumerate(cands) if len(c) >= 2]
            skipped["identical"] += len(chunk) - len(live)
            if isinstance(judge, AnnotatorJudge):
                picks = [(annotated_pair(judge, chunk[i].messages, cands[i], f"{cfg.seed}/{start + i}"), None)
                         for i in live]
            else:
                picks = best_vs_worst(judge, [chunk[i].messages for i in live], [cands[i] for i in live])
            for i, (pick, scores) in zip(live, picks):
                if pick is None:
                    skipped["tied"] += 1
                    continue
                rec = {"prompt": chunk[i].prompt, **pick}
                if cfg.save_samples:
                    rec["samples"] = samples[i]
                    if scores is not None:
                        rec["sample_scores"] = dict(zip(cands[i], scores))
                records.append(rec)
                texts.append(chunk[i].text)
            bar.update(task, advance=len(chunk), info=f"{len(records)} pairs")

    summary = summarize(cfg, judge, rows, records, texts, skipped, distinct_counts)
    write_jsonl(cfg.out, records)
    summary["out"] = cfg.out
    print_summary(summary, k)
    return summary


# ----------------------------------------------------------------------------- the summary
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summarize(cfg: Config, judge: ScalarJudge | PairwiseJudge, rows: list[PromptRow], records: list[dict[str, Any]],
              texts: list[str], skipped: dict[str, int], distinct_counts: list[int]) -> dict[str, Any]:
    """Counts and the judge's mean scores of chosen vs rejected; with the gold report, the gold scorer's too."""
    summary: dict[str, Any] = {
        "prompts": len(rows), "samples": len(rows) * cfg.num_samples, "pairs": len(records), "skipped": skipped,
        "judge": cfg.judge, "mean_distinct_samples": sum(distinct_counts) / len(distinct_counts),
        "judge_chosen": _mean([r["scores"]["chosen"] for r in records]),
        "judge_rejected": _mean([r["scores"]["rejected"] for r in records]),
    }
    if "truncated" in judge.stats:
        summary["judge_truncated"] = judge.stats["truncated"]
    gold_on = cfg.gold_report == "on"
    if cfg.gold_report == "auto":
        world_like = sum(parse_prompt(r.text).kind != "free" for r in rows)
        gold_on = isinstance(judge, (AnnotatorJudge, GoldJudge)) or world_like * 2 >= len(rows)
    if gold_on:
        gc = [score(t, r["chosen"]).overall for t, r in zip(texts, records)]
        gr = [score(t, r["rejected"]).overall for t, r in zip(texts, records)]
        gaps = [c - r for c, r in zip(gc, gr) if c != r]
        summary.update(gold_chosen=_mean(gc), gold_rejected=_mean(gr),
                       gold_agreement=_mean([float(g > 0) for g in gaps]), gold_ties=len(records) - len(gaps))
    return summary


def print_summary(summary: dict[str, Any], k: int) -> None:
    s, skipped = summary, summary["skipped"]
    print(f"label: {s['pairs']} pairs written to {s['out']} from {s['prompts']} prompts x {k} samples "
          f"(judge {s['judge']}); skipped {skipped['identical']} with fewer than 2 distinct answers, "
          f"{skipped['tied']} with all answers scored equal; {s['mean_distinct_samples']:.2f} distinct "
          f"answers per prompt on average")
    print(f"label: judge score chosen {_fmt(s['judge_chosen'])} vs rejected {_fmt(s['judge_rejected'])}"
          + (f"; {s['judge_truncated']} judge inputs truncated" if s.get("judge_truncated") else ""))
    if "gold_chosen" in s:
        print(f"label: gold score chosen {_fmt(s['gold_chosen'])} vs rejected {_fmt(s['gold_rejected'])}; judge "
              f"agrees with gold on {_fmt(s['gold_agreement'])} of {s['pairs'] - s['gold_ties']} pairs with a gold "
              f"gap ({s['gold_ties']} gold ties)")
    sys.stdout.flush()
