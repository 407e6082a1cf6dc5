"""Stage 2, instruction tuning (SFT): from a base model to an assistant.

    tristage sft runs/base/model --data chats.jsonl --out runs/sft
    tristage sft path/to/Qwen2.5-0.5B --data chats.jsonl --lora-rank 16 --out runs/sft-lora

The algorithm: next-token cross-entropy on the assistant's tokens only (each assistant turn including
its end-of-turn token, nothing else: tristage/data/chat.py renders the chat template and builds the
mask), from a tristage checkpoint or any supported Hugging Face model folder.

Choices, and why:
- The loss is a mean over every trained token of the global batch: each micro-batch contributes its
  *sum*, divided by the trained-token count of all micro-batches on all processes. A plain per-batch mean
  would weight a short answer's tokens more than a long one's, and change with the accumulation split.
- Packing by default (several conversations per row with a block-diagonal mask and positions restarting
  per conversation): on these CPUs it wastes no compute on padding, and a conversation's loss does not
  depend on its row mates (tested); `--mode padded` is the alternative.
- The end-of-turn token is trained, and generation_config.json lists it as a stop token, so the model
  stops, in tristage and in transformers. The report counts how many validation answers end with it.
- Full fine-tuning, or LoRA (`--lora-rank`): the frozen base plus low-rank adapters; at the end the adapter
  is saved in the PEFT format (out/adapter) and merged into the weights for the model folder (out/model).
- The same loop qualities as pre-training: bf16 autocast, clipping, warmup + cosine, atomic checkpoints
  with the training state beside them, exact `--resume`, metrics.jsonl, a progress bar, DDP under torchrun.
Simplified: no NEFTune, no sample weighting; one data mixture (all `--data` files concatenated).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tristage.config import arg, save_config, to_dict
from tristage.model.hf import load_model, save_model
from tristage.train import distributed as dist
from tristage.train.common import (
    MetricsLog,
    accumulate_gradients,
    evaluate_loss,
    progress,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)
from tristage.train.optim import Schedule, build_optimizer, lr_at, set_lr


@dataclass
class Config:
    """Instruction-tune a model on chat data (assistant tokens only), fully or with LoRA."""

    model: str = arg(help="starting model folder (tristage checkpoint or Hugging Face Llama/Qwen/Mistral)",
                     positional=True)
    data: list[str] = arg([], help="training chats: JSONL/JSON of {messages}, Alpaca or ShareGPT records (.gz ok)")
    val_data: list[str] = arg([], help="validation chats (default: hold out --val-fraction of --data)")
    val_fraction: float = arg(0.05, help="share of --data held out for validation when --val-data is not given")
    out: str = arg("runs/sft", help="run folder: config.yaml, metrics.jsonl, model/ (and adapter/ with LoRA)")
    on_error: Literal["raise", "skip"] = arg("raise", help="invalid records: stop at the first, or skip and count")
    system_prompt: str | None = arg(None, help="system message for conversations that have none")
    max_len: int = arg(512, help="longest conversation in tokens; longer ones are truncated (counted)")
    truncation: Literal["truncate", "drop"] = arg("truncate", help="what to do with conversations over --max-len")
    mode: Literal["packed", "padded"] = arg("packed", help="pack several conversations per row, or pad each")
    tokens_per_batch: int = arg(8192, help="token slots per micro-batch per process (rows x length)")
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    epochs: float = arg(2.0, help="passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = arg(None, help="optimizer steps (default: from --epochs)")
    lr: float = arg(1e-4, help="peak learning rate (LoRA typically wants ~10x more)")
    min_lr_ratio: float = arg(0.1, help="final learning rate as a fraction of --lr")
    warmup_steps: int = arg(20, help="linear warmup steps")
    schedule: Schedule = arg("cosine", help="cosine | wsd | constant")
    weight_decay: float = arg(0.0, help="AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, help="clip the global gradient norm (0: off)")
    lora_rank: int = arg(0, help="LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = arg(32.0, help="LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = arg(0.0, help="dropout on the LoRA input")
    lora_targets: list[str] = arg(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  help="module names that get adapters")
    dtype: str = arg("auto", help="autocast dtype: auto (bf16 where native) | float32 | bfloat16")
    compile: bool = arg(False, help="torch.compile the model")
    activation_checkpointing: bool = arg(False, help="recompute activations in backward to save memory")
    parallel: dist.Parallel = arg("ddp", help="under torchrun: ddp or fsdp")
    eval_every: int = arg(100, help="validate every N steps (and at the end); 0: only at the end")
    save_every: int = arg(500, help="checkpoint every N steps (and at the end)")
    log_every: int = arg(10, help="write metrics every N steps")
    resume: bool = arg(False, help="continue the run in --out from its last checkpoint, exactly")
    stop_at: int | None = arg(None, help="checkpoint and stop after this step (then --resume)")
    seed: int = arg(0, help="seed for the split, the data order and LoRA initialisation")
    device: str = arg("auto", help="auto | cpu | cuda | cuda:N")
    progress: bool = arg(True, help="show a progress bar")


def load_chats(cfg: Config, tokenizer):
    """(train examples, val examples, messages printed about what was skipped or truncated)."""
    from tristage.data.chat import encode_conversations, format_skipped, load_conversations

    def load(paths):
        convs, errors = [], []
        for p in paths:
            c, e = load_conversations(p, on_error=cfg.on_error, system_prompt=cfg.system_prompt)
            convs += c
            errors += e
        return convs, errors

    if not cfg.data:
        raise ValueError("sft: no --data given")
    train, errors = load(cfg.data)
    if cfg.val_data:
        val, verr = load(cfg.val_data)
        errors += verr
    else:
        rng = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(train), generator=rng).tolist()
        n_val = max(1, round(cfg.val_fraction * len(train))) if cfg.val_fraction > 0 else 0
        val = [train[i] for i in order[:n_val]]
        train = [train[i] for i in sorted(order[n_val:])]
    notes = [format_skipped(errors)]
    tr, tr_stats = encode_conversations(tokenizer, train, cfg.max_len, cfg.truncation, on_error=cfg.on_error)
    va, va_stats = encode_conversations(tokenizer, val, cfg.max_len, cfg.truncation, on_error=cfg.on_error)
    notes += [f"train: {tr_stats}", f"val: {va_stats}"]
    if not tr:
        raise ValueError(f"sft: no usable training conversations in {cfg.data}")
    return tr, va, notes


def main(cfg: Config) -> dict:
    from tristage.data.chat import ChatLoader
    from tristage.tokenizer import Tokenizer

    d = dist.init(cfg.device)
    device, out = d.device, Path(cfg.out)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.load(cfg.model)
    if not tokenizer.chat_template:
        raise ValueError(f"{cfg.model}: the tokenizer has no chat_template; add one to tokenizer_config.json")
    train, val, notes = load_chats(cfg, tokenizer)

    lora = cfg.lora_rank > 0
    state = None
    ckpt = out / ("adapter" if lora else "model")
    if cfg.resume:
        if not (ckpt / "training_state.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint to resume in {ckpt}")
        state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
    model = load_model(ckpt if (state is not None and not lora) else cfg.model, device=device, dtype=torch.float32)
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
    if cfg.compile:
        wrapped = torch.compile(wrapped)

    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    loader = ChatLoader(train, cfg.tokens_per_batch, pad_id, mode=cfg.mode, seq_len=cfg.max_len, seed=cfg.seed,
                        rank=d.rank, world_size=d.world_size)
    val_batches = []
    if val:
        vl = ChatLoader(val, cfg.tokens_per_batch, pad_id, mode=cfg.mode, seq_len=cfg.max_len, seed=cfg.seed,
                        rank=d.rank, world_size=d.world_size) if len(val) >= d.world_size else None
        val_batches = [vl.collate(b) for b in vl.plan(0)] if vl else []
    steps_per_epoch = max(1, len(loader.plan(0)) // cfg.grad_accum)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    start_step = 0
    if state is not None:
        dist.load_optim_state(wrapped, opt, state["optimizer"], d)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step = state["step"]

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        for n in notes:
            print(f"sft: {n}")
        print(f"sft: {n_params / 1e6:.2f}M params, {n_train / 1e6:.3f}M trained ({'LoRA' if lora else 'full'}); "
              f"{len(train)} train / {len(val)} val conversations; {cfg.mode} at {loader.efficiency():.0%} "
              f"real tokens; {steps_per_epoch} steps/epoch, {max_steps} steps; {dtype}, {device}")
    log = MetricsLog(out, enabled=d.is_main, resume_step=start_step if state is not None else None)

    def checkpoint(step: int, metrics: dict, final: bool) -> None:
        training_state = {"step": step, "optimizer": dist.full_optim_state(wrapped, opt, d),
                          "loader": loader.state_dict(), "rng": rng_state()}
        full = dist.full_state_dict(wrapped, d)
        if d.is_main:
            meta = {"stage": "sft", "parent": cfg.model, "step": step, "config": to_dict(cfg), "metrics": metrics}
            if lora:
                from tristage.model.lora import merge_lora, save_adapter

                save_adapter(model, out / "adapter", base_model_path=cfg.model, training_state=training_state)
                if final:
                    import copy

                    merged = merge_lora(copy.deepcopy(model))
                    save_model(merged, out / "model", tokenizer, dtype=torch.float32, meta=meta)
            else:
                save_model(model, out / "model", tokenizer, state_dict=full, dtype=torch.float32,
                           training_state=training_state, meta=meta)
        dist.barrier(d)

    metrics: dict = {}
    t_last, tok_count = time.perf_counter(), 0
    with progress(cfg.progress and d.is_main) as bar:
        task = bar.add_task("sft", total=max_steps, completed=start_step, info="")
        for step in range(start_step, max_steps):
            lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            set_lr(opt, lr)
            micro = [next(loader) for _ in range(cfg.grad_accum)]
            n_local = torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in micro)), device=device)
            n_global = dist.all_reduce_sum(n_local, d).item()
            loss_sum = accumulate_gradients(wrapped, micro, n_global, d.world_size, device, dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            loss = dist.all_reduce_sum(loss_sum, d).item() / max(n_global, 1)
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                raise FloatingPointError(f"sft: loss {loss} / grad norm {float(grad_norm)} at step {step + 1}; "
                                         "stopping without writing a checkpoint from this state")
            opt.step()
            opt.zero_grad(set_to_none=True)
            tok_count += sum(int(b["num_tokens"]) for b in micro)
            done = step + 1
            if done % cfg.log_every == 0 or done == max_steps:
                now = time.perf_counter()
                tps = tok_count * d.world_size / max(now - t_last, 1e-9)
                t_last, tok_count = now, 0
                metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "real_tok_per_s": tps,
                           "epoch": loader.epoch + loader.index / max(1, len(loader.plan(loader.epoch)))}
                log.log(done, **metrics)
                bar.update(task, info=f"loss {loss:.3f}  {tps:,.0f} tok/s")
            if val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == max_steps):
                vloss = evaluate_loss(wrapped, val_batches, device, dtype, d)
                metrics["val_loss"] = vloss
                log.log(done, val_loss=vloss)
                if d.is_main:
                    bar.console.print(f"step {done}: val loss {vloss:.4f}")
            stopping = cfg.stop_at is not None and done >= cfg.stop_at
            if (cfg.save_every and done % cfg.save_every == 0) or done == max_steps or stopping:
                checkpoint(done, metrics, final=done == max_steps)
            bar.update(task, completed=done)
            if stopping:
                break
    log.close()
    dist.shutdown(d)
    return metrics
