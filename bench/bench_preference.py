"""Preference-learning benchmark: tristage `dpo` / `reward` against TRL's DPOTrainer / RewardTrainer, with loss parity.

    .venv/bin/python bench/bench_preference.py [--repeats 2] [--steps 30] [--quick] [--no-write] [--only NAME ...]

Target (issue): steps/s >= 2x TRL's DPOTrainer (and RewardTrainer) on the same tiny model and data, in the same run,
on this CPU (../shared/BASELINES.md section 3(c): TRL 1.16 DPO at 4.9 steps/s, batch 8, max length 256), peak memory
beside it; and the loss values on identical inputs agree with TRL's to 1e-5, checked here (TRL is only a bench extra).

One run does:
1. the shared setup in --work: tristage's char tokenizer (`train_char` on tiny Shakespeare) with our ChatML template;
   a tristage GPT with the BASELINES Llama shape (hidden 128, 4 layers, 4 heads, intermediate 512, tied, seed 0)
   saved as a Hugging Face folder (`model`), a perturbed copy of it (`policy`, for the parity checks only: with
   policy == reference every DPO loss is log 2 and tests nothing), and a reward model with our score head on the same
   backbone (`rm`, a LlamaForSequenceClassification folder); N_PAIRS synthetic pairs (prompt = a Shakespeare line,
   chosen = the true next line, rejected = a random other line) written once as `pairs.jsonl` in TRL's
   conversational shape, which tristage reads as is and TRL reads through `trl_rows`;
2. parity (`parity`): TRL's own loss code and ours on identical per-sequence log-probs / rewards, the per-sequence
   summed log-probs and rewards of a real batch through both pipelines, and the first-step losses; a table of max abs
   differences, exit status 1 if any exceeds TOL;
3. every trainer in its own subprocess (`--worker NAME`: peak RSS = that process's VmHWM), --steps optimizer steps
   each, the order alternating between repeats; per step the time between optimizer-step ends (TRL: a step-end
   callback; tristage: an optimizer step post-hook); figures = medians over steps after WARMUP, then the median over
   repeats; tristage's one-off reference pass is timed on its own and is inside the end-to-end time;
4. a table, and the "## Preference learning (DPO, reward model)" section of bench/RESULTS.md.

Token sequences. Our template renders an assistant turn as `<|im_start|>assistant\\n{reply}<|im_end|>\\n`; tristage
scores (and reads rewards at) the reply up to and including `<|im_end|>` and drops the newline after it. TRL's
conversational format renders prompt + reply with the same template and scores everything after the prompt, i.e. the
trailing newline too (one token more per reply; for RewardTrainer the reward is read at that newline). So the TRL rows
that are compared use TRL's standard (text) format built from the same JSONL by the same template: prompt =
apply_chat_template(prompt, add_generation_prompt=True), chosen / rejected = reply + '<|im_end|>', with the tokenizer's
eos_token set to '<|im_end|>' so TRL appends nothing. The setup checks that TRL's tokenized pairs are then identical to
tristage's (ids and scored positions) and that the conversational ones are ours + one newline token per reply; the
conversational format is timed as an extra row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from benchlib import RESULTS, busy_seconds, memory_kib, own_seconds, wait_quiet, write_section

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
SECTION = "Preference learning (DPO, reward model)"
N_PAIRS, BATCH, MAX_LEN = 64, 8, 256
DPO_LR, RM_LR, BETA = 5e-4, 1e-4, 0.1
END = "<|im_end|>"
TOL = 1e-5
WARMUP = 5  # steps left out of the medians
DISTURBED = 0.05  # other jobs' CPU-seconds per second of a run above which the run is marked disturbed
TRL_BASELINE = {"dpo_ms": 203.2, "dpo_steps_s": 4.92}  # BASELINES.md section 3(c), standard format
LLAMA = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
             max_position_embeddings=512, tie_word_embeddings=True)

# name -> (label, settings)
TRAINERS = {
    "trl_dpo": ("TRL DPOTrainer", "text format (same tokens as ours), explicit ref_model copy, fp32"),
    "ours_dpo": ("tristage dpo", "fp32 (--dtype float32), reference log-probs precomputed, packed pairs"),
    "ours_dpo_bf16": ("tristage dpo", "--dtype bfloat16 (autocast), reference log-probs precomputed, packed pairs"),
    "ours_dpo_rows": ("tristage dpo", "fp32, reference log-probs precomputed, --layout rows (a row per answer)"),
    "trl_dpo_bf16": ("TRL DPOTrainer", "text format, explicit ref_model copy, bf16=True (CPU autocast)"),
    "trl_dpo_conv": ("TRL DPOTrainer", "conversational format (+1 token per reply), explicit ref_model copy, fp32"),
    "trl_dpo_precompute": ("TRL DPOTrainer", "text format, precompute_ref_log_probs=True, ref_model=None, fp32"),
    "trl_rm": ("TRL RewardTrainer", "LlamaForSequenceClassification, text format (same tokens), fp32"),
    "trl_rm_bf16": ("TRL RewardTrainer", "LlamaForSequenceClassification, text format, bf16=True (CPU autocast)"),
    "ours_rm": ("tristage reward", "fp32 (--dtype float32), --center-coef 0, packed pairs"),
    "ours_rm_bf16": ("tristage reward", "--dtype bfloat16 (autocast), --center-coef 0, packed pairs"),
    "ours_rm_rows": ("tristage reward", "fp32, --center-coef 0, --layout rows (a row per answer)"),
}
ORDER = ["trl_dpo", "trl_dpo_bf16", "ours_dpo", "ours_dpo_bf16", "ours_dpo_rows", "trl_dpo_conv", "trl_dpo_precompute",
         "trl_rm", "trl_rm_bf16", "ours_rm", "ours_rm_bf16", "ours_rm_rows"]


# ----------------------------------------------------------------------------- machine load
# ----------------------------------------------------------------------------- setup
def make_pairs() -> list[dict]:
    """N_PAIRS pairs in TRL's conversational shape: prompt = line 2k, chosen = line 2k+1, rejected = a random line."""
    lines = [x for x in SHAKESPEARE.read_text().splitlines() if x.strip()]
    rng = random.Random(0)
    out = []
    for k in range(N_PAIRS):
        prompt, chosen = lines[2 * k], lines[2 * k + 1]
        rejected = chosen
        while rejected.strip() in (chosen.strip(), prompt.strip()):
            rejected = lines[rng.randrange(len(lines))]
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def read_pairs(work: Path) -> list[dict]:
    return [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]


def hf_tokenizer(work: Path):
    """transformers' tokenizer of our folder, with eos = <|im_end|> (so TRL's text format appends nothing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    tok.eos_token = END
    return tok


def trl_rows(tok, recs: list[dict], fmt: str) -> list[dict]:
    """TRL's rows from the JSONL: 'conv' as is; 'text' = the prompt rendered by our template + reply + <|im_end|>."""
    if fmt == "conv":
        return recs
    return [{"prompt": tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
             "chosen": r["chosen"][0]["content"] + END, "rejected": r["rejected"][0]["content"] + END} for r in recs]


def our_examples(work: Path):
    from tristage.data.preference import encode_preferences, load_preferences
    from tristage.tokenizer import Tokenizer

    tok = Tokenizer.load(work / "model")
    prefs, _ = load_preferences(work / "pairs.jsonl")
    ex, stats = encode_preferences(tok, prefs, MAX_LEN)
    return tok, ex, stats


def setup(work: Path) -> dict:
    """Tokenizer, model folders and pairs; returns facts for the report."""
    from tristage.model.gpt import ModelConfig, build_model
    from tristage.model.hf import save_model
    from tristage.model.score import from_causal_lm, save_reward_model
    from tristage.tokenizer import train_char

    tok = train_char([str(SHAKESPEARE)])
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_key_value_heads=4, **LLAMA)
    model = build_model(cfg, seed=0)
    save_model(model, work / "model", tok, dtype=torch.float32)
    policy = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    save_model(policy, work / "policy", tok, dtype=torch.float32)
    rm = from_causal_lm(build_model(cfg, seed=0), 1, seed=0)
    save_reward_model(rm, work / "rm", tok, dtype=torch.float32)
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    _, ex, stats = our_examples(work)
    lens = [len(e.chosen_ids) for e in ex] + [len(e.rejected_ids) for e in ex]
    reply = [sum(e.chosen_mask) for e in ex] + [sum(e.rejected_mask) for e in ex]
    return {"vocab": tok.vocab_size, "params": sum(p.numel() for p in model.parameters()),
            "seq_len": (min(lens), statistics.mean(lens), max(lens)),
            "reply_len": (min(reply), statistics.mean(reply), max(reply)), "encode": str(stats)}


# ----------------------------------------------------------------------------- parity
class StubLM(torch.nn.Module):
    """Stands in for TRL's fused-head model: returns per-token log-probs whose row sums are the given values."""

    def __init__(self, seq_logps: torch.Tensor, width: int):
        super().__init__()
        self.per_token = torch.zeros(len(seq_logps), width)
        self.per_token[:, 0] = seq_logps  # zeros elsewhere: the sum over the row is exactly this value

    def forward(self, **_):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)


def stub_batch(chosen_len: torch.Tensor, rejected_len: torch.Tensor, prompt: int = 4) -> dict:
    """A TRL DPO batch (2B rows) whose completion masks have the given lengths."""
    lens = torch.cat([chosen_len, rejected_len]).long()
    T = prompt + int(lens.max())
    cm = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        cm[i, prompt:prompt + n] = 1
    am = ((torch.arange(T) < prompt) | cm.bool()).long()
    return {"input_ids": torch.zeros(len(lens), T, dtype=torch.long), "attention_mask": am, "completion_mask": cm}


def trl_dpo_loss(trainer, c, r, rc, rr, lc, lr, loss_type: str, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL DPOTrainer._compute_loss on given summed log-probs: per-pair losses (one call per pair) and the metrics
    TRL logs for the whole batch (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies)."""
    trainer.loss_types, trainer.loss_weights, trainer.beta = [loss_type], [1.0], beta
    trainer.precompute_ref_logps = True  # read the reference log-probs from the batch

    def call(idx):
        batch = stub_batch(lc[idx], lr[idx])
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = rc[idx], rr[idx]
        stub = StubLM(torch.cat([c[idx], r[idx]]), batch["input_ids"].shape[1] - 1)
        with torch.no_grad():
            return trainer._compute_loss(stub, batch, False)

    per_pair = torch.stack([call(torch.tensor([i])) for i in range(len(c))])
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    mean = call(torch.arange(len(c)))
    m = {k: trainer._metrics[mode][k][-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                    "rewards/accuracies")}
    trainer.precompute_ref_logps = False
    return per_pair, {"mean": mean.item(), **m}


def input_sets(model_set: dict) -> dict[str, dict]:
    """Per-sequence log-probs fed to both sides: from the models, random, and near-certain answers."""
    g = torch.Generator().manual_seed(0)
    n = 256
    lc, lr = torch.randint(1, 61, (n,), generator=g).float(), torch.randint(1, 61, (n,), generator=g).float()
    rc, rr = -lc * (2 + 2.5 * torch.rand(n, generator=g)), -lr * (2 + 2.5 * torch.rand(n, generator=g))
    # policy = reference + N(0, 8^2), kept a valid log-prob (mean token log-prob <= -0.05)
    c = torch.minimum(rc + 8 * torch.randn(n, generator=g), -0.05 * lc)
    r = torch.minimum(rr + 8 * torch.randn(n, generator=g), -0.05 * lr)
    sets = {"model": model_set, "random": dict(c=c, r=r, rc=rc, rr=rr, lc=lc, lr=lr)}
    # near-certain answers: mean token log-prob in [-0.01, -1e-4] (a well-fitted model); reference-free losses only
    ac, ar = -10 ** (-2 - 2 * torch.rand(n, generator=g)), -10 ** (-2 - 2 * torch.rand(n, generator=g))
    sets["near-certain"] = dict(c=ac * lc, r=ar * lr, rc=None, rr=None, lc=lc, lr=lr)
    return sets


def parity(work: Path) -> tuple[list[dict], dict]:
    """Rows (group, check, inputs, max_abs, tolerance, ...) and facts (token-sequence checks, ORPO vs fp64)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from tristage.data.preference import collate_pairs, collate_pairs_shared
    from tristage.model.hf import load_model
    from tristage.model.score import load_reward_model
    from tristage.rollout import batch_logprobs
    from tristage.stages import dpo as sdpo
    from tristage.stages import reward as sreward
    from tristage.train.losses import bradley_terry_loss, dpo_loss

    torch.manual_seed(0)
    rows, facts = [], {}

    def add(group, check, inputs, a, b, rel: float | None = None):
        """One row; the tolerance is TOL absolute, or `rel` x the largest |value| (for fp32 sums of hundreds)."""
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        scale = b.abs().max().item()
        tol = TOL if rel is None else rel * scale
        rows.append({"group": group, "check": check, "inputs": inputs, "max_abs": (a - b).abs().max().item(),
                     "n": a.numel(), "scale": scale, "tol": tol,
                     "tol_text": f"{TOL:g}" if rel is None else f"{rel:g} x largest = {tol:.1e}"})

    tok = hf_tokenizer(work)
    recs = read_pairs(work)
    ttok, ex, _ = our_examples(work)
    common = dict(per_device_train_batch_size=BATCH, max_length=MAX_LEN, use_cpu=True, bf16=False,
                  gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)

    # --- DPO: TRL's tokenization vs ours
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir=str(work / "parity_dpo"), beta=BETA, **common)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(trl_rows(tok, recs, "text")),
                         processing_class=tok)
    ds = trainer.train_dataset

    def same_tokens(d, extra: list[int]):
        n = 0
        for i, e in enumerate(ex):
            p = d[i]["prompt_ids"]
            n += (p + d[i]["chosen_ids"] == e.chosen_ids + extra and p + d[i]["rejected_ids"] == e.rejected_ids + extra
                  and [0] * len(p) + [1] * (len(d[i]["chosen_ids"]) - len(extra)) == e.chosen_mask
                  and [0] * len(p) + [1] * (len(d[i]["rejected_ids"]) - len(extra)) == e.rejected_mask)
        return n

    facts["dpo_text_same"] = same_tokens(ds, []) if len(ds) == len(ex) else 0
    conv = trainer._prepare_dataset(Dataset.from_list(trl_rows(tok, recs, "conv")), tok, args, "conv")
    nl = tok.convert_tokens_to_ids("\n") if "\n" in tok.get_vocab() else tok("\n", add_special_tokens=False)["input_ids"][0]
    facts["dpo_conv_plus_newline"] = same_tokens(conv, [nl]) if len(conv) == len(ex) else 0
    facts["pairs"] = len(ex)

    # --- DPO pipeline: per-sequence summed log-probs of one batch (policy and reference), fp32
    batch = trainer.data_collator([ds[i] for i in range(BATCH)])
    ob = collate_pairs(ex[:BATCH], ttok.pad_id)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ours_pol, ours_ref = load_model(work / "policy", dtype=torch.float32), load_model(work / "model", dtype=torch.float32)
    with torch.no_grad():
        pc, pr = trainer.compute_ref_log_probs(trainer.model, batch)
        rc, rr = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        lp, n = batch_logprobs(ours_pol, ob)
        lr_, _ = batch_logprobs(ours_ref, ob)
        packed = collate_pairs_shared(ex[:BATCH], ttok.pad_id, pack=True)
        lp_packed, n_packed = batch_logprobs(ours_pol, packed)
        # TRL's fused-head forward, as in its _compute_loss; ours: the log_softmax + gather of `sequence_logprobs`
        trl_tok = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                                labels=labels, fused_lm_head=True).log_probs
        y = ob["labels"]
        ours_tok = torch.log_softmax(ours_pol(ob["input_ids"]).float(), -1).gather(
            -1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != -100)
    add("DPO pipeline", "per-token reply log-probs, policy (TRL fused-head forward vs ours)", f"batch of {BATCH} pairs",
        ours_tok[:, :trl_tok.shape[1]], trl_tok)
    add("DPO pipeline", "summed reply log-probs, policy (TRL `compute_ref_log_probs` vs `sequence_logprobs`)",
        f"batch of {BATCH} pairs", lp, torch.cat([pc, pr]), 1e-6)
    add("DPO pipeline", "summed reply log-probs, reference", f"batch of {BATCH} pairs", lr_, torch.cat([rc, rr]), 1e-6)
    add("DPO pipeline", f"summed reply log-probs, policy, tristage's default packed layout ({packed['input_ids'].shape[0]} "
        f"rows of {packed['input_ids'].shape[1]} for {BATCH} pairs, prompt once per pair) vs TRL",
        f"batch of {BATCH} pairs", lp_packed, torch.cat([pc, pr]), 1e-6)
    add("DPO pipeline", "scored tokens per sequence, packed layout vs TRL", f"batch of {BATCH} pairs", n_packed,
        torch.cat([x.sum(1).float() for x in batch["completion_mask"].chunk(2)]))
    lc_t, lr_t = (x.sum(1).float() for x in batch["completion_mask"].chunk(2))
    add("DPO pipeline", "scored tokens per sequence", f"batch of {BATCH} pairs", n, torch.cat([lc_t, lr_t]))
    for loss_type, beta in (("sigmoid", BETA), ("ipo", BETA)):
        trainer.loss_types, trainer.loss_weights, trainer.beta = [loss_type], [1.0], beta
        with torch.no_grad():
            trl_first = trainer.compute_loss(trainer.model, dict(batch))
        cfg = sdpo.Config(model="-", loss=loss_type, beta=beta)
        ours_first = sdpo.losses(lp, n, lr_, BATCH, cfg)[0].mean()
        add("DPO pipeline", f"first-step loss, {loss_type} (beta {beta}): TRL compute_loss vs tristage dpo",
            "policy vs reference model", ours_first, trl_first)

    # --- loss formulas on identical per-sequence log-probs
    model_set = dict(c=pc, r=pr, rc=rc, rr=rr, lc=lc_t, lr=lr_t)
    ns = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device="cpu"))
    for name, s in input_sets(model_set).items():
        c, r, rc_, rr_, lc, lr = s["c"], s["r"], s["rc"], s["rr"], s["lc"], s["lr"]
        what = f"{name} ({len(c)} pairs)"
        if rc_ is not None:
            for loss_type, beta in (("sigmoid", BETA), ("ipo", BETA), ("ipo", 0.5)):
                per, m = trl_dpo_loss(trainer, c, r, rc_, rr_, lc, lr, loss_type, beta)
                ours, ch, rj = dpo_loss(c, r, rc_, rr_, chosen_len=lc, rejected_len=lr, beta=beta, loss_type=loss_type)
                label = "DPO (sigmoid)" if loss_type == "sigmoid" else "IPO (per-token means)"
                add("loss", f"{label}, beta {beta}: per pair (DPOTrainer._compute_loss)", what, ours, per)
                add("loss", f"{label}, beta {beta}: batch mean", what, ours.mean(), m["mean"])
                if loss_type == "sigmoid":
                    add("loss", "implicit rewards: mean chosen, mean rejected, mean margin, accuracy", what,
                        [ch.mean(), rj.mean(), (ch - rj).mean(), (ch > rj).float().mean()],
                        [m["rewards/chosen"], m["rewards/rejected"], m["rewards/margins"], m["rewards/accuracies"]])
            # conservative DPO = TRL CPO's sigmoid loss with label smoothing on the reference log-ratios
            cns = SimpleNamespace(**vars(ns), loss_type="sigmoid", beta=BETA, label_smoothing=0.1, simpo_gamma=0.5)
            trl_l, trl_ch, trl_rj = CPOTrainer.cpo_loss(cns, c - rc_, r - rr_)
            ours, ch, rj = dpo_loss(c, r, rc_, rr_, beta=BETA, loss_type="sigmoid", label_smoothing=0.1)
            add("loss", f"conservative DPO, label smoothing 0.1, beta {BETA}: per pair (CPOTrainer.cpo_loss "
                "sigmoid on log-ratios)", what, ours, trl_l)
        avg_c, avg_r = c / lc, r / lr
        for ls in (0.0, 0.1):
            sns = SimpleNamespace(**vars(ns), loss_type="simpo", beta=2.0, label_smoothing=ls, simpo_gamma=0.5)
            trl_l, trl_ch, trl_rj = CPOTrainer.cpo_loss(sns, avg_c, avg_r)
            ours, ch, rj = dpo_loss(c, r, None, None, chosen_len=lc, rejected_len=lr, beta=2.0, loss_type="simpo",
                                    gamma=0.5, label_smoothing=ls)
            add("loss", f"SimPO, beta 2, gamma 0.5, label smoothing {ls}: per pair (CPOTrainer.cpo_loss)", what,
                ours, trl_l)
            if ls == 0.0:
                add("loss", "SimPO rewards (beta x mean token log-prob), chosen and rejected", what,
                    torch.cat([ch, rj]), torch.cat([trl_ch, trl_rj]))
        ons = SimpleNamespace(**vars(ns), beta=BETA)
        ratio = ORPOTrainer.odds_ratio_loss(ons, avg_c, avg_r)[0]
        ours, _, _ = dpo_loss(c, r, None, None, chosen_len=lc, rejected_len=lr, beta=BETA, loss_type="orpo")
        add("loss", f"ORPO, lambda {BETA}: per pair, NLL term = -mean reply log-prob on both sides "
            "(ORPOTrainer.odds_ratio_loss)", what, ours, -avg_c - ratio)
        # the same in float64 with log(1 - p) = log(-expm1(log p)), exact to ~1e-16: who is off if they differ
        xc, xr = avg_c.double(), avg_r.double()
        odds = (xc - xr) - (torch.log(-torch.expm1(xc)) - torch.log(-torch.expm1(xr)))
        exact = -xc - BETA * torch.nn.functional.logsigmoid(odds)
        facts[f"orpo_vs_fp64_{name}"] = {"ours": (ours.double() - exact).abs().max().item(),
                                         "trl": ((-avg_c - ratio).double() - exact).abs().max().item()}

    # --- reward model
    hf_rm = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=torch.float32,
                                                               attn_implementation="sdpa")
    rargs = RewardConfig(output_dir=str(work / "parity_rm"), **common)
    rtrainer = RewardTrainer(model=hf_rm, args=rargs, train_dataset=Dataset.from_list(trl_rows(tok, recs, "text")),
                             processing_class=tok)
    rds = rtrainer.train_dataset
    facts["rm_text_same"] = sum(rds[i]["chosen_ids"] == e.chosen_ids and rds[i]["rejected_ids"] == e.rejected_ids
                                for i, e in enumerate(ex)) if len(rds) == len(ex) else 0
    rbatch = rtrainer.data_collator([rds[i] for i in range(BATCH)])
    with torch.no_grad():
        rew = rtrainer.model(input_ids=rbatch["input_ids"], attention_mask=rbatch["attention_mask"]).logits.squeeze(-1)
        ours_rm = load_reward_model(work / "rm", dtype=torch.float32)
        s = sreward.pair_scores(ours_rm, ob, "cpu")[:, 0]
        s_packed = sreward.pair_scores(ours_rm, packed, "cpu")[:, 0]
    add("reward pipeline", "rewards of chosen and rejected (LlamaForSequenceClassification vs tristage "
        "ScoreModel, same weights)", f"batch of {BATCH} pairs", s, rew)
    add("reward pipeline", "rewards of chosen and rejected, tristage's default packed layout vs TRL",
        f"batch of {BATCH} pairs", s_packed, rew)
    margin = torch.rand(BATCH, generator=torch.Generator().manual_seed(2))
    for coef, mg in ((None, None), (0.01, None), (None, margin), (0.01, margin)):
        rtrainer.args.center_rewards_coefficient = coef
        inputs = dict(rbatch)
        if mg is not None:
            inputs["margin"] = mg
        with torch.no_grad():
            trl_loss = rtrainer.compute_loss(rtrainer.model, inputs)
        rc_, rr_ = rew.chunk(2)
        label = (f"Bradley-Terry, center coef {coef or 0}" + (", margin" if mg is not None else "")
                 + ": RewardTrainer.compute_loss vs `bradley_terry_loss`")
        add("reward loss", label, "TRL's rewards of the batch",
            bradley_terry_loss(rc_, rr_, mg, coef or 0.0), trl_loss)
        add("reward loss", label.replace("`bradley_terry_loss`", "tristage's pipeline (our model, batch, loss)"),
            f"batch of {BATCH} pairs", bradley_terry_loss(s[:BATCH], s[BATCH:], mg, coef or 0.0), trl_loss)
    rtrainer.args.center_rewards_coefficient = None
    return rows, facts


def passed(row: dict) -> bool:
    return row["max_abs"] <= row["tol"]  # NaN fails


def parity_table(rows: list[dict]) -> list[str]:
    out = ["| group | check (ours vs TRL) | inputs | max abs diff | tolerance | values | largest |value| | ok |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['group']} | {r['check']} | {r['inputs']} | {r['max_abs']:.1e} | {r['tol_text']} | {r['n']} | "
                   f"{r['scale']:.3g} | {'yes' if passed(r) else '**NO**'} |")
    return out


# ----------------------------------------------------------------------------- workers (one trainer per process)
def worker_trl(work: Path, name: str, steps: int, rec: dict) -> None:
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    rec["t0"] = time.perf_counter()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["begin"], rec["rss_start_kib"] = time.perf_counter(), memory_kib("VmRSS")

        def on_step_end(self, args, state, control, **kw):
            rec["ends"].append(time.perf_counter())

    tok = hf_tokenizer(work)
    rows = trl_rows(tok, read_pairs(work), "conv" if name.endswith("conv") else "text")
    common = dict(output_dir=str(work / name), per_device_train_batch_size=BATCH, max_length=MAX_LEN, use_cpu=True,
                  max_steps=steps, logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
                  dataloader_num_workers=0, bf16=name.endswith("bf16"), gradient_checkpointing=False,
                  lr_scheduler_type="constant", adam_beta2=0.95)  # = tristage's AdamW betas and --schedule constant
    if name.startswith("trl_rm"):
        model = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=torch.float32,
                                                                   attn_implementation="sdpa")
        args = RewardConfig(learning_rate=RM_LR, **common)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                callbacks=[Clock()])
    else:
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
        pre = name.endswith("precompute")
        ref = None if pre else copy.deepcopy(model)
        args = DPOConfig(learning_rate=DPO_LR, beta=BETA, precompute_ref_log_probs=pre, **common)
        orig = DPOTrainer._precompute_ref_logps

        def timed(self, *a, **k):
            t = time.perf_counter()
            out = orig(self, *a, **k)
            rec["ref_s"] = rec.get("ref_s", 0.0) + time.perf_counter() - t
            return out

        DPOTrainer._precompute_ref_logps = timed
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Clock()])
    trainer.train()
    rec["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rec["settings"] = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                       "optim": str(args.optim), "lr_scheduler": str(args.lr_scheduler_type),
                       "max_grad_norm": args.max_grad_norm, "attn": model.config._attn_implementation}


def worker_ours(work: Path, name: str, steps: int, rec: dict) -> None:
    from tristage.data import preference
    from tristage.stages import dpo, reward
    from tristage.train import loop

    stage = reward if name.startswith("ours_rm") else dpo
    rec["t0"] = time.perf_counter()
    build = loop.build_optimizer

    def build_timed(*a, **k):
        opt = build(*a, **k)
        opt.register_step_post_hook(lambda *_: rec["ends"].append(time.perf_counter()))
        return opt

    nxt = preference.PairLoader.__next__

    def counting(self):
        if "begin" not in rec:
            rec["begin"], rec["rss_start_kib"] = time.perf_counter(), memory_kib("VmRSS")
        return nxt(self)

    ref_pass = dpo.reference_logps

    def ref_timed(*a, **k):
        t = time.perf_counter()
        out = ref_pass(*a, **k)
        rec["ref_s"] = rec.get("ref_s", 0.0) + time.perf_counter() - t
        return out

    loop.build_optimizer, preference.PairLoader.__next__, dpo.reference_logps = build_timed, counting, ref_timed
    dtype = "bfloat16" if name.endswith("bf16") else "float32"
    common = dict(data=[str(work / "pairs.jsonl")], val_fraction=0.0, out=str(work / name), max_len=MAX_LEN,
                  batch_size=BATCH, max_steps=steps, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=1.0,
                  dtype=dtype, eval_every=0, save_every=0, log_every=1, progress=False, seed=0, device="cpu",
                  overwrite=True)
    common["layout"] = "rows" if name.endswith("_rows") else "packed"
    if stage is reward:
        reward.main(reward.Config(model=str(work / "rm"), lr=RM_LR, center_coef=0.0, **common))
    else:
        dpo.main(dpo.Config(model=str(work / "model"), lr=DPO_LR, loss="sigmoid", beta=BETA, **common))
    recs = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    rec["losses"] = [r["loss"] for r in recs if "loss" in r]
    rec["settings"] = {"cmd": ours_command(name, steps)}


def ours_command(name: str, steps: int) -> str:
    dtype = "bfloat16" if name.endswith("bf16") else "float32"
    common = (f"--data pairs.jsonl --val-fraction 0 --max-len {MAX_LEN} --batch-size {BATCH} --max-steps {steps} "
              f"--warmup-steps 0 --schedule constant --weight-decay 0 --grad-clip 1.0 --dtype {dtype} --eval-every 0 "
              f"--save-every 0 --log-every 1 --no-progress --device cpu"
              + (" --layout rows" if name.endswith("_rows") else ""))
    if name.startswith("ours_rm"):
        return f"tristage reward rm {common} --lr {RM_LR:g} --center-coef 0"
    return f"tristage dpo model {common} --lr {DPO_LR:g} --loss sigmoid --beta {BETA}"


def worker(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    work, name = Path(args.work), args.worker
    rec: dict = {"ends": []}
    t0 = time.perf_counter()
    (worker_trl if name.startswith("trl") else worker_ours)(work, name, args.steps, rec)
    rec["wall_in"] = time.perf_counter() - t0
    rec["hwm_kib"] = memory_kib("VmHWM")
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


# ----------------------------------------------------------------------------- driver
def run_trainer(work: Path, name: str, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work", str(work), "--steps", str(steps)]
    load0, busy0, own0 = os.getloadavg()[0], busy_seconds(), own_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                  "TOKENIZERS_PARALLELISM": "false",
                                                                  "TRL_EXPERIMENTAL_SILENCE": "1"})
    wall = time.perf_counter() - t0
    others = max(0.0, busy_seconds() - busy0 - (own_seconds(resource.RUSAGE_CHILDREN) - own0))
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    rec = json.loads(line[len("RESULT "):])
    ends = rec["ends"]
    if len(ends) != steps:
        raise RuntimeError(f"{name}: {len(ends)} step ends timed, expected {steps}")
    dts = [b - a for a, b in zip([rec["begin"], *ends[:-1]], ends)]
    keep = range(min(WARMUP, len(dts) - 1), len(dts))
    ms = statistics.median(dts[k] for k in keep) * 1e3
    out = {"name": name, "ms": ms, "steps_s": 1e3 / ms, "pairs_s": BATCH * 1e3 / ms, "steps": len(dts),
           "hwm_mb": rec["hwm_kib"] / 1024, "rss_start_mb": rec["rss_start_kib"] / 1024, "wall": wall,
           "train_s": ends[-1] - rec["begin"], "e2e": ends[-1] - rec["t0"], "ref_s": rec.get("ref_s"),
           "others": others, "load": (load0, os.getloadavg()[0]), "settings": rec["settings"],
           "losses": rec["losses"], "loss0": rec["losses"][0] if rec["losses"] else float("nan"),
           "loss1": rec["losses"][-1] if rec["losses"] else float("nan")}
    out["clean"] = others <= DISTURBED * wall
    return out


def combine(runs: list[dict]) -> dict:
    used = [r for r in runs if r["clean"]] or runs
    keys = ("ms", "steps_s", "pairs_s", "hwm_mb", "rss_start_mb", "wall", "train_s", "e2e", "loss0", "loss1")
    med = {k: statistics.median(r[k] for r in used) for k in keys}
    refs = [r["ref_s"] for r in used if r["ref_s"] is not None]
    med["ref_s"] = statistics.median(refs) if refs else None
    return {**med, "n": len(used), "runs": runs, "settings": runs[0]["settings"]}


# ----------------------------------------------------------------------------- report
def report(a: argparse.Namespace, facts: dict, prows: list[dict], res: dict[str, dict], load: dict) -> str:
    lo, mean, hi = facts["seq_len"]
    rlo, rmean, rhi = facts["reply_len"]
    bad = [r for r in prows if not passed(r)]
    worst = max(prows, key=lambda r: r["max_abs"] / r["tol"])
    lines = [f"`{a.cmd_line}`", ""]

    def best(fp32: str) -> str:
        bf = fp32 + "_bf16"
        return bf if bf in res and fp32 in res and res[bf]["steps_s"] > res[fp32]["steps_s"] else fp32

    verdicts, ratios = [], []
    for trl_fp32, ours, what in (("trl_dpo", "ours_dpo", "DPO"), ("trl_rm", "ours_rm", "reward model")):
        if trl_fp32 in res and ours in res:
            b, trl = best(ours), best(trl_fp32)
            ratio = res[b]["steps_s"] / res[trl]["steps_s"]
            ratios.append(ratio)
            verdicts.append(f"{what}: **{ratio:.2f}x** TRL's steps/s ({TRAINERS[b][0]}, {TRAINERS[b][1]}; against "
                            f"TRL's faster setting, {TRAINERS[trl][1]}; fp32 against fp32: "
                            f"{res[ours]['steps_s'] / res[trl_fp32]['steps_s']:.2f}x); end to end "
                            f"{res[trl]['e2e'] / res[b]['e2e']:.2f}x; peak RSS {res[b]['hwm_mb']:.0f} vs "
                            f"{res[trl]['hwm_mb']:.0f} MB")
    met = bool(ratios) and min(ratios) >= 2.0
    lines += [f"Target (issue): >= 2x the steps/s of TRL's DPOTrainer and RewardTrainer, same model, data and batch, "
              f"same run; losses equal to TRL's to {TOL:g} on identical inputs. Speed **{'met' if met else 'not met'}**: "
              + "; ".join(verdicts) + f". Parity: **{'all' if not bad else len(prows) - len(bad)} of {len(prows)} "
              f"checks within tolerance** (closest to its tolerance: {worst['max_abs']:.1e}, {worst['check']}, "
              f"{worst['inputs']})" + (": FAILED, see below" if bad else "") + ".", "",
              f"Model: tristage GPT, Llama shape (hidden 128, 4 layers, 4 heads, intermediate 512, tied embeddings), "
              f"vocab {facts['vocab']} (tristage `train_char` on tiny Shakespeare), {facts['params'] / 1e6:.3f}M params, "
              f"seed 0, saved with `save_model`; TRL loads the same folder with `AutoModelForCausalLM` (sdpa). Reward "
              f"model: the same backbone with our score head (seed 0) saved with `save_reward_model`; TRL loads it as "
              f"`LlamaForSequenceClassification` (num_labels 1), tristage with `load_reward_model`, so both start from "
              f"the same weights.", "",
              f"Data: {facts['pairs']} synthetic pairs (prompt = a tiny-Shakespeare line, chosen = the next line, "
              f"rejected = a random other line), one `pairs.jsonl` in TRL's conversational shape that tristage reads "
              f"as is. TRL reads it in its standard (text) format built by our ChatML template (prompt = "
              f"`apply_chat_template(prompt, add_generation_prompt=True)`, reply + `<|im_end|>`, tokenizer eos_token = "
              f"`<|im_end|>` so TRL appends nothing): TRL's tokenized pairs equal tristage's (ids and scored positions) "
              f"for {facts['dpo_text_same']}/{facts['pairs']} pairs (DPOTrainer) and {facts['rm_text_same']}/"
              f"{facts['pairs']} (RewardTrainer). TRL's conversational format scores one token more per reply (the "
              f"newline after `<|im_end|>` that the template emits; tristage stops at `<|im_end|>`): equal to ours plus "
              f"that token for {facts['dpo_conv_plus_newline']}/{facts['pairs']}; it is timed as an extra row. "
              f"Sequences are {lo}-{hi} tokens (mean {mean:.0f}), replies {rlo}-{rhi} (mean {rmean:.0f}); none is "
              f"truncated at {MAX_LEN}.", "",
              "### Loss parity", "",
              f"Ours against TRL 1.16's own code, fp32. DPO / IPO: `DPOTrainer._compute_loss` of a real trainer, fed "
              f"the given summed log-probs by a stub model (per-token log-probs whose row sums are exactly the inputs) "
              f"and reference log-probs through the batch (`precompute_ref_logps`), once per pair and once for the batch "
              f"(loss mean and the rewards TRL logs). TRL 1.16's DPOTrainer has no conservative DPO (its "
              f"`label_smoothing` only feeds the `robust` and `exo_pair` losses, which are different formulas), so "
              f"conservative DPO is checked against `trl.experimental.cpo.CPOTrainer.cpo_loss` (sigmoid with label "
              f"smoothing) applied to the log-ratios against the reference; SimPO against the same function "
              f"(loss_type simpo, TRL's `simpo_gamma`), ORPO against `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` "
              f"(both called unbound on a namespace carrying beta, label_smoothing, simpo_gamma, alpha = 0), with "
              f"per-token mean log-probs (sum / reply tokens, as TRL's `average_log_prob=True`). Inputs: 'model' = the "
              f"summed log-probs TRL computed for one batch of {BATCH} pairs with a perturbed policy (every weight + "
              f"N(0, 0.01^2)) and the original model as the reference; 'random' = 256 pairs, reply lengths 1-60, "
              f"reference log-probs -2 to -4.5 per token, policy = reference + N(0, 8^2) capped at -0.05 per token; 'near-certain' = 256 pairs "
              f"whose mean token log-probs lie in [-0.01, -1e-4] (reference-free losses only). Pipelines: TRL's "
              f"fused-head forward (`compute_ref_log_probs`) on its collated batch against our `sequence_logprobs` on "
              f"our `collate_pairs` batch of the same {BATCH} pairs, and the first-step losses (policy vs reference "
              f"model; TRL `compute_loss`, ours `dpo.losses`). Reward: `RewardTrainer.compute_loss` against "
              f"`bradley_terry_loss` on TRL's rewards and through our pipeline (our model, batch and loss), with "
              f"`center_rewards_coefficient` 0.01 = our `--center-coef` and a margin (TRL: the batch's `margin` column; "
              f"tristage derives it from ratings with `--margin-scale`, here the same values are passed to the loss). "
              f"ORPO's NLL term differs by definition and is not compared: TRL averages the chosen rows' "
              f"token NLL over prompt + reply across the batch, tristage averages each chosen reply's token NLL, then "
              f"over pairs; both sides here get tristage's.", ""]
    lines += parity_table(prows)
    lines += ["", f"Tolerance: {TOL:g} absolute everywhere except the summed log-probs of whole replies (up to "
                  f"{facts['reply_len'][2]} tokens, sums of a few hundred, where one fp32 ulp is 3e-5 and a different "
                  f"summation order alone moves the result by that): 1e-6 relative there; the per-token values they "
                  f"are summed from are held to {TOL:g}. Everything is fp32."]
    for r in bad:
        lines.append(f"- **Failed**: {r['group']}: {r['check']} [{r['inputs']}]: {r['max_abs']:.2e} > {r['tol']:.1e}.")
    orpo = {k.removeprefix("orpo_vs_fp64_"): v for k, v in facts.items() if k.startswith("orpo_vs_fp64_")}
    if orpo:
        lines.append("ORPO against an fp64 evaluation of the same formula (log(1 - p) as log(-expm1(log p))), max abs "
                     "difference: " + "; ".join(f"{k}: ours {v['ours']:.1e}, TRL {v['trl']:.1e}" for k, v in orpo.items())
                     + ". tristage computes log(1 - p) as log1p(-exp(log p)), which loses digits when the mean token "
                     "log-prob is near 0 (TRL's `log1mexp` switches to log(-expm1(x)) above -ln 2).")
    lines += ["", "### Speed and memory", "",
              f"Settings, both sides: {BATCH} pairs per batch in one forward (TRL: chosen and rejected as {2 * BATCH} "
              f"rows padded to the batch's longest; tristage's default `--layout packed`: each pair's prompt once, then "
              f"both replies, the rejected one masked from the chosen one, pairs packed into as few rows as the longest "
              f"pair's length allows; its log-probs and rewards equal TRL's, see the parity table; the `--layout rows` "
              f"rows run TRL's layout), max length {MAX_LEN}, AdamW (betas 0.9/0.95 = tristage's, "
              f"eps 1e-8, weight decay 0), constant learning rate, grad clip 1.0, {a.steps} steps, no warm-up, CPU, {torch.get_num_threads()} threads, no compile, no gradient "
              f"checkpointing. DPO: sigmoid, beta {BETA}, lr {DPO_LR:g}; reward model: lr {RM_LR:g}, no centering, no "
              f"margin. TRL: `DPOConfig` / `RewardConfig(per_device_train_batch_size={BATCH}, max_length={MAX_LEN}, "
              f"learning_rate=..., use_cpu=True, max_steps={a.steps}, bf16=False (True in the bf16 rows), gradient_checkpointing=False, "
              f"logging_steps=1, save_strategy='no', lr_scheduler_type='constant', adam_beta2=0.95)`, DPO with `ref_model=copy.deepcopy(model)` (TRL runs the "
              f"reference forward every step; the precompute row lets TRL compute it once before training instead, "
              f"with no reference model held). TRL's defaults are bf16=True and gradient_checkpointing=True; checkpointing "
              f"is off here as in BASELINES.md, bf16 is timed both ways and the ratios are taken against TRL's faster "
              f"setting. tristage: `{ours_command('ours_dpo', a.steps)}` and "
              f"`{ours_command('ours_rm', a.steps)}` (and `--dtype bfloat16`), run in-process by the worker. So both sides run the same algorithm "
              f"on the same data, and since both shuffle with `torch.randperm` seeded 0, their first epoch "
              f"({N_PAIRS // BATCH} steps) sees the same batches in the same order (later epochs differ: TRL's sampler "
              f"continues its generator, tristage reseeds per epoch): " + trajectory(res) + ".", "",
              f"Measured: each trainer in its own process, in alternating order, {a.repeats} repeat(s); per step the "
              f"time between optimizer-step ends (TRL: step-end callback; tristage: optimizer post-hook), medians over "
              f"steps {WARMUP + 1}-{a.steps}, then over repeats. 'ref pass' = the one-off reference log-prob pass "
              f"before step 1 (tristage dpo; TRL's precompute row), included in 'end to end' = from the start of the "
              f"worker (after imports: load tokenizer, model and data, prepare, reference pass, all steps) to the last "
              f"step's end; 'process' = the subprocess wall time, imports and final save included. Peak RSS = the "
              f"process's VmHWM. Loss = first and last logged training loss. Machine: {load['text']}.", "",
              "| trainer | settings | steps/s | ms/step | pairs/s | ref pass | end to end | process | peak RSS | "
              "loss first -> last | steps/s vs TRL's fastest |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        if name not in res:
            continue
        r = res[name]
        label, settings = TRAINERS[name]
        peer = best("trl_rm" if "rm" in name else "trl_dpo")
        vs = f"{r['steps_s'] / res[peer]['steps_s']:.2f}x" if peer in res else "-"
        bold = "**" if name in (best("trl_dpo"), best("trl_rm"), best("ours_dpo"), best("ours_rm")) else ""
        ref = f"{r['ref_s']:.2f} s" if r["ref_s"] is not None else "-"
        lines.append(f"| {bold}{label}{bold} | {settings} | {bold}{r['steps_s']:.2f}{bold} | {r['ms']:.1f} | "
                     f"{r['pairs_s']:.0f} | {ref} | {r['e2e']:.1f} s | {r['wall']:.1f} s | {r['hwm_mb']:.0f} MB | "
                     f"{r['loss0']:.3f} -> {r['loss1']:.3f} | {vs} |")
    lines += ["", f"BASELINES.md section 3(c) (TRL 1.16 DPOTrainer, same machine kind, its own 71-token vocab and "
                  f"template): {TRL_BASELINE['dpo_ms']} ms/step, {TRL_BASELINE['dpo_steps_s']} steps/s.", ""]
    bf_note = []
    for fp in ("trl_dpo", "trl_rm", "ours_dpo", "ours_rm"):
        k = fp + "_bf16"
        if k in res and fp in res:
            faster = res[k]["steps_s"] > res[fp]["steps_s"]
            bf_note.append(f"{fp.replace('_', ' ')}: bf16 {res[k]['steps_s']:.2f} vs fp32 {res[fp]['steps_s']:.2f} "
                           f"steps/s ({'faster, credited' if faster else 'not faster, not credited'})")
    if bf_note:
        lines += ["bf16 autocast: " + "; ".join(bf_note) + ".", ""]
    lines.append("Every run (trainer: steps/s, ms/step, train time, process wall, other jobs' CPU):")
    for name in ORDER:
        if name not in res:
            continue
        parts = [f"{'' if r['clean'] else '(disturbed) '}{r['steps_s']:.2f}, {r['ms']:.1f} ms, {r['train_s']:.1f} s, "
                 f"{r['wall']:.1f} s, {r['others']:.1f} CPU-s" for r in res[name]["runs"]]
        lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def trajectory(res: dict[str, dict]) -> str:
    """Max |loss difference| over the first epoch's steps, between runs that see the same batches (first repeat)."""
    k = N_PAIRS // BATCH
    out = []
    for x, y in (("ours_dpo", "trl_dpo"), ("trl_dpo_precompute", "trl_dpo"), ("ours_rm", "trl_rm")):
        if x in res and y in res:
            lx, ly = res[x]["runs"][0]["losses"][:k], res[y]["runs"][0]["losses"][:k]
            n = min(len(lx), len(ly))
            d = max(abs(p - q) for p, q in zip(lx[:n], ly[:n])) if n else float("nan")
            out.append(f"{x} vs {y}, training loss of steps 1-{n}: max abs difference {d:.1e}")
    return "; ".join(out) if out else "not compared (a peer is missing)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_preference"), help="folder for models, data, runs")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every trainer (the median is reported)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per trainer run")
    ap.add_argument("--only", nargs="*", default=None, help="trainers to run (default: all)", choices=ORDER)
    ap.add_argument("--quiet-wait", type=float, default=600, help="max seconds to wait for idle CPUs before timing")
    ap.add_argument("--retries", type=int, default=2, help="extra runs allowed per disturbed trainer run")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 steps, 1 repeat, no waiting, no write")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--keep-going", action="store_true",
                    help="time and write even if a parity check fails (the exit status is 1 all the same)")
    ap.add_argument("--worker", choices=ORDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    a.cmd_line = "python bench/bench_preference.py " + " ".join(sys.argv[1:])
    if not SHAKESPEARE.exists():
        print(f"skipped: {SHAKESPEARE} is absent")
        return 0
    if a.quick:
        a.steps, a.repeats, a.quiet_wait, a.retries, a.no_write = 8, 1, 0, 0, True
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    facts = setup(work)
    print(f"setup: {facts}", flush=True)
    prows, pfacts = parity(work)
    facts.update(pfacts)
    print(f"token checks: {pfacts}")
    print("\n".join(parity_table(prows)), flush=True)
    failed = [r for r in prows if not passed(r)]
    if failed:
        print(f"\nPARITY FAILED: {len(failed)} of {len(prows)} checks differ from TRL by more than {TOL:g}:", flush=True)
        for r in failed:
            print(f"  {r['group']}: {r['check']} [{r['inputs']}]: max abs diff {r['max_abs']:.2e}", flush=True)
        if not a.keep_going:
            return 1
    names = a.only or ORDER
    runs: dict[str, list[dict]] = {n: [] for n in names}
    busy = wait_quiet(a.quiet_wait)
    load = {"busy_before": busy, "load0": os.getloadavg()}
    print(f"CPUs {busy:.0%} busy before timing", flush=True)
    for rep in range(a.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            for _attempt in range(1 + a.retries):  # a disturbed run is retried after waiting for quiet CPUs
                if a.quiet_wait > 0:
                    wait_quiet(min(a.quiet_wait, 120))
                r = run_trainer(work, name, a.steps)
                runs[name].append(r)
                ref = f", ref pass {r['ref_s']:.2f} s" if r["ref_s"] is not None else ""
                print(f"  [{rep + 1}/{a.repeats}] {name}: {r['steps_s']:.2f} steps/s, {r['ms']:.1f} ms/step{ref}, "
                      f"end to end {r['e2e']:.1f} s, peak RSS {r['hwm_mb']:.0f} MB, wall {r['wall']:.1f} s, loss "
                      f"{r['loss0']:.3f} -> {r['loss1']:.3f}, other jobs' CPU {r['others']:.1f} s"
                      f"{'' if r['clean'] else ' (disturbed)'}", flush=True)
                if r["clean"]:
                    break
    res = {n: combine(rs) for n, rs in runs.items()}
    all_runs = [r for rs in runs.values() for r in rs]
    n_dist = sum(not r["clean"] for r in all_runs)
    load["text"] = (f"CPUs {busy:.0%} busy just before timing; load average {load['load0'][0]:.2f} at the start, "
                    f"{os.getloadavg()[0]:.2f} at the end; {n_dist} of {len(all_runs)} runs disturbed (other jobs used "
                    f"more than {DISTURBED} CPU-s per second of them; excluded from the medians where a clean run exists)")
    text = report(a, facts, prows, res, load)
    print("\n" + text)
    if not a.no_write:
        write_section(SECTION, text)
        print(f"wrote the {SECTION} section of {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
