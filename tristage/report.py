"""A pipeline run's report, from its folder alone: report.md (beside its PNGs in report/) and report.html (one
self-contained file, the same PNGs embedded as base64).

    tristage report runs/demo          # also written at the end of every `tristage pipeline` run

What it shows, each read from what the stages wrote (nothing is recomputed, no model is loaded):
  environment        environment.json: hardware, versions, seed, the machine's load when the run started
  stages             .pipeline/NAME.json (time, peak memory) and NAME/metrics.jsonl (tokens, throughput, MFU, last
                     losses) for every stage; each stage's settings as the pipeline file gave them, and all of them
  losses             every training stage's loss and validation loss against the step (losses.png)
  RL                 per PPO / GRPO stage: the rollouts' reward, KL and gold score by step, and the held-out monitor's
                     reward and gold against KL (curves.json) with the over-optimisation point marked: the held-out
                     evaluation with the best gold, when a later one has a higher reward and a gold score lower by
                     more than max(0.01, 2 standard errors) (the rule of the stages' own monitor)
  reward model       validation accuracy on the annotator's labels (metrics.jsonl) and agreement with the gold scorer
                     on held-out pairs (an eval stage's reward_models)
  scores             every evaluated model's mean score on the held-out prompts with its 95% interval (eval stages)
  arena              the leaderboard with its intervals (leaderboard.json / .png), and gold against the board
  answers            the same few prompts answered by every model, side by side
Choices: a report is data about a run, so it is rebuilt from files, never from memory; blocks (heading, paragraph,
table, image, code) are rendered twice by two small functions instead of converting markdown to HTML; model output
is text, escaped in HTML and put in code spans / cells in markdown; plots need matplotlib (the plot extra) and are
left out with a note without it.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

from tristage.flags.report import Config
from tristage.io import UserError, atomic_write_text

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", path, caption) | ("code", text)
TRAINING = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")
RATES = (("tok_per_s", "tokens/s"), ("real_tok_per_s", "tokens/s"), ("pairs_per_s", "pairs/s"),
         ("answers_per_s", "answers/s"))


# ----------------------------------------------------------------------------- reading the run folder
def _json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of an interrupted write
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def stage_rows(run: Path, stages: list[dict[str, Any]]) -> list[list[str]]:
    """One row per stage: name, command, status, time, tokens, throughput, MFU, peak memory, last figures."""
    rows = []
    for s in stages:
        m = _json(run / ".pipeline" / f"{s['name']}.json", {})
        metrics = _jsonl(run / s["name"] / "metrics.jsonl")
        last = {k: v for r in metrics for k, v in r.items()}
        tokens = last.get("tokens")
        rate = next(((k, unit) for k, unit in RATES if any(k in r for r in metrics)), None)
        if rate:
            vals = [r[rate[0]] for r in metrics if rate[0] in r]
            rate_text = f"{sum(vals) / len(vals):,.0f} {rate[1]}" if vals else "-"
        else:
            rate_text = "-"
        mfus = [r["mfu"] for r in metrics if "mfu" in r]
        mem = m.get("peak_rss_mb")
        held = m.get("start_rss_mb")
        mem_text = "-" if mem is None else f"{mem:,.0f} MB" + (f" ({mem - held:+,.0f})" if held is not None else "") \
            + (f", GPU {m['peak_cuda_mb']:,.0f} MB" if m.get("peak_cuda_mb") else "")
        figures = ", ".join(f"{k} {_fmt(last[k])}" for k in ("loss", "val_loss", "val_accuracy", "reward", "kl",
                                                              "eval_gold") if k in last)
        rows.append([s["name"], s["command"], m.get("status", "not run"), _seconds(m.get("seconds")),
                     _fmt(tokens) if tokens is not None else "-", rate_text,
                     f"{sum(mfus) / len(mfus):.1%}" if mfus else "-", mem_text, figures or "-"])
    return rows


def overoptimisation_point(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The held-out evaluation with the best gold score, when a later one has a higher reward and a gold score lower
    by more than max(0.01, 2 standard errors): where more optimisation of the reward stopped paying in gold."""
    best = None
    for h in history:
        if "eval_gold" not in h:
            return None
        if best is None or h["eval_gold"] > best["eval_gold"]:
            best = h
        elif h["eval_reward"] > best["eval_reward"] and \
                best["eval_gold"] - h["eval_gold"] > max(0.01, 2 * h.get("eval_gold_stderr", 0.0)):
            return best
    return None


# ----------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(run: Path, stages: list[dict[str, Any]], path: Path) -> bool:
    plt = _pyplot()
    shown = [(s, _jsonl(run / s["name"] / "metrics.jsonl")) for s in stages if s["command"] in TRAINING]
    shown = [(s, m) for s, m in shown if any("loss" in r for r in m)]
    if plt is None or not shown:
        return False
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (s, metrics) in zip(axes.flat, shown):
        for key, style in (("loss", ".-"), ("val_loss", "o--")):
            pts = [(r["step"], r[key]) for r in metrics if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=4)
        ax.set_title(f"{s['name']} ({s['command']})")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_rl(run: Path, name: str, path: Path) -> dict[str, Any] | None:
    """Rollout reward / KL / gold by step and the held-out reward and gold against KL, the over-optimisation point
    marked. Returns the point (or None); False-y without matplotlib or curves."""
    plt = _pyplot()
    metrics = [r for r in _jsonl(run / name / "metrics.jsonl") if "reward" in r]
    history = _json(run / name / "curves.json", [])
    if plt is None or not (metrics or history):
        return None
    point = overoptimisation_point(history)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = [r["step"] for r in metrics]

    def pair(ax, x, reward, gold, reward_err=None, gold_err=None, fmt="-"):
        """Reward on the left axis, gold on the right one (their scales differ)."""
        ax.errorbar(x, reward, yerr=reward_err, fmt=fmt, capsize=3, color="tab:blue")
        ax.set_ylabel("reward", color="tab:blue")
        if gold is not None:
            right = ax.twinx()
            right.errorbar(x, gold, yerr=gold_err, fmt=fmt, capsize=3, color="tab:orange")
            right.set_ylabel("gold", color="tab:orange")
            return right
        return None

    pair(axes[0], steps, [r["reward"] for r in metrics],
         [r.get("gold", math.nan) for r in metrics] if any("gold" in r for r in metrics) else None)
    axes[0].set_title(f"{name}: rollouts")
    axes[0].set_xlabel("step")
    axes[1].plot(steps, [r["kl"] for r in metrics], color="tab:red")
    axes[1].set_title("KL(policy || reference), nats per answer")
    axes[1].set_xlabel("step")
    ax = axes[2]
    if history:
        kl = [h["eval_kl"] for h in history]
        gold = [h["eval_gold"] for h in history] if "eval_gold" in history[0] else None
        right = pair(ax, kl, [h["eval_reward"] for h in history], gold,
                     [h.get("eval_reward_stderr", 0) for h in history],
                     [h.get("eval_gold_stderr", 0) for h in history], fmt="o-")
        if point is not None and right is not None:
            ax.axvline(point["eval_kl"], color="tab:red", linestyle=":")
            right.annotate(f"over-optimisation after step {int(point['step'])}",
                           (point["eval_kl"], point["eval_gold"]), fontsize=8, color="tab:red")
        ax.set_xlabel("KL(policy || reference), nats per answer")
        ax.set_title("held-out monitor (reward blue, gold orange)")
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return point or {}


def plot_scores(models: dict[str, Any], scorer: str, path: Path) -> bool:
    plt = _pyplot()
    if plt is None or not models:
        return False
    names = list(models)
    mean = [models[n]["mean"] for n in names]
    err = [[m - models[n]["low"] for n, m in zip(names, mean)], [models[n]["high"] - m for n, m in zip(names, mean)]]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.2))
    ax.bar(names, mean, yerr=err, capsize=4, color="tab:blue")
    lo = min(models[n]["low"] for n in names)
    top = [m for m in mean if m > 0.3]
    if top and lo > 0.3:
        ax.set_ylim(max(0, min(top) - 0.1), min(1.0, max(models[n]["high"] for n in names) + 0.02))
    ax.set_ylabel(f"mean {scorer} score (95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- the report's blocks
def build(run: Path, examples: int = 3) -> list[Block]:
    info = _json(run / "pipeline.json")
    if not info:
        raise UserError(f"{run}: not a pipeline run folder (no pipeline.json; `tristage pipeline ... --out {run}` "
                        "writes one)")
    stages = info["stages"]
    env = _json(run / "environment.json", {})
    spec = _load_yaml(run / "pipeline.yaml")
    figs = run / "report"
    figs.mkdir(exist_ok=True)
    blocks: list[Block] = [("h", 1, f"tristage pipeline report: {run.name}")]
    markers = {s["name"]: _json(run / ".pipeline" / f"{s['name']}.json", {}) for s in stages}
    done = sum(m.get("status") == "done" for m in markers.values())
    total = sum(m.get("seconds", 0.0) for m in markers.values())
    blocks.append(("p", f"{info.get('source', '')}: {done} of {len(stages)} stages done, {_seconds(total)} of stage "
                        f"time in all. {spec.get('description', '')}".strip()))

    blocks += environment_blocks(env)
    blocks += stage_blocks(run, stages, figs)
    for s in stages:
        if s["command"] in ("ppo", "grpo"):
            blocks += rl_blocks(run, s, figs)
    evals = [(s["name"], _json(run / s["name"] / "results.json")) for s in stages if s["command"] == "eval"]
    blocks += reward_blocks(run, stages, evals)
    blocks += score_blocks(run, evals, figs)
    for s in stages:
        if s["command"] == "arena":
            blocks += arena_blocks(run, s)
    blocks += answer_blocks(run, evals, examples)
    blocks += settings_blocks(spec)
    return blocks


def environment_blocks(env: dict[str, Any]) -> list[Block]:
    """The machine, versions and seed of the run."""
    blocks: list[Block] = []
    blocks.append(("h", 2, "Environment"))
    blocks.append(("table", ["", ""], [
        ["hardware", f"{env.get('cpu', '-')}, {env.get('cpu_count', '-')} cores ({env.get('threads', '-')} torch "
                     f"threads), {env.get('memory_gb', '-')} GB"
                     + (f"; GPUs: {', '.join(env['gpus'])}" if env.get("gpus") else "; no GPU")],
        ["load average (1, 5, 15 min) at the start / end", " / ".join(
            ", ".join(f"{x:.2f}" for x in env.get(k) or []) or "-" for k in ("load_average", "load_average_end"))],
        ["wall time of the last invocation", _seconds(env.get("seconds"))],
        ["versions", f"tristage {env.get('tristage', '-')}, Python {env.get('python', '-')}, torch "
                     f"{env.get('torch', '-')}"],
        ["platform", env.get("platform", "-")], ["seed", _fmt(env.get("seed"))], ["date", env.get("date", "-")]]))

    return blocks


def stage_blocks(run: Path, stages: list[dict[str, Any]], figs: Path) -> list[Block]:
    """The stage table and the loss curves."""
    blocks: list[Block] = []
    blocks.append(("h", 2, "Stages"))
    blocks.append(("table", ["stage", "command", "status", "time", "tokens", "throughput", "MFU", "peak memory",
                             "last figures"], stage_rows(run, stages)))
    blocks.append(("p", "Time is the stage's wall time (summed over resumed runs). Tokens: every real token the "
                        "stage's models processed (prompts and answers, padding not counted); throughput in the "
                        "stage's own unit, averaged over its log intervals. MFU: the model FLOPs of that work (PaLM's "
                        "6N + 12LHQT per trained token, a third of it per token of generation, scoring and reference "
                        "passes) per second against the hardware's peak (on a CPU, the best measured matmul rate). "
                        "Peak memory: the process's resident set during the stage, and in brackets its growth over "
                        "the stage's start (the stages share one process; what an earlier stage still holds is in "
                        "the first figure only), and CUDA's peak allocation."))
    if plot_losses(run, stages, figs / "losses.png"):
        blocks += [("h", 2, "Losses"), ("img", figs / "losses.png", "training and validation loss by step")]

    return blocks


def rl_blocks(run: Path, s: dict[str, Any], figs: Path) -> list[Block]:
    """One RL stage's held-out curves and its over-optimisation point."""
    blocks: list[Block] = []
    point = plot_rl(run, s["name"], figs / f"rl_{s['name']}.png")
    if point is None:
        return blocks
    blocks.append(("h", 2, f"RL: {s['name']} ({s['command']})"))
    blocks.append(("img", figs / f"rl_{s['name']}.png", f"{s['name']}: reward, KL and gold"))
    history = _json(run / s["name"] / "curves.json", [])
    if history:
        rows = [[str(int(h["step"])), _fmt(h["eval_kl"]), _fmt(h["eval_reward"]), _fmt(h.get("eval_gold"))]
                for h in history]
        blocks.append(("table", ["step", "held-out KL", "held-out reward", "held-out gold"], rows))
    blocks.append(("p", f"Over-optimisation: the held-out reward rose after step {int(point['step'])} while the "
                        "gold score fell (marked)." if point else
                        "No over-optimisation point: the held-out gold score did not fall while the reward rose."
                        if history and "eval_gold" in history[0] else
                        "No gold scorer in the held-out monitor: over-optimisation cannot be seen here."))

    return blocks


def reward_blocks(run: Path, stages: list[dict[str, Any]], evals: list[tuple[str, Any]]) -> list[Block]:
    """Each reward model's accuracy on its labels and agreement with gold."""
    blocks: list[Block] = []
    rm_rows = []
    for s in stages:
        if s["command"] != "reward":
            continue
        val = [r for r in _jsonl(run / s["name"] / "metrics.jsonl") if "val_accuracy" in r]
        agree = next((r["reward_models"][s["name"]] for _, r in evals if r and s["name"] in r.get("reward_models", {})),
                     None)
        rm_rows.append([s["name"], _fmt(val[-1]["val_accuracy"]) if val else "-",
                        f"{agree['reward']:.1%} of {agree['n']}" if agree else "-",
                        f"{agree['annotator']:.1%}" if agree else "-"])
    if rm_rows:
        blocks += [("h", 2, "Reward model"),
                   ("table", ["reward model", "validation accuracy (the labels)", "agrees with gold (held-out pairs)",
                              "the labels agree with gold"], rm_rows),
                   ("p", "Pairs whose two answers have the same gold score are left out of the agreement.")]

    return blocks


def score_blocks(run: Path, evals: list[tuple[str, Any]], figs: Path) -> list[Block]:
    """Every model's mean score on the held-out prompts, with intervals."""
    blocks: list[Block] = []
    for name, r in evals:
        if not r:
            continue
        blocks.append(("h", 2, f"Scores on held-out prompts ({name})"))
        rows = [[m, _fmt(v["mean"]), f"[{v['low']:.3f}, {v['high']:.3f}]", f"{v['stop_rate']:.0%}"]
                for m, v in r["models"].items()]
        blocks.append(("table", ["model", f"mean {r['scorer']} score", "95% interval", "ends its turn"], rows))
        blocks.append(("p", f"{r['n']} held-out prompts ({_relative(r['prompts'], run)}), one answer each "
                            "(greedy unless set otherwise); interval: mean +- 1.96 standard errors over prompts."))
        if plot_scores(r["models"], r["scorer"], figs / f"scores_{name}.png"):
            blocks.append(("img", figs / f"scores_{name}.png", f"mean {r['scorer']} score per model"))

    return blocks


def arena_blocks(run: Path, s: dict[str, Any]) -> list[Block]:
    """An arena stage's board."""
    blocks: list[Block] = []
    summary = _json(run / s["name"] / "summary.json")
    board = _json(run / s["name"] / "leaderboard.json")
    if not summary or not board:
        return blocks
    blocks.append(("h", 2, f"Arena ({s['name']})"))
    gold = summary.get("gold", {})
    rows = [[str(b["rank"]), b["model"], _fmt(b["rating"], 0), f"[{_fmt(b['lower'], 0)}, {_fmt(b['upper'], 0)}]",
             f"{b['wins']}/{b['losses']}/{b['ties']}",
             _fmt(gold[b["model"]]["mean"]) if b["model"] in gold else "-"] for b in board]
    blocks.append(("table", ["rank", "model", "rating", "95% interval", "wins/losses/ties", "mean gold"], rows))
    text = (f"{summary['prompts']} prompts, {summary['battles']} battles, judge {summary['judge']}; Bradley-Terry "
            "ratings (mean 1000) with bootstrap intervals; a rank counts the models whose interval lies wholly "
            "above.")
    if "kendall_tau" in summary:
        text += f" Kendall tau between the ratings and the mean gold scores: {summary['kendall_tau']:.2f}."
    blocks.append(("p", text))
    if (run / s["name"] / "leaderboard.png").is_file():
        blocks.append(("img", run / s["name"] / "leaderboard.png", "arena leaderboard"))

    return blocks


def answer_blocks(run: Path, evals: list[tuple[str, Any]], examples: int) -> list[Block]:
    """A few answers of every model to the same prompts."""
    blocks: list[Block] = []
    for name, r in evals:
        if not r:
            continue
        answers = {m: _jsonl(run / name / "answers" / f"{m}.jsonl") for m in r["models"]}
        n = min([examples] + [len(a) for a in answers.values()])
        if not n:
            continue
        blocks.append(("h", 2, "Answers side by side"))
        for i in range(n):
            prompt = next(iter(answers.values()))[i]["prompt"]
            text = prompt if isinstance(prompt, str) else "\n".join(f"{t['role']}: {t['content']}" for t in prompt)
            blocks.append(("quote", text))
            blocks.append(("table", ["model", "answer", r["scorer"]],
                           [[m, a[i]["answer"], _fmt(a[i]["score"])]
                            for m, a in answers.items()]))

    return blocks


def settings_blocks(spec: dict[str, Any]) -> list[Block]:
    """The pipeline file as given."""
    blocks: list[Block] = []
    blocks.append(("h", 2, "Settings"))
    blocks.append(("p", "Each stage's settings as the pipeline file gave them (pipeline.yaml in the run folder); the "
                        "full resolved settings of every stage are in .pipeline/NAME.json."))
    blocks.append(("code", yaml.safe_dump({k: v for k, v in spec.items() if k != "description"}, sort_keys=False)))
    return blocks


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _relative(path: str, run: Path) -> str:
    return "{run}" + path[len(str(run)):] if path.startswith(str(run)) else path


# ----------------------------------------------------------------------------- rendering
def _md_text(text: str) -> str:
    """Text (model output among it) as literal markdown: HTML and markdown's own characters escaped."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]#|":
        text = text.replace(ch, "\\" + ch)
    return text


def _md_cell(text: str) -> str:
    return _md_text(text).replace("\n", "<br>")


def to_markdown(blocks: list[Block], run: Path) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "quote":
            out.append("\n".join("> " + _md_text(line) for line in b[1].splitlines()))
        elif kind == "table":
            out.append("| " + " | ".join(b[1]) + " |\n|" + "---|" * len(b[1]) + "\n" +
                       "\n".join("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]))
        elif kind == "img":
            out.append(f"![{b[2]}]({Path(b[1]).relative_to(run).as_posix()})")
        elif kind == "code":
            out.append("```yaml\n" + b[1].rstrip() + "\n```")
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;
text-align:left}th{background:#f3f3f3}td.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em}
blockquote{white-space:pre-wrap;border-left:4px solid #ccc;margin:.8em 0;padding:.2em .8em;color:#444}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto}img{max-width:100%}"""


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
           "</head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif kind == "quote":
            out.append(f"<blockquote>{e(b[1])}</blockquote>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            text_cols = {i for i, h in enumerate(b[1]) if h == "answer"}
            body = "".join("<tr>" + "".join(f"<td class='text'>{e(str(c))}</td>" if i in text_cols else
                                            f"<td>{e(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
                           for row in b[2])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            out.append(f"<p><img alt='{e(b[2])}' src='data:image/png;base64,{data}'></p>")
        elif kind == "code":
            out.append(f"<pre>{e(b[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run: str | Path, examples: int = 3) -> tuple[Path, Path]:
    """Write RUN/report.md (its PNGs in RUN/report/) and RUN/report.html (self-contained); returns both paths."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    blocks = build(run, examples)
    md, page = run / "report.md", run / "report.html"
    atomic_write_text(md, to_markdown(blocks, run))
    atomic_write_text(page, to_html(blocks, f"tristage report: {run.name}"))
    return md, page


def main(cfg: Config) -> int:
    md, page = write_report(cfg.run, cfg.examples)
    print(f"report: {page} (self-contained) and {md}")
    return 0
