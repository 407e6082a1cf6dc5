"""Pre-training benchmark (issue 3): tiny Shakespeare, character level, against nanoGPT and transformers.

    .venv/bin/python bench/bench_pretrain.py [--repeats 2] [--quick] [--no-peer] [--no-write]

Target: validation loss <= 1.886 (nanoGPT's final, on nanoGPT's 90/10 split) with <= 0.80M parameters in <= 55 s,
half of nanoGPT's 1 min 51 s, wall time around the whole `tristage pretrain` process (import, build, training,
evals, checkpoint). One run does:
1. the matmul roofline of this machine (1024^3, fp32 and bf16) and a check of what bf16 autocast really computes;
2. char tokenizer + `tristage prepare --split tail --val-fraction 0.1` (nanoGPT's split) into --work;
3. the tuned recipe as a subprocess of the CLI, --repeats times (median), each after waiting for a quiet machine;
   evals run on the whole val split; their wall-clock offsets come from the streamed stdout;
4. the peer: transformers' LlamaForCausalLM (hidden 128, 4 layers, 4 heads, intermediate 341, tied, vocab = the 66
   ids present in the data: 65 characters + end-of-text) and tristage's GPT with the *same* shape, trained by one
   plain PyTorch loop with the recipe's AdamW, schedule, batch, steps, clipping and dtype, alternating every 25 steps
   on the same batches (so both see the same machine load); both evaluated on the whole val split;
5. a table, and the "## Pre-training" section of bench/RESULTS.md.
MFU = 6 * N (all parameters) * tokens/s / measured matmul peak of the dtype (attention FLOPs ignored, as in
../shared/BASELINES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import RESULTS, busy_seconds, own_seconds, wait_quiet, write_section

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
TARGET, BUDGET_S = 1.886, 55.0
BLOCK = 25  # plain loop: steps per model before switching to the other
DISTURBED = 0.05  # a timed run during which other jobs used more than this many CPU-seconds per second is disturbed
NANOGPT = {"val": 1.8857, "wall_s": 110.8, "tok_s": 16.2e3, "ms_step": 47.3}  # BASELINES.md section 2, run 1
MODEL = "--hidden-size 128 --num-layers 4 --num-heads 4 --intermediate-size 320 --seq-len 64".split()
RECIPE = MODEL + ("--batch-size 12 --max-steps 700 --lr 2e-3 --warmup-steps 50 --schedule cosine --min-lr-ratio 0.1 "
                  "--beta2 0.99 --weight-decay 0.1 --grad-clip 1.0 --dtype bfloat16 --eval-every 350 --eval-batches 145 "
                  "--log-every 25 --save-every 0 --sample-prompts ROMEO: --no-progress").split()


def flag(args: list[str], name: str, value: str | None = None) -> list[str]:
    """args with --name set to value (None: removed)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == name:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out + ([name, value] if value is not None else [])


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 21) -> float:
    """FLOP/s of the fastest of `reps` n^3 matmuls (the fastest: a burst from another job cannot lower it)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / min(ts)


def bf16_check() -> str:
    """What autocast computes inside the model's Linear layers, and what bf16 buys per op at the model's shapes."""
    from tristage.model.gpt import ModelConfig, build_model

    m = build_model(ModelConfig(vocab_size=329, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=320, max_position_embeddings=64))
    seen = set()
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.add(str(o.dtype).removeprefix("torch.")))
             for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    with torch.autocast("cpu", torch.bfloat16):
        logits = m(torch.randint(0, 73, (12, 64)))
    for h in hooks:
        h.remove()

    def clock(fn, reps=30):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    def gemm(dt):
        x, w = torch.randn(768, 128, dtype=dt), torch.randn(320, 128, dtype=dt)
        return clock(lambda: F.linear(x, w))

    def sdpa(dt):
        q = torch.randn(12, 4, 64, 32, dtype=dt, requires_grad=True)
        return clock(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward())

    g32, g16, s32, s16 = gemm(torch.float32), gemm(torch.bfloat16), sdpa(torch.float32), sdpa(torch.bfloat16)
    return (f"Linear outputs under autocast: {sorted(seen)}, logits {str(logits.dtype).removeprefix('torch.')}; "
            f"GEMM 768x128 @ 128x320: fp32 {g32:.3f} ms, bf16 {g16:.3f} ms ({g32 / g16:.1f}x); SDPA fwd+bwd "
            f"[12,4,64,32] causal: fp32 {s32:.2f} ms, bf16 {s16:.2f} ms ({s32 / s16:.2f}x), which is why tristage's "
            f"model computes attention this short in fp32 when it trains in bf16 on CPU (projections and MLP stay "
            f"bf16; `CPU_FP32_ATTENTION_MAX` in tristage/model/gpt.py)")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tristage.cli", *args]


def prepare(work: Path) -> Path:
    shards = work / "shards"
    subprocess.run(cli("tokenizer", "--kind", "char", "--files", str(DATA), "--out", str(work / "tok")), check=True)
    subprocess.run(cli("prepare", "--inputs", str(DATA), "--tokenizer", str(work / "tok"), "--out", str(shards),
                       "--split", "tail", "--val-fraction", "0.1"), check=True)
    return shards


def timed_run(shards: Path, out: Path, recipe: list[str]) -> dict:
    """One `tristage pretrain` process; wall time around it; val evals stamped as their lines arrive."""
    cmd = cli("pretrain", "--data", str(shards), "--out", str(out), *recipe)
    load0, busy0, own0 = os.getloadavg()[0], busy_seconds(), own_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    evals, head = [], ""
    for line in p.stdout:
        if m := re.match(r"step (\d+): val loss ([\d.]+)", line):
            evals.append((int(m[1]), float(m[2]), time.perf_counter() - t0))
        elif line.startswith("pretrain:"):
            head = line.strip()
    if p.wait():
        raise SystemExit(f"tristage pretrain failed ({p.returncode}): {' '.join(cmd)}")
    wall = time.perf_counter() - t0
    others = busy_seconds() - busy0 - (own_seconds(resource.RUSAGE_CHILDREN) - own0)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    hit = next((e for e in evals if e[1] <= TARGET), None)
    return {"wall": wall, "evals": evals, "final": evals[-1][1], "tok_s": statistics.median(tps), "head": head,
            "tokens": recs[-1].get("tokens") or max(r.get("tokens", 0) for r in recs),
            "hit": hit, "load": (load0, os.getloadavg()[0]), "others": max(others, 0.0)}


def plain_loop(shards: Path, recipe: list[str], steps: int, peer: bool) -> dict:
    """Our GPT and transformers' Llama of one shape, trained by one plain loop (see the module notes)."""
    import numpy as np

    from tristage.data.pretrain import TokenLoader
    from tristage.model.gpt import ModelConfig, build_model
    from tristage.runtime import autocast, resolve_dtype
    from tristage.stages.pretrain import parse_args
    from tristage.train.optim import build_optimizer, lr_at, set_lr

    cfg = parse_args(["--data", str(shards), *flag(recipe, "--max-steps", str(steps))])
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
    train = TokenLoader(shards, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, mode="random")
    val = TokenLoader(shards, "val", cfg.batch_size, cfg.seq_len, mode="sequential")
    ids = np.unique(np.concatenate([np.asarray(s) for s in train.shards + val.shards]))
    remap = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    remap[torch.from_numpy(ids.astype(np.int64))] = torch.arange(len(ids))
    vocab, inter = len(ids), 341
    val_batches = [(remap[x], remap[y]) for x, y in val.val_batches(val.per_epoch)]  # the whole val split

    models = {}
    ours = build_model(ModelConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=inter, max_position_embeddings=cfg.seq_len), seed=0)
    models["tristage GPT"] = (ours, lambda m, x: m(x))
    if peer:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=4, intermediate_size=inter, tie_word_embeddings=True,
                                          max_position_embeddings=cfg.seq_len, attn_implementation="sdpa"))
        models["transformers Llama"] = (hf, lambda m, x: m(input_ids=x).logits)
    state = {k: {"opt": build_optimizer(m, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2)), "times": [],
                 "evals": [], "params": sum(p.numel() for p in m.parameters())} for k, (m, _) in models.items()}

    def loss_of(name, x, y):
        m, fwd = models[name]
        with autocast(torch.device("cpu"), dtype):
            return F.cross_entropy(fwd(m, x).float().flatten(0, 1), y.flatten())

    eval_every = cfg.eval_every or steps
    busy0, own0 = busy_seconds(), own_seconds(resource.RUSAGE_SELF)
    for start in range(0, steps, BLOCK):  # models alternate every BLOCK steps on the same batches
        block = [tuple(remap[t] for t in next(train)) for _ in range(min(BLOCK, steps - start))]
        for name, (m, _) in models.items():
            st = state[name]
            for step, (x, y) in enumerate(block, start):
                t = time.perf_counter()
                set_lr(st["opt"], lr_at(step, steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))
                loss_of(name, x, y).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
                st["opt"].step()
                st["opt"].zero_grad(set_to_none=True)
                st["times"].append(time.perf_counter() - t)
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    with torch.no_grad():
                        m.eval()
                        vl = sum(loss_of(name, vx, vy).item() for vx, vy in val_batches) / len(val_batches)
                        m.train()
                    st["evals"].append((step + 1, vl, sum(st["times"])))
    others = busy_seconds() - busy0 - (own_seconds(resource.RUSAGE_SELF) - own0)
    for st in state.values():
        st["ms"] = statistics.median(st["times"][10:] or st["times"]) * 1e3
        st["tok_s"] = cfg.batch_size * cfg.seq_len / st["ms"] * 1e3
        st["hit"] = next((e for e in st["evals"] if e[1] <= TARGET), None)
        st["final"] = st["evals"][-1][1]
        del st["opt"], st["times"]
    return {"vocab": vocab, "inter": inter, "dtype": str(dtype).removeprefix("torch."), "models": state,
            "others": max(others, 0.0)}


def fmt_t(s: float | None) -> str:
    return "-" if s is None else f"{int(s // 60)}:{s % 60:04.1f}"


def report(a: argparse.Namespace, peaks: dict, bf16: str, runs: list[dict], plain: dict | None, recipe: list[str],
           n_params: int, dtype: str) -> str:
    peak = peaks["bfloat16" if dtype == "bfloat16" else "float32"]
    mfu = lambda n, tps: 6 * n * tps / peak  # noqa: E731
    used = [r for r in runs if r["clean"]] or runs  # undisturbed runs (all of them if none was)
    walls = [r["wall"] for r in used]
    wall = statistics.median(walls)
    hits = [r["hit"][2] for r in used if r["hit"]]
    final = statistics.median(r["final"] for r in used)
    tps = statistics.median(r["tok_s"] for r in used)
    met = final <= TARGET and wall <= BUDGET_S
    cmd = " ".join(["tristage pretrain --data SHARDS --out OUT", *recipe])
    rows = [("nanoGPT (BASELINES.md, fp32, 2000 it)", "0.80M", f"{NANOGPT['val']:.4f}", fmt_t(NANOGPT["wall_s"]),
             fmt_t(NANOGPT["wall_s"]), f"{NANOGPT['tok_s'] / 1e3:.1f}k", f"{mfu(0.80e6, NANOGPT['tok_s']) * 100:.0f}%*"),
            (f"**tristage pretrain** (this recipe, median of {len(used)})", f"{n_params / 1e6:.3f}M", f"{final:.4f}",
             fmt_t(statistics.median(hits)) if hits else "not reached", fmt_t(wall), f"{tps / 1e3:.1f}k",
             f"{mfu(n_params, tps) * 100:.0f}%")]
    lines = [f"`{a.cmd_line}`", "",
             f"Target (issue 3): val loss <= {TARGET} with <= 0.80M parameters in <= {BUDGET_S:.0f} s wall, counting "
             f"start-up. **{'Met' if met else 'Not met'}**: median wall {wall:.1f} s (runs: "
             f"{', '.join(f'{w:.1f}' for w in walls)} s), final val loss {final:.4f} "
             f"({wall / NANOGPT['wall_s']:.2f}x nanoGPT's wall time).", "",
             "Recipe (the exact command; SHARDS from `tristage tokenizer --kind char` + `tristage prepare --split "
             "tail --val-fraction 0.1`, vocab 329 = 8 specials + 65 chars + 256 byte fallbacks, 1,003,855 train / "
             "111,541 val tokens):", "", f"    {cmd}", "",
             "Val loss is the mean over the whole val split (145 windows of 12x64 = 111,360 targets), every eval. "
             "Wall = the whole process (python + torch import, build, training, evals, checkpoint, one sample).", "",
             "| run | params | final val loss | time to <= 1.886 | wall | tok/s | MFU |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", "\\* nanoGPT's MFU against this machine's fp32 peak, from its median tok/s.", "",
              f"Every timed run (disturbed = other jobs used more than {DISTURBED} CPU-s per second of it; those are "
              f"excluded from the medians{', but no run was undisturbed' if used is runs and not runs[0]['clean'] else ''}):"]
    for r in runs:
        evals = ", ".join(f"{s}: {v:.4f} @ {t:.1f} s" for s, v, t in r["evals"])
        lines.append(f"- {'' if r['clean'] else '(disturbed) '}wall {r['wall']:.1f} s; evals (step: val loss @ offset) "
                     f"{evals}; load average {r['load'][0]:.2f} -> {r['load'][1]:.2f}; other jobs' CPU {r['others']:.1f} s")
    if plain:
        ms = plain["models"]
        lines += ["", f"Same loop, same shape (vocab {plain['vocab']}, intermediate {plain['inter']}, "
                      f"{plain['dtype']}): one plain PyTorch loop trains both models (alternating every {BLOCK} "
                      f"steps, same batches) with the recipe's AdamW, schedule, batch, steps and clipping; time to "
                      f"target counts training steps only (other jobs' CPU during the loop: {plain['others']:.1f} s).",
                  "",
                  "| model (plain loop) | params | ms/step (median) | tok/s | MFU | time to <= 1.886 | final val loss |",
                  "|---|---|---|---|---|---|---|"]
        for name, st in ms.items():
            lines.append(f"| {name} | {st['params'] / 1e6:.3f}M | {st['ms']:.1f} | {st['tok_s'] / 1e3:.1f}k | "
                         f"{mfu(st['params'], st['tok_s']) * 100:.0f}% | {fmt_t(st['hit'][2]) if st['hit'] else '-'} "
                         f"| {st['final']:.4f} |")
        if len(ms) == 2:
            a_, b_ = ms.values()
            lines += ["", f"Per-step speed, tristage / transformers: **{b_['ms'] / a_['ms']:.2f}x**; "
                          f"BASELINES.md measured the transformers model at 14.9k-18.5k tok/s."]
    lines += ["", f"Machine peak (1024^3 matmul, fastest of 21, {torch.get_num_threads()} threads): fp32 "
                  f"{peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s. MFU = 6 N tok/s "
                  f"/ peak of the run's dtype ({dtype}).", "", f"bf16 check: {bf16}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_pretrain"), help="folder for shards and runs")
    ap.add_argument("--repeats", type=int, default=2, help="undisturbed timed runs wanted (the median is reported)")
    ap.add_argument("--extra-attempts", type=int, default=3, help="further runs allowed to replace disturbed ones")
    ap.add_argument("--quiet-wait", type=float, default=600,
                    help="max seconds to wait for idle CPUs before each timed part")
    ap.add_argument("--quick", action="store_true", help="smoke test: 60 steps, 1 repeat, no waiting, no write")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers (the plain loop runs ours only)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-loop comparison")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    a = ap.parse_args()
    a.cmd_line = "python bench/bench_pretrain.py " + " ".join(sys.argv[1:])
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    recipe = RECIPE
    if a.quick:
        recipe = flag(flag(RECIPE, "--max-steps", "60"), "--eval-every", "30")
        a.repeats, a.extra_attempts, a.quiet_wait, a.no_write = 1, 0, 0, True
    steps = int(recipe[recipe.index("--max-steps") + 1])
    dtype = recipe[recipe.index("--dtype") + 1]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    shards = prepare(work)
    busy = wait_quiet(a.quiet_wait)
    print(f"CPUs {busy:.0%} busy; measuring the matmul peak and checking bf16 ...", flush=True)
    peaks = {str(dt).removeprefix("torch."): matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    bf16 = bf16_check()
    print(f"peak fp32 {peaks['float32'] / 1e9:.0f} / bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s\n{bf16}", flush=True)

    runs: list[dict] = []
    while sum(r["clean"] for r in runs) < a.repeats and len(runs) < a.repeats + a.extra_attempts:
        busy = wait_quiet(a.quiet_wait)
        print(f"timed run {len(runs) + 1} (CPUs {busy:.0%} busy before) ...", flush=True)
        r = timed_run(shards, work / f"run{len(runs)}", recipe)
        r["clean"] = r["others"] <= DISTURBED * r["wall"]
        runs.append(r)
        print(f"  {r['head']}\n  wall {r['wall']:.1f} s, final val {r['final']:.4f}, {r['tok_s']:,.0f} tok/s, "
              f"target hit {r['hit']}, other jobs' CPU {r['others']:.1f} s{'' if r['clean'] else ' (disturbed)'}",
              flush=True)
    from tristage.model.hf import load_model

    n_params = sum(p.numel() for p in load_model(work / "run0" / "model").parameters())

    plain = None
    if not a.no_plain:
        wait_quiet(a.quiet_wait)
        print(f"plain loop, {steps} steps{'' if a.no_peer else ', ours and transformers alternating'} ...", flush=True)
        plain = plain_loop(shards, recipe, steps, peer=not a.no_peer)
    text = report(a, peaks, bf16, runs, plain, recipe, n_params, dtype)
    print("\n" + text)
    if not a.no_write:
        write_section("Pre-training", text)
        print(f"wrote the Pre-training section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
