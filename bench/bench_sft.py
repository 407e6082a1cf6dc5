"""Instruction-tuning benchmark (SFT): tristage `sft` against TRL's SFTTrainer, then SFT on real instruction data.

    .venv/bin/python bench/bench_sft.py [--repeats 2] [--steps 40] [--quick] [--no-real] [--no-write]

Target (issue): SFT throughput in real (non-padding) tokens/s >= 2x TRL's SFTTrainer on the same tiny Llama, the same
data and batch shape, in the same run, on this CPU (../shared/BASELINES.md section 3: TRL 1.16 reached about 9.5k real
tok/s padded and 3.9k with packing=True); peak memory beside it; and a real-data SFT whose validation loss falls.

One run does:
1. the shared setup in --work: tristage's char tokenizer (`train_char` on tiny Shakespeare: 8 specials + 65 chars +
   256 byte fallbacks) with our ChatML template (assistant turns in `{% generation %}` blocks); a tristage GPT with the
   BASELINES Llama shape (hidden 128, 4 layers, 4 heads, intermediate 512, tied embeddings, seed 0) saved as a
   Hugging Face folder; 2000 synthetic chats (user = one non-empty Shakespeare line, assistant = the next two lines,
   disjoint triples from the top of the file); checks that transformers renders the same ids and assistant mask from
   that folder as tristage does, and that LlamaForCausalLM gives our logits from our weights;
2. every trainer in its own subprocess (`--worker NAME`: peak RSS = that process's VmHWM), --steps optimizer steps each,
   the order alternating between repeats so machine load hits both sides; per step the time between optimizer-step
   ends (TRL: a step-end callback; tristage: an optimizer step post-hook) and the real tokens of its batch;
   figures = medians over steps after WARMUP, then the median over repeats;
3. the real-data SFT (see `real_data`), whose val loss is measured before and after on the same split;
4. a table, and the "## Instruction tuning (SFT)" section of bench/RESULTS.md.

Real tokens are counted the same way for both: every non-pad position fed to the model, which is exactly TRL's own
`num_tokens` (attention_mask.sum() padded; the flattened length padding-free) and, for tristage, the sum of the batch's
examples' input lengths; checked against TRL's logged num_tokens. tristage feeds 2 positions fewer per conversation
(its examples are pre-shifted and drop the untrained newline after the last <|im_end|>), so it gets less credit for the
same conversations: conversations/s is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import RESULTS, busy_seconds, memory_kib, own_seconds, wait_quiet, write_section

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_libre_ok.jsonl"
SECTION = "Instruction tuning (SFT)"
N_CHATS, ROWS, MAX_LEN, LR = 2000, 12, 256, 1e-3
WARMUP = 5  # steps left out of the medians
DISTURBED = 0.05  # other jobs' CPU-seconds per second of a run above which the run is marked disturbed
TRL_BASELINE = {"padded": 9.5e3, "packed": 3.9e3}  # BASELINES.md section 3(b)
LLAMA = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
             max_position_embeddings=512, tie_word_embeddings=True)

# name -> (label, settings)
TRAINERS = {
    "trl_padded": ("TRL SFTTrainer, padded", "fp32, gradient_checkpointing=False"),
    "trl_padded_bf16": ("TRL SFTTrainer, padded", "bf16=True (CPU autocast), gradient_checkpointing=False"),
    "trl_packed": ("TRL SFTTrainer, packing=True (bfd, padding-free)", "fp32, gradient_checkpointing=False"),
    "trl_padded_defaults": ("TRL SFTTrainer, padded, TRL defaults", "bf16=True (CPU autocast), gradient_checkpointing=True"),
    "trl_packed_defaults": ("TRL SFTTrainer, packing=True, TRL defaults", "bf16=True (CPU autocast), gradient_checkpointing=True"),
    "ours_padded": ("tristage sft --mode padded", "fp32 (--dtype float32)"),
    "ours_packed": ("tristage sft --mode packed", "fp32 (--dtype float32)"),
    "ours_padded_bf16": ("tristage sft --mode padded", "--dtype bfloat16 (autocast)"),
    "ours_packed_bf16": ("tristage sft --mode packed", "--dtype bfloat16 (autocast)"),
}
ORDER = ["trl_padded", "ours_padded", "trl_packed", "ours_packed", "ours_padded_bf16", "ours_packed_bf16",
         "trl_padded_bf16", "trl_padded_defaults"]  # the default set; trl_packed_defaults (slow) only with --only
REAL = dict(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            max_len=512, tokens_per_batch=4096, max_steps=300, lr=2e-3, warmup_steps=20, eval_every=100, seed=0)


# ----------------------------------------------------------------------------- machine load
# ----------------------------------------------------------------------------- setup
def make_chats() -> list[dict]:
    lines = [x for x in SHAKESPEARE.read_text().splitlines() if x.strip()]
    return [{"messages": [{"role": "user", "content": lines[3 * i]},
                          {"role": "assistant", "content": lines[3 * i + 1] + "\n" + lines[3 * i + 2]}]}
            for i in range(N_CHATS)]


def setup(work: Path) -> dict:
    """Tokenizer + model folder + chats; equality checks against transformers. Returns facts for the report."""
    from tristage.data.chat import render
    from tristage.model.gpt import ModelConfig, build_model
    from tristage.model.hf import save_model
    from tristage.tokenizer import train_char

    tok = train_char([str(SHAKESPEARE)])
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_key_value_heads=4, **LLAMA)
    model = build_model(cfg, seed=0)
    save_model(model, work / "model", tok, dtype=torch.float32)
    chats = make_chats()
    (work / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    rendered = [render(tok, c["messages"]) for c in chats]
    lengths = [len(ids) for ids, _ in rendered]
    facts = {"vocab": tok.vocab_size, "params": sum(p.numel() for p in model.parameters()),
             "conv_len": (min(lengths), statistics.mean(lengths), max(lengths)),
             "trained_share": sum(map(sum, (m for _, m in rendered))) / sum(lengths)}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(work / "model")
    same_ids = same_mask = 0
    for c, (ids, mask) in zip(chats[:200], rendered[:200]):
        out = hf_tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        same_ids += list(out["input_ids"]) == ids
        same_mask += list(out["assistant_masks"]) == mask
    hf = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    x = torch.tensor([ids[:min(lengths)] for ids, _ in rendered[:4]])
    with torch.no_grad():
        diff = (hf(input_ids=x).logits - model(x)).abs().max().item()
    facts.update(checked=200, same_ids=same_ids, same_mask=same_mask, logit_diff=diff, hf_class=type(hf).__name__)
    return facts


# ----------------------------------------------------------------------------- workers (one trainer per process)
def worker_trl(work: Path, name: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    packing, defaults = "packed" in name, name.endswith("defaults")
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    ds = Dataset.from_list([json.loads(x) for x in (work / "chats.jsonl").read_text().splitlines()])
    kw = dict(output_dir=str(work / name), per_device_train_batch_size=ROWS, max_length=MAX_LEN, learning_rate=LR,
              use_cpu=True, max_steps=steps, logging_steps=10, report_to="none", save_strategy="no",
              assistant_only_loss=True, packing=packing, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    if not defaults:
        kw.update(bf16=name.endswith("bf16"), gradient_checkpointing=False)
    args = SFTConfig(**kw)
    rec: dict = {"ends": [], "tokens": [], "convs": [], "slots": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["begin"], rec["rss_start_kib"] = time.perf_counter(), memory_kib("VmRSS")

        def on_step_end(self, args, state, control, **kw):
            rec["ends"].append(time.perf_counter())

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        b = collate(examples)
        rec["slots"].append(int(b["input_ids"].numel()))
        if "attention_mask" in b:  # TRL's own rule (SFTTrainer.compute_loss)
            rec["tokens"].append(int(b["attention_mask"].sum()))
            rec["convs"].append(len(examples))
        else:
            rec["tokens"].append(int(b["position_ids"].size(1)))
            rec["convs"].append(int((b["position_ids"] == 0).sum()))
        return b

    trainer.data_collator = counting
    trainer.train()
    logged = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    rec["trl_num_tokens"] = logged[-1] if logged else None
    rec["settings"] = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                       "assistant_only_loss": args.assistant_only_loss, "packing": args.packing,
                       "packing_strategy": args.packing_strategy, "padding_free": trainer.padding_free,
                       "optim": getattr(args.optim, "value", str(args.optim)),
                       "lr_scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
                       "max_grad_norm": args.max_grad_norm, "attn": model.config._attn_implementation}
    return rec


def worker_ours(work: Path, name: str, steps: int) -> dict:
    import numpy as np

    from tristage.data import chat
    from tristage.stages import sft
    from tristage.train import loop

    rec: dict = {"ends": [], "tokens": [], "convs": [], "slots": []}
    build = loop.build_optimizer

    def build_timed(*a, **k):
        opt = build(*a, **k)
        opt.register_step_post_hook(lambda *_: rec["ends"].append(time.perf_counter()))
        return opt

    nxt, plan = chat.ChatLoader.__next__, chat.ChatLoader.plan

    def counting(self):
        if "begin" not in rec:
            rec["begin"], rec["rss_start_kib"] = time.perf_counter(), memory_kib("VmRSS")
        b = nxt(self)
        batch = self.plan(self.epoch)[self.index - 1]
        members = [i for j in batch for i in self.bins[j]] if self.mode == "packed" else batch
        rec["tokens"].append(sum(len(self.examples[i]) for i in members))
        rec["convs"].append(len(members))
        rec["slots"].append(int(b["input_ids"].numel()))
        return b

    def plan_rows(self, epoch):
        """padded only: ROWS conversations per batch, as TRL's per_device_train_batch_size (the flag is a token budget)."""
        if self.mode != "padded":
            return plan(self, epoch)
        if self._cached[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
            self._cached = (epoch, [order[k:k + ROWS] for k in range(0, len(order) - ROWS + 1, ROWS)])
        return self._cached[1]

    loop.build_optimizer, chat.ChatLoader.__next__, chat.ChatLoader.plan = build_timed, counting, plan_rows
    cfg = sft.Config(model=str(work / "model"), data=[str(work / "chats.jsonl")], val_fraction=0.0,
                     out=str(work / name), max_len=MAX_LEN, mode="packed" if "packed" in name else "padded",
                     tokens_per_batch=ROWS * MAX_LEN, max_steps=steps, lr=LR, warmup_steps=0, weight_decay=0.0,
                     grad_clip=1.0, dtype="bfloat16" if name.endswith("bf16") else "float32", compile=False,
                     eval_every=0, save_every=0, log_every=10, progress=False, seed=0, device="cpu", overwrite=True)
    sft.main(cfg)
    rec["settings"] = {"cmd": ours_command(name, steps)}
    return rec


def ours_command(name: str, steps: int) -> str:
    mode = "packed" if "packed" in name else "padded"
    dtype = "bfloat16" if name.endswith("bf16") else "float32"
    return (f"tristage sft MODEL --data chats.jsonl --val-fraction 0 --max-len {MAX_LEN} --mode {mode} "
            f"--tokens-per-batch {ROWS * MAX_LEN} --max-steps {steps} --lr {LR:g} --warmup-steps 0 --weight-decay 0 "
            f"--grad-clip 1.0 --dtype {dtype} --eval-every 0 --save-every 0 --log-every 10 --no-progress")


def worker(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    work, name = Path(args.work), args.worker
    t0 = time.perf_counter()
    rec = (worker_trl if name.startswith("trl") else worker_ours)(work, name, args.steps)
    rec["wall"] = time.perf_counter() - t0
    rec["hwm_kib"] = memory_kib("VmHWM")
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


# ----------------------------------------------------------------------------- driver
def run_trainer(work: Path, name: str, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work", str(work), "--steps", str(steps)]
    load0, busy0, own0 = os.getloadavg()[0], busy_seconds(), own_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                  "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t0
    others = max(0.0, busy_seconds() - busy0 - (own_seconds(resource.RUSAGE_CHILDREN) - own0))
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"worker {name} failed ({p.returncode})")
    rec = json.loads(line[len("RESULT "):])
    ends, tokens, convs, slots = rec["ends"], rec["tokens"][:steps], rec["convs"][:steps], rec["slots"][:steps]
    dts = [b - a for a, b in zip([rec["begin"], *ends[:-1]], ends)]
    keep = range(min(WARMUP, len(dts) - 1), len(dts))
    ms = statistics.median(dts[k] for k in keep) * 1e3
    out = {"name": name, "ms": ms, "tok_s": statistics.median(tokens[k] / dts[k] for k in keep),
           "conv_s": statistics.median(convs[k] / dts[k] for k in keep),
           "slot_s": statistics.median(slots[k] / dts[k] for k in keep), "real_share": sum(tokens) / sum(slots),
           "tok_step": statistics.mean(tokens), "conv_step": statistics.mean(convs), "steps": len(dts),
           "hwm_mb": rec["hwm_kib"] / 1024, "rss_start_mb": rec["rss_start_kib"] / 1024, "wall": wall,
           "train_s": ends[-1] - rec["begin"], "others": others, "load": (load0, os.getloadavg()[0]),
           "settings": rec["settings"], "trl_num_tokens": rec.get("trl_num_tokens"),
           "counted_tokens": sum(tokens)}
    out["clean"] = others <= DISTURBED * wall
    return out


def combine(runs: list[dict]) -> dict:
    used = [r for r in runs if r["clean"]] or runs
    med = {k: statistics.median(r[k] for r in used) for k in ("ms", "tok_s", "conv_s", "slot_s", "real_share",
                                                               "tok_step", "conv_step",
                                                               "hwm_mb", "rss_start_mb", "wall")}
    return {**med, "n": len(used), "runs": runs, "settings": runs[0]["settings"]}


# ----------------------------------------------------------------------------- real data
def real_data(work: Path, quick: bool) -> dict:
    """SFT of a randomly initialised tiny model (BPE tokenizer trained on the Alpaca text) on alpaca_libre_ok.jsonl
    with 5% held out; train (first 20 batches of the training split) and val loss before and after, same batches."""
    from tristage.data.chat import ChatLoader
    from tristage.model.gpt import ModelConfig, build_model
    from tristage.model.hf import load_model, save_model
    from tristage.stages import sft
    from tristage.tokenizer import train_bpe
    from tristage.train.loop import evaluate_loss

    p = dict(REAL, max_steps=30, eval_every=15) if quick else REAL
    rdir = work / "real"
    rdir.mkdir(parents=True, exist_ok=True)
    text = rdir / "alpaca.txt"
    with text.open("w") as fh:
        for line in ALPACA.read_text().splitlines():
            r = json.loads(line)
            fh.write("\n".join(r.get(k) or "" for k in ("instruction", "input", "output")) + "\n")
    t0 = time.perf_counter()
    tok = train_bpe([str(text)], p["vocab_size"])
    tok.save(rdir / "tok")
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
                       num_attention_heads=p["num_attention_heads"], intermediate_size=p["intermediate_size"],
                       max_position_embeddings=p["max_len"])
    base = build_model(mcfg, seed=p["seed"])
    save_model(base, rdir / "base", tok, dtype=torch.float32)
    cfg = sft.Config(model=str(rdir / "base"), data=[str(ALPACA)], val_fraction=0.05, out=str(rdir / "sft"), on_error="skip",
                     max_len=p["max_len"], mode="packed", tokens_per_batch=p["tokens_per_batch"],
                     max_steps=p["max_steps"], lr=p["lr"], warmup_steps=p["warmup_steps"], dtype="float32",
                     eval_every=p["eval_every"], save_every=0, log_every=25, progress=False, seed=p["seed"],
                     overwrite=True)
    train, val, notes = sft.load_chats(cfg, tok)

    def batches(examples, n=None):
        loader = ChatLoader(examples, cfg.tokens_per_batch, tok.pad_id, mode="packed", seq_len=cfg.max_len, seed=0)
        return [loader.collate(b) for b in loader.plan(0)[:n]]

    vb, tb = batches(val), batches(train, 20)
    cpu = torch.device("cpu")
    before = (evaluate_loss(base, tb, cpu, torch.float32), evaluate_loss(base, vb, cpu, torch.float32))
    setup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    sft.main(cfg)
    sft_s = time.perf_counter() - t1
    tuned = load_model(rdir / "sft" / "model")
    after = (evaluate_loss(tuned, tb, cpu, torch.float32), evaluate_loss(tuned, vb, cpu, torch.float32))
    recs = [json.loads(x) for x in (rdir / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    tps = [r["real_tok_per_s"] for r in recs if "real_tok_per_s" in r]
    cmds = [f"tristage tokenizer --files alpaca.txt --out tok --vocab-size {p['vocab_size']}   "
            f"# alpaca.txt = instruction, input, output of every record, one per line",
            f"# base: build_model(ModelConfig(vocab_size={tok.vocab_size}, hidden_size={p['hidden_size']}, "
            f"num_hidden_layers={p['num_hidden_layers']}, num_attention_heads={p['num_attention_heads']}, "
            f"intermediate_size={p['intermediate_size']}, max_position_embeddings={p['max_len']}), seed={p['seed']}) "
            f"+ save_model(base, 'base', tok)  (random initialisation, no pre-training)",
            f"tristage sft base --data {os.path.relpath(ALPACA, ROOT)} "
            f"--val-fraction 0.05 --on-error skip --out sft --max-len {p['max_len']} --mode packed --tokens-per-batch "
            f"{p['tokens_per_batch']} --max-steps {p['max_steps']} --lr {p['lr']:g} --warmup-steps {p['warmup_steps']} "
            f"--dtype float32 --eval-every {p['eval_every']} --save-every 0 --log-every 25 --no-progress"]
    return {"p": p, "notes": notes, "n_train": len(train), "n_val": len(val),
            "n_records": sum(1 for x in ALPACA.read_text().splitlines() if x.strip()),
            "train_tokens": sum(map(len, train)), "val_tokens": sum(map(len, val)),
            "val_targets": sum(int((b["labels"] != -100).sum()) for b in vb),
            "params": sum(q.numel() for q in base.parameters()), "vocab": tok.vocab_size, "before": before,
            "after": after, "evals": evals, "sft_s": sft_s, "setup_s": setup_s,
            "tok_s": statistics.median(tps) if tps else 0.0, "cmds": cmds,
            "first_loss": next((r["loss"] for r in recs if "loss" in r), None),
            "last_loss": [r["loss"] for r in recs if "loss" in r][-1]}


# ----------------------------------------------------------------------------- report
def report(a: argparse.Namespace, facts: dict, res: dict[str, dict], real: dict | None, load: dict) -> str:
    trl = res["trl_padded"]["tok_s"]
    best_trl_name = max((k for k in res if k.startswith("trl")), key=lambda k: res[k]["tok_s"])
    ours_fp32 = max((k for k in ("ours_padded", "ours_packed") if k in res), key=lambda k: res[k]["tok_s"])
    bf16 = [k for k in ("ours_padded_bf16", "ours_packed_bf16") if k in res]
    ours_best = max([ours_fp32, *bf16], key=lambda k: res[k]["tok_s"])
    ratio = res[ours_best]["tok_s"] / res[best_trl_name]["tok_s"]
    met = ratio >= 2.0
    ts = res["trl_padded"]["settings"]
    lo, mean, hi = facts["conv_len"]
    lines = [f"`{a.cmd_line}`", "",
             f"Target (issue): real tokens/s >= 2x TRL's SFTTrainer, same model, data and batch shape, same run. "
             f"**{'Met' if met else 'Not met'}**: the fastest tristage setting ({TRAINERS[ours_best][0]}, "
             f"{TRAINERS[ours_best][1]}) is **{ratio:.2f}x** the fastest TRL setting measured here "
             f"({TRAINERS[best_trl_name][0]}, {TRAINERS[best_trl_name][1]}); fp32 against fp32 padded: "
             f"{res[ours_fp32]['tok_s'] / trl:.2f}x.", "",
             f"Model: tristage GPT, Llama shape (hidden 128, 4 layers, 4 heads, kv heads 4, intermediate 512, tied "
             f"embeddings), vocab {facts['vocab']} (tristage `train_char` on tiny Shakespeare: 8 specials + 65 chars + 256 "
             f"byte fallbacks), {facts['params'] / 1e6:.3f}M params, seed 0, saved with `save_model`; TRL loads the same "
             f"folder with `AutoModelForCausalLM` ({facts['hf_class']}, sdpa; max |logit difference| from ours "
             f"{facts['logit_diff']:.1e}) and `AutoTokenizer` (our ChatML template, assistant turns in "
             f"`{{% generation %}}` blocks: transformers gives the same ids for {facts['same_ids']}/{facts['checked']} "
             f"chats and the same assistant mask for {facts['same_mask']}/{facts['checked']}).", "",
             f"Data: {N_CHATS} synthetic chats (user = one non-empty tiny-Shakespeare line, assistant = the next two, "
             f"disjoint triples from the top), rendered {lo}-{max(hi, lo)} tokens (mean {mean:.0f}), "
             f"{facts['trained_share']:.0%} of them trained (assistant text + `<|im_end|>`). Both sides train the "
             f"assistant tokens only (TRL: `assistant_only_loss=True`, which works with our template).", "",
             f"Settings, both sides: {ROWS} conversations per batch (padded to the batch's longest; packed: {ROWS} rows "
             f"of {MAX_LEN}), max length {MAX_LEN}, lr {LR:g}, AdamW (weight decay 0), grad clip 1.0, {a.steps} steps, no "
             f"compile, CPU, {torch.get_num_threads()} threads. TRL: `SFTConfig(per_device_train_batch_size={ROWS}, "
             f"max_length={MAX_LEN}, learning_rate={LR:g}, use_cpu=True, max_steps={a.steps}, assistant_only_loss=True, "
             f"bf16=False (True in the bf16 row), gradient_checkpointing=False, packing=False|True, logging_steps=10, save_strategy='no')` "
             f"(optim {ts['optim']}, schedule {ts['lr_scheduler']}, {ts['attn']}). TRL's own defaults are bf16=True and "
             f"gradient_checkpointing=True; those rows are marked. tristage: `{ours_command('ours_padded', a.steps)}` "
             f"(and `--mode packed`, `--dtype bfloat16`), run in-process by the worker. `--tokens-per-batch` is a token "
             f"budget, so for padded mode the worker makes the loader take exactly {ROWS} conversations per batch "
             f"(shuffled), as TRL does; packed mode is the stock loader ({ROWS} rows x {MAX_LEN}).", "",
             f"Measured: each trainer in its own process, in alternating order, {a.repeats} repeat(s); per step the time "
             f"between optimizer-step ends (TRL: step-end callback; tristage: optimizer post-hook) and the batch's real "
             f"tokens = non-pad positions fed to the model (TRL's `num_tokens` rule; tristage: its examples' input "
             f"lengths, 2 positions fewer per conversation than TRL feeds). Medians over steps {WARMUP + 1}-{a.steps}, "
             f"then over repeats. Slots = every position of the batch tensor, padding included (TRL padding-free: none; "
             f"tristage packed: {ROWS} x {MAX_LEN}). Peak RSS = the trainer process's VmHWM (python, imports, model, data, training); "
             f"'RSS at start' = VmRSS when training starts. Machine: {load['text']}.", "",
             "| trainer | dtype / settings | real tok/s | conv/s | ms/step | real tok/step | slots/s (real share) | "
             "peak RSS | RSS at start | vs TRL's fastest (tok/s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in TRAINERS:
        if name not in res:
            continue
        r = res[name]
        label, settings = TRAINERS[name]
        bold = "**" if name in (ours_best, best_trl_name) else ""
        lines.append(f"| {bold}{label}{bold} | {settings} | {bold}{r['tok_s'] / 1e3:.1f}k{bold} | {r['conv_s']:.0f} | "
                     f"{r['ms']:.1f} | {r['tok_step']:.0f} | {r['slot_s'] / 1e3:.1f}k ({r['real_share']:.0%}) | {r['hwm_mb']:.0f} MB | {r['rss_start_mb']:.0f} MB | "
                     f"{r['tok_s'] / res[best_trl_name]['tok_s']:.2f}x |")
    lines += ["", f"BASELINES.md (TRL 1.16, same machine kind, its own 71-token vocab and template): padded "
                  f"{TRL_BASELINE['padded'] / 1e3:.1f}k, packing=True {TRL_BASELINE['packed'] / 1e3:.1f}k real tok/s.",
              ""]
    bf_note = []
    for k in bf16:
        fp = k.removesuffix("_bf16")
        faster = res[k]["tok_s"] > res[fp]["tok_s"]
        bf_note.append(f"{k.split('_')[1]}: bf16 {res[k]['tok_s'] / 1e3:.1f}k vs fp32 {res[fp]['tok_s'] / 1e3:.1f}k "
                       f"({'faster, credited' if faster else 'not faster, not credited'})")
    if bf_note:
        lines += ["bf16 autocast for tristage: " + "; ".join(bf_note) + ".", ""]
    lines.append("Every run (trainer: real tok/s, ms/step, train time, process wall, other jobs' CPU; TRL's logged "
                 "num_tokens vs ours counted):")
    for name in TRAINERS:
        if name not in res:
            continue
        parts = []
        for r in res[name]["runs"]:
            chk = "" if r["trl_num_tokens"] is None else (
                f", TRL num_tokens {r['trl_num_tokens']:.0f} = counted {r['counted_tokens']}"
                if r["trl_num_tokens"] == r["counted_tokens"] else
                f", TRL num_tokens {r['trl_num_tokens']:.0f} != counted {r['counted_tokens']}")
            parts.append(f"{'' if r['clean'] else '(disturbed) '}{r['tok_s'] / 1e3:.1f}k, {r['ms']:.1f} ms, "
                         f"{r['train_s']:.1f} s, {r['wall']:.1f} s, {r['others']:.1f} CPU-s{chk}")
        lines.append(f"- {name}: " + "; ".join(parts))
    if real:
        p = real["p"]
        (tb0, vb0), (tb1, vb1) = real["before"], real["after"]
        lines += ["", "### Real instruction data", "",
                  f"`{ALPACA.name}` ({real['n_records']:,} Alpaca records, {real['n_records'] - real['n_train'] - real['n_val']} "
                  f"skipped by `--on-error skip` for an empty output; converted by tristage's loader: "
                  f"user = instruction + input, assistant = output), 5% held out by `--val-fraction 0.05` (seed 0): "
                  f"{real['n_train']} train / {real['n_val']} val conversations, {real['train_tokens']:,} / "
                  f"{real['val_tokens']:,} tokens; val loss is the mean over all {real['val_targets']:,} trained (assistant) "
                  f"targets of the val split, train loss over the first 20 packed batches of the train split, both "
                  f"measured before and after with the same batches. Model: randomly initialised, "
                  f"{real['params'] / 1e6:.2f}M params (vocab {real['vocab']} byte-level BPE trained on the Alpaca text, "
                  f"hidden {p['hidden_size']}, {p['num_hidden_layers']} layers, intermediate {p['intermediate_size']}), "
                  f"fp32. SFT: {p['max_steps']} steps in {real['sft_s']:.0f} s ({real['tok_s'] / 1e3:.1f}k trained (assistant) "
                  f"tok/s median, as `real_tok_per_s` in metrics.jsonl), setup (tokenizer + split + loss before) {real['setup_s']:.0f} s. Commands:", ""]
        lines += [f"    {c}" for c in real["cmds"]]
        lines += ["", "| | train loss | val loss |", "|---|---|---|",
                  f"| before SFT (random init) | {tb0:.3f} | {vb0:.3f} |",
                  f"| after {p['max_steps']} steps | {tb1:.3f} | **{vb1:.3f}** |", "",
                  "Val loss during the run (step: loss): " + ", ".join(f"{s}: {v:.3f}" for s, v in real["evals"]) + ".",
                  f"Loader notes: {'; '.join(real['notes'])}.",
                  "`oasst1_validation_qlora.jsonl.gz` is not used: its `input` is one `### Human: ... ### Assistant:` "
                  "string, which tristage's loader does not split into turns (it would need a converter)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_sft"), help="folder for the model, data and runs")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every trainer (the median is reported)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per trainer run")
    ap.add_argument("--only", nargs="*", default=None, help="trainers to run (default: all but trl_packed_defaults)",
                    choices=list(TRAINERS))
    ap.add_argument("--quiet-wait", type=float, default=600, help="max seconds to wait for idle CPUs before timing")
    ap.add_argument("--retries", type=int, default=2, help="extra runs allowed per disturbed trainer run")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 steps, 1 repeat, short real-data run, no write")
    ap.add_argument("--no-real", action="store_true", help="skip the real-data SFT")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--worker", choices=list(TRAINERS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    a.cmd_line = "python bench/bench_sft.py " + " ".join(sys.argv[1:])
    if not SHAKESPEARE.exists():
        print(f"skipped: {SHAKESPEARE} is absent")
        return 0
    if a.quick:
        a.steps, a.repeats, a.quiet_wait, a.retries, a.no_write = 8, 1, 0, 0, True
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    facts = setup(work)
    print(f"setup: {facts}", flush=True)
    names = a.only or ORDER
    runs: dict[str, list[dict]] = {n: [] for n in names}
    busy = wait_quiet(a.quiet_wait)
    load = {"busy_before": busy, "load0": os.getloadavg()}
    print(f"CPUs {busy:.0%} busy before timing", flush=True)
    for rep in range(a.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            for _attempt in range(1 + a.retries):  # a disturbed run is retried after waiting for quiet CPUs
                share = wait_quiet(a.quiet_wait)
                r = run_trainer(work, name, a.steps)
                r["busy_before"] = share
                runs[name].append(r)
                print(f"  [{rep + 1}/{a.repeats}] {name}: {r['tok_s']:,.0f} real tok/s, {r['ms']:.1f} ms/step, "
                      f"{r['tok_step']:.0f} tok/step, peak RSS {r['hwm_mb']:.0f} MB, wall {r['wall']:.1f} s, "
                      f"other jobs' CPU {r['others']:.1f} s{'' if r['clean'] else ' (disturbed)'}", flush=True)
                if r["clean"]:
                    break
    res = {n: combine(rs) for n, rs in runs.items()}
    all_runs = [r for rs in runs.values() for r in rs]
    n_dist = sum(not r["clean"] for r in all_runs)
    n_busy = sum(r["busy_before"] >= 0.08 for r in all_runs)
    load["text"] = (f"each run started after waiting (up to {a.quiet_wait:.0f} s) for idle CPUs, {n_busy} of "
                    f"{len(all_runs)} without getting them; load average {load['load0'][0]:.2f} at the start, "
                    f"{os.getloadavg()[0]:.2f} at the end; {n_dist} of {len(all_runs)} runs disturbed (other jobs used "
                    f"more than {DISTURBED} CPU-s per second of them; excluded from the medians where a clean run exists)")
    real = None
    if not a.no_real and ALPACA.exists():
        wait_quiet(a.quiet_wait)
        print("real data: tokenizer, random tiny model, SFT on Alpaca ...", flush=True)
        real = real_data(work, a.quick)
        print(f"  val loss {real['before'][1]:.3f} -> {real['after'][1]:.3f} in {real['sft_s']:.0f} s", flush=True)
    if "trl_padded" not in res:
        print(json.dumps({k: {x: v[x] for x in ("tok_s", "ms", "hwm_mb")} for k, v in res.items()}, indent=1))
        return 0
    text = report(a, facts, res, real, load)
    print("\n" + text)
    if not a.no_write:
        write_section(SECTION, text)
        print(f"wrote the {SECTION} section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
