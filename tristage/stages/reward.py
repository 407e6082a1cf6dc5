"""Stage 3a, reward model: learn a scalar score of an answer from pairs where one answer was preferred.

    tristage reward runs/sft/model --data pairs.jsonl --out runs/rm
    tristage score runs/rm/model answers.jsonl

The algorithm: the backbone (an SFT, base or Hugging Face model) gets a linear score head read at the last
real token of prompt + response (tristage/model/reward.py), trained with the Bradley-Terry loss
-log sigma(r_chosen - r_rejected - margin) (tristage/train/losses.py) on preference pairs
(tristage/data/preference.py; the Anthropic HH, TRL, long-form-QA and PandaLM shapes are converted on load).

Choices, and why:
- Both answers of a batch go through one forward pass, so their scores come from the same weights and the same
  numerics, and the prompt is computed once per pair: a pair is one segment holding the prompt, the chosen answer
  and the rejected one, with positions restarting and a mask that hides the chosen answer from the rejected one,
  so each score is that of its own sequence (tested). Short segments share a row, up to the longest one's length
  (`--layout packed`, the default; `shared`: a pair per row; `rows`: a row per answer).
- Optional margin from the ratings (`--margin-scale`): pairs with a larger rating gap must be separated
  by more (Llama 2's margin loss); optional reward centering (`--center-coef`, Eisenstein et al.) adds
  coef * (r_c + r_r)^2, keeping scores near zero so they are comparable across prompts and stable for PPO.
- Fine-grained feedback: when the pairs carry per-attribute ratings, one extra output per attribute regresses
  its rating (mapped from its observed range to [-1, 1]) with a squared error weighted by `--rating-coef`.
  The model's one scalar is reward + sum_a w_a * attribute_a with w_a = `--attribute-weight` / A; labels,
  weights and rating ranges are written into config.json, and validation reports accuracy of both the
  Bradley-Terry output alone and of the combined score, so the weights can be judged on held-out pairs.
- The loss is a mean over the pairs of the global batch, whatever the accumulation split or process count.
- Validation: accuracy (share of pairs scored chosen > rejected), mean margin, mean and std of rewards.
- Export: a Hugging Face *ForSequenceClassification folder (out/model) that transformers loads with the
  same scores; `training_state.pt` beside it makes `--resume` exact.
Simplified: full fine-tuning only (no LoRA), one data mixture.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tristage.config import arg, save_config, to_dict
from tristage.data.preference import PAIR_LAYOUT_HELP, PairLayout
from tristage.model.score import per_row
from tristage.train import distributed as dist
from tristage.train.common import (
    MetricsLog,
    autocast,
    progress,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    to_device,
)
from tristage.train.losses import bradley_terry_loss, rating_loss
from tristage.train.optim import Schedule, build_optimizer, lr_at, set_lr


@dataclass
class Config:
    """Train a reward model on preference pairs (Bradley-Terry), with optional per-attribute rating heads."""

    model: str = arg(help="starting model folder: SFT/base checkpoint, Hugging Face causal LM, or a reward model",
                     positional=True)
    data: list[str] = arg([], help="preference pairs: JSONL/JSON of prompt|messages + chosen + rejected, or the "
                                   "Anthropic HH, long-form-QA or PandaLM shapes (.gz ok)")
    val_data: list[str] = arg([], help="validation pairs (default: hold out --val-fraction of --data)")
    val_fraction: float = arg(0.05, help="share of --data held out for validation when --val-data is not given")
    out: str = arg("runs/reward", help="run folder: config.yaml, metrics.jsonl, model/")
    on_error: Literal["raise", "skip"] = arg("raise", help="invalid records: stop at the first, or skip and count")
    system_prompt: str | None = arg(None, help="system message for prompts that have none")
    layout: PairLayout = arg("packed", help=PAIR_LAYOUT_HELP)
    max_len: int = arg(512, help="longest prompt + answer in tokens; the prompt is cut from the left (counted)")
    batch_size: int = arg(16, help="pairs per micro-batch per process")
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    epochs: float = arg(1.0, help="passes over the training pairs (ignored when --max-steps is set)")
    max_steps: int | None = arg(None, help="optimizer steps (default: from --epochs)")
    lr: float = arg(1e-4, help="peak learning rate")
    min_lr_ratio: float = arg(0.1, help="final learning rate as a fraction of --lr")
    warmup_steps: int = arg(10, help="linear warmup steps")
    schedule: Schedule = arg("cosine", help="cosine | wsd | constant")
    weight_decay: float = arg(0.0, help="AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, help="clip the global gradient norm (0: off)")
    margin_scale: float = arg(0.0, help="margin = scale x (mean normalised rating of chosen - of rejected), >= 0")
    center_coef: float = arg(0.01, help="reward-centering coefficient: + coef * mean((r_c + r_r)^2); 0: off")
    attribute_heads: Literal["auto", "on", "off"] = arg("auto", help="per-attribute rating heads (auto: when the "
                                                                     "training pairs carry ratings)")
    rating_coef: float = arg(1.0, help="weight of the rating heads' squared error in the loss")
    attribute_weight: float = arg(1.0, help="total weight of the attribute heads in the combined score")
    dtype: str = arg("auto", help="autocast dtype: auto (bf16 where native) | float32 | bfloat16")
    parallel: dist.Parallel = arg("ddp", help="under torchrun: ddp or fsdp")
    eval_every: int = arg(100, help="validate every N steps (and at the end); 0: only at the end")
    save_every: int = arg(500, help="checkpoint every N steps (and at the end)")
    log_every: int = arg(10, help="write metrics every N steps")
    resume: bool = arg(False, help="continue the run in --out from its last checkpoint, exactly")
    stop_at: int | None = arg(None, help="checkpoint and stop after this step (then --resume)")
    seed: int = arg(0, help="seed for the split, the data order and the head's initialisation")
    device: str = arg("auto", help="auto | cpu | cuda | cuda:N")
    progress: bool = arg(True, help="show a progress bar")


def rating_ranges(examples, attributes: list[str]) -> dict[str, list[float]]:
    """Observed [lo, hi] of each attribute's ratings over both sides of the pairs."""
    out = {}
    for k, a in enumerate(attributes):
        vals = [v for e in examples if e.ratings for side in e.ratings.values() for v in [side[k]] if not math.isnan(v)]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        out[a] = [lo, hi if hi > lo else lo + 1.0]
    return out


def normalise_ratings(ratings: torch.Tensor, rm) -> torch.Tensor:
    """ratings [N, A] on their observed scales -> [-1, 1] (NaN stays NaN), in the heads' label order."""
    rng = torch.tensor([rm.rating_range[a] for a in rm.labels[1:]], dtype=ratings.dtype, device=ratings.device)
    return 2 * (ratings - rng[:, 0]) / (rng[:, 1] - rng[:, 0]) - 1


def pair_scores(model, batch: dict, device) -> torch.Tensor:
    """Scores [2B, num_labels] (chosen answers first) of a pair batch in either layout: a row per answer
    (collate_pairs) or pairs sharing their prompt (collate_pairs_shared)."""
    if "last_row" not in batch:
        return model(batch["input_ids"], at=per_row(batch["last_index"]))
    at = (batch["last_row"], batch["last_pos"])
    return model(batch["input_ids"], batch["position_ids"], batch["attn_mask"], at=at)


def pair_loss(rm, scores: torch.Tensor, batch: dict, cfg: Config) -> tuple[torch.Tensor, dict]:
    """Mean loss over the batch's pairs and its parts. scores [2B, L]."""
    B = batch["num_pairs"]
    rc, rr = scores[:B, 0], scores[B:, 0]
    margin = None
    ratings = batch.get("ratings")
    if ratings is not None and len(rm.labels) > 1:
        ratings = normalise_ratings(ratings, rm)
    if cfg.margin_scale and ratings is not None:
        gap = ratings[:B].nanmean(-1) - ratings[B:].nanmean(-1)
        margin = (cfg.margin_scale * torch.nan_to_num(gap)).clamp(min=0)
    loss = bradley_terry_loss(rc, rr, margin, cfg.center_coef)
    parts = {"bt_loss": loss.detach()}
    if len(rm.labels) > 1 and ratings is not None:
        rl = rating_loss(scores[:, 1:], ratings)
        loss = loss + cfg.rating_coef * rl
        parts["rating_loss"] = rl.detach()
    return loss, parts


@torch.no_grad()
def evaluate(model, rm, batches: list[dict], device, dtype, d=None) -> dict:
    """Accuracy, margin and reward statistics over validation batches (BT output and combined score)."""
    was = model.training
    model.eval()
    rc, rr, cc, cr, mse = [], [], [], [], []
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            s = pair_scores(model, batch, device)
        B = batch["num_pairs"]
        rc.append(s[:B, 0])
        rr.append(s[B:, 0])
        comb = rm.combine(s)
        cc.append(comb[:B])
        cr.append(comb[B:])
        if len(rm.labels) > 1 and batch.get("ratings") is not None:
            target = normalise_ratings(batch["ratings"], rm)
            have = ~torch.isnan(target)
            mse.append(torch.stack([((s[:, 1:] - torch.nan_to_num(target)) ** 2)[have].sum(), have.sum()]))
    model.train(was)
    if not rc:
        return {}
    rc, rr, cc, cr = (torch.cat(x).double() for x in (rc, rr, cc, cr))
    stats = torch.stack([(rc > rr).sum(), (cc > cr).sum(), (rc - rr).sum(), rc.sum(), rr.sum(),
                         (rc ** 2).sum() + (rr ** 2).sum(), torch.tensor(float(len(rc)), dtype=torch.float64),
                         *(torch.stack(mse).sum(0).double() if mse else torch.zeros(2, dtype=torch.float64))])
    if d is not None:
        dist.all_reduce_sum(stats, d)
    n = stats[6].item()
    mean = (stats[3] + stats[4]).item() / (2 * n)
    out = {"accuracy": stats[0].item() / n, "accuracy_combined": stats[1].item() / n, "margin": stats[2].item() / n,
           "reward_chosen": stats[3].item() / n, "reward_rejected": stats[4].item() / n,
           "reward_std": math.sqrt(max(stats[5].item() / (2 * n) - mean ** 2, 0.0)), "pairs": int(n)}
    if stats[8] > 0:
        out["rating_mse"] = stats[7].item() / stats[8].item()
    return out


def main(cfg: Config) -> dict:
    from tristage.data.preference import PairLoader, load_pair_splits, pair_collator
    from tristage.model.hf import load_model
    from tristage.model.score import (
        ScoreModel,
        from_causal_lm,
        is_reward_folder,
        load_reward_model,
        save_reward_model,
    )
    from tristage.tokenizer import Tokenizer

    d = dist.init(cfg.device)
    device, out = d.device, Path(cfg.out)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.load(cfg.model)
    if not tokenizer.chat_template:
        raise ValueError(f"{cfg.model}: the tokenizer has no chat_template; add one to tokenizer_config.json")
    if tokenizer.pad_id is None or tokenizer.pad_id in set(tokenizer.stop_ids):
        raise ValueError(f"{cfg.model}: the tokenizer needs a pad token distinct from its end-of-turn tokens "
                         "(set pad_token in tokenizer_config.json)")
    train, val, attributes, notes = load_pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, tokenizer,
                                                     cfg.max_len, cfg.on_error, cfg.system_prompt)
    heads = {"on": bool(attributes), "off": False, "auto": any(e.ratings for e in train) and bool(attributes)}
    use_heads = heads[cfg.attribute_heads]
    if cfg.attribute_heads == "on" and not attributes:
        raise ValueError("--attribute-heads on: the training pairs carry no ratings")
    labels = ["reward"] + (list(attributes) if use_heads else [])
    A = len(labels) - 1
    head = {"labels": labels, "weights": [1.0] + [cfg.attribute_weight / max(A, 1)] * A,
            "rating_range": rating_ranges(train, attributes) if use_heads else {}}

    state, ckpt = None, out / "model"
    if cfg.resume:
        if not (ckpt / "training_state.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint to resume in {ckpt}")
        state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
        model: ScoreModel = load_reward_model(ckpt, device=device, dtype=torch.float32)
    elif is_reward_folder(cfg.model):
        model = load_reward_model(cfg.model, device=device, dtype=torch.float32)
        if model.labels != labels:
            raise ValueError(f"{cfg.model}: its heads {model.labels} differ from this data's {labels}")
    else:
        model = from_causal_lm(load_model(cfg.model, device=device, dtype=torch.float32), len(labels), cfg.seed,
                               **head)
    model.train()
    wrapped = dist.wrap(model, d, cfg.parallel)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    loader = PairLoader(train, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                        pad_id=tokenizer.pad_id, layout=cfg.layout)
    val_batches = []
    if len(val) >= d.world_size:
        vl = PairLoader(val, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                        pad_id=tokenizer.pad_id)
        collate = pair_collator(cfg.layout)
        val_batches = [collate([val[i] for i in b], tokenizer.pad_id) for b in vl.plan(0)]
    steps_per_epoch = max(1, loader.steps_per_epoch() // cfg.grad_accum)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    start_step = 0
    if state is not None:
        dist.load_optim_state(wrapped, opt, state["optimizer"], d)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step = state["step"]
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        for n in notes:
            print(f"reward: {n}")
        print(f"reward: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; heads {labels}; "
              f"{len(train)} train / {len(val)} val pairs; {steps_per_epoch} steps/epoch, {max_steps} steps; "
              f"{dtype}, {device}")
    log = MetricsLog(out, enabled=d.is_main, resume_step=start_step if state is not None else None)

    def checkpoint(step: int, metrics: dict) -> None:
        training_state = {"step": step, "optimizer": dist.full_optim_state(wrapped, opt, d),
                          "loader": loader.state_dict(), "rng": rng_state()}
        full = dist.full_state_dict(wrapped, d)
        if d.is_main:
            meta = {"stage": "reward", "parent": cfg.model, "step": step, "config": to_dict(cfg), "metrics": metrics}
            save_reward_model(model, ckpt, tokenizer, state_dict=full, dtype=torch.float32,
                              training_state=training_state, meta=meta)
        dist.barrier(d)

    metrics: dict = {}
    t_last, pairs_seen = time.perf_counter(), 0
    with progress(cfg.progress and d.is_main) as bar:
        task = bar.add_task("reward", total=max_steps, completed=start_step, info="")
        for step in range(start_step, max_steps):
            lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            set_lr(opt, lr)
            micro = [next(loader) for _ in range(cfg.grad_accum)]
            n_global = dist.all_reduce_sum(torch.tensor(float(sum(b["num_pairs"] for b in micro)), device=device),
                                           d).item()
            totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct, margin, pairs
            for i, batch in enumerate(micro):
                batch = to_device(batch, device)
                with dist.no_sync(wrapped, i == len(micro) - 1), autocast(device, dtype):
                    s = pair_scores(wrapped, batch, device)
                    loss, _ = pair_loss(model, s, batch, cfg)
                    B = batch["num_pairs"]
                    (loss * B * d.world_size / n_global).backward()
                totals += torch.tensor([loss.item() * B, (s[:B, 0] > s[B:, 0]).sum().item(),
                                        (s[:B, 0] - s[B:, 0]).sum().item(), B], device=device, dtype=torch.float64)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            dist.all_reduce_sum(totals, d)
            loss_v = totals[0].item() / totals[3].item()
            if not (math.isfinite(loss_v) and math.isfinite(float(grad_norm))):
                raise FloatingPointError(f"reward: loss {loss_v} / grad norm {float(grad_norm)} at step {step + 1}; "
                                         "stopping without writing a checkpoint from this state")
            opt.step()
            opt.zero_grad(set_to_none=True)
            pairs_seen += int(totals[3].item())
            done = step + 1
            if done % cfg.log_every == 0 or done == max_steps:
                now = time.perf_counter()
                metrics = {"loss": loss_v, "accuracy": totals[1].item() / totals[3].item(),
                           "margin": totals[2].item() / totals[3].item(), "lr": lr, "grad_norm": float(grad_norm),
                           "pairs_per_s": pairs_seen / max(now - t_last, 1e-9)}
                t_last, pairs_seen = now, 0
                log.log(done, **metrics)
                bar.update(task, info=f"loss {loss_v:.3f}  acc {metrics['accuracy']:.2f}")
            if val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == max_steps):
                v = evaluate(wrapped, model, val_batches, device, dtype, d)
                metrics.update({f"val_{k}": x for k, x in v.items()})
                log.log(done, **{f"val_{k}": x for k, x in v.items()})
                if d.is_main:
                    bar.console.print(f"step {done}: val accuracy {v['accuracy']:.3f} (combined "
                                      f"{v['accuracy_combined']:.3f}), margin {v['margin']:.3f}, rewards "
                                      f"{v['reward_chosen']:.3f} / {v['reward_rejected']:.3f}")
            stopping = cfg.stop_at is not None and done >= cfg.stop_at
            if (cfg.save_every and done % cfg.save_every == 0) or done == max_steps or stopping:
                checkpoint(done, metrics)
            bar.update(task, completed=done)
            if stopping:
                break
    log.close()
    dist.shutdown(d)
    return metrics
