"""Stage 1, pre-training: next-token prediction on token shards, from scratch or continued.

    tristage prepare --inputs 'corpus/*.txt' --tokenizer tok/ --out shards/
    tristage pretrain --data shards/ --out runs/base --depth 4 --max-steps 2000
    torchrun --nproc-per-node 8 -m tristage.cli pretrain --data shards/ --parallel fsdp ...

The algorithm: minimise the mean cross-entropy of each next token. The loop, top to bottom:
learning rate from a pure schedule function -> `grad_accum` micro-batches, each loss a *sum* over its
tokens divided by the token count of the whole global batch (so accumulation and data parallelism give
exactly the mean over all tokens of the global batch, whatever the split) -> clip -> AdamW step.

Choices, and why:
- bf16 autocast by default where the hardware computes bf16 natively (on this project's CPUs, oneDNN
  runs bf16 matmuls about 2x faster); weights, gradients and optimizer state stay fp32, so a resumed
  run continues bit for bit.
- Every checkpoint is a Hugging Face model folder (`OUT/model`) with `training_state.pt` inside it
  (optimizer, data position, RNG, step), written atomically: weights and the state to resume them are
  replaced together or not at all. `--resume` continues exactly: the same losses, step for step.
- A NaN/inf loss or gradient stops the run with the step number, and no checkpoint is written from it.
- Distributed through torchrun: DDP or FSDP2 applied from outside (train/distributed.py); rank r reads
  rows r*B..(r+1)*B of each global batch, so N processes of batch B equal one process of batch N*B.
Simplified: no dropout (pre-training at these scales rarely needs it); no z-loss; no MuP.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tristage.config import arg, save_config, to_dict
from tristage.model.gpt import GPT, ModelConfig, build_model
from tristage.model.hf import load_model, save_model
from tristage.plan import flops_per_token
from tristage.train import distributed as dist
from tristage.train.common import (
    MetricsLog,
    accumulate_gradients,
    evaluate_loss,
    peak_flops,
    progress,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)
from tristage.train.optim import Schedule, build_optimizer, lr_at, set_lr


@dataclass
class Config:
    """Pre-train a Llama-family model on token shards (from `tristage prepare`)."""

    data: str = arg("runs/demo/shards", help="token shard folder written by `tristage prepare`")
    out: str = arg("runs/pretrain", help="run folder: config.yaml, metrics.jsonl, samples.jsonl, model/")
    init_from: str | None = arg(None, help="continue from this Hugging Face / tristage model folder")
    tokenizer: str | None = arg(None, help="tokenizer folder (default: the one the shards were made with)")
    depth: int = arg(4, help="model size knob: depth layers of width 64*depth (see ModelConfig.from_depth)")
    hidden_size: int | None = arg(None, help="override the width derived from --depth")
    num_layers: int | None = arg(None, help="override the layer count derived from --depth")
    num_heads: int | None = arg(None, help="override the head count (head dim = width / heads)")
    num_kv_heads: int | None = arg(None, help="key/value heads for grouped-query attention (default: = heads)")
    intermediate_size: int | None = arg(None, help="MLP width (default: about 8/3 of the model width)")
    rope_theta: float = arg(10000.0, help="RoPE base")
    tie_embeddings: bool = arg(True, help="share the input embedding with the output layer")
    seq_len: int = arg(256, help="tokens per training sequence (the context length)")
    batch_size: int = arg(16, help="sequences per micro-batch per process")
    grad_accum: int = arg(1, help="micro-batches per optimizer step; global batch = batch x accum x processes")
    max_steps: int = arg(1000, help="optimizer steps")
    lr: float = arg(3e-3, help="peak learning rate")
    min_lr_ratio: float = arg(0.1, help="final learning rate as a fraction of --lr")
    warmup_steps: int = arg(50, help="linear warmup steps")
    schedule: Schedule = arg("cosine", help="cosine | wsd (warmup-stable-decay) | constant")
    weight_decay: float = arg(0.1, help="AdamW weight decay on matrices and embeddings")
    beta1: float = arg(0.9, help="AdamW beta1")
    beta2: float = arg(0.95, help="AdamW beta2")
    grad_clip: float = arg(1.0, help="clip the global gradient norm to this (0: off)")
    loader: Literal["random", "sequential"] = arg("random", help="random windows (nanoGPT) or one pass in order")
    dtype: str = arg("auto", help="autocast dtype: auto (bf16 where native) | float32 | bfloat16 | float16")
    compile: bool = arg(False, help="torch.compile the model (pays compile time up front)")
    activation_checkpointing: bool = arg(False, help="recompute activations in backward to save memory")
    parallel: dist.Parallel = arg("ddp", help="under torchrun: ddp (replicate) or fsdp (FSDP2 fully_shard)")
    eval_every: int = arg(250, help="validate every N steps (and at the end); 0: only at the end")
    eval_batches: int = arg(20, help="validation batches per evaluation")
    sample_every: int = arg(0, help="write sample generations every N steps (0: only at the end)")
    sample_prompts: list[str] = arg(["Once upon a time"], help="prompts for the sample generations")
    save_every: int = arg(500, help="checkpoint every N steps (and at the end)")
    log_every: int = arg(10, help="write metrics every N steps")
    resume: bool = arg(False, help="continue the run in --out from its last checkpoint, exactly")
    stop_at: int | None = arg(None, help="checkpoint and stop after this step (split a run into jobs; then --resume)")
    seed: int = arg(0, help="seed for initialisation and data order")
    device: str = arg("auto", help="auto | cpu | cuda | cuda:N")
    progress: bool = arg(True, help="show a progress bar")


def parse_args(argv: list[str]) -> Config:
    from tristage.config import parse

    return parse(Config, argv)


def model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    over = {k: v for k, v in dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                  intermediate_size=cfg.intermediate_size).items() if v is not None}
    if "hidden_size" in over and "num_attention_heads" not in over:
        over["num_attention_heads"] = max(1, over["hidden_size"] // 64)
    return ModelConfig.from_depth(cfg.depth, vocab_size, rope_theta=cfg.rope_theta,
                                  tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.seq_len,
                                  **over)


def write_samples(model: GPT, tokenizer, prompts: list[str], step: int, path: Path, max_new_tokens: int = 64) -> None:
    """Greedy continuations of the prompts, appended to samples.jsonl."""
    from tristage.serve.engine import Engine, SamplingParams

    engine = Engine(model)
    outs = engine.generate([tokenizer.encode(p) for p in prompts],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids))
    with open(path, "a") as fh:
        for p, o in zip(prompts, outs):
            text = tokenizer.decode(o.tokens, skip_special_tokens=True)
            fh.write(json.dumps({"step": step, "prompt": p, "completion": text}) + "\n")


def main(cfg: Config) -> dict:
    from tristage.data.pretrain import TokenLoader, load_meta
    from tristage.tokenizer import Tokenizer

    d = dist.init(cfg.device)
    device = d.device
    out = Path(cfg.out)
    ckpt_dir = out / "model"
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    load_meta(cfg.data)  # fails early, naming the folder, if it is not a finished `tristage prepare` output
    tok_path = cfg.tokenizer or str(Path(cfg.data) / "tokenizer")
    tokenizer = Tokenizer.load(tok_path)

    # -- model: resume > continue from a folder > from scratch
    state = None
    if cfg.resume:
        if not (ckpt_dir / "training_state.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint to resume in {ckpt_dir}")
        model = load_model(ckpt_dir, device=device, dtype=torch.float32)
        state = torch.load(ckpt_dir / "training_state.pt", map_location="cpu", weights_only=False)
    elif cfg.init_from:
        model = load_model(cfg.init_from, device=device, dtype=torch.float32)
    else:
        model = build_model(model_config(cfg, tokenizer.vocab_size), device=device, seed=cfg.seed)
    mcfg = model.config
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens, model only {mcfg.vocab_size}")
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context {mcfg.max_position_embeddings}")
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    wrapped = dist.wrap(model, d, cfg.parallel)  # before the optimizer: FSDP2 swaps parameters for DTensors
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                         seed=cfg.seed, mode=cfg.loader)
    val_loader = TokenLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                             seed=cfg.seed + 1, mode="sequential")
    val_batches = [{"input_ids": x, "labels": y} for x, y in val_loader.val_batches(cfg.eval_batches)]
    bytes_per_token = val_loader.bytes_per_token

    start_step, tokens_seen = 0, 0
    if state is not None:
        dist.load_optim_state(wrapped, opt, state["optimizer"], d)
        loader.load_state_dict(state["loader"])  # the same on every rank: a global step counter
        set_rng_state(state["rng"])
        start_step, tokens_seen = state["step"], state["tokens_seen"]

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world_size
    flops_per_step = flops_per_token(mcfg, cfg.seq_len) * tokens_per_step  # PaLM convention
    peak = peak_flops(device, dtype) * d.world_size
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        print(f"pretrain: {n_params / 1e6:.2f}M params, {mcfg.num_hidden_layers} layers x {mcfg.hidden_size}, "
              f"vocab {mcfg.vocab_size}, {tokens_per_step:,} tokens/step, {dtype}, device {device}, "
              f"{d.world_size} process(es)")
    log = MetricsLog(out, enabled=d.is_main, resume_step=start_step if state is not None else None)

    def checkpoint(step: int, metrics: dict) -> None:
        full = dist.full_state_dict(wrapped, d)  # collective under FSDP
        optim_state = dist.full_optim_state(wrapped, opt, d)
        if d.is_main:
            training_state = {"step": step, "tokens_seen": tokens_seen, "optimizer": optim_state,
                              "loader": loader.state_dict(), "rng": rng_state()}
            save_model(model, ckpt_dir, tokenizer, state_dict=full, dtype=torch.float32, training_state=training_state,
                       meta={"stage": "pretrain", "parent": cfg.init_from, "step": step, "tokens": tokens_seen,
                             "config": to_dict(cfg), "metrics": metrics})
        dist.barrier(d)

    metrics: dict = {}
    t_last, tok_last = time.perf_counter(), tokens_seen
    with progress(cfg.progress and d.is_main) as bar:
        task = bar.add_task("pretrain", total=cfg.max_steps, completed=start_step, info="")
        for step in range(start_step, cfg.max_steps):
            lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            set_lr(opt, lr)
            n_global = tokens_per_step  # fixed-length windows: every target counts
            micro = [dict(zip(("input_ids", "labels"), next(loader))) for _ in range(cfg.grad_accum)]
            loss_sum = accumulate_gradients(wrapped, micro, n_global, d.world_size, device, dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            loss = dist.all_reduce_sum(loss_sum, d) / n_global
            if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
                raise FloatingPointError(f"pretrain: loss {loss.item()} / grad norm {float(grad_norm)} at step "
                                         f"{step + 1}; stopping without writing a checkpoint from this state")
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens_seen
                mfu = tps / tokens_per_step * flops_per_step / peak
                metrics = {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_seen,
                           "tok_per_s": tps, "mfu": mfu}
                log.log(done, **metrics)
                bar.update(task, info=f"loss {loss.item():.3f}  {tps:,.0f} tok/s  MFU {mfu:.0%}")
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
                vl = evaluate_loss(wrapped, val_batches, device, dtype, d)
                metrics.update(val_loss=vl, val_bpb=vl / math.log(2) / bytes_per_token)
                log.log(done, val_loss=vl, val_bpb=metrics["val_bpb"])
                if d.is_main:
                    bar.console.print(f"step {done}: val loss {vl:.4f}, {metrics['val_bpb']:.3f} bits/byte")
            if d.is_main and ((cfg.sample_every and done % cfg.sample_every == 0) or done == cfg.max_steps) \
                    and cfg.sample_prompts and not cfg.parallel == "fsdp":
                write_samples(model, tokenizer, cfg.sample_prompts, done, out / "samples.jsonl")
                model.train()
            stopping = cfg.stop_at is not None and done >= cfg.stop_at
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps or stopping:
                checkpoint(done, metrics)
            bar.update(task, completed=done)
            if stopping:
                if d.is_main:
                    bar.console.print(f"stopped after step {done} (--stop-at); continue with --resume")
                break
    log.close()
    dist.shutdown(d)
    return metrics
