"""Stage 3a, direct preference optimisation: learn from preference pairs with no reward model and no sampling.

    tristage dpo runs/sft/model --data pairs.jsonl --out runs/dpo                      # DPO (sigmoid)
    tristage dpo runs/sft/model --data pairs.jsonl --loss ipo --beta 0.5               # IPO
    tristage dpo runs/sft/model --data pairs.jsonl --label-smoothing 0.1               # conservative DPO
    tristage dpo runs/sft/model --data pairs.jsonl --loss simpo --beta 2 --gamma 0.5   # SimPO (no reference)
    tristage dpo runs/base/model --data pairs.jsonl --loss orpo --beta 0.1             # ORPO (SFT + odds ratio)

The algorithm: the policy starts from the SFT model (which is also the reference); each step raises the
log-probability of the chosen answer relative to the rejected one, measured against the reference, through
one of the losses in tristage/train/losses.py (`--loss`). Sequence log-probs are sums over the answer's
tokens (prompt masked; tristage/data/preference.py builds the labels).

Choices, and why:
- The reference model is never held in memory during training: its log-probs of every chosen and rejected
  answer (train and validation) are computed once before the first step, with the starting weights, and
  cached in out/reference_logps.pt, keyed by the reference weights, the pairs' tokens and the dtype, so a
  resumed run (or a rerun in the same folder with other hyperparameters) reads them back. So DPO costs
  one model's memory, as SFT does. SimPO and ORPO need no reference at all.
- One forward pass per batch, and the prompt computed once per pair: a pair is one segment holding the prompt, the
  chosen answer and the rejected one, with positions restarting and a mask that hides the chosen answer from the
  rejected one, so each answer's log-probs are those of its own sequence (tested) at about half the tokens, since
  prompts are usually longer than answers. Short segments share a row, up to the longest one's length, which
  removes padding where pair lengths vary (`--layout packed`, the default; `shared`: a pair per row; `rows`: a
  row per answer, the plain layout).
- Logged per step and on validation: loss, implicit rewards of chosen and rejected (beta * log-ratio to
  the reference; beta * mean token log-prob for the reference-free losses), their margin, and accuracy
  (chosen reward > rejected). Expect the chosen reward to fall while the margin grows: the loss sees only
  the difference, and pushing the rejected answer down (which also lowers the similar chosen one) is the
  cheap way to widen it. Judge a run by margin, accuracy and held-out quality, not by the chosen reward.
- The loss is a mean over the pairs of the global batch, whatever the accumulation split or process count.
- LoRA (`--lora-rank`) as in SFT: adapters on the frozen model, saved in the PEFT format (out/adapter)
  and merged into out/model at the end.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import torch

from tristage.data.preference import PairLoader, load_pair_splits, pair_collator
from tristage.flags.dpo import Config
from tristage.io import atomic_write_bytes
from tristage.model.hf import load_model
from tristage.rollout import batch_logprobs
from tristage.runtime import autocast, to_device
from tristage.train import distributed as dist
from tristage.train import loop
from tristage.train.losses import REFERENCE_FREE, dpo_loss


def losses(logp: torch.Tensor, n: torch.Tensor, ref: torch.Tensor | None, B: int, cfg: Config):
    """Per-pair loss [B] and implicit rewards (chosen [B], rejected [B]) from 2B summed log-probs."""
    rc, rr = (ref[:B], ref[B:]) if ref is not None else (None, None)
    return dpo_loss(logp[:B], logp[B:], rc, rr, chosen_len=n[:B], rejected_len=n[B:], beta=cfg.beta,
                    loss_type=cfg.loss, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma)


def reference_key(model_dir: str, train: list, val: list, dtype: torch.dtype) -> str:
    """Fingerprint of what reference log-probs depend on: the weights file(s), every pair's tokens, the dtype."""
    h = hashlib.sha256(str(dtype).encode())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for split in (train, val):
        h.update(b"|")
        for e in split:
            h.update(repr((e.chosen_ids, e.chosen_mask, e.rejected_ids, e.rejected_mask)).encode())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(model, batches: list[tuple[list[int], dict]], n_pairs: int, device, dtype) -> torch.Tensor:
    """[n_pairs, 2] summed log-probs (chosen, rejected) of every pair, computed once with `model`."""
    was = model.training
    model.eval()
    out = torch.full((n_pairs, 2), float("nan"), dtype=torch.float64)
    for idx, batch in batches:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            logp, _ = batch_logprobs(model, batch)
        B = len(idx)
        out[idx, 0], out[idx, 1] = logp[:B].double().cpu(), logp[B:].double().cpu()
    model.train(was)
    return out


def reference_tables(cfg: Config, s: loop.Session, model, train: list, val: list, val_batches: list,
                     collate, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[pairs, 2] reference log-probs of the train and validation pairs: read back from out/reference_logps.pt
    when its key matches (same reference weights, pairs and precision), else computed once (each rank its share
    of the pairs, summed across ranks) and cached."""

    cache = s.out / "reference_logps.pt"
    key = reference_key(cfg.ref_model or cfg.model, train, val, s.dtype)
    saved = read_reference_cache(cache, s.is_main)
    if saved.get("key") == key:  # resume, or a rerun with other hyperparameters
        if s.is_main:
            print(f"dpo: reference log-probs from {cache}")
        return saved["train"], saved["val"]
    ref = load_model(cfg.ref_model, device=s.device, dtype=torch.float32) if cfg.ref_model else model
    t0 = time.perf_counter()
    B, d = cfg.batch_size, s.d
    mine = [list(range(k, min(k + B, len(train)))) for k in range(d.rank * B, len(train), B * d.world_size)]
    ref_train = reference_logps(ref, [(b, collate([train[i] for i in b], pad_id)) for b in mine], len(train),
                                s.device, s.dtype)
    ref_val = reference_logps(ref, val_batches, len(val), s.device, s.dtype)
    for t in (ref_train, ref_val):  # each pair was computed on one rank; the sum gives every rank all
        t.nan_to_num_(0.0)
        if d.world_size > 1:
            t.copy_(dist.all_reduce_sum(t.to(s.device), d).cpu())
    if s.is_main:
        s.out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"train": ref_train, "val": ref_val, "key": key}, buf)
        atomic_write_bytes(cache, buf.getvalue())
        print(f"dpo: reference log-probs of {len(train)} + {len(val)} pairs in {time.perf_counter() - t0:.1f}s "
              f"-> {cache}")
    return ref_train, ref_val


def read_reference_cache(cache: Path, verbose: bool) -> dict:
    """out/reference_logps.pt, or {} when there is none; a damaged one (a truncated copy) is said so and then
    recomputed, since the cache only saves time."""
    if not cache.exists():
        return {}
    try:
        saved = torch.load(cache, map_location="cpu")
        if isinstance(saved, dict) and {"key", "train", "val"} <= saved.keys():
            return saved
        problem = "not a reference cache"
    except Exception as e:  # torch.load's errors on a truncated file vary (RuntimeError, EOFError, ...)
        problem = f"{type(e).__name__}: {e}"
    if verbose:
        print(f"dpo: {cache} cannot be read ({problem}); computing the reference log-probs again")
    return {}


@torch.no_grad()
def evaluate(model, batches: list[tuple[list[int], dict]], ref: torch.Tensor | None, cfg: Config, device, dtype,
             d=None) -> dict:
    """Mean loss, rewards, margin and accuracy over the validation pairs."""
    was = model.training
    model.eval()
    tot = torch.zeros(6, dtype=torch.float64, device=device)  # loss, chosen, rejected, correct, logp_c, pairs
    for idx, batch in batches:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            logp, n = batch_logprobs(model, batch)
        B = len(idx)
        r = None if ref is None else torch.cat([ref[idx, 0], ref[idx, 1]]).to(device, torch.float32)
        loss, ch, rj = losses(logp, n, r, B, cfg)
        tot += torch.stack([loss.sum(), ch.sum(), rj.sum(), (ch > rj).sum(), logp[:B].sum(),
                            torch.tensor(float(B), device=device)]).double()
    model.train(was)
    if d is not None:
        dist.all_reduce_sum(tot, d)
    n = tot[5].item()
    if n == 0:
        return {}
    return {"loss": tot[0].item() / n, "reward_chosen": tot[1].item() / n, "reward_rejected": tot[2].item() / n,
            "margin": (tot[1] - tot[2]).item() / n, "accuracy": tot[3].item() / n, "logp_chosen": tot[4].item() / n}


def main(cfg: Config) -> dict:
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), not {cfg.label_smoothing}")
    s = loop.start(cfg, "dpo")
    if s.state is not None and not s.lora:  # the run being resumed must be a policy's (not a reward model's)
        loop.model_config(s.ckpt)
    # before any data is read; the reference reads the same sequences, so its context counts too
    cfg.max_len = loop.fit_max_len(cfg.max_len, cfg.model, *([cfg.ref_model] if cfg.ref_model else []))
    tokenizer = loop.chat_tokenizer(cfg.model)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    train, val, _, notes = load_pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, tokenizer,
                                            cfg.max_len, cfg.on_error, cfg.system_prompt)
    model = loop.load_policy(s)
    d, collate = s.d, pair_collator(cfg.layout)
    loader = PairLoader(train, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size, pad_id=pad_id,
                        layout=cfg.layout)
    val_batches = []
    if len(val) >= d.world_size:
        vl = PairLoader(val, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size, pad_id=pad_id)
        val_batches = [(b, collate([val[i] for i in b], pad_id)) for b in vl.plan(0)]
    ref_train = ref_val = None  # from the starting weights, before any adapter or update
    if cfg.loss not in REFERENCE_FREE:
        ref_train, ref_val = reference_tables(cfg, s, model, train, val, val_batches, collate, pad_id)
    loop.add_lora(s, model)
    t = loop.prepare(s, model)
    steps_per_epoch = max(1, loader.steps_per_epoch() // cfg.grad_accum)
    max_steps = loop.total_steps(cfg, steps_per_epoch)
    start = loop.restore(s, t, loader)
    loop.announce(s, *notes, f"{cfg.loss}, beta {cfg.beta}; {loop.trained_params(model)[1] / 1e6:.3f}M trained "
                             f"({'LoRA' if s.lora else 'full'}); {len(train)} train / {len(val)} val pairs; "
                             f"{steps_per_epoch} steps/epoch, {max_steps} steps; {s.dtype}, {s.device}")

    def next_batch() -> dict:
        batch = next(loader)
        return {**batch, "pair_idx": loader.plan(loader.epoch)[loader.index - 1]}

    def loss_fn(wrapped, batch):
        idx = batch["pair_idx"]
        ref = None if ref_train is None else torch.cat([ref_train[idx, 0], ref_train[idx, 1]]).to(s.device,
                                                                                                   torch.float32)
        logp, n = batch_logprobs(wrapped, batch)
        loss, ch, rj = losses(logp, n, ref, len(idx), cfg)
        return loss.sum(), {"reward_chosen": ch.sum(), "reward_rejected": rj.sum(), "accuracy": (ch > rj).sum()}

    metrics: dict = {}
    with loop.Reporter(s, max_steps, start) as rep:
        for step in range(start, max_steps):
            micro = [next_batch() for _ in range(cfg.grad_accum)]
            m = loop.train_step(s, t, micro, loss_fn, lambda b: len(b["pair_idx"]), step, max_steps)
            rep.watch(step + 1, m)
            tokens, flops = loop.step_work(micro, model.config, d.world_size)
            rep.count(m["count"], tokens, flops)
            done = step + 1
            if loop.due(done, cfg.log_every, max_steps):
                metrics = {k: m[k] for k in ("loss", "reward_chosen", "reward_rejected")}
                metrics.update(margin=m["reward_chosen"] - m["reward_rejected"], accuracy=m["accuracy"], lr=m["lr"],
                               grad_norm=m["grad_norm"], pairs_per_s=rep.rate(), **rep.work())
                rep.record(done, metrics, f"loss {m['loss']:.3f}  margin {metrics['margin']:.3f}  acc "
                                          f"{m['accuracy']:.2f}")
            if val_batches and loop.due(done, cfg.eval_every, max_steps):
                v = evaluate(t.wrapped, val_batches, ref_val, cfg, s.device, s.dtype, d)
                metrics.update({f"val_{k}": x for k, x in v.items()})
                rep.record(done, {f"val_{k}": x for k, x in v.items()})
                rep.print(f"step {done}: val loss {v['loss']:.4f}, accuracy {v['accuracy']:.3f}, margin "
                          f"{v['margin']:.3f}, rewards {v['reward_chosen']:.3f} / {v['reward_rejected']:.3f}")
            if loop.save_due(s, done, max_steps):
                loop.save(s, t, tokenizer, done, metrics, loader, final=done == max_steps, parent=cfg.model)
            rep.advance(done)
            if loop.stop_due(s, done):
                break
    loop.finish(s)
    return metrics
