"""The arena's benchmarks: the vicuna80 human-vote leaderboard against FastChat's methods, the time to fit and
bootstrap 10^5 battles, and an automatic arena of the demo world's models.

    .venv/bin/python bench/bench_arena.py                                   # all three parts
    .venv/bin/python bench/bench_arena.py --only vicuna timing
    .venv/bin/python bench/bench_arena.py --only demo --demo /tmp/demo_final --extra ppo=runs/ppo/model

Parts (results in runs/bench_arena/results.json, printed as markdown; --write puts them in bench/RESULTS.md):
  vicuna   ../shared/data/arena/vicuna80/human_battles.jsonl (7,040 human votes, 9 models): tristage's board
           (1000 bootstrap rounds, seed 0) next to two small reimplementations of FastChat's methods, written here
           from its published code (read, not copied):
             notebook      the 2023 Chatbot Arena notebook's `compute_mle_elo`: every battle twice, a tie once as an
                           A win and once as a B win, scikit-learn's LogisticRegression (no intercept, no penalty,
                           tol 1e-8) on +-ln 10 columns, 400 x coef + 1000; bootstrap = 1000 refits on
                           `battles.sample(frac=1, replace=True)` under np.random.seed(42); the notebook's plot shows
                           the bootstrap median with the 2.5 / 97.5 quantiles
             elo_analysis  fastchat/serve/monitor/elo_analysis.py's `compute_elo_mle_with_tie` (2024): the BT
                           likelihood on unique (a, b, outcome) rows minimised by scipy's L-BFGS-B (100 iterations at
                           most, gtol 1e-6), bootstrap = multinomial draws of the rows' counts
           (needs scikit-learn and scipy: the bench extra; a method whose library is missing is left out).
  timing   10^5 synthetic battles among 20 models: one fit, a 100-round bootstrap, the same with style control,
           and the notebook method's single fit for comparison (medians of 3).
  demo     `tristage arena` on a finished demo folder (--demo: base, sft, dpo, dpo_round2 + --extra NAME=PATH):
           100 held-out prompts, greedy answers (as tristage.eval.world.evaluate_chat_model answers), judged by the
           simulated annotator (--judge world); the same answers judged by the demo's reward model (rm:); the style-
           controlled board of the world battles; each model's mean gold score on the same 100 prompts from
           evaluate_chat_model; Kendall's tau between each board and the gold means.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import busy_share, write_section  # noqa: E402
from tristage.eval.arena import Battles, fit_bt, kendall_tau, leaderboard, read_battles  # noqa: E402

VICUNA = ROOT.parent / "shared" / "data" / "arena" / "vicuna80" / "human_battles.jsonl"
OUT = ROOT / "runs" / "bench_arena"


# ----------------------------------------------------------------------------- FastChat's methods, reimplemented
def notebook_mle(ma: np.ndarray, mb: np.ndarray, winner: np.ndarray, models: list[str]) -> np.ndarray:
    """The notebook's compute_mle_elo: ratings [p] in `models` order (model indices ma, mb [N]; winner strings)."""
    from sklearn.linear_model import LogisticRegression

    n, p = len(ma), len(models)
    x = np.zeros((2 * n, p))
    rows = np.arange(2 * n)
    x[rows, np.concatenate([ma, ma])] = math.log(10)
    x[rows, np.concatenate([mb, mb])] = -math.log(10)
    tie = np.isin(winner, ["tie", "tie (bothbad)"])
    y = np.concatenate([(winner == "model_a") | tie, winner == "model_a"]).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer scikit-learn spells "no penalty" C=inf; the fit is the same
        lr = LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8)
        lr.fit(x, y)
    return 400 * lr.coef_[0] + 1000


def elo_analysis_mle(a: np.ndarray, b: np.ndarray, s: np.ndarray, w: np.ndarray, p: int) -> np.ndarray:
    """elo_analysis.py's fit_bt + scale: L-BFGS-B on the weighted BT negative log-likelihood, 400 x r + 1000."""
    from scipy.optimize import minimize
    from scipy.special import expit

    alpha = math.log(10)

    def loss_grad(r):
        d = alpha * (r[a] - r[b])
        q = expit(d)
        loss = -((np.log(q) * s + np.log(1 - q) * (1 - s)) * w).sum()
        g = -alpha * (s - q) * w
        grad = np.zeros(p)
        np.add.at(grad, a, g)
        np.add.at(grad, b, -g)
        return loss, grad

    res = minimize(loss_grad, np.zeros(p), jac=True, method="L-BFGS-B", options={"maxiter": 100, "gtol": 1e-6})
    return 400 * res.x + 1000


def fastchat_inputs(path: Path):
    """(models, ma, mb, winner) of a battle file; models in the notebook's order, pd.concat([model_a, model_b])
    .unique()."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    models = list(dict.fromkeys([r["model_a"] for r in rows] + [r["model_b"] for r in rows]))
    idx = {m: i for i, m in enumerate(models)}
    return (models, np.array([idx[r["model_a"]] for r in rows]), np.array([idx[r["model_b"]] for r in rows]),
            np.array([r["winner"] for r in rows]))


def unique_rows(ma, mb, winner):
    key = np.stack([ma, mb, np.select([winner == "model_a", winner == "model_b"], [2, 0], 1)], 1)
    u, counts = np.unique(key, axis=0, return_counts=True)
    return u[:, 0], u[:, 1], u[:, 2] / 2.0, counts.astype(float)


def vicuna(rounds: int = 1000) -> dict:
    b = read_battles(VICUNA)
    t = time.perf_counter()
    board = leaderboard(b, bootstrap=rounds, seed=0)
    ours_s = time.perf_counter() - t
    res = {"battles": len(b), "ours": {m: {"rating": float(board.rating[i]), "lower": float(board.lower[i]),
                                           "upper": float(board.upper[i]), "median": float(board.median[i]),
                                           "rank": int(board.rank[i]), "battles": int(board.battles[i]),
                                           "online_elo": float(board.online_elo[i])}
                                       for i, m in enumerate(board.models)},
           "ours_seconds": ours_s, "order": board.models}
    models, ma, mb, winner = fastchat_inputs(VICUNA)
    try:
        notebook_mle(ma, mb, winner, models)  # untimed: imports scikit-learn
        t = time.perf_counter()
        point = notebook_mle(ma, mb, winner, models)
        fit_s = time.perf_counter() - t
        np.random.seed(42)
        n = len(ma)
        boot = []
        t = time.perf_counter()
        for _ in range(rounds):
            i = np.random.randint(0, n, n)  # what DataFrame.sample(frac=1, replace=True) draws
            boot.append(notebook_mle(ma[i], mb[i], winner[i], models))
        boot_s = time.perf_counter() - t
        boot = np.array(boot)
        q = np.percentile(boot, [2.5, 50, 97.5], axis=0)
        res["notebook"] = {m: {"rating": float(point[j]), "lower": float(q[0, j]), "median": float(q[1, j]),
                               "upper": float(q[2, j])} for j, m in enumerate(models)}
        res["notebook_seconds"] = {"fit": fit_s, "bootstrap": boot_s}
    except ImportError as e:
        res["notebook_missing"] = str(e)
    try:
        a, bb, s, w = unique_rows(ma, mb, winner)
        point = elo_analysis_mle(a, bb, s, w, len(models))
        np.random.seed(42)
        draws = np.random.multinomial(len(ma), w / w.sum(), size=rounds) / len(ma)
        boot = np.array([elo_analysis_mle(a, bb, s, d, len(models)) for d in draws])
        q = np.percentile(boot, [2.5, 97.5], axis=0)
        res["elo_analysis"] = {m: {"rating": float(point[j]), "lower": float(q[0, j]), "upper": float(q[1, j])}
                               for j, m in enumerate(models)}
    except ImportError as e:
        res["elo_analysis_missing"] = str(e)
    return res


# ----------------------------------------------------------------------------- timing
def synthetic(n: int, p: int, seed: int = 0) -> Battles:
    rng = np.random.default_rng(seed)
    strength = rng.normal(0, 150, p)
    a = rng.integers(0, p, n)
    b = (a + rng.integers(1, p, n)) % p
    pa = 1 / (1 + 10 ** ((strength[b] - strength[a]) / 400))
    u, v = rng.random(n), rng.random(n)
    score = np.where(v < 0.1, 0.5, (u < pa).astype(float))
    la, lb = rng.uniform(20, 600, n), rng.uniform(20, 600, n)
    names = [f"m{i:02d}" for i in range(p)]
    return Battles(names, a, b, score, {"length": la}, {"length": lb})


def _median_time(fn, reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def timing(n: int = 100_000, p: int = 20, rounds: int = 100) -> dict:
    b = synthetic(n, p)
    res = {"battles": n, "models": p, "rounds": rounds, "busy_share_before": busy_share(2.0)}
    res["fit_s"] = _median_time(lambda: fit_bt(b))
    res["bootstrap_s"] = _median_time(lambda: leaderboard(b, bootstrap=rounds, seed=0))
    res["style_fit_s"] = _median_time(lambda: fit_bt(b, style=["length"]))
    res["style_bootstrap_s"] = _median_time(lambda: leaderboard(b, bootstrap=rounds, seed=0, style=["length"]))
    try:
        winner = np.where(b.score == 1, "model_a", np.where(b.score == 0, "model_b", "tie"))
        res["notebook_fit_s"] = _median_time(lambda: notebook_mle(b.a, b.b, winner, b.models))
    except ImportError:
        pass
    res["busy_share_after"] = busy_share(2.0)
    return res


# ----------------------------------------------------------------------------- the demo world's arena
def _run(argv: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run([str(ROOT / ".venv" / "bin" / "tristage"), *argv], stdout=fh, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"{' '.join(argv[:3])}... failed ({p.returncode}); see {log}")
    return time.perf_counter() - t


def demo(root: Path, extra: list[str], limit: int = 100, rounds: int = 1000, prev: dict | None = None) -> dict:
    from tristage.eval.world import evaluate_chat_model

    models = {m: root / m / "model" for m in ("base", "sft", "dpo", "dpo_round2") if (root / m / "model").is_dir()}
    for spec in extra:
        name, _, path = spec.partition("=")
        models[name] = Path(path)
    prompts = root / "world" / "eval" / "prompts.jsonl"
    OUT.mkdir(parents=True, exist_ok=True)
    world_out, rm_out = OUT / "demo_world", OUT / "demo_rm"
    common = ["--prompts", str(prompts), "--limit", str(limit), "--temperature", "0", "--bootstrap", str(rounds),
              "--no-progress"]
    res: dict = {"models": {m: str(p) for m, p in models.items()}, "prompts": limit}
    res["world_seconds"] = _run(["arena", *[f"{m}={p}" for m, p in models.items()], "--judge", "world", "--out",
                                 str(world_out), *common], OUT / "demo_world.log")
    res["world"] = json.loads((world_out / "summary.json").read_text())
    answers = [f"{m}={world_out / 'answers' / f'{m}.jsonl'}" for m in models]
    res["rm_seconds"] = _run(["arena", *answers, "--judge", f"rm:{root / 'reward' / 'model'}", "--out", str(rm_out),
                              *common], OUT / "demo_rm.log")
    res["rm"] = json.loads((rm_out / "summary.json").read_text())
    for key in ("world", "rm"):  # a rerun resumes the finished arenas: keep the time of the run that did the work
        if not res[key]["battles_judged"] and prev and f"{key}_seconds" in prev:
            res[f"{key}_seconds"] = prev[f"{key}_seconds"]
    for key, folder in (("world_style", world_out), ("rm_style", rm_out)):
        _run(["leaderboard", str(folder / "battles.jsonl"), "--style-control", "--bootstrap", str(rounds), "--json",
              str(OUT / f"demo_{key}.json")], OUT / f"demo_{key}.log")
        res[key] = json.loads((OUT / f"demo_{key}.json").read_text())
        res[f"{key}_coef"] = [x for x in (OUT / f"demo_{key}.log").read_text().splitlines()
                              if x.startswith("style control:")]
    res["length"] = {m: float(np.mean([len(json.loads(x)["answer"]) for x in
                                       (world_out / "answers" / f"{m}.jsonl").read_text().splitlines()]))
                     for m in models}
    gold = {}
    for m, p in models.items():
        gold[m] = evaluate_chat_model(p, prompts, limit=limit)["overall"]
    res["gold"] = gold
    for key in ("world", "rm"):
        board = res[key]["board"]
        res[f"tau_{key}"] = kendall_tau([r["rating"] for r in board], [gold[r["model"]] for r in board])
    for key in ("world_style", "rm_style"):
        board = res[key]
        res[f"tau_{key}"] = kendall_tau([r["rating"] for r in board], [gold[r["model"]] for r in board])
    return res


# ----------------------------------------------------------------------------- report
def _ci(x: dict) -> str:
    lo = "-inf" if x.get("lower") is None else f"{x['lower']:.0f}"
    hi = "+inf" if x.get("upper") is None else f"{x['upper']:.0f}"
    return f"{x['rating']:.0f} [{lo}, {hi}]"


def report(res: dict) -> str:
    out = []
    if "vicuna" in res:
        v = res["vicuna"]
        out.append(f"### vicuna80 human votes ({v['battles']:,} battles, 9 models)\n")
        nb, ea = v.get("notebook"), v.get("elo_analysis")
        out.append("| model | tristage: rating [95% interval] (rank) | FastChat notebook: MLE / bootstrap median "
                   "[2.5, 97.5] | FastChat elo_analysis.py: MLE [2.5, 97.5] | tristage - notebook MLE | "
                   "online Elo (K=4) |")
        out.append("|---|---|---|---|---|---|")
        for m in v["order"]:
            o = v["ours"][m]
            n = nb[m] if nb else None
            e = ea[m] if ea else None
            out.append(f"| {m} | {_ci(o)} ({o['rank']}) | "
                       + (f"{n['rating']:.1f} / {n['median']:.0f} [{n['lower']:.0f}, {n['upper']:.0f}]" if n else "-")
                       + " | " + (f"{e['rating']:.1f} [{e['lower']:.0f}, {e['upper']:.0f}]" if e else "-")
                       + " | " + (f"{o['rating'] - n['rating']:+.2f}" if n else "-")
                       + f" | {o['online_elo']:.0f} |")
        if nb:
            d = [abs(v["ours"][m]["rating"] - nb[m]["rating"]) for m in v["order"]]
            dl = [abs(v["ours"][m]["lower"] - nb[m]["lower"]) for m in v["order"]]
            du = [abs(v["ours"][m]["upper"] - nb[m]["upper"]) for m in v["order"]]
            out.append(f"\nLargest difference to the notebook: MLE {max(d):.2f} points, interval ends "
                       f"{max(dl + du):.1f} points; tristage's 1000-round board took {v['ours_seconds']:.2f} s, the "
                       f"notebook method {v['notebook_seconds']['fit']:.2f} s per fit and "
                       f"{v['notebook_seconds']['bootstrap']:.0f} s for its 1000 rounds.")
    if "timing" in res:
        t = res["timing"]
        per = 1000 / t["battles"]
        out.append(f"\n### Time to fit ({t['battles']:,} synthetic battles, {t['models']} models, 10% ties)\n")
        out.append("| what | seconds | per 1,000 battles |")
        out.append("|---|---|---|")
        rows = [("one Bradley-Terry fit", t["fit_s"]), (f"board with {t['rounds']} bootstrap rounds", t["bootstrap_s"]),
                ("one fit with style control (length)", t["style_fit_s"]),
                (f"board with style control, {t['rounds']} rounds", t["style_bootstrap_s"])]
        if "notebook_fit_s" in t:
            rows.append(("FastChat notebook method, one fit (scikit-learn on 2N rows)", t["notebook_fit_s"]))
        for name, s in rows:
            out.append(f"| {name} | {s:.3f} | {s * per * 1000:.2f} ms |")
        out.append(f"\nMedians of 3; CPUs busy with other jobs: {t['busy_share_before']:.0%} before, "
                   f"{t['busy_share_after']:.0%} after.")
    if "demo" in res:
        d = res["demo"]
        out.append(f"\n### Demo-world arena ({d['prompts']} held-out prompts, greedy answers)\n")
        out.append("| model | mean gold (evaluate_chat_model) | mean answer length (chars) | judge world: rating "
                   "[95%] | judge world, style control | judge rm (the demo's reward model) | judge rm, style control |")
        out.append("|---|---|---|---|---|---|---|")
        by = {k: {r["model"]: r for r in d[k]["board"]} for k in ("world", "rm")}
        by.update({k: {r["model"]: r for r in d[k]} for k in ("world_style", "rm_style")})
        for m in sorted(d["gold"], key=lambda m: -d["gold"][m]):
            out.append(f"| {m} | {d['gold'][m]:.4f} | {d['length'][m]:.0f} | {_ci(by['world'][m])} | "
                       f"{_ci(by['world_style'][m])} | {_ci(by['rm'][m])} | {_ci(by['rm_style'][m])} |")
        out.append("\nStyle coefficients: world: " + "; ".join(d["world_style_coef"]) + "; rm: "
                   + "; ".join(d["rm_style_coef"]) + ".")
        out.append(f"\nKendall tau with the gold order: world {d['tau_world']:.3f}, world with style control "
                   f"{d['tau_world_style']:.3f}, rm {d['tau_rm']:.3f}, rm with style control {d['tau_rm_style']:.3f}. "
                   f"Battles: {d['world']['battles']} "
                   f"({d['world']['ties']} ties, {d['world']['identical']} of identical answers); the arena took "
                   f"{d['world_seconds']:.0f} s (answers + world judge), {d['rm_seconds']:.0f} s with the rm judge "
                   "on the same answers.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["vicuna", "timing", "demo"])
    ap.add_argument("--demo", default="/tmp/demo_final", help="a finished `tristage demo` folder")
    ap.add_argument("--extra", nargs="*", default=[], help="more models for the demo arena: NAME=PATH")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--write", action="store_true", help="replace the arena section of bench/RESULTS.md")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if "vicuna" in args.only and VICUNA.exists():
        res["vicuna"] = vicuna()
    if "timing" in args.only:
        res["timing"] = timing()
    if "demo" in args.only and (Path(args.demo) / "sft" / "model").is_dir():
        res["demo"] = demo(Path(args.demo), args.extra, args.limit, prev=res.get("demo"))
    path.write_text(json.dumps(res, indent=2))
    text = report(res)
    print(text)
    if args.write:
        write_section("Arena: leaderboards from pairwise battles", text)


if __name__ == "__main__":
    main()
