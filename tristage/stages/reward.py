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

import torch

from tristage.data.preference import PairLoader, load_pair_splits, pair_collator
from tristage.flags.reward import Config
from tristage.io import UserError
from tristage.model.hf import load_model
from tristage.model.score import from_causal_lm, is_reward_folder, load_reward_model, per_row, save_reward_model
from tristage.runtime import autocast, to_device
from tristage.train import distributed as dist
from tristage.train import loop
from tristage.train.losses import bradley_terry_loss, rating_loss


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


def build(cfg: Config, s: loop.Session, train: list, attributes: list[str]):
    """The reward model: the checkpoint being resumed > a reward-model folder (same heads) > a causal LM with a
    fresh score head (one output, plus one per attribute when the pairs carry ratings)."""

    heads = {"on": bool(attributes), "off": False, "auto": any(e.ratings for e in train) and bool(attributes)}
    if cfg.attribute_heads == "on" and not attributes:
        raise UserError("--attribute-heads on: the training pairs carry no ratings")
    labels = ["reward"] + (list(attributes) if heads[cfg.attribute_heads] else [])
    if s.state is not None:
        return load_reward_model(s.ckpt, device=s.device, dtype=torch.float32)
    if is_reward_folder(cfg.model):
        model = load_reward_model(cfg.model, device=s.device, dtype=torch.float32)
        if model.labels != labels:
            raise UserError(f"{cfg.model}: its heads {model.labels} differ from this data's {labels}")
        return model
    A = len(labels) - 1
    return from_causal_lm(load_model(cfg.model, device=s.device, dtype=torch.float32), len(labels), cfg.seed,
                          labels=labels, weights=[1.0] + [cfg.attribute_weight / max(A, 1)] * A,
                          rating_range=rating_ranges(train, attributes) if A else {})


def main(cfg: Config) -> dict:
    s = loop.start(cfg, "reward")
    if s.state is not None:  # the run being resumed must be a reward model's (not, say, an SFT run's folder)
        loop.model_config(s.ckpt, "reward")
    cfg.max_len = loop.fit_max_len(cfg.max_len, cfg.model, kind="any")  # before any data is read
    tokenizer = loop.chat_tokenizer(cfg.model)
    if tokenizer.pad_id is None or tokenizer.pad_id in set(tokenizer.stop_ids):
        raise UserError(f"{cfg.model}: the tokenizer needs a pad token distinct from its end-of-turn tokens "
                         "(set pad_token in tokenizer_config.json)")
    train, val, attributes, notes = load_pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, tokenizer,
                                                     cfg.max_len, cfg.on_error, cfg.system_prompt)
    model = build(cfg, s, train, attributes)
    t = loop.prepare(s, model)
    d = s.d
    loader = PairLoader(train, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                        pad_id=tokenizer.pad_id, layout=cfg.layout)
    val_batches = []
    if len(val) >= d.world_size:
        vl = PairLoader(val, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                        pad_id=tokenizer.pad_id)
        val_batches = [pair_collator(cfg.layout)([val[i] for i in b], tokenizer.pad_id) for b in vl.plan(0)]
    steps_per_epoch = max(1, loader.steps_per_epoch() // cfg.grad_accum)
    max_steps = loop.total_steps(cfg, steps_per_epoch)
    start = loop.restore(s, t, loader)
    loop.announce(s, *notes, f"{loop.trained_params(model)[0] / 1e6:.2f}M params; heads {model.labels}; "
                             f"{len(train)} train / {len(val)} val pairs; {steps_per_epoch} steps/epoch, "
                             f"{max_steps} steps; {s.dtype}, {s.device}")

    def loss_fn(wrapped, batch):
        scores = pair_scores(wrapped, batch, s.device)
        loss, _ = pair_loss(model, scores, batch, cfg)
        B = batch["num_pairs"]
        rc, rr = scores[:B, 0], scores[B:, 0]
        return loss * B, {"accuracy": (rc > rr).sum(), "margin": (rc - rr).sum()}

    metrics: dict = {}
    with loop.Reporter(s, max_steps, start) as rep:
        for step in range(start, max_steps):
            micro = [next(loader) for _ in range(cfg.grad_accum)]
            m = loop.train_step(s, t, micro, loss_fn, lambda b: b["num_pairs"], step, max_steps)
            rep.watch(step + 1, m)
            tokens, flops = loop.step_work(micro, model.config, d.world_size, lm_head=False)
            rep.count(m["count"], tokens, flops)
            done = step + 1
            if loop.due(done, cfg.log_every, max_steps):
                metrics = {k: m[k] for k in ("loss", "accuracy", "margin", "lr", "grad_norm")}
                metrics.update(pairs_per_s=rep.rate(), **rep.work())
                rep.record(done, metrics, f"loss {m['loss']:.3f}  acc {m['accuracy']:.2f}")
            if val_batches and loop.due(done, cfg.eval_every, max_steps):
                v = evaluate(t.wrapped, model, val_batches, s.device, s.dtype, d)
                metrics.update({f"val_{k}": x for k, x in v.items()})
                rep.record(done, {f"val_{k}": x for k, x in v.items()})
                rep.print(f"step {done}: val accuracy {v['accuracy']:.3f} (combined {v['accuracy_combined']:.3f}), "
                          f"margin {v['margin']:.3f}, rewards {v['reward_chosen']:.3f} / {v['reward_rejected']:.3f}")
            if loop.save_due(s, done, max_steps):
                loop.save(s, t, tokenizer, done, metrics, loader, final=done == max_steps, parent=cfg.model,
                          save_fn=save_reward_model)
            rep.advance(done)
            if loop.stop_due(s, done):
                break
    loop.finish(s)
    return metrics
