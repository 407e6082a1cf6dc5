"""Generation throughput: tristage's engine against transformers on the same tiny Llama, in the same run.

    .venv/bin/python bench/bench_generate.py [--repeats 7] [--batch-sizes 1 16 64] [--no-compile] [--no-write]

The issue's setting: LlamaConfig(vocab 71, hidden 128, 4 layers, 4 heads, intermediate 512, tied; ~1.06M
parameters), torch.manual_seed(0), greedy, 32-token prompts, exactly 128 new tokens, fp32, 2 threads. Methods:
- transformers `generate` (use_cache=True, min_new_tokens = max_new_tokens = 128),
- a bare loop over transformers' forward with past_key_values + argmax (what `generate` costs without its machinery),
- the tristage engine eager (the default), and compiled (`Engine(compile=True)`, torch.compile of the decode step),
  whose compile time is listed separately: cold (empty inductor cache) and warm (a new process with the on-disk
  cache filled, as a second run would see).
Methods run interleaved, round-robin, `--repeats` times each; the tables report medians (the machine is shared, so
the spread is printed as well). The greedy tokens of every method are checked to be identical.
Writes the "## Generation" section of bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-bench-"))  # cold compile

import torch  # noqa: E402
from benchlib import RESULTS, write_section  # noqa: E402

PROMPT, NEW = 32, 128


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()  # type: ignore[union-attr]
    except Exception:
        return platform.processor() or "unknown CPU"


def build_models(tmp: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tristage.model.hf import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=71, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=512, max_position_embeddings=512,
                      tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp)
    return hf, load_model(tmp).eval()


def hf_generate(hf, x: torch.Tensor) -> torch.Tensor:
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                      min_new_tokens=NEW, use_cache=True, pad_token_id=0)
    return out[:, x.shape[1]:]


@torch.inference_mode()
def hf_loop(hf, x: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache()
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # renamed in v5
    logits = hf(x, use_cache=True, **{kw: cache}).logits[:, -1]
    toks = []
    for _ in range(NEW):
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
        if len(toks) == NEW:
            break
        logits = hf(tok, use_cache=True, **{kw: cache}).logits[:, -1]
    return torch.cat(toks, 1)


def engine_run(engine, x: torch.Tensor) -> torch.Tensor:
    from tristage.serve.engine import SamplingParams

    outs = engine.generate(x.tolist(), SamplingParams(max_new_tokens=NEW, temperature=0))
    return torch.tensor([o.tokens for o in outs])


def early_stop_table(model, repeats: int) -> str:
    """Rows that finish early: leave the batch (KVCache.select) or stay masked, and how often stops are checked.

    Sampling at temperature 1 with two stop ids out of 71 (about 3% a step) gives lengths from a few tokens to the
    128 cap, as RL rollouts have. Same seed, and every variant produces the same tokens (checked)."""
    from tristage.serve.engine import Engine, SamplingParams

    gen = torch.Generator().manual_seed(1)
    variants = {"leave at once (compact_at=0, check_every=1)": dict(compact_at=1e-9, check_every=1),
                "leave when 25% done, check every 4 (default)": dict(),
                "masked, never leave (check_every=4)": dict(compact_at=2.0),
                "masked, check every step": dict(compact_at=2.0, check_every=1)}
    rows = []
    for b in (16, 64):
        x = torch.randint(0, 71, (b, PROMPT), generator=gen).tolist()
        p = SamplingParams(max_new_tokens=NEW, temperature=1.0, stop_ids=[0, 1], seed=0)
        times: dict[str, list[float]] = {}
        lengths = None
        for _ in range(repeats):
            for name, kw in variants.items():
                dt, outs = timed(Engine(model, **kw).generate, x, p)
                times.setdefault(name, []).append(dt)
                got = [o.tokens for o in outs]  # a row's draws do not depend on other rows: the same tokens
                assert lengths is None or got == lengths, f"{name}: different tokens"
                lengths = got
        n = sum(len(t) for t in lengths)  # type: ignore[union-attr]
        for name in variants:
            rows.append(f"| {b} | {name} | {n / statistics.median(times[name]):,.0f} |")
        mean = n / b
        rows[-len(variants)] = rows[-len(variants)].replace(f"| {b} |", f"| {b} (mean length {mean:.0f}) |")
    return "\n".join(["| batch | finished rows | generated tok/s |", "|---|---|---|", *rows])


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def warm_probe(b: int) -> None:
    """Run in a fresh process sharing the parent's inductor cache: the first compiled call's extra seconds."""
    from tristage.serve.engine import Engine

    torch.set_num_threads(2)
    _, ours = build_models(Path(tempfile.mkdtemp(prefix="bench-gen-")))
    engine = Engine(ours, compile=True)
    x = torch.randint(0, 71, (b, PROMPT))
    first, _ = timed(engine_run, engine, x)
    again, _ = timed(engine_run, engine, x)
    print(f"WARM {first - again:.2f}")


def warm_start(b: int) -> float:
    """The compile seconds a second run of the same command pays (the first fills the on-disk cache for its path)."""
    for _ in range(2):
        out = subprocess.run([sys.executable, __file__, "--warm-probe", str(b)], capture_output=True, text=True,
                             env=os.environ.copy())
        m = re.search(r"WARM ([\d.-]+)", out.stdout)
        if m is None:
            raise RuntimeError(f"warm-start probe failed:\n{out.stderr[-2000:]}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine (saves the compile time)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--warm-probe", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipping the generation benchmark (pip install transformers)")
        return 0
    from tristage.serve.engine import Engine

    if args.warm_probe:
        warm_probe(args.warm_probe)
        return 0
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    hf, ours = build_models(tmp)
    eager = Engine(ours)
    methods = {"transformers generate": lambda x: hf_generate(hf, x),
               "transformers forward loop": lambda x: hf_loop(hf, x),
               "tristage engine (eager)": lambda x: engine_run(eager, x)}
    compile_s: dict[int, tuple[float, float]] = {}
    if not args.no_compile:
        compiled = Engine(ours, compile=True)
        methods["tristage engine (compiled)"] = lambda x: engine_run(compiled, x)
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, 71, (b, PROMPT), generator=gen) for b in args.batch_sizes}
    times: dict[tuple[str, int], list[float]] = {}
    for b, x in prompts.items():
        ref = hf_generate(hf, x)  # warm-up, and the tokens every method must reproduce
        for name, fn in methods.items():
            if name == "tristage engine (compiled)":  # first call compiles (cold); a new process shows the warm start
                cold, out = timed(fn, x)
                run, _ = timed(fn, x)
                compile_s[b] = (cold - run, warm_start(b))
            else:
                _, out = timed(fn, x)
            if not torch.equal(out, ref):
                print(f"MISMATCH: {name} at batch {b} differs from transformers generate", file=sys.stderr)
                return 1
        for _ in range(args.repeats):
            for name, fn in methods.items():
                times.setdefault((name, b), []).append(timed(fn, x)[0])

    def tok_s(name: str, b: int) -> float:
        return b * NEW / statistics.median(times[(name, b)])

    bs = args.batch_sizes
    lines = ["| method | " + " | ".join(f"B={b} tok/s (ms/step)" for b in bs) + " | " +
             " | ".join(f"B={b} vs generate" for b in bs) + " |",
             "|---|" + "---|" * (2 * len(bs))]
    for name in methods:
        cells = [f"{tok_s(name, b):,.0f} ({1000 * statistics.median(times[(name, b)]) / NEW:.2f})" for b in bs]
        ratios = [f"{tok_s(name, b) / tok_s('transformers generate', b):.2f}x" for b in bs]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    spread = ["", "Spread (min-max tok/s over the repeats): " + "; ".join(
        f"{name.split(' ', 1)[1]} B={b}: {b * NEW / max(times[(name, b)]):,.0f}-{b * NEW / min(times[(name, b)]):,.0f}"
        for name in methods for b in bs)]
    comp = []
    if compile_s:
        comp = ["", "Compile time of the compiled engine, in seconds: the first call's wall time minus a steady one's, "
                "in this process (cold: empty inductor cache; batch 1 has its own graph, one dynamic graph serves "
                "every batch size >= 2) and in a new process running the same batch a second time, reusing the "
                "on-disk cache (warm: dynamo tracing and loading the compiled kernels): "
                + ", ".join(f"B={b}: {c:.1f} cold / {w:.1f} warm" for b, (c, w) in compile_s.items()) + "."]
    notes = []
    if compile_s:
        def steps(b: int, sec: float) -> str:
            saved = (statistics.median(times[("tristage engine (eager)", b)])
                     - statistics.median(times[("tristage engine (compiled)", b)])) / NEW
            return f"{sec / saved:,.0f}" if saved > 0 else "never"
        notes = ["", "Break-even of compiling (decode steps before the compile time is paid back by faster steps, "
                 "cold / warm): " + ", ".join(f"B={b}: {steps(b, c)} / {steps(b, w)}"
                                               for b, (c, w) in compile_s.items() if c > 1) + ". "
                 "So the default is eager: a chat turn or a few hundred prompts are done before compiling would pay; "
                 "`compile=True` (`--compile`) is for long rollout or JSONL runs."]
    ref = {1: 488, 16: 4368}  # BASELINES.md section 4, transformers generate on this machine
    notes += ["", "Against the issue's reference figures for transformers generate (BASELINES.md: 488 and 4,368 "
              "tok/s at B=1 and 16): eager " + ", ".join(f"B={b}: {tok_s('tristage engine (eager)', b) / r:.2f}x"
                                                            for b, r in ref.items() if b in bs) + "."]
    table = "\n".join(lines + spread + comp + notes)
    print(table)
    early = early_stop_table(ours, args.repeats)
    print("\n" + early)
    load = f"1-minute load average {load_before:.2f} when the run started"
    if load_before > 0.75 * (os.cpu_count() or 1):
        print(f"\nWARNING: {load}: other processes share the CPU, the figures are unreliable", file=sys.stderr)
    text = f"""Greedy decoding, {PROMPT}-token prompts, exactly {NEW} new tokens, fp32, the issue's tiny Llama
(hidden 128, 4 layers, 4 heads, intermediate 512, vocab 71, tied; 1.06M parameters),
torch.set_num_threads({args.threads}).
Median of {args.repeats} interleaved repeats; all methods produce identical tokens (checked); {load}.
Machine: {cpu_name()}, {os.cpu_count()} vCPU; torch {torch.__version__}, transformers {transformers.__version__}.
Command: `.venv/bin/python bench/bench_generate.py{' --no-compile' if args.no_compile else ''}`

{table}

Rows that finish early (sampling, temperature 1, two stop ids; eager engine; tokens per second of wall time):

{early}
"""
    if not args.no_write:
        write_section("Generation", text)
        print(f"\nwrote the Generation section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
