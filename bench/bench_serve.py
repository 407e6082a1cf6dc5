"""Serving under load: `tristage serve` against `transformers serve --continuous-batching` on the same model folder,
the same requests, in the same run.

    .venv/bin/python bench/bench_serve.py [--clients 1 4 16] [--requests-per-client 6] [--rounds 3] [--no-write]

The model: a random Llama (vocab 4096 byte-level BPE trained on this repository's text, hidden 256, 6 layers, 8
heads, 4 KV heads, intermediate 768, untied, ~7M parameters, fp32) saved by tristage as a Hugging Face folder; both
servers load that folder. Its special (end-of-turn too) and non-ASCII byte tokens get logit 0 (below every greedy
pick), so every greedy answer runs to exactly max_tokens and is ASCII (both servers stream whole characters; the
token counts are then the same on both sides and checked).
The requests: chat completions, streaming, greedy, a user message of 8-64 random words, max_tokens 32-128, drawn
once with a seed and sent in the same order to both servers by N concurrent clients (each sends its next request
when the last one ends), N = 1, 4, 16, max(6, N * --requests-per-client) requests per level. Two configurations:
each server with its defaults, and one core of torch work each (OMP_NUM_THREADS=1; tristage with --prefill-process
off --replicas 1 --threads 1).
Reported per server and level: time to first token (TTFT) and time per output token after the first (TPOT) as
p50 / p90 / p99 over requests, inter-token gaps p99, output tokens per second at full concurrency (the tokens that
arrived while all N clients had a request in flight, from the start to the last request sent, over that time) and
over the whole run (all tokens / wall time: the drain at the end, with fewer than N clients left, included), and
errors (HTTP errors, broken streams, answers whose token count is not max_tokens). One server runs at a time, after
an untimed warm-up, --rounds times per configuration, the two taking turns; each level reports its median round
(the shared machine's speed drifts from run to run, by 20% and more, for both servers alike); the client is a minimal asyncio HTTP/1.1 reader, so its own CPU cost stays small (it is
reported, with the CPU time other processes took during the run: the machine has 2 shared cores; a server's
CPU time counts the processes it started, as tristage serve's engine processes).
Writes the "## Serving" section of bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import busy_seconds, own_seconds, wait_quiet, write_section

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin"
WORDS = ("the a dog cat sat on mat porch river stone light house tree small big red blue quick slow over under "
         "story about when then because model train data token answer question people city night day").split()


# ----------------------------------------------------------------------------- the model
def build_model(out: Path) -> Path:
    import torch

    from tristage.model.gpt import ModelConfig, build_model
    from tristage.model.hf import save_model
    from tristage.tokenizer import train_bpe

    texts = [str(p) for p in sorted(ROOT.glob("tristage/**/*.py")) + sorted(ROOT.glob("*.md"))]
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(Path(p).read_text(encoding="utf-8", errors="ignore") for p in texts))
    tok = train_bpe([str(corpus)], vocab_size=4096)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=768, max_position_embeddings=1024,
                      tie_word_embeddings=False, initializer_range=0.2)
    model = build_model(cfg, seed=0)
    bad = [i for i in range(tok.vocab_size) if not tok.decode([i]).isascii() or "\ufffd" in tok.decode([i])]
    specials = [tok.token_to_id(t) for t in tok.special_tokens]
    with torch.no_grad():
        model.lm_head.weight[sorted(set(bad + specials + tok.stop_ids))] = 0
    save_model(model, out / "model", tok)
    return out / "model"


# ----------------------------------------------------------------------------- the client
@dataclass
class Result:
    ttft: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival time of each token
    tokens: int = 0
    error: str | None = None
    sent: float = 0.0  # when the client sent it (perf_counter)


async def stream_chat(port: int, body: dict, res: Result) -> None:
    """POST one streaming request and time each `data:` event that carries content (a minimal HTTP/1.1 client:
    chunked or not, it only needs the SSE lines). The stream must end with a finish_reason (or `data: [DONE]`, which
    transformers serve does not send) and hold max_tokens tokens."""
    t0 = time.perf_counter()
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
        await writer.drain()
        status = (await reader.readline()).split(b" ")[1]
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if status != b"200":
            res.error = f"HTTP {status.decode()}: {(await reader.read(300)).decode(errors='replace')}"
            return
        done = False
        while True:
            line = await reader.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue  # chunk-size lines and blank separators
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                res.error = str(event["error"])[:200]
                return
            for c in event.get("choices", []):
                done = done or c.get("finish_reason") is not None  # transformers serve sends no [DONE]
                if (c.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if not res.times:
                        res.ttft = now - t0
                    res.times.append(now)
                    res.tokens += 1
        if not done:
            res.error = "stream ended without a finish_reason or [DONE]"
        elif res.tokens != body["max_tokens"]:
            res.error = f"{res.tokens} tokens, expected {body['max_tokens']}"
    except (OSError, ValueError, IndexError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()


async def load(port: int, model: str, reqs: list[tuple[str, int]], clients: int) -> tuple[list[Result], float, float]:
    """`clients` workers send the requests in order, each one at a time: -> results, wall time and the start time
    (perf_counter)."""
    results = [Result() for _ in reqs]
    todo = iter(range(len(reqs)))

    async def worker() -> None:
        for i in todo:
            text, max_tokens = reqs[i]
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            results[i].sent = time.perf_counter()
            await stream_chat(port, body, results[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - t0, t0


def requests(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 64))), rng.randint(32, 128)) for _ in range(n)]


# ----------------------------------------------------------------------------- the servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """CPU-seconds of a process, its threads and the processes under it (tristage serve's engines are processes)."""
    ppid, cpu = {}, {}
    for d in Path("/proc").iterdir():
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            ppid[int(d.name)], cpu[int(d.name)] = int(f[1]), (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = set(), [pid]
    while todo:
        tree.add(p := todo.pop())
        todo += [c for c, pp in ppid.items() if pp == p and c not in tree]
    return sum(cpu.get(p, 0.0) for p in tree)


def start(kind: str, folder: Path, port: int, log: Path, env: dict[str, str],
          one_core: bool = False) -> tuple[subprocess.Popen, str]:
    if kind == "tristage":
        cmd = [str(PY / "tristage"), "serve", f"bench={folder}", "--port", str(port), "--log-level", "warning"]
        cmd += ["--prefill-process", "off", "--replicas", "1", "--threads", "1"] if one_core else []
        name = "bench"
    else:
        cmd = [str(PY / "transformers"), "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
               "--port", str(port), "--host", "127.0.0.1", str(folder)]
        name = str(folder)
    p = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, **env})
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return p, name
        except OSError:
            if p.poll() is not None:
                raise SystemExit(f"{kind} server exited: see {log}") from None
            time.sleep(0.5)
    raise SystemExit(f"{kind} server did not start: see {log}")


def stop(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGINT)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def full_concurrency(results: list[Result], t0: float) -> float:
    """Output tokens/s while every client had a request in flight: from the start to the last request sent (after
    it, the next client to finish finds no work and the load drains). Tokens that arrived in that window / its
    length."""
    end = max(r.sent for r in results)
    if end <= t0:
        return float("nan")
    return sum(t <= end for r in results for t in r.times) / (end - t0)


def summarize(results: list[Result], wall: float, t0: float) -> dict:
    ok = [r for r in results if r.error is None]
    tpot = [(r.times[-1] - r.times[0]) / (len(r.times) - 1) for r in ok if len(r.times) > 1]
    gaps = [b - a for r in ok for a, b in zip(r.times, r.times[1:])]
    return {"requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r.error for r in results if r.error), None),
            "tokens": sum(r.tokens for r in results), "tok_s": sum(r.tokens for r in results) / wall, "wall": wall,
            "tok_s_full": full_concurrency(results, t0),
            **{f"ttft_p{q}": pct([r.ttft for r in ok], q) for q in (50, 90, 99)},
            **{f"tpot_p{q}": pct(tpot, q) for q in (50, 90, 99)}, "gap_p99": pct(gaps, 99)}


def run_server(kind: str, folder: Path, levels: list[int], per_client: int, tmp: Path, config: str) -> dict:
    port = free_port()
    env = {"OMP_NUM_THREADS": "1"} if config == "one-thread" else {}
    p, name = start(kind, folder, port, tmp / f"{kind}-{config}.log", env, one_core=config == "one-thread")
    out = {}
    try:
        warm, _, _ = asyncio.run(load(port, name, requests(4, seed=99), 4))  # untimed: first-request costs
        if any(r.error for r in warm):
            print(f"  {kind} warm-up errors: {[r.error for r in warm if r.error][:2]}", flush=True)
        for n in levels:
            reqs = requests(max(6, n * per_client), seed=n)
            b0, s0, c0 = busy_seconds(), proc_cpu(p.pid), own_seconds()
            results, wall, t0 = asyncio.run(load(port, name, reqs, n))
            server_cpu, client_cpu = proc_cpu(p.pid) - s0, own_seconds() - c0
            others = busy_seconds() - b0 - server_cpu - client_cpu
            s = summarize(results, wall, t0)
            s.update(server_cpu=server_cpu / wall, client_cpu=client_cpu / wall, others_cpu=max(0.0, others) / wall)
            out[n] = s
            print(f"  {config:10s} {kind:12s} clients {n:3d}: {s['tok_s']:7.1f} tok/s ({s['tok_s_full']:7.1f} at full "
                  f"concurrency), TTFT p50 "
                  f"{s['ttft_p50'] * 1e3:7.1f} ms, TPOT p50 {s['tpot_p50'] * 1e3:6.1f} ms, errors {s['errors']} "
                  f"(server {s['server_cpu']:.2f} / client {s['client_cpu']:.2f} / others {s['others_cpu']:.2f} "
                  f"cores)" + (f" first error: {s['first_error']}" if s["errors"] else ""), flush=True)
    finally:
        stop(p)
    return out


def median_round(rounds: list[dict]) -> dict:
    """Per level, the round with the median output tokens/s at full concurrency (the lower middle of an even
    count), with the median whole-run tokens/s, every round's figures under "rounds" / "rounds_full" and every
    round's errors counted under "errors_all"."""
    out = {}
    for n in rounds[0]:
        by_speed = sorted((r[n] for r in rounds), key=lambda s: s["tok_s_full"])
        whole = sorted(r[n]["tok_s"] for r in rounds)
        out[n] = {**by_speed[(len(by_speed) - 1) // 2], "tok_s": whole[(len(whole) - 1) // 2],
                  "rounds": [r[n]["tok_s"] for r in rounds], "rounds_full": [r[n]["tok_s_full"] for r in rounds],
                  "errors_all": sum(r[n]["errors"] for r in rounds)}
    return out


# ----------------------------------------------------------------------------- report
def report(res: dict, args: argparse.Namespace, load_before: float) -> str:
    top = max(args.clients)

    def ratio(config: str, n: int, key: str = "tok_s_full") -> float:
        return res[config]["tristage"][n][key] / res[config]["transformers"][n][key]

    def cpu_ms(s: dict) -> float:
        return s["server_cpu"] * s["wall"] / s["tokens"] * 1e3  # the round's own CPU time per token

    errs = sum(s["errors_all"] for c in res.values() for k in c.values() for s in k.values())  # every round's
    import torch
    import transformers

    d, o = res["defaults"], res.get("one-thread")
    head = (f"**{ratio('defaults', top):.2f}x the output tokens/s of `transformers serve --continuous-batching` at "
            f"{top} concurrent streaming clients (while all {top} have a request in flight), each server with its "
            f"defaults** ({d['tristage'][top]['tok_s_full']:.0f} vs {d['transformers'][top]['tok_s_full']:.0f} "
            f"tok/s); over the whole run, the drain at its end included, {ratio('defaults', top, 'tok_s'):.2f}x")
    if o:
        head += (f"; with one core of torch work each **{ratio('one-thread', top):.2f}x** "
                 f"({o['tristage'][top]['tok_s_full']:.0f} vs {o['transformers'][top]['tok_s_full']:.0f} tok/s), "
                 f"whole run {ratio('one-thread', top, 'tok_s'):.2f}x")
    lines = [head + f"; {errs} errors in all; same model folder, same requests, same run.", "",
             "```", f".venv/bin/python bench/bench_serve.py --clients {' '.join(map(str, args.clients))} "
             f"--requests-per-client {args.requests_per_client} --rounds {args.rounds}", "```", "",
             "Settings: a random Llama (byte-level BPE vocab 4096, hidden 256, 6 layers, 8 heads / 4 KV heads, "
             "intermediate 768, untied, ~7M parameters, fp32) saved by tristage as a Hugging Face folder, loaded by "
             "both servers; its special (end-of-turn too) and non-ASCII tokens have logit 0, so every greedy answer "
             "runs to max_tokens (the token counts are checked: a stream with another count is an error). Streaming "
             "chat completions, greedy, user messages of 8-64 words, max_tokens 32-128, the same requests in the same "
             f"order to both; N clients each send their next request when the last ends, max(6, {args.requests_per_client}"
             f" x N) requests per level. Throughput is measured two ways: at full concurrency (output tokens that "
             "arrived while every client had a request in flight, from the start to the moment the last request was "
             "sent, over that time: the load the level names) and over the whole run (all tokens / wall time, "
             "including the drain at the end, when clients run out of requests and fewer than N remain). Each server "
             f"ran {args.rounds} time(s) per configuration, the two taking turns; each row is the level's median round "
             "by tokens/s at full concurrency (the whole-run column: the median of the rounds; the machine's speed "
             "drifts between runs, for both servers), and the ratios are of those medians. `tristage serve "
             "bench=MODEL` (defaults: --max-batch 32 per engine, fp32, CPU; two engine processes (--replicas, 2 "
             "where there are 2 CPUs or more), each with one torch thread here, beside the HTTP process; no prefill "
             "process) and `transformers serve --continuous-batching "
             "--device cpu --dtype "
             f"float32 MODEL` (transformers {transformers.__version__}; its defaults otherwise: torch's threads, 2 "
             "here); one server at a time, each after 4 untimed warm-up requests. Two configurations: each "
             "server's defaults, and one core of torch work each: both started with OMP_NUM_THREADS=1, tristage with "
             "--prefill-process off --replicas 1 --threads 1 (one engine process, which prefills the prompts itself; "
             "the same compute for both). TTFT: request sent to first token; TPOT: time per output token after the first (p50 / p90 "
             "/ p99 over requests); gap p99: the 99th percentile of the gaps between consecutive tokens of a "
             "stream; CPU / token: the server's CPU time (all its processes) per output token.", "",
             f"Machine: 2 vCPU shared with other jobs, torch {torch.__version__}, no GPU; share of both cores "
             f"busy just before the run: {load_before:.0%}. The cores columns are CPU-seconds per second of the "
             "run: the server, this bench's client, and every other process on the machine (other jobs' load).", "",
             "| config | server | clients | tok/s, full concurrency | of each round | tok/s, whole run | of each round "
             "| TTFT p50 / p90 / p99 (ms) | "
             "TPOT p50 / p90 / p99 (ms) | gap p99 (ms) | errors | CPU / token (ms) | cores: server / client / others |",
             "|---|---|---:|---:|---|---:|---|---|---|---:|---:|---:|---|"]
    for config, by_kind in res.items():
        for kind in ("tristage", "transformers"):
            for n, s in by_kind[kind].items():
                lines.append(f"| {config} | {kind} | {n} | {s['tok_s_full']:.1f} | "
                             f"{' / '.join(f'{x:.0f}' for x in s['rounds_full'])} | {s['tok_s']:.1f} | "
                             f"{' / '.join(f'{x:.0f}' for x in s['rounds'])} | {s['ttft_p50'] * 1e3:.0f} / "
                             f"{s['ttft_p90'] * 1e3:.0f} / {s['ttft_p99'] * 1e3:.0f} | {s['tpot_p50'] * 1e3:.1f} / "
                             f"{s['tpot_p90'] * 1e3:.1f} / {s['tpot_p99'] * 1e3:.1f} | {s['gap_p99'] * 1e3:.1f} | "
                             f"{s['errors']} | {cpu_ms(s):.2f} | {s['server_cpu']:.2f} / {s['client_cpu']:.2f} / "
                             f"{s['others_cpu']:.2f} |")
    for config in res:
        lines += ["", f"Ratio of output tokens/s (tristage / transformers), {config}: at full concurrency " + ", ".join(
            f"{n} clients {ratio(config, n):.2f}x" for n in args.clients) + "; whole run " + ", ".join(
            f"{n} clients {ratio(config, n, 'tok_s'):.2f}x" for n in args.clients) + "."]
    if o:
        low = min(args.clients)
        met = {c: ratio(c, top) >= 2 for c in res}
        verdict = ("met with both configurations" if all(met.values()) else "not met" if not any(met.values())
                   else "met only with " + ", ".join(c for c, m in met.items() if m))
        t, x = d["tristage"][top], d["transformers"][top]
        lines += ["", f"Reading: the 2x target at {top} clients: {verdict}. At {top} clients with the defaults "
                  f"tristage's server spent {cpu_ms(t):.2f} ms of CPU per output token on {t['server_cpu']:.2f} "
                  f"cores (its two engine processes and the HTTP side), transformers {cpu_ms(x):.2f} ms on "
                  f"{x['server_cpu']:.2f} cores. transformers' time per token at {low} client(s) is "
                  f"{d['transformers'][low]['tpot_p50'] * 1e3:.1f} ms with its defaults (torch's threads) and "
                  f"{o['transformers'][low]['tpot_p50'] * 1e3:.1f} ms with one thread. The one-thread rows compare "
                  "the engines doing the same work: "
                  + ", ".join(f"{ratio('one-thread', n):.2f}x at {n} clients" for n in args.clients)
                  + ". Under other jobs' load (the 'others' column) the defaults ratio is inflated: transformers' "
                  "two threads then contend with them for the cores.", "",
                  "Why two engine processes: a decode step of this model is some 150 small torch ops, which one "
                  "thread runs best (a second torch thread in the same process did not pay: its work per op is too "
                  "small to split); two engines, each decoding about half the rows on a core of its own, use both "
                  "cores. Measured at 16 clients, tristage alone, the variants taking turns (2026-12-03): 2334 and "
                  "1790 tok/s with two against 1414 with one. The one-thread configuration is one engine process.",
                  "",
                  "Where tristage's time goes in one engine process (py-spy on it under this load at 16 clients; "
                  "torch.profiler on its decode step alone): with the prompts prefilled in a process of their own "
                  "(`--prefill-process on`), "
                  "the engine process spends ~86% of its time in decode steps, ~5% admitting rows and ~2% sending "
                  "tokens. A 16-row decode step (~7 ms) is ~37% attention over the fp32 KV cache (SDPA's CPU kernel: "
                  "~380 us a layer at ~150 slots), ~29% the linear layers (oneDNN on packed weights, serve/packed.py; "
                  "q/k/v and gate/up one product each) and the rest small ops (norms, rotary embeddings, sampling). "
                  "Prefilling the prompts that join was a quarter of the engine process's time (profiled) when the "
                  "engine did it, on the one core its decode steps use; the prefill process moves it to the second "
                  "core, which the HTTP side (~0.1-0.2 ms of CPU per token) and this bench's client share with it. "
                  "Its price is latency while that core is busy, and its gain did not hold: A/B at 16 clients "
                  "(tristage alone, the same load, the variants taking turns, 2026-12-02) 1297 / 1085 / 1262 tok/s "
                  "with it against 1074 / 1277 / 1237 without, TTFT p50 46-56 ms against 34-43 ms (at 4 clients "
                  "37-43 against 25-34 ms); across this bench's runs that day it moved tokens/s at 16 clients by -13% "
                  "to +11%. So it is off by default. "
                  "Tried and within the run-to-run noise: two torch threads (for every op, or for attention alone), "
                  "the prefill on a second thread of the engine process, "
                  "other forms of attention (query heads folded onto their KV head, batched matmuls: 5-10% faster "
                  "alone), fused norms, torch.compile of the decode step (no faster at 16 rows; 20-35 s to compile)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--servers", nargs="+", default=["tristage", "transformers"])
    ap.add_argument("--configs", nargs="+", default=["defaults", "one-thread"], choices=["defaults", "one-thread"])
    ap.add_argument("--rounds", type=int, default=3, help="each server this many times per configuration, taking "
                    "turns; each level reports its median round (the machine's speed drifts between runs)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    folder = build_model(tmp)
    print(f"model folder {folder}; waiting for quiet CPUs", flush=True)
    load_before = wait_quiet(60)
    runs: dict = {config: {kind: [] for kind in args.servers} for config in args.configs}
    for config in args.configs:
        for _ in range(args.rounds):  # the servers take turns, so a drift in the machine's speed reaches both
            for kind in args.servers:
                runs[config][kind].append(run_server(kind, folder, args.clients, args.requests_per_client, tmp, config))
    res = {config: {kind: median_round(rounds) for kind, rounds in by_kind.items()} for config, by_kind in runs.items()}
    if not args.no_write and set(args.servers) == {"tristage", "transformers"} and "defaults" in res:
        write_section("Serving", report(res, args, load_before))
        print("wrote the Serving section of bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
