"""`tristage world generate` and `tristage world score`: the demo world's data, and its gold scorer on a file.

generate: writes pre-training text, SFT conversations, preference pairs and held-out eval prompts under
  --out (see tristage/world/data.py for the layout), prints a summary and writes it to summary.json.
score: reads a JSONL of {"prompt", "response"} (or {"messages", "response"}, or {"messages"} ending with
  the assistant's turn), writes each row with its gold score to --out (if given) and prints the means.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tristage.flags.world import GenerateConfig, ScoreConfig
from tristage.io import DataError, read_jsonl, write_jsonl
from tristage.world.data import generate
from tristage.world.gold import ATTRIBUTES, score


def generate_main(cfg: GenerateConfig) -> int:
    for name in ("n_stories", "n_sft", "n_pref", "n_eval"):
        if getattr(cfg, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("val_frac", "absurd_frac", "imperfect_frac"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1]")
    kw = {
        k: getattr(cfg, k)
        for k in (
            "seed",
            "n_stories",
            "n_sft",
            "n_pref",
            "n_eval",
            "val_frac",
            "absurd_frac",
            "imperfect_frac",
            "annotator_temperature",
        )
    }
    if cfg.quiet:
        summary = generate(cfg.out, **kw)
    else:
        total = cfg.n_eval + cfg.n_stories + cfg.n_sft + cfg.n_pref
        with Progress(transient=True) as bar:
            task = bar.add_task("generating the world", total=total)
            summary = generate(
                cfg.out, **kw, progress=lambda name, n: bar.update(task, advance=n, description=f"writing {name}")
            )
        _print_summary(cfg.out, summary)
    return 0


def _print_summary(out: Path, s: dict) -> None:
    t = Table(title=f"demo world (seed {s['seed']}) -> {out}")
    for col in ("file", "size", "rows"):
        t.add_column(col)
    for f, info in s["files"].items():
        size = info["bytes"]
        t.add_row(f, f"{size / 1e6:.2f} MB" if size > 1e5 else f"{size / 1e3:.1f} kB", str(info["rows"]))
    c = Console()
    c.print(t)
    g, a = s["mean_gold"], s["annotator"]
    c.print(
        f"mean gold score: pretrain {g['pretrain']}, sft {g['sft']}, preference chosen "
        f"{g['preference_chosen']} / rejected {g['preference_rejected']}"
    )
    c.print(
        f"annotator agreement with gold {a['agreement_with_gold']} (expected {a['expected_agreement']}); "
        f"{s['distinct_stories']} distinct stories, {s['distinct_words']} distinct words; {s['seconds']} s"
    )


def _prompt_response(path: Path, line: int, row: dict) -> tuple[str, str]:
    response = row.get("response")
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise DataError(path, line, "expected a string", field="prompt")
    elif "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise DataError(path, line, "expected a list of {role, content}", field="messages")
        if response is None and msgs and msgs[-1].get("role") == "assistant":
            response, msgs = msgs[-1]["content"], msgs[:-1]
        users = [m["content"] for m in msgs if m.get("role") == "user"]
        if not users:
            raise DataError(path, line, "no user message", field="messages")
        prompt = users[-1]
    else:
        raise DataError(path, line, "expected a 'prompt' or 'messages' field")
    if not isinstance(response, str):
        raise DataError(path, line, "expected a string", field="response")
    return prompt, response


def score_main(cfg: ScoreConfig) -> int:
    # a bad file (missing, empty, not UTF-8, a bad line) raises a located DataError: the CLI prints it, exit 2
    rows = []
    for line, row in read_jsonl(cfg.file):
        prompt, response = _prompt_response(cfg.file, line, row)
        rows.append({"prompt": prompt, "response": response, "score": score(prompt, response).to_dict()})
    if cfg.out is not None:
        write_jsonl(cfg.out, rows)
    means = {a: sum(r["score"]["attributes"][a] for r in rows) / max(1, len(rows)) for a in ATTRIBUTES}
    overall = sum(r["score"]["overall"] for r in rows) / max(1, len(rows))
    if cfg.quiet:
        return 0

    t = Table(title=f"gold scores of {cfg.file} ({len(rows)} rows)")
    t.add_column("attribute")
    t.add_column("mean", justify="right")
    t.add_row("overall", f"{overall:.3f}")
    for a, v in means.items():
        t.add_row(a, f"{v:.3f}")
    Console().print(t)
    return 0
