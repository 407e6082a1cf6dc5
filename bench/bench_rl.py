"""Online RL benchmark: tristage `ppo` / `grpo` against TRL's PPOTrainer (trl 0.29.1) / GRPOTrainer (TRL 1.16).

    .venv/bin/python bench/bench_rl.py [--repeats 2] [--ppo-steps 12] [--grpo-steps 20] [--quick] [--no-write]
    .venv/bin/python bench/bench_rl.py --report-only      # rewrite the sections from the last run's results.json

TRL 1.16 (the venv's) has no PPO trainer, so TRL 0.29.1 is installed beside it on first use (`pip install --no-deps
--target runs/trl029 trl==0.29.1`) and its PPO worker runs with PYTHONPATH=runs/trl029 (it trains with the venv's
transformers 5.24).

Target (issue): >= 2x TRL's optimizer steps per second on each of PPO and GRPO, same tiny models, prompts and
settings, in the same run, on this CPU (../shared/BASELINES.md section 3(d): TRL PPO 0.57 updates/s, GRPO 1.94
steps/s), with peak memory beside it and, for tristage, where the time goes.

One run does:
1. the shared setup in --work: tristage's char tokenizer (`train_char` on tiny Shakespeare, our ChatML template,
   eos = `<|im_end|>`, so the one token that ends a turn is the same for tristage and TRL: see STOP below); a
   tristage GPT with the BASELINES Llama shape (hidden 128, 4 layers, 4 heads, intermediate 512, tied, seed 0)
   saved as a Hugging Face folder (`policy`, also the reference on both sides), a reward model (`rm`: the same
   backbone shape, seed 1, our score head) and a value model (`vm`: seed 2), both LlamaForSequenceClassification
   folders (`save_reward_model`); N_PROMPTS training and N_VAL held-out prompts (a tiny-Shakespeare line cut to
   PROMPT_CHARS characters, so every rendered prompt has the same length and no side pads).
2. every trainer in its own subprocess (`--worker NAME`), the order alternating between repeats, each run waiting
   for idle CPUs first (benchlib.wait_quiet) and retried when other jobs used the CPUs meanwhile; per rollout batch
   the time between the ends of consecutive batches (TRL: the step-end callback, called once per rollout batch;
   tristage: an optimizer post-hook, every ppo_epochs x num_minibatches-th step); medians over batches after
   WARMUP, then the median over repeats. Peak RSS = the subprocess's ru_maxrss (os.wait4).
3. the "## PPO" and "## GRPO" sections of bench/RESULTS.md.

STOP. tristage's char tokenizer ends a generation at eos (`<|endoftext|>`) or at the end-of-turn token
(`<|im_end|>`); TRL ends at the tokenizer's eos only. With the default eos a random model would stop twice as often
on our side (two stop tokens of 329) and so do less work; the tokenizer is therefore saved with eos =
`<|im_end|>`, which makes `<|im_end|>` the only stop token on both sides. The random policy still emits it now
and then (about 1 in 329 tokens), so the completions' mean lengths are reported for both sides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from benchlib import RESULTS, busy_seconds, own_seconds, wait_quiet, write_section

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
TRL029 = ROOT / "runs" / "trl029"  # pip install --no-deps --target runs/trl029 trl==0.29.1 (TRL 1.16 has no PPO)
END = "<|im_end|>"
PROMPT_CHARS, N_PROMPTS, N_VAL = 32, 512, 4
MAX_NEW = 64
WARMUP = 3  # rollout batches left out of the medians
DISTURBED = 0.05  # other jobs' CPU-seconds per second of a run above which the run is marked disturbed
LLAMA = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
             max_position_embeddings=512, tie_word_embeddings=True)
# PPO: BASELINES.md 3(d); the rest TRL PPOConfig's defaults, which tristage's equal: kl 0.05 (k1, in the reward),
# clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95; temperature 0.7 (TRL's default) on both sides
PPO = dict(batch=16, epochs=4, minibatches=1, lr=3e-6, beta=0.05, temperature=0.7, missing_eos_penalty=1.0)
# GRPO: BASELINES.md 3(d): 16 completions per step = 4 prompts x 4; TRL's default loss "dapo" = our --loss-agg token
GRPO = dict(prompts=4, k=4, lr=1e-6, beta=0.04, temperature=1.0)
TRL_BASELINE = {"ppo_updates_s": 0.57, "grpo_steps_s": 1.94}

# name -> (label, settings)
TRAINERS = {
    "trl_ppo": ("TRL PPOTrainer 0.29.1", "fp32 (bf16=False)"),
    "trl_ppo_bf16": ("TRL PPOTrainer 0.29.1", "bf16=True (CPU autocast; TRL's default)"),
    "ours_ppo": ("tristage ppo", "fp32 (--dtype float32)"),
    "ours_ppo_bf16": ("tristage ppo", "bf16 autocast (--dtype auto, its default: bfloat16 on this CPU)"),
    "trl_grpo": ("TRL GRPOTrainer 1.16", "fp32 (bf16=False), transformers generate"),
    "trl_grpo_bf16": ("TRL GRPOTrainer 1.16", "bf16=True (CPU autocast; TRL's default), transformers generate"),
    "ours_grpo": ("tristage grpo", "fp32 (--dtype float32)"),
    "ours_grpo_bf16": ("tristage grpo", "bf16 autocast (--dtype auto, its default: bfloat16 on this CPU)"),
}
ORDER = list(TRAINERS)


def is_ppo(name: str) -> bool:
    return "ppo" in name


def per_batch(name: str) -> tuple[int, int]:
    """(completions, optimizer steps) per rollout batch."""
    return (PPO["batch"], PPO["epochs"] * PPO["minibatches"]) if is_ppo(name) else (GRPO["prompts"] * GRPO["k"], 1)


# ----------------------------------------------------------------------------- setup
def prompt_texts() -> list[str]:
    lines = [x.strip() for x in SHAKESPEARE.read_text().splitlines()]
    return [x[:PROMPT_CHARS] for x in lines if len(x) >= PROMPT_CHARS][:N_PROMPTS + N_VAL]


def setup(work: Path) -> dict:
    """Tokenizer, the policy / reward / value folders and the prompt files; returns facts for the report."""
    import torch

    from tristage.model.gpt import ModelConfig, build_model
    from tristage.model.hf import save_model
    from tristage.model.score import from_causal_lm, save_reward_model
    from tristage.tokenizer import Tokenizer, train_char

    tok = train_char([str(SHAKESPEARE)])
    tok.eos_token = END  # one stop token on both sides (module docstring, STOP)
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_key_value_heads=4, **LLAMA)
    model = build_model(cfg, seed=0)
    save_model(model, work / "policy", tok, dtype=torch.float32)
    for name, seed in (("rm", 1), ("vm", 2)):
        save_reward_model(from_causal_lm(build_model(cfg, seed=seed), 1, seed=seed), work / name, tok,
                          dtype=torch.float32)
    texts = prompt_texts()
    rows = [{"prompt": [{"role": "user", "content": t}]} for t in texts]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:N_PROMPTS]))
    (work / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[N_PROMPTS:]))
    back = Tokenizer.load(work / "policy")
    lens = {len(back.apply_chat_template(r["prompt"], add_generation_prompt=True)) for r in rows}
    return {"vocab": tok.vocab_size, "params": sum(p.numel() for p in model.parameters()), "prompt_tokens": lens,
            "stop_ids": back.stop_ids, "end_id": back.token_to_id(END)}


def read_rows(work: Path, name: str = "prompts.jsonl") -> list[dict]:
    return [json.loads(x) for x in (work / name).read_text().splitlines()]


# ----------------------------------------------------------------------------- workers (one trainer per process)
def generate_timer(rec: dict) -> None:
    """Add the seconds spent in transformers' generate to rec["gen_now"] (TRL's generation time)."""
    from transformers.generation.utils import GenerationMixin

    orig = GenerationMixin.generate

    def timed(self, *a, **k):
        t = time.perf_counter()
        out = orig(self, *a, **k)
        rec["gen_now"] = rec.get("gen_now", 0.0) + time.perf_counter() - t
        return out

    GenerationMixin.generate = timed


def trl_clock(rec: dict):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            rec["ends"].append(time.perf_counter())
            rec["gen"].append(rec.pop("gen_now", 0.0))

    return Clock()


def worker_trl_ppo(work: Path, name: str, steps: int, rec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    from tristage.tokenizer import Tokenizer

    rec["t0"] = time.perf_counter()
    generate_timer(rec)
    tok = AutoTokenizer.from_pretrained(work / "policy")
    tok.padding_side = "left"
    ours = Tokenizer.load(work / "policy")  # the same ids as transformers' (tristage tests it); a plain list of ids
    ds = Dataset.from_list([{"input_ids": ours.apply_chat_template(r["prompt"], add_generation_prompt=True)}
                            for r in read_rows(work)])
    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", **load)
    ref = AutoModelForCausalLM.from_pretrained(work / "policy", **load)
    rm = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, **load)
    vm = AutoModelForSequenceClassification.from_pretrained(work / "vm", num_labels=1, **load)
    truncate = ppo_mod.truncate_response

    def lengths(stop_token_id, pad_token_id, responses):  # TRL's own cut at the first stop token, lengths counted
        hit = responses == stop_token_id
        first = torch.where(hit.any(1), hit.int().argmax(1) + 1, responses.shape[1])
        rec["lengths"].append(first.float().mean().item())
        rec["stop_rate"].append(hit.any(1).float().mean().item())
        rec["decoded"].append(responses.shape[1])
        return truncate(stop_token_id, pad_token_id, responses)

    ppo_mod.truncate_response = lengths
    args = PPOConfig(output_dir=str(work / name), per_device_train_batch_size=PPO["batch"],
                     num_mini_batches=PPO["minibatches"], num_ppo_epochs=PPO["epochs"],
                     total_episodes=steps * PPO["batch"], response_length=MAX_NEW,
                     local_rollout_forward_batch_size=PPO["batch"], stop_token="eos",
                     missing_eos_penalty=PPO["missing_eos_penalty"], use_cpu=True, bf16=name.endswith("bf16"),
                     gradient_checkpointing=False, learning_rate=PPO["lr"], kl_coef=PPO["beta"],
                     temperature=PPO["temperature"], lr_scheduler_type="constant", adam_beta2=0.95,
                     num_sample_generations=0, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                     disable_tqdm=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         value_model=vm, train_dataset=ds, callbacks=[trl_clock(rec)])
    trainer.train()
    rec["settings"] = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                       "stop_token_id": trainer.stop_token_id, "eos": tok.eos_token, "attn":
                       policy.config._attn_implementation}


def worker_trl_grpo(work: Path, name: str, steps: int, rec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer

    rec["t0"] = time.perf_counter()
    generate_timer(rec)
    rm = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, dtype=torch.float32,
                                                            attn_implementation="sdpa")
    args = GRPOConfig(output_dir=str(work / name), per_device_train_batch_size=GRPO["prompts"] * GRPO["k"],
                      num_generations=GRPO["k"], max_completion_length=MAX_NEW, beta=GRPO["beta"],
                      learning_rate=GRPO["lr"], temperature=GRPO["temperature"], use_cpu=True,
                      bf16=name.endswith("bf16"), gradient_checkpointing=False, lr_scheduler_type="constant",
                      adam_beta2=0.95, max_steps=steps, logging_steps=1, report_to="none", save_strategy="no",
                      seed=0, disable_tqdm=True, dataloader_num_workers=0,
                      model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
    # the policy as a folder path: TRL then loads the reference from it too (BASELINES.md section 3)
    trainer = GRPOTrainer(model=str(work / "policy"), reward_funcs=rm, args=args,
                          train_dataset=Dataset.from_list(read_rows(work)), callbacks=[trl_clock(rec)])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    rec["lengths"] = [h["completions/mean_length"] for h in logs]
    rec["stop_rate"] = [1.0 - h.get("completions/clipped_ratio", 0.0) for h in logs]
    rec["settings"] = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                       "loss_type": args.loss_type, "eos": trainer.processing_class.eos_token,
                       "steps_per_generation": args.steps_per_generation}


def worker_ours(work: Path, name: str, steps: int, rec: dict) -> None:
    from tristage.stages import grpo, ppo, rl
    from tristage.train import loop

    rec["t0"] = time.perf_counter()
    _, opt_steps = per_batch(name)
    build, n = loop.build_optimizer, [0]

    def build_timed(*a, **k):
        opt = build(*a, **k)

        def hook(*_):
            n[0] += 1
            if n[0] % opt_steps == 0:
                rec["ends"].append(time.perf_counter())

        opt.register_step_post_hook(hook)
        return opt

    sub: dict[str, float] = {}

    def timed(fn, key):  # seconds inside fn, per step (a finer split of the stage's time_update)
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            sub[key] = sub.get(key, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    stage = ppo if is_ppo(name) else grpo
    loop.build_optimizer = build_timed
    loop.train_step = timed(loop.train_step, "optimizer_steps")
    stage.advantages = timed(stage.advantages, "advantages")
    rl.batch_stats = timed(rl.batch_stats, "batch_stats")
    record = loop.Reporter.record

    def record_sub(self, step, metrics, info=None):
        if "reward" in metrics:  # a training step's record: add this step's finer split
            metrics = {**metrics, **{f"sub_{k}": v for k, v in sub.items()}}
            sub.clear()
        return record(self, step, metrics, info)

    loop.Reporter.record = record_sub
    enter = loop.Reporter.__enter__

    def entered(self):
        rec["begin"] = time.perf_counter()
        return enter(self)

    loop.Reporter.__enter__ = entered
    common = dict(prompts=[str(work / "prompts.jsonl")], val_prompts=[str(work / "val.jsonl")], eval_prompts=N_VAL,
                  out=str(work / name), max_new_tokens=MAX_NEW, max_steps=steps, eval_every=0, save_every=0,
                  log_every=1, progress=False, seed=0, device="cpu", dtype=dtype_of(name), overwrite=True)
    if stage is ppo:
        ppo.main(ppo.Config(model=str(work / "policy"), reward=str(work / "rm"), value_model=str(work / "vm"),
                            batch_size=PPO["batch"], ppo_epochs=PPO["epochs"], num_minibatches=PPO["minibatches"],
                            missing_eos_penalty=PPO["missing_eos_penalty"], lr=PPO["lr"], beta=PPO["beta"],
                            temperature=PPO["temperature"], **common))
    else:
        grpo.main(grpo.Config(model=str(work / "policy"), reward=str(work / "rm"), batch_size=GRPO["prompts"],
                              num_samples=GRPO["k"], beta=GRPO["beta"], lr=GRPO["lr"],
                              temperature=GRPO["temperature"], **common))
    recs = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    steps_recs = [r for r in recs if "reward" in r]
    rec["lengths"] = [r["length"] for r in steps_recs]
    rec["stop_rate"] = [r["stop_rate"] for r in steps_recs]
    rec["split"] = [{k: v for k, v in r.items() if k.startswith(("time_", "sub_"))} for r in steps_recs]
    rec["answers_per_s"] = [r.get("answers_per_s") for r in steps_recs]
    rec["ratio_first"] = [r.get("ratio_first") for r in steps_recs]
    rec["settings"] = {"cmd": ours_command(name, steps)}


def dtype_of(name: str) -> str:
    """tristage's --dtype for a trainer: float32, or its default (auto: bf16 where the CPU computes it natively)."""
    return "auto" if name.endswith("bf16") else "float32"


def ours_command(name: str, steps: int) -> str:
    common = (f"--prompts prompts.jsonl --val-prompts val.jsonl --eval-prompts {N_VAL} --max-new-tokens {MAX_NEW} "
              f"--max-steps {steps} --eval-every 0 --save-every 0 --log-every 1 --no-progress --seed 0 --device cpu "
              f"--dtype {dtype_of(name)}")
    if is_ppo(name):
        return (f"tristage ppo policy --reward rm --value-model vm --batch-size {PPO['batch']} --ppo-epochs "
                f"{PPO['epochs']} --num-minibatches {PPO['minibatches']} --missing-eos-penalty "
                f"{PPO['missing_eos_penalty']} --lr {PPO['lr']:g} --beta {PPO['beta']} --temperature "
                f"{PPO['temperature']} {common}")
    return (f"tristage grpo policy --reward rm --batch-size {GRPO['prompts']} --num-samples {GRPO['k']} --beta "
            f"{GRPO['beta']} --lr {GRPO['lr']:g} --temperature {GRPO['temperature']} {common}")


def worker(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore")
    import torch

    torch.manual_seed(0)
    work, name = Path(args.work), args.worker
    rec: dict = {"ends": [], "gen": [], "lengths": [], "decoded": [], "stop_rate": []}
    steps = args.ppo_steps if is_ppo(name) else args.grpo_steps
    t0 = time.perf_counter()
    fn = worker_ours if name.startswith("ours") else worker_trl_ppo if is_ppo(name) else worker_trl_grpo
    fn(work, name, steps, rec)
    rec["wall_in"] = time.perf_counter() - t0
    rec["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


# ----------------------------------------------------------------------------- driver
def run_trainer(work: Path, name: str, steps: int, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work", str(work),
           "--ppo-steps", str(a.ppo_steps), "--grpo-steps", str(a.grpo_steps)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if name.startswith("trl") and is_ppo(name):
        env["PYTHONPATH"] = os.pathsep.join([str(TRL029), *filter(None, [env.get("PYTHONPATH")])])
    log = work / f"{name}.log"
    busy0, own0 = busy_seconds(), own_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    others = max(0.0, busy_seconds() - busy0 - (own_seconds(resource.RUSAGE_CHILDREN) - own0))
    text = log.read_text()
    line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{name} failed (exit {p.returncode}), log {log}:\n{text[-6000:]}")
    rec = json.loads(line[len("RESULT "):])
    ends = rec["ends"]
    if len(ends) != steps:
        raise RuntimeError(f"{name}: {len(ends)} rollout batches timed, expected {steps}")
    dts = [b - a for a, b in zip([rec["begin"], *ends[:-1]], ends)]
    keep = list(range(min(WARMUP, len(dts) - 1), len(dts)))
    s = statistics.median(dts[k] for k in keep)
    comps, opt = per_batch(name)
    lens = [rec["lengths"][k] for k in keep if k < len(rec["lengths"])]
    mean_len = statistics.fmean(lens) if lens else float("nan")
    out = {"name": name, "s_batch": s, "batches_s": 1 / s, "opt_s": opt / s, "comps_s": comps / s,
           "len": mean_len, "tok_s": comps * mean_len / s, "hwm_mb": ru.ru_maxrss / 1024, "wall": wall,
           "train_s": ends[-1] - rec["begin"], "e2e": ends[-1] - rec["t0"], "others": others,
           "settings": rec["settings"], "dts": dts, "threads": rec["threads"]}
    if rec.get("stop_rate"):
        out["stop_rate"] = statistics.fmean(rec["stop_rate"][k] for k in keep if k < len(rec["stop_rate"]))
    if rec.get("decoded"):
        out["decoded"] = statistics.fmean(rec["decoded"][k] for k in keep)
    if rec.get("gen") and name.startswith("trl"):
        out["split"] = {"generate": statistics.median(rec["gen"][k] for k in keep)}
    if rec.get("split"):
        keys = sorted({k for r in rec["split"] for k in r})
        out["split"] = {k: statistics.median(rec["split"][i].get(k, 0.0) for i in keep) for k in keys}
    out["clean"] = others <= DISTURBED * wall
    return out


def combine(runs: list[dict]) -> dict:
    used = [r for r in runs if r["clean"]] or runs
    keys = ("s_batch", "batches_s", "opt_s", "comps_s", "len", "tok_s", "hwm_mb", "wall", "train_s", "e2e")
    med = {k: statistics.median(r[k] for r in used) for k in keys}
    for k in ("stop_rate", "decoded"):
        if all(k in r for r in used):
            med[k] = statistics.median(r[k] for r in used)
    if all("split" in r for r in used):
        keys2 = set.intersection(*(set(r["split"]) for r in used))
        med["split"] = {k: statistics.median(r["split"][k] for r in used) for k in keys2}
    return {**med, "n": len(used), "runs": runs, "settings": runs[0]["settings"]}


# ----------------------------------------------------------------------------- report
def best(res: dict[str, dict], fp32: str) -> str:
    bf = fp32 + "_bf16"
    return bf if bf in res and fp32 in res and res[bf]["batches_s"] > res[fp32]["batches_s"] else fp32


def split_text(r: dict, name: str) -> str:
    """tristage's time per rollout batch by phase (medians over batches after warm-up, then over repeats)."""
    sp = r.get("split") or {}
    if "time_generate" not in sp:
        return "not available (metrics.jsonl has no time_* fields)"
    total = sum(v for k, v in sp.items() if k.startswith("time_"))
    upd, sub = sp.get("time_update", 0.0), {k[4:]: v for k, v in sp.items() if k.startswith("sub_")}
    rest = upd - sum(sub.values())
    parts = []
    for k, label in (("time_generate", "generate (engine, KV cache)"),
                     ("time_logprobs", "log-probs (no-grad forwards: the reference, and the policy when it is updated "
                                       "more than once per batch)"),
                     ("time_score", "score (reward model on the sampled tokens)")):
        parts.append(f"{label} {sp.get(k, 0) * 1e3:.0f} ms ({sp.get(k, 0) / total:.0%})")
    opt = sub.get("optimizer_steps", 0.0)
    adv = sub.get("advantages", 0.0)
    n_opt = per_batch(name)[1]
    adv_label = "advantages (value-model pass, GAE, whitening)" if is_ppo(name) else "advantages (group baseline)"
    parts.append(f"update {upd * 1e3:.0f} ms ({upd / total:.0%}) = {n_opt} optimizer step(s) {opt * 1e3:.0f} ms + "
                 f"{adv_label} {adv * 1e3:.0f} ms + batch statistics {sub.get('batch_stats', 0) * 1e3:.0f} ms + "
                 f"minibatch building and the rest {rest * 1e3:.0f} ms")
    parts.append(f"other (logging, loop) {sp.get('time_other', 0) * 1e3:.0f} ms ({sp.get('time_other', 0) / total:.0%})")
    return f"{total * 1e3:.0f} ms per rollout batch: " + "; ".join(parts)


def section(kind: str, a: argparse.Namespace, facts: dict, res: dict[str, dict], load: str) -> tuple[str, float]:
    trl_fp32, ours_fp32 = f"trl_{kind}", f"ours_{kind}"
    trl, ours = best(res, trl_fp32), best(res, ours_fp32)
    r_o, r_t = res[ours], res[trl]
    ratio = r_o["opt_s"] / r_t["opt_s"]
    fp = res[ours_fp32]["opt_s"] / res[trl_fp32]["opt_s"]
    unit = "updates/s" if kind == "ppo" else "steps/s"
    comps, opt = per_batch(ours)
    steps = a.ppo_steps if kind == "ppo" else a.grpo_steps
    lines = [f"**{ratio:.2f}x** TRL's optimizer steps per second (tristage {kind} {r_o['opt_s']:.2f}, "
             f"{TRAINERS[ours][1]}, vs {TRAINERS[trl][0]} {r_t['opt_s']:.2f}, {TRAINERS[trl][1]}; each side at its "
             f"faster precision; fp32 against fp32: {fp:.2f}x). "
             f"Target >= 2x: **{'Met' if ratio >= 2 else 'Not met'}**.", "",
             f"Date: {a.date}. Command: `{' '.join(['.venv/bin/python bench/bench_rl.py', a.argv]).strip()}`.", ""]
    if kind == "ppo":
        lines += [f"Settings, both sides: {comps} prompts per rollout batch, one completion each, {PPO['epochs']} PPO "
                  f"epochs x {PPO['minibatches']} minibatch = {opt} optimizer steps per batch (policy and value model "
                  f"in one AdamW step), at most {MAX_NEW} new tokens, temperature {PPO['temperature']} (TRL's "
                  f"default), KL coefficient {PPO['beta']} (k1, in the reward), missing-EOS penalty "
                  f"{PPO['missing_eos_penalty']}, lr {PPO['lr']:g} constant, AdamW betas 0.9/0.95, clip 0.2, value "
                  f"clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95, CPU, {res[ours]['runs'][0]['threads']}"
                  f" threads, no gradient checkpointing. TRL: `PPOConfig(per_device_train_batch_size={PPO['batch']}, "
                  f"num_mini_batches={PPO['minibatches']}, num_ppo_epochs={PPO['epochs']}, total_episodes="
                  f"{steps * comps}, response_length={MAX_NEW}, local_rollout_forward_batch_size={PPO['batch']}, "
                  f"stop_token='eos', missing_eos_penalty={PPO['missing_eos_penalty']}, use_cpu=True, bf16=False "
                  f"(True in the bf16 row), gradient_checkpointing=False, learning_rate={PPO['lr']:g}, kl_coef="
                  f"{PPO['beta']}, temperature={PPO['temperature']}, lr_scheduler_type='constant', adam_beta2=0.95, "
                  f"num_sample_generations=0, logging_steps=1)` from `trl.experimental.ppo` (trl 0.29.1 installed "
                  f"with `pip install --no-deps --target runs/trl029 trl==0.29.1`, run with PYTHONPATH=runs/trl029; "
                  f"TRL 1.16 has no PPO trainer), policy and reference `AutoModelForCausalLM` (sdpa), reward and "
                  f"value models `AutoModelForSequenceClassification` (num_labels 1), all from the folders below. "
                  f"tristage: `{ours_command(ours, steps)}`, run in-process by the worker (`ppo.main(ppo.Config(...))`"
                  f"). TRL's PPO clips no gradient (it calls `optimizer.step()` after `backward`); tristage clips "
                  f"at 1.0 (its default), which costs it a gradient-norm pass per step.", ""]
    else:
        lines += [f"Settings, both sides: {GRPO['prompts']} prompts x {GRPO['k']} completions = {comps} completions "
                  f"and one optimizer step per rollout batch, at most {MAX_NEW} new tokens, temperature "
                  f"{GRPO['temperature']}, beta {GRPO['beta']} (k3 KL to the reference in the loss, so both load a "
                  f"reference model), clipped surrogate (epsilon 0.2) averaged over all completion tokens (TRL's "
                  f"default loss_type 'dapo' = tristage's default --loss-agg token), group-normalised advantages, "
                  f"lr {GRPO['lr']:g} constant, AdamW betas 0.9/0.95, CPU, "
                  f"{res[ours]['runs'][0]['threads']} threads, no gradient checkpointing. TRL: "
                  f"`GRPOConfig(per_device_train_batch_size={comps}, num_generations={GRPO['k']}, "
                  f"max_completion_length={MAX_NEW}, beta={GRPO['beta']}, learning_rate={GRPO['lr']:g}, temperature="
                  f"{GRPO['temperature']}, use_cpu=True, bf16=False (True in the bf16 row), gradient_checkpointing="
                  f"False, lr_scheduler_type='constant', adam_beta2=0.95, max_steps={steps}, logging_steps=1)`, "
                  f"transformers generate (no vLLM), the policy passed as its folder (TRL loads the reference from "
                  f"it), `reward_funcs` = the reward model as `AutoModelForSequenceClassification` (num_labels 1). "
                  f"tristage: `{ours_command(ours, steps)}`, run in-process by the worker "
                  f"(`grpo.main(grpo.Config(...))`). Both compute one no-grad reference pass per batch, and with "
                  f"one optimizer step per batch both take the rollout's own log-probs from that step's forward "
                  f"(TRL with num_iterations 1, tristage with --ppo-epochs 1 --num-minibatches 1). The reward model "
                  f"reads different inputs: tristage's the sampled tokens (prompt + answer + end of turn, 112 "
                  f"tokens per answer on average here), TRL's the answers decoded and tokenized again, where this "
                  f"random policy's invalid UTF-8 bytes come back as 3-byte replacement characters (198 tokens on "
                  f"average; tristage read those too before it scored sampled tokens: its score phase was 37 ms "
                  f"per batch then, 15 ms now).", ""]
    lines += [f"Models: a tristage GPT with the BASELINES Llama shape (hidden 128, 4 layers, 4 heads, intermediate "
              f"512, tied embeddings), vocab {facts['vocab']} (tristage `train_char` on tiny Shakespeare), "
              f"{facts['params'] / 1e6:.3f}M parameters, seed 0, saved with `save_model` (policy, also the "
              f"reference)" + ("; reward model (seed 1) and value model (seed 2): the same backbone shape with our "
                               "score head, saved with `save_reward_model` as LlamaForSequenceClassification folders;"
                               " tristage starts its value model from the `vm` folder (`--value-model vm`), TRL "
                               "from the same folder" if kind == "ppo" else
                               "; reward model (seed 1): the same backbone shape with our score head, saved with "
                               "`save_reward_model` as a LlamaForSequenceClassification folder") + ". "
              f"Prompts: {N_PROMPTS} tiny-Shakespeare lines cut to {PROMPT_CHARS} characters as a user turn, so every "
              f"rendered prompt has {', '.join(map(str, sorted(facts['prompt_tokens'])))} tokens and nothing is "
              f"padded. The tokenizer's eos is `<|im_end|>`, the one token that ends an answer on both sides "
              f"(tristage would otherwise also stop at `<|endoftext|>`, TRL only at eos); the random policy emits "
              f"it now and then, so the completions' actual mean lengths are in the table.", "",
              f"Measured: each trainer in its own process, {steps} rollout batches, in alternating order, "
              f"{a.repeats} repeat(s), each run after waiting for idle CPUs; per rollout batch the time between the "
              f"ends of consecutive batches (generation, scoring, every update, logging), medians over batches "
              f"{WARMUP + 1}-{steps}, then over repeats. {unit}: optimizer steps per second"
              + (f" ({opt} per rollout batch; BASELINES.md counts rollout batches as 'updates', so its "
                 f"{TRL_BASELINE['ppo_updates_s']} updates/s are {TRL_BASELINE['ppo_updates_s'] * opt:.2f} optimizer "
                 f"steps/s)" if kind == "ppo" else "") + "; completions/s and generated tokens/s (completion tokens "
              "up to and including the stop token, summed over the batch) from the same median; 'end to end' = "
              "from the start of the worker (after imports) to the last batch's end; 'process' = the subprocess "
              "wall time (imports, loading, the final save and monitor included). Peak RSS = the subprocess's "
              f"ru_maxrss. Machine: {load}.", "",
              f"| trainer | settings | {unit} | rollout batches/s | s/batch | completions/s | generated tokens/s | "
              f"mean completion length | ended their turn | peak RSS | end to end | process | {unit} vs TRL's faster |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in (trl_fp32, trl_fp32 + "_bf16", ours_fp32, ours_fp32 + "_bf16"):
        if name not in res:
            continue
        r = res[name]
        label, settings = TRAINERS[name]
        bold = "**" if name in (trl, ours) else ""
        stop = f"{r['stop_rate']:.0%}" if "stop_rate" in r else "-"
        lines.append(f"| {bold}{label}{bold} | {settings} | {bold}{r['opt_s']:.2f}{bold} | {r['batches_s']:.3f} | "
                     f"{r['s_batch']:.3f} | {r['comps_s']:.1f} | {r['tok_s']:,.0f} | {r['len']:.1f} | {stop} | "
                     f"{r['hwm_mb']:.0f} MB | {r['e2e']:.1f} s | {r['wall']:.1f} s | "
                     f"{r['opt_s'] / r_t['opt_s']:.2f}x |")
    base = TRL_BASELINE["ppo_updates_s"] if kind == "ppo" else TRL_BASELINE["grpo_steps_s"]
    lines += ["", "BASELINES.md section 3(d) (same machine kind, its own 71-token vocab): TRL "
                  + (f"PPO {base} updates/s (rollout batches) = {base * opt:.2f} optimizer steps/s" if kind == "ppo"
                     else f"GRPO {base} steps/s") + ".", ""]
    bf = trl_fp32 + "_bf16"
    if bf in res:
        faster = res[bf]["batches_s"] > res[trl_fp32]["batches_s"]
        lines += [f"TRL bf16 autocast: {res[bf]['opt_s']:.2f} vs fp32 {res[trl_fp32]['opt_s']:.2f} {unit} "
                  f"({'faster, so the ratio is taken against it' if faster else 'not faster, so the ratio is taken against fp32'}).", ""]
    if "decoded" in res.get(trl, {}):
        lines += [f"TRL decodes every row of a batch until the longest is done ({res[trl]['decoded']:.0f} decoding steps "
                  f"per batch on average) and trains on the padded rows; tristage's engine lets finished rows leave "
                  f"the batch.", ""]
    trl_gen = (res[trl].get("split") or {}).get("generate")
    lines += [f"Where tristage's time goes (medians per rollout batch, from metrics.jsonl's time_* fields; the "
              f"update split by wrapping its functions): {split_text(r_o, ours)}."]
    g = (res.get(best(res, "ours_grpo")) or {}).get("split") or {}
    p = (r_o.get("split") or {}).get("sub_optimizer_steps")
    if kind == "ppo" and p and g.get("sub_optimizer_steps"):
        lines.append(f"A PPO optimizer step (policy and value model, forward and backward, {comps} completions) takes "
                     f"{p / opt * 1e3:.0f} ms; a GRPO one in the same run (policy only, {per_batch('ours_grpo')[0]} "
                     f"completions of the same length) {g['sub_optimizer_steps'] * 1e3:.0f} ms.")
    if trl_gen is not None:
        lines.append(f"TRL's transformers `generate` takes {trl_gen * 1e3:.0f} ms of its {r_t['s_batch'] * 1e3:.0f} ms "
                     f"per batch ({trl_gen / r_t['s_batch']:.0%}).")
    lines += ["", "Every run (trainer: optimizer steps/s, s per batch, mean length, peak RSS, process wall, other jobs' CPU):"]
    for name in (trl_fp32, trl_fp32 + "_bf16", ours_fp32, ours_fp32 + "_bf16"):
        if name not in res:
            continue
        parts = [f"{'' if r['clean'] else '(disturbed) '}{r['opt_s']:.2f}, {r['s_batch']:.3f} s, {r['len']:.1f}, "
                 f"{r['hwm_mb']:.0f} MB, {r['wall']:.1f} s, {r['others']:.1f} CPU-s" for r in res[name]["runs"]]
        lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n", ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_rl"), help="folder for models, prompts, runs")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every trainer (the median is reported)")
    ap.add_argument("--ppo-steps", type=int, default=12, help="rollout batches per PPO run")
    ap.add_argument("--grpo-steps", type=int, default=20, help="rollout batches (= optimizer steps) per GRPO run")
    ap.add_argument("--only", nargs="*", default=None, help="trainers to run (default: all)", choices=ORDER)
    ap.add_argument("--quiet-wait", type=float, default=600, help="max seconds to wait for idle CPUs before each run")
    ap.add_argument("--retries", type=int, default=2, help="extra runs allowed per disturbed trainer run")
    ap.add_argument("--quick", action="store_true", help="smoke test: 5 batches each, 1 repeat, no waiting, no write")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the sections from the last run's --work/results.json (no timing)")
    ap.add_argument("--worker", choices=ORDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.report_only:
        return report(json.loads((Path(a.work) / "results.json").read_text()), a.no_write)
    a.argv, a.t_start = " ".join(sys.argv[1:]), time.time()
    if not SHAKESPEARE.exists():
        print(f"skipped: {SHAKESPEARE} is absent")
        return 0
    if not (TRL029 / "trl" / "experimental" / "ppo").is_dir():  # TRL 1.16 has no PPO trainer; 0.29.1 beside it
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRL029), "trl==0.29.1"]
        print("installing TRL 0.29.1 for its PPO trainer: " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"could not install TRL 0.29.1 into {TRL029}; run the command above by hand")
            return 1
    if a.quick:
        a.ppo_steps, a.grpo_steps, a.repeats, a.quiet_wait, a.retries, a.no_write = 5, 5, 1, 0, 0, True
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    facts = setup(work)
    print(f"setup: {facts}", flush=True)
    names = a.only or ORDER
    runs: dict[str, list[dict]] = {n: [] for n in names}
    busy = wait_quiet(a.quiet_wait) if a.quiet_wait > 0 else 0.0
    load0 = os.getloadavg()[0]
    print(f"CPUs {busy:.0%} busy before timing", flush=True)
    for rep in range(a.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            for _attempt in range(1 + a.retries):  # a disturbed run is retried after waiting for quiet CPUs
                if a.quiet_wait > 0:
                    wait_quiet(a.quiet_wait)
                r = run_trainer(work, name, a.ppo_steps if is_ppo(name) else a.grpo_steps, a)
                runs[name].append(r)
                print(f"  [{rep + 1}/{a.repeats}] {name}: {r['opt_s']:.2f} optimizer steps/s, {r['s_batch']:.3f} "
                      f"s/batch, {r['comps_s']:.1f} completions/s, {r['tok_s']:.0f} tok/s, mean length "
                      f"{r['len']:.1f}, peak RSS {r['hwm_mb']:.0f} MB, wall {r['wall']:.1f} s, other jobs' CPU "
                      f"{r['others']:.1f} s{'' if r['clean'] else ' (disturbed)'}; split {r.get('split')}",
                      flush=True)
                if r["clean"]:
                    break
    all_runs = [r for rs in runs.values() for r in rs]
    n_dist = sum(not r["clean"] for r in all_runs)
    load_text = (f"CPUs {busy:.0%} busy just before timing; load average {load0:.2f} at the start, "
                 f"{os.getloadavg()[0]:.2f} at the end; {n_dist} of {len(all_runs)} runs disturbed (other jobs used "
                 f"more than {DISTURBED} CPU-s per second of them; excluded from the medians where a clean run "
                 f"exists); the whole benchmark took {(time.time() - a.t_start) / 60:.1f} min, waits for idle CPUs "
                 f"included")
    saved = {"args": {k: getattr(a, k) for k in ("ppo_steps", "grpo_steps", "repeats", "argv")}, "load": load_text,
             "facts": {**facts, "prompt_tokens": sorted(facts["prompt_tokens"])}, "runs": runs,
             "date": datetime.date.today().isoformat()}
    (work / "results.json").write_text(json.dumps(saved, indent=1))
    return report(saved, a.no_write)


def report(saved: dict, no_write: bool) -> int:
    """Print (and unless no_write, write into RESULTS.md) the PPO and GRPO sections from a run's results.json."""
    a = argparse.Namespace(**saved["args"], date=saved["date"])
    res = {n: combine(rs) for n, rs in saved["runs"].items() if rs}
    for kind, title in (("ppo", "PPO"), ("grpo", "GRPO")):
        if f"trl_{kind}" not in res or f"ours_{kind}" not in res:
            continue
        text, _ = section(kind, a, saved["facts"], res, saved["load"])
        print(f"\n## {title}\n\n{text}")
        if not no_write:
            write_section(title, text)
            print(f"wrote the {title} section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
