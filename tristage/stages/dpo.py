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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tristage.config import arg, save_config, to_dict
from tristage.data.preference import PAIR_LAYOUT_HELP, PairLayout
from tristage.io import atomic_write_bytes
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
from tristage.train.losses import REFERENCE_FREE, LossType, dpo_loss, sequence_logprobs
from tristage.train.optim import Schedule, build_optimizer, lr_at, set_lr


@dataclass
class Config:
    """Direct preference optimisation (DPO, IPO, conservative DPO, SimPO, ORPO) on preference pairs."""

    model: str = arg(help="starting policy folder (usually the SFT model; also the reference)", positional=True)
    data: list[str] = arg([], help="preference pairs: JSONL/JSON of prompt|messages + chosen + rejected, or the "
                                   "Anthropic HH, long-form-QA or PandaLM shapes (.gz ok)")
    val_data: list[str] = arg([], help="validation pairs (default: hold out --val-fraction of --data)")
    val_fraction: float = arg(0.05, help="share of --data held out for validation when --val-data is not given")
    out: str = arg("runs/dpo", help="run folder: config.yaml, metrics.jsonl, reference_logps.pt, model/")
    ref_model: str | None = arg(None, help="reference model folder (default: the starting policy)")
    layout: PairLayout = arg("packed", help=PAIR_LAYOUT_HELP)
    loss: LossType = arg("sigmoid", help="sigmoid (DPO; with --label-smoothing: conservative DPO) | ipo | "
                                         "simpo (reference-free) | orpo (reference-free, with an SFT term)")
    beta: float = arg(0.1, help="DPO/IPO/SimPO temperature; ORPO's odds-ratio weight lambda")
    label_smoothing: float = arg(0.0, help="assumed label-noise rate for conservative DPO / SimPO (0..0.5)")
    gamma: float = arg(0.5, help="SimPO target reward margin")
    on_error: Literal["raise", "skip"] = arg("raise", help="invalid records: stop at the first, or skip and count")
    system_prompt: str | None = arg(None, help="system message for prompts that have none")
    max_len: int = arg(512, help="longest prompt + answer in tokens; the prompt is cut from the left (counted)")
    batch_size: int = arg(8, help="pairs per micro-batch per process")
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    epochs: float = arg(1.0, help="passes over the training pairs (ignored when --max-steps is set)")
    max_steps: int | None = arg(None, help="optimizer steps (default: from --epochs)")
    lr: float = arg(5e-6, help="peak learning rate (small: DPO moves a model quickly; LoRA wants ~10x more)")
    min_lr_ratio: float = arg(0.1, help="final learning rate as a fraction of --lr")
    warmup_steps: int = arg(10, help="linear warmup steps")
    schedule: Schedule = arg("cosine", help="cosine | wsd | constant")
    weight_decay: float = arg(0.0, help="AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, help="clip the global gradient norm (0: off)")
    lora_rank: int = arg(0, help="LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = arg(32.0, help="LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = arg(0.0, help="dropout on the LoRA input")
    lora_targets: list[str] = arg(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  help="module names that get adapters")
    dtype: str = arg("auto", help="autocast dtype: auto (bf16 where native) | float32 | bfloat16")
    activation_checkpointing: bool = arg(False, help="recompute activations in backward to save memory")
    parallel: dist.Parallel = arg("ddp", help="under torchrun: ddp or fsdp")
    eval_every: int = arg(100, help="validate every N steps (and at the end); 0: only at the end")
    save_every: int = arg(500, help="checkpoint every N steps (and at the end)")
    log_every: int = arg(10, help="write metrics every N steps")
    resume: bool = arg(False, help="continue the run in --out from its last checkpoint, exactly")
    stop_at: int | None = arg(None, help="checkpoint and stop after this step (then --resume)")
    seed: int = arg(0, help="seed for the split and the data order")
    device: str = arg("auto", help="auto | cpu | cuda | cuda:N")
    progress: bool = arg(True, help="show a progress bar")


def pair_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs [2B] (chosen, then rejected) and answer token counts [2B], from either batch layout:
    two rows per pair (collate_pairs) or one row with the prompt shared (collate_pairs_shared)."""
    if "lp_seq" not in batch:
        return sequence_logprobs(model(batch["input_ids"]), batch["labels"])
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"])
    picked = logits[batch["lp_row"], batch["lp_pos"]].float()  # [N, V]: the logits that predict each answer token
    lp = picked.log_softmax(-1).gather(-1, batch["lp_tok"][:, None])[:, 0]
    n2 = 2 * batch["num_pairs"]
    zeros = torch.zeros(n2, device=lp.device, dtype=lp.dtype)
    return zeros.index_add(0, batch["lp_seq"], lp), zeros.index_add(0, batch["lp_seq"], torch.ones_like(lp))


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
            logp, _ = pair_logprobs(model, batch)
        B = len(idx)
        out[idx, 0], out[idx, 1] = logp[:B].double().cpu(), logp[B:].double().cpu()
    model.train(was)
    return out


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
            logp, n = pair_logprobs(model, batch)
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
    from tristage.data.preference import PairLoader, load_pair_splits, pair_collator
    from tristage.model.hf import load_model, save_model
    from tristage.tokenizer import Tokenizer

    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), not {cfg.label_smoothing}")
    d = dist.init(cfg.device)
    device, out = d.device, Path(cfg.out)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.load(cfg.model)
    if not tokenizer.chat_template:
        raise ValueError(f"{cfg.model}: the tokenizer has no chat_template; add one to tokenizer_config.json")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    train, val, _, notes = load_pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, tokenizer,
                                            cfg.max_len, cfg.on_error, cfg.system_prompt)

    lora = cfg.lora_rank > 0
    state, ckpt = None, out / ("adapter" if lora else "model")
    if cfg.resume:
        if not (ckpt / "training_state.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint to resume in {ckpt}")
        state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
    model = load_model(ckpt if (state is not None and not lora) else cfg.model, device=device, dtype=torch.float32)

    def split_batches(examples, loader):
        return [(b, collate([examples[i] for i in b], pad_id)) for b in loader.plan(0)]

    collate = pair_collator(cfg.layout)
    loader = PairLoader(train, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size, pad_id=pad_id,
                        layout=cfg.layout)
    val_batches = []
    if len(val) >= d.world_size:
        val_batches = split_batches(val, PairLoader(val, cfg.batch_size, seed=cfg.seed, rank=d.rank,
                                                    world_size=d.world_size, pad_id=pad_id))

    # reference log-probs, once (from the starting weights, before any adapter or update)
    ref_train = ref_val = None
    if cfg.loss not in REFERENCE_FREE:
        cache = out / "reference_logps.pt"
        key = reference_key(cfg.ref_model or cfg.model, train, val, dtype)
        saved = torch.load(cache, map_location="cpu") if cache.exists() else {}
        if saved.get("key") == key:  # same reference weights, pairs and precision: reuse (resume, reruns)
            ref_train, ref_val = saved["train"], saved["val"]
            if d.is_main:
                print(f"dpo: reference log-probs from {cache}")
        else:
            ref = load_model(cfg.ref_model, device=device, dtype=torch.float32) if cfg.ref_model else model
            t0 = time.perf_counter()
            # every pair on every rank computes its own shard; sum across ranks fills the table
            all_train = [(b, collate([train[i] for i in b], pad_id))
                         for b in [list(range(k, min(k + cfg.batch_size, len(train))))
                                   for k in range(d.rank * cfg.batch_size, len(train), cfg.batch_size * d.world_size)]]
            ref_train = reference_logps(ref, all_train, len(train), device, dtype)
            ref_val = reference_logps(ref, val_batches, len(val), device, dtype)
            for t in (ref_train, ref_val):  # each pair was computed on one rank; the sum gives every rank all
                t.nan_to_num_(0.0)
                if d.world_size > 1:
                    t.copy_(dist.all_reduce_sum(t.to(device), d).cpu())
            if ref is not model:
                del ref
            if d.is_main:
                out.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                torch.save({"train": ref_train, "val": ref_val, "key": key}, buf)
                atomic_write_bytes(cache, buf.getvalue())
                print(f"dpo: reference log-probs of {len(train)} + {len(val)} pairs in "
                      f"{time.perf_counter() - t0:.1f}s -> {cache}")

    if lora:
        from tristage.model.lora import LoRAConfig, apply_lora, load_adapter

        if state is not None:
            load_adapter(model, ckpt, trainable=True)
        else:
            torch.manual_seed(cfg.seed)
            apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                         target_modules=list(cfg.lora_targets)))
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.train()
    wrapped = dist.wrap(model, d, cfg.parallel)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = max(1, loader.steps_per_epoch() // cfg.grad_accum)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    start_step = 0
    if state is not None:
        dist.load_optim_state(wrapped, opt, state["optimizer"], d)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step = state["step"]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        for n in notes:
            print(f"dpo: {n}")
        print(f"dpo: {cfg.loss}, beta {cfg.beta}; {n_train / 1e6:.3f}M trained ({'LoRA' if lora else 'full'}); "
              f"{len(train)} train / {len(val)} val pairs; {steps_per_epoch} steps/epoch, {max_steps} steps; "
              f"{dtype}, {device}")
    log = MetricsLog(out, enabled=d.is_main, resume_step=start_step if state is not None else None)

    def checkpoint(step: int, metrics: dict, final: bool) -> None:
        training_state = {"step": step, "optimizer": dist.full_optim_state(wrapped, opt, d),
                          "loader": loader.state_dict(), "rng": rng_state()}
        full = dist.full_state_dict(wrapped, d)
        if d.is_main:
            meta = {"stage": "dpo", "parent": cfg.model, "step": step, "config": to_dict(cfg), "metrics": metrics}
            if lora:
                from tristage.model.lora import merge_lora, save_adapter

                save_adapter(model, out / "adapter", base_model_path=cfg.model, training_state=training_state)
                if final:
                    import copy

                    save_model(merge_lora(copy.deepcopy(model)), out / "model", tokenizer, dtype=torch.float32,
                               meta=meta)
            else:
                save_model(model, out / "model", tokenizer, state_dict=full, dtype=torch.float32,
                           training_state=training_state, meta=meta)
        dist.barrier(d)

    metrics: dict = {}
    t_last, pairs_seen = time.perf_counter(), 0
    with progress(cfg.progress and d.is_main) as bar:
        task = bar.add_task("dpo", total=max_steps, completed=start_step, info="")
        for step in range(start_step, max_steps):
            lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            set_lr(opt, lr)
            micro = []
            for _ in range(cfg.grad_accum):
                batch = next(loader)
                micro.append((loader.plan(loader.epoch)[loader.index - 1], batch))
            n_global = dist.all_reduce_sum(torch.tensor(float(sum(len(i) for i, _ in micro)), device=device),
                                           d).item()
            tot = torch.zeros(5, dtype=torch.float64, device=device)  # loss, chosen, rejected, correct, pairs
            for k, (idx, batch) in enumerate(micro):
                batch = to_device(batch, device)
                B = len(idx)
                ref = None if ref_train is None else torch.cat([ref_train[idx, 0], ref_train[idx, 1]]).to(
                    device, torch.float32)
                with dist.no_sync(wrapped, k == len(micro) - 1), autocast(device, dtype):
                    logp, n = pair_logprobs(wrapped, batch)
                    loss, ch, rj = losses(logp, n, ref, B, cfg)
                    (loss.sum() * d.world_size / n_global).backward()
                tot += torch.stack([loss.detach().sum(), ch.sum(), rj.sum(), (ch > rj).sum(),
                                    torch.tensor(float(B), device=device)]).double()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            dist.all_reduce_sum(tot, d)
            npairs = tot[4].item()
            loss_v = tot[0].item() / npairs
            if not (math.isfinite(loss_v) and math.isfinite(float(grad_norm))):
                raise FloatingPointError(f"dpo: loss {loss_v} / grad norm {float(grad_norm)} at step {step + 1}; "
                                         "stopping without writing a checkpoint from this state")
            opt.step()
            opt.zero_grad(set_to_none=True)
            pairs_seen += int(npairs)
            done = step + 1
            if done % cfg.log_every == 0 or done == max_steps:
                now = time.perf_counter()
                metrics = {"loss": loss_v, "reward_chosen": tot[1].item() / npairs,
                           "reward_rejected": tot[2].item() / npairs, "margin": (tot[1] - tot[2]).item() / npairs,
                           "accuracy": tot[3].item() / npairs, "lr": lr, "grad_norm": float(grad_norm),
                           "pairs_per_s": pairs_seen / max(now - t_last, 1e-9)}
                t_last, pairs_seen = now, 0
                log.log(done, **metrics)
                bar.update(task, info=f"loss {loss_v:.3f}  margin {metrics['margin']:.3f}  acc "
                                      f"{metrics['accuracy']:.2f}")
            if val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == max_steps):
                v = evaluate(wrapped, val_batches, ref_val, cfg, device, dtype, d)
                metrics.update({f"val_{k}": x for k, x in v.items()})
                log.log(done, **{f"val_{k}": x for k, x in v.items()})
                if d.is_main:
                    bar.console.print(f"step {done}: val loss {v['loss']:.4f}, accuracy {v['accuracy']:.3f}, "
                                      f"margin {v['margin']:.3f}, rewards {v['reward_chosen']:.3f} / "
                                      f"{v['reward_rejected']:.3f}")
            stopping = cfg.stop_at is not None and done >= cfg.stop_at
            if (cfg.save_every and done % cfg.save_every == 0) or done == max_steps or stopping:
                checkpoint(done, metrics, final=done == max_steps)
            bar.update(task, completed=done)
            if stopping:
                break
    log.close()
    dist.shutdown(d)
    return metrics
