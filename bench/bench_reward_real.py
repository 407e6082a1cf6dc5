"""Reward models on real human preference data (hh-rlhf, long-form QA, PandaLM), from a model built here.

    .venv/bin/python bench/bench_reward_real.py [--work runs/bench_reward_real] [--quick] [--no-write]

There is no pre-trained model to download, so one run builds everything from ../shared/data:
1. splits: hh-rlhf harmless-base and helpful-base (their public *test* files, the only hh files shipped) are each
   cut 90/10 into train/val, deterministically and by conversation: a pair goes to val when
   blake2b(seed, first human turn) < 0.1, so pairs that open with the same question never straddle the split.
   The raw JSONL lines are written unchanged; bad records are left in and skipped (and counted) by the loader;
2. a byte-level BPE tokenizer (`tristage tokenizer`, vocab 4096) on the text of the *train* pairs (both hh files)
   plus three Gutenberg novels; never on validation or evaluation pairs;
3. `tristage prepare` + `tristage pretrain` (depth 4, seq 256) on the same text: each train pair as two ChatML
   conversations (prompt + chosen, prompt + rejected; text only, no labels) plus the novels in ~4 KB pieces;
4. `tristage reward` from that base model, once on the harmless train split and once on the helpful one, each
   validated on its own val split (`--on-error skip`: the loader's skip counts are reported);
5. scoring here, with the saved reward models (stage 3a's forward pass, bf16 autocast as in training): both
   val splits with both models (the cross cells show how the two objectives disagree), and the helpful model on
   four evaluation-only sets: hh helpful-online and helpful-rejection-sampled (test files), the 260 expert
   long-form-QA pairs and the PandaLM pairs that have a majority vote (a set of more than 500 valid pairs is
   scored on a random 500 of them, seed 0, to stay in the time budget); prompt + reply are cut to 192 tokens
   (the prompt loses tokens from the left) for training and scoring alike;
6. baselines on exactly the same pairs: chance (50%), "the longer reply wins" (characters; a tie counts as half)
   and a bag-of-words Bradley-Terry logistic regression (numpy; log(1 + count) of lower-cased words of the reply,
   vocabulary = words in >= 2 train replies, L2 1e-3, full-batch Adam, fixed a priori), fitted on the same train
   split as the reward model;
7. the "## Reward models on real preference data" section of bench/RESULTS.md.
No hyperparameter here was chosen by looking at a validation number: the reward recipe is the demo's
(lr 3e-4, 1 epoch) and the model size and steps were set from the CPU time budget (~6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import RESULTS, busy_share, wait_quiet, write_section

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PREF = DATA / "preference"
GUTENBERG = DATA / "pretrain" / "gutenberg"
SECTION = "Reward models on real preference data"

SEED, VAL_FRACTION, MAX_LEN, VOCAB = 0, 0.1, 192, 4096
SPLIT_SETS = {"hh harmless-base": "hh_rlhf_harmless_base_test.jsonl.gz",
              "hh helpful-base": "hh_rlhf_helpful_base_test.jsonl.gz"}
EVAL_SETS = {"hh helpful-online": "hh_rlhf_helpful_online_test.jsonl.gz",
             "hh helpful-rejection-sampled": "hh_rlhf_helpful_rejection_sampled_test.jsonl.gz",
             "long-form QA (experts)": "lfqa_expert_pairwise_human_preferences.jsonl",
             "PandaLM (human, majority)": "pandalm_human_testset_v1.json.gz"}
BOOKS = ["pg1342_pride_and_prejudice.txt.gz", "pg1155_the_secret_adversary.txt.gz", "pg308_three_men_in_a_boat.txt.gz"]
PRETRAIN = ("--depth 4 --seq-len 256 --batch-size 16 --max-steps 160 --warmup-steps 20 --eval-every 0 "
            "--eval-batches 20 --save-every 0 --log-every 20 --no-progress").split()
REWARD = (f"--on-error skip --max-len {MAX_LEN} --batch-size 16 --epochs 1 --lr 3e-4 --eval-every 0 --save-every 0 "
          "--log-every 10 --no-progress").split()
EVAL_CAP = 500  # evaluation-only sets larger than this: a random sample of this many pairs (seed 0)
QUICK = {"train_pairs": 96, "val_pairs": 40, "eval_pairs": 24, "book_chars": 60_000, "pretrain_steps": 10}
BOW_L2, BOW_ITERS = 1e-3, 300
THREADS = os.cpu_count() or 1  # torch threads here and in the CLI steps (OMP_NUM_THREADS); --threads


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tristage.cli", *args]


def show(cmd: list[str]) -> str:
    """The command as a user types it (tristage instead of python -m tristage.cli, paths relative to the repo)."""
    args = cmd[3:] if cmd[1:3] == ["-m", "tristage.cli"] else cmd
    out = []
    for a in args:
        a = a.replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")
        out.append(a if re.fullmatch(r"[\w./:=,+-]+", a) else "'" + a.replace("'", "'\\''") + "'")
    return " ".join(["tristage", *out] if cmd[1:3] == ["-m", "tristage.cli"] else out)


def run(cmd: list[str], log: list[str], timings: dict, name: str) -> str:
    """Run a CLI step, echo its output, keep it; record the command and its wall time."""
    log.append(show(cmd))
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS)})
    timings[name] = time.perf_counter() - t
    print(p.stdout, end="", flush=True)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {show(cmd)}")
    return p.stdout


# ----------------------------------------------------------------------------- data
def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def group_key(line: str) -> str:
    """The first human turn of an HH record (the unit of the split); the raw line if it has none."""
    try:
        chosen = json.loads(line).get("chosen")
    except (json.JSONDecodeError, AttributeError):
        return line
    m = re.search(r"Human: (.*?)(?:\n\nAssistant:|$)", chosen, flags=re.S) if isinstance(chosen, str) else None
    return m[1].strip() if m else line


def in_val(key: str) -> bool:
    h = hashlib.blake2b(f"{SEED}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < VAL_FRACTION


def split_file(src: Path, out: Path, quick: bool) -> tuple[Path, Path]:
    lines = read_lines(src)
    train = [x for x in lines if not in_val(group_key(x))]
    val = [x for x in lines if in_val(group_key(x))]
    if quick:
        train, val = train[:QUICK["train_pairs"]], val[:QUICK["val_pairs"]]
    paths = out.with_name(out.name + "_train.jsonl"), out.with_name(out.name + "_val.jsonl")
    for p, rows in zip(paths, (train, val)):
        p.write_text("\n".join(rows) + "\n")
    return paths


def load(path: Path, limit: int | None = None):
    """(pairs, errors) with the loader the reward stage uses, bad records skipped; `limit`: the first N pairs."""
    from tristage.data.preference import load_preferences

    prefs, errors = load_preferences(path, on_error="skip")
    return (prefs[:limit] if limit else prefs), errors


def error_summary(errors) -> str:
    from collections import Counter

    reasons = Counter(re.sub(r" \(.*", "", e.reason) for e in errors)
    return "; ".join(f"{n} {r}" for r, n in reasons.most_common())


def book_pieces(max_chars: int | None, size: int = 4000) -> list[str]:
    """The novels cut at paragraph ends into pieces of about `size` characters."""
    pieces = []
    for book in BOOKS:
        with gzip.open(GUTENBERG / book, "rt", encoding="utf-8") as f:
            text = f.read()
        if max_chars:
            text = text[:max_chars // len(BOOKS)]
        buf = ""
        for para in re.split(r"\n\s*\n", text):
            buf += para.strip() + "\n\n"
            if len(buf) >= size:
                pieces.append(buf.strip())
                buf = ""
        if buf.strip():
            pieces.append(buf.strip())
    return pieces


# ----------------------------------------------------------------------------- scoring
def reply_len(p) -> tuple[int, int]:
    return len(p.chosen), len(p.rejected)


def longer_wins(prefs) -> float:
    return float(np.mean([1.0 if c > r else 0.5 if c == r else 0.0 for c, r in map(reply_len, prefs)]))


def score_pairs(rm_dir: Path, prefs, batch_size: int = 32) -> dict:
    """Chosen/rejected rewards of every pair that renders (stage 3a's forward pass and dtype) and what it says."""
    import torch

    from tristage.data.preference import collate_pairs, encode_preferences
    from tristage.model.score import load_reward_model, per_row
    from tristage.runtime import autocast, resolve_dtype
    from tristage.tokenizer import Tokenizer

    tok = Tokenizer.load(rm_dir)
    model = load_reward_model(rm_dir, dtype=torch.float32).eval()
    device = torch.device("cpu")
    dtype = resolve_dtype("auto", device)
    kept, examples, truncated = [], [], 0
    for p in prefs:  # one at a time, so a pair that fails to render is dropped from the baselines too
        ex, stats = encode_preferences(tok, [p], MAX_LEN, on_error="skip")
        if ex:
            kept.append(p)
            examples.append(ex[0])
            truncated += stats.truncated
    order = sorted(range(len(examples)), key=lambda i: max(len(examples[i].chosen_ids), len(examples[i].rejected_ids)))
    rc, rr = np.zeros(len(examples)), np.zeros(len(examples))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = collate_pairs([examples[i] for i in idx], tok.pad_id)
            with autocast(device, dtype):
                sc = model(batch["input_ids"], at=per_row(batch["last_index"]))[:, 0].float().numpy()
            rc[idx], rr[idx] = sc[:len(idx)], sc[len(idx):]
    longer = np.array([np.sign(c - r) for c, r in map(reply_len, kept)])
    said = np.sign(rc - rr)
    return {"pairs": kept, "n": len(kept), "render_errors": len(prefs) - len(kept), "truncated": truncated,
            "accuracy": float(np.mean(rc > rr)), "margin": float(np.mean(rc - rr)),
            "prefers_longer": float(np.mean(said[longer != 0] == longer[longer != 0])) if (longer != 0).any() else 0.0}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def bow_matrix(prefs, vocab: dict[str, int]) -> np.ndarray:
    """[pairs, vocab]: log(1 + count) of the chosen reply's words minus the rejected reply's."""
    d = np.zeros((len(prefs), len(vocab)), dtype=np.float32)
    for i, p in enumerate(prefs):
        for sign, text in ((1.0, p.chosen), (-1.0, p.rejected)):
            counts: dict[int, int] = {}
            for w in words(text):
                if (j := vocab.get(w)) is not None:
                    counts[j] = counts.get(j, 0) + 1
            for j, c in counts.items():
                d[i, j] += sign * math.log1p(c)
    return d


def bow_fit(train) -> tuple[dict[str, int], np.ndarray]:
    """Bradley-Terry logistic regression on bag-of-words differences: min mean softplus(-D w) + l2/2 |w|^2."""
    from collections import Counter

    df = Counter(w for p in train for text in (p.chosen, p.rejected) for w in set(words(text)))
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in df.items() if n >= 2))}
    d = bow_matrix(train, vocab)
    w, m, v = (np.zeros(len(vocab), dtype=np.float32) for _ in range(3))
    for t in range(1, BOW_ITERS + 1):  # Adam, lr 0.05
        z = d @ w
        g = -(d.T @ (1.0 / (1.0 + np.exp(np.clip(z, -30, 30))))) / len(d) + BOW_L2 * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= 0.05 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return vocab, w


def bow_accuracy(model, prefs) -> float:
    vocab, w = model
    z = bow_matrix(prefs, vocab) @ w
    return float(np.mean(np.where(z > 0, 1.0, np.where(z == 0, 0.5, 0.0))))


# ----------------------------------------------------------------------------- report
def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def ci(acc: float, n: int) -> str:
    return f"±{100 * 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / max(n, 1)):.1f}"


def report(saved: dict) -> str:
    rows, info, commands, timings, total = (saved[k] for k in ("rows", "info", "commands", "timings", "total"))
    lines = [f"`.venv/bin/python {saved['cmd_line']}` on {saved['date']}: {total / 60:.1f} min wall in all "
             f"(1-minute load average {info['load'][0]:.2f} at the start, {info['load'][1]:.2f} at the end; "
             f"{info['cpu_s'] / 60:.1f} min of CPU time of this process and its children; CPUs "
             f"{info['busy0']:.0%} busy just before it), torch "
             f"{info['torch']}, {info['threads']} thread(s)"
             + (" (the machine was shared with another 2-thread job: two threads each on 2 cores ran about 3x "
                "slower per step than one, so this run used one; the CPU time is what counts against the ~6 "
                "minutes of 2-core time this benchmark is sized for)" if info["threads"] == 1 else "") + ".", "",
             "A reward model built from nothing in a few CPU minutes, on the hh-rlhf *test* files (the train files "
             "are not shipped) with our own split, and on evaluation-only sets. Accuracy = share of pairs where the "
             "chosen reply gets the higher reward; ± = 95% binomial interval (1.96 standard errors); margin = mean "
             "reward(chosen) - reward(rejected); \"RM: longer\" = share of pairs (replies of unequal length) where "
             "the reward model prefers the longer reply. Baselines on the same pairs: chance, the longer reply wins "
             "(characters, ties half), bag-of-words logistic regression fitted on the reward model's train split.", "",
             "| evaluated on | reward model trained on | pairs train / eval | records skipped | RM accuracy | "
             "RM margin | RM: longer | chance | longer wins | BoW LR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['eval']} | {r['trained']} | {r['n_train']:,} / {r['n']:,} | {r['skipped']} | "
                     f"**{pct(r['accuracy'])}** {ci(r['accuracy'], r['n'])} | {r['margin']:+.3f} | "
                     f"{pct(r['prefers_longer'])} | 50% | {pct(r['longer'])} | {pct(r['bow'])} |")
    lines += ["", "What the rows say (the numbers above decide; nothing was tuned on them):"]
    for r in rows:
        lo = r["accuracy"] - 1.96 * math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / max(r["n"], 1))
        hi = 2 * r["accuracy"] - lo
        vs_chance = ("above chance" if lo > 0.5 else "below chance" if hi < 0.5 else
                     "not distinguishable from chance")
        best = max(("longer wins", r["longer"]), ("BoW LR", r["bow"]), key=lambda x: x[1])
        gap = r["accuracy"] - best[1]
        vs_base = (f"{abs(gap) * 100:.1f} points {'above' if gap > 0 else 'below'} the best baseline ({best[0]}, "
                   f"{pct(best[1])})" + (", within the RM's ± interval" if abs(gap) < hi - r["accuracy"]
                                         else ""))
        pl = r["prefers_longer"]
        length = (f"it prefers the longer reply in {pct(pl)} of pairs"
                  + (" (largely a length detector)" if pl >= 0.7 else " (largely a shortness detector)" if pl <= 0.3
                     else ""))
        lines.append(f"- {r['eval']} ({r['trained']} model): {pct(r['accuracy'])} on {r['n']} pairs is "
                     f"{vs_chance} at 95%, {vs_base}; {length}.")
    lines += ["", "Data and skipped records (`--on-error skip`; the reasons are the loader's):", ""]
    lines += [f"- {x}" for x in info["data_notes"]]
    lines += ["", f"Base model: {info['base']}", "",
              "The CLI steps, exactly as run (the split files under data/ and the corpus files under corpus/ are "
              "written by the script first, as its docstring describes; the table's scoring and the baselines run "
              "in-process with the saved reward models):", ""]
    lines += [f"    {c}" for c in commands]
    lines += ["", "Wall time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "."]
    lines += ["", "Notes:"] + ["- " + re.sub(r"(\d\.\d{4})\d{4,}", r"\1", x) for x in info["notes"]]
    return "\n".join(lines).replace(str(ROOT) + "/", "") + "\n"


# ----------------------------------------------------------------------------- main
def main() -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_reward_real"), help="folder for data and runs")
    ap.add_argument("--quick", action="store_true", help="smoke test: ~100 pairs per split, 10 pre-training steps, "
                                                         "no write")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads, here and in the CLI steps "
                                                                 "(default: all cores)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, help="first wait up to this many seconds for idle CPUs")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from WORK/results.json of an "
                                                               "earlier run; runs nothing")
    a = ap.parse_args()
    if a.report_only:
        text = report(json.loads((Path(a.work) / "results.json").read_text()))
        print(text)
        if not a.no_write:
            write_section(SECTION, text)
            print(f"wrote the '{SECTION}' section of {RESULTS}")
        return 0
    a.cmd_line = "bench/bench_reward_real.py " + " ".join(sys.argv[1:])
    missing = [f for f in [*SPLIT_SETS.values(), *EVAL_SETS.values()] if not (PREF / f).exists()]
    if missing or not GUTENBERG.exists():
        print(f"skipped: missing {missing or GUTENBERG}")
        return 0
    if a.quick:
        a.no_write = True
    THREADS = a.threads
    import torch

    from tristage.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    busy0 = wait_quiet(a.quiet_wait, threshold=0.1) if a.quiet_wait > 0 else busy_share(1.0)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    cpu0 = sum(os.times()[:4])
    work = Path(a.work)
    for sub in ("data", "corpus"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    timings: dict[str, float] = {}
    notes: list[str] = []

    # 1. splits and loading
    t = time.perf_counter()
    splits, data_notes = {}, []
    for name, fname in SPLIT_SETS.items():
        tr_path, va_path = split_file(PREF / fname, work / "data" / name.split()[-1], a.quick)
        (tr, tr_err), (va, va_err) = load(tr_path), load(va_path)
        splits[name] = {"train": tr, "val": va, "train_path": tr_path, "val_path": va_path,
                        "skipped": f"{len(tr_err)} train / {len(va_err)} val"}
        data_notes.append(f"{name} (`{fname}`): {len(tr) + len(tr_err) + len(va) + len(va_err):,} records -> "
                          f"train {len(tr):,} pairs ({len(tr_err)} skipped) / val {len(va):,} pairs "
                          f"({len(va_err)} skipped); skipped: {error_summary(tr_err + va_err) or 'none'}")
    evals = {}
    for name, fname in EVAL_SETS.items():
        prefs, errs = load(PREF / fname)
        n_all, cap = len(prefs), QUICK["eval_pairs"] if a.quick else EVAL_CAP
        if n_all > cap:
            prefs = [prefs[i] for i in sorted(np.random.default_rng(SEED).choice(n_all, cap, replace=False))]
        evals[name] = {"pairs": prefs, "skipped": f"{len(errs)} (whole file)"}
        used = f"a random {len(prefs):,} of them (seed {SEED})" if len(prefs) < n_all else "all used"
        data_notes.append(f"{name} (`{fname}`, evaluation only): {n_all:,} valid pairs, {used}; {len(errs)} "
                          f"records skipped: {error_summary(errs) or 'none'}")
    train_all = [p for s in splits.values() for p in s["train"]]
    pieces = book_pieces(QUICK["book_chars"] if a.quick else None)
    tok_text = work / "corpus" / "tokenizer_text.txt"
    with open(tok_text, "w", encoding="utf-8") as f:
        for p in train_all:
            f.write("\n".join([m["content"] for m in p.prompt] + [p.chosen, p.rejected]) + "\n\n")
        f.write("\n\n".join(pieces) + "\n")
    timings["split + load"] = time.perf_counter() - t

    # 2. tokenizer, 3. pre-training corpus, shards, base model
    tok_dir, shards, base = work / "tok", work / "shards", work / "base"
    run(cli("tokenizer", "--files", str(tok_text), "--out", str(tok_dir), "--vocab-size", str(VOCAB)), commands,
        timings, "tokenizer")
    tok = Tokenizer.load(tok_dir)
    corpus = work / "corpus" / "pretrain.txt"
    n_docs = 0
    with open(corpus, "w", encoding="utf-8") as f:
        for p in train_all:
            for reply in (p.chosen, p.rejected):
                text = tok.apply_chat_template([*p.prompt, {"role": "assistant", "content": reply}], tokenize=False)
                if not any(s in text for s in ("<|endoftext|>",)):
                    f.write(text.rstrip("\n") + "\n<|endoftext|>\n")
                    n_docs += 1
        for piece in pieces:
            f.write(piece + "\n<|endoftext|>\n")
    run(cli("prepare", "--inputs", str(corpus), "--tokenizer", str(tok_dir), "--out", str(shards),
            "--val-fraction", "0.1" if a.quick else "0.02"), commands, timings, "prepare")
    meta = json.loads((shards / "meta.json").read_text())
    pre = PRETRAIN if not a.quick else [*PRETRAIN[:PRETRAIN.index("--max-steps")], "--max-steps",
                                        str(QUICK["pretrain_steps"]), *PRETRAIN[PRETRAIN.index("--max-steps") + 2:]]
    pre_out = run(cli("pretrain", "--data", str(shards), "--out", str(base), *pre), commands, timings, "pretrain")
    recs = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in recs if "val_loss" in r]
    train_loss = [r["loss"] for r in recs if "loss" in r]
    n_params = re.search(r"([\d.]+)M param", pre_out)
    tokens = {k: v["tokens"] for k, v in meta["splits"].items()}
    steps = int(pre[pre.index("--max-steps") + 1])
    info = {"base": f"{n_params[1] + 'M parameters' if n_params else '?'}, {steps} steps x 16 x 256 tokens "
                    f"({steps * 16 * 256 / 1e6:.2f}M tokens) on a corpus of {tokens['train']:,} train / "
                    f"{tokens['val']:,} val tokens ({n_docs:,} chat documents from the train pairs + {len(pieces)} novel pieces of ~4 KB from "
                    f"{', '.join(b.split('_', 1)[1].removesuffix('.txt.gz') for b in BOOKS)}); final train loss "
                    f"{train_loss[-1] if train_loss else float('nan'):.3f}, held-out val loss "
                    f"{val_loss[-1] if val_loss else float('nan'):.3f} on 2% of those documents (by hash; a pair's two "
                    f"documents share their prompt, so this is not a clean held-out figure).",
            "data_notes": data_notes, "notes": notes, "torch": torch.__version__,
            "threads": torch.get_num_threads()}

    # 4. reward models
    rms, stage = {}, {}
    for name, s in splits.items():
        short = name.split()[-1].split("-")[0]
        out = work / f"rm_{short}"
        text = run(cli("reward", str(base / "model"), "--data", str(s["train_path"]), "--val-data",
                       str(s["val_path"]), "--out", str(out), *REWARD), commands, timings, f"reward {short}")
        rms[name] = out / "model"
        last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        stage[name] = {"val_accuracy": next((r["val_accuracy"] for r in reversed(last) if "val_accuracy" in r), None),
                       "notes": [ln.removeprefix("reward: ") for ln in text.splitlines() if ln.startswith("reward: ")]}
        acc = stage[name]["val_accuracy"]
        notes.append(f"`tristage reward` on {name}: " + "; ".join(stage[name]["notes"]) +
                     f"; its own final val accuracy {'-' if acc is None else f'{acc:.4f}'} (the table's rescoring "
                     "of the saved model agrees unless a note below says otherwise)")

    # 5. + 6. scoring and baselines
    t = time.perf_counter()
    rows = []
    bows = {name: bow_fit(s["train"]) for name, s in splits.items()}
    helpful = "hh helpful-base"
    targets = [(ev, tr, s["val"], s["skipped"]) for ev, s in splits.items() for tr in splits]
    targets += [(ev, helpful, e["pairs"], e["skipped"]) for ev, e in evals.items()]
    for ev, tr, prefs, skipped in targets:
        r = score_pairs(rms[tr], prefs)
        kept = r.pop("pairs")
        r.update(eval=ev + (" val" if ev in splits else ""), trained=tr + " train", n_train=len(splits[tr]["train"]),
                 skipped=skipped, longer=longer_wins(kept), bow=bow_accuracy(bows[tr], kept))
        rows.append(r)
        print(f"{r['eval']} <- {r['trained']}: n {r['n']}, accuracy {r['accuracy']:.3f}, margin {r['margin']:+.3f}, "
              f"longer {r['longer']:.3f}, BoW {r['bow']:.3f}, truncated {r['truncated']}, render errors "
              f"{r['render_errors']}", flush=True)
        if r["render_errors"]:
            notes.append(f"{r['eval']}: {r['render_errors']} pairs failed to render with our tokenizer and were left "
                         "out of every column")
        if ev == tr and stage[tr]["val_accuracy"] is not None and abs(stage[tr]["val_accuracy"] - r["accuracy"]) > 0.01:
            notes.append(f"{ev}: the stage's val accuracy {stage[tr]['val_accuracy']:.3f} differs from the rescoring "
                         f"here {r['accuracy']:.3f}")
    timings["scoring + baselines"] = time.perf_counter() - t
    trunc = ", ".join(f"{r['eval']} {r['truncated']}" for r in rows if r["truncated"] and r["trained"].startswith(
        helpful))
    notes.append(f"max length {MAX_LEN} tokens (prompt + reply); pairs longer than that lose prompt tokens from the "
                 f"left (the reply is cut from the right only if it alone is longer): {trunc or 'none'}.")
    notes.append("The rows on the val splits are the only ones a choice could have been tuned on, and none was: "
                 "one run, recipe fixed before it.")
    total = time.perf_counter() - t_start
    info["load"] = (load0, os.getloadavg()[0])
    info["cpu_s"] = sum(os.times()[:4]) - cpu0
    info["busy0"] = busy0
    saved = {"cmd_line": a.cmd_line, "date": time.strftime("%Y-%m-%d"), "rows": rows, "info": info,
             "commands": commands, "timings": timings, "total": total}
    (work / "results.json").write_text(json.dumps(saved, indent=1))
    text = report(saved)
    print("\n" + text)
    if not a.no_write:
        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
