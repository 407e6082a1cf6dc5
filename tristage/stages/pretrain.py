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
from pathlib import Path

import torch

from tristage.config import parse
from tristage.data.pretrain import TokenLoader, check_tokenizer, load_meta
from tristage.flags.pretrain import Config
from tristage.flops import flops_per_token
from tristage.io import UserError
from tristage.model.gpt import GPT, ModelConfig, build_model
from tristage.model.hf import load_model
from tristage.serve.engine import Engine, SamplingParams
from tristage.tokenizer import Tokenizer
from tristage.train import loop
from tristage.train.loop import lm_loss_sum


def parse_args(argv: list[str]) -> Config:
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

    engine = Engine(model)
    outs = engine.generate([tokenizer.encode(p) for p in prompts],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids))
    with open(path, "a") as fh:
        for p, o in zip(prompts, outs):
            text = tokenizer.decode(o.tokens, skip_special_tokens=True)
            fh.write(json.dumps({"step": step, "prompt": p, "completion": text}) + "\n")


# the shape flags behind each ModelConfig field they set, to name a difference with a resumed checkpoint
SHAPE_FLAGS = {"vocab_size": "the tokenizer's vocabulary", "hidden_size": "--hidden-size / --depth",
               "num_hidden_layers": "--num-layers / --depth", "num_attention_heads": "--num-heads",
               "num_key_value_heads": "--num-kv-heads", "intermediate_size": "--intermediate-size",
               "rope_theta": "--rope-theta", "tie_word_embeddings": "--tie-embeddings"}


def shape_differences(want: ModelConfig, have: ModelConfig) -> list[str]:
    """`flags: value (checkpoint: value)` for each shape field where the flags' model differs from a checkpoint's
    (the context length is not one: a resumed run may train on shorter sequences than its model holds)."""
    return [f"{flag} gives {k} {getattr(want, k)} (checkpoint: {getattr(have, k)})"
            for k, flag in SHAPE_FLAGS.items() if getattr(want, k) != getattr(have, k)]


def build(cfg: Config, s: loop.Session, vocab_size: int) -> GPT:
    """The model: the checkpoint being resumed > a folder to continue from > a fresh one from the shape flags.
    Resuming a run built from the shape flags with other shape flags is refused, naming each difference."""
    if s.state is not None:
        if cfg.init_from is None:
            diff = shape_differences(model_config(cfg, vocab_size), loop.model_config(s.ckpt))
            if diff:
                raise UserError(f"--resume: the flags describe another model than the checkpoint in {s.ckpt}: "
                                + "; ".join(diff) + f" (resume with the run's own flags: --config {s.out}/config.yaml)")
        return load_model(s.ckpt, device=s.device, dtype=torch.float32)
    if cfg.init_from:
        return load_model(cfg.init_from, device=s.device, dtype=torch.float32)
    return build_model(model_config(cfg, vocab_size), device=s.device, seed=cfg.seed)


def main(cfg: Config) -> dict:
    s = loop.start(cfg, "pretrain")
    load_meta(cfg.data)  # fails early, naming the folder, if it is not a finished `tristage prepare` output
    tok_path = cfg.tokenizer or str(Path(cfg.data) / "tokenizer")
    tokenizer = Tokenizer.load(tok_path)
    check_tokenizer(cfg.data, tokenizer, tok_path)  # the shards' ids mean this tokenizer's tokens
    model = build(cfg, s, tokenizer.vocab_size)
    mcfg = model.config
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens, the model only {mcfg.vocab_size}")
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's context: {mcfg.max_position_embeddings} "
                        "positions (max_position_embeddings)")
    t = loop.prepare(s, model)
    d = s.d
    loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                         seed=cfg.seed, mode=cfg.loader)
    val_loader = TokenLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                             seed=cfg.seed + 1, mode="sequential")
    val_batches = [{"input_ids": x, "labels": y} for x, y in val_loader.val_batches(cfg.eval_batches)]
    start = loop.restore(s, t, loader)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world_size
    step_flops = tokens_per_step * flops_per_token(mcfg, cfg.seq_len)  # PaLM's convention
    loop.announce(s, f"{loop.trained_params(model)[0] / 1e6:.2f}M params, {mcfg.num_hidden_layers} layers x "
                     f"{mcfg.hidden_size}, vocab {mcfg.vocab_size}, {tokens_per_step:,} tokens/step, {s.dtype}, "
                     f"device {s.device}, {d.world_size} process(es)")

    metrics: dict = {}
    with loop.Reporter(s, cfg.max_steps, start) as rep:
        for step in range(start, cfg.max_steps):
            micro = [dict(zip(("input_ids", "labels"), next(loader))) for _ in range(cfg.grad_accum)]
            m = loop.train_step(s, t, micro, lambda mdl, b: (lm_loss_sum(mdl, b), {}), loop.target_count, step,
                                cfg.max_steps)
            rep.watch(step + 1, m)
            rep.count(tokens_per_step, tokens_per_step, step_flops)
            done = step + 1
            if loop.due(done, cfg.log_every, cfg.max_steps):
                tps = rep.rate()
                metrics = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], **rep.work(),
                           "tok_per_s": tps}
                rep.record(done, metrics, f"loss {m['loss']:.3f}  {tps:,.0f} tok/s  MFU {metrics['mfu']:.0%}")
            if loop.due(done, cfg.eval_every, cfg.max_steps):
                vl = loop.evaluate_loss(t.wrapped, val_batches, s.device, s.dtype, d)
                metrics.update(val_loss=vl, val_bpb=vl / math.log(2) / val_loader.bytes_per_token)
                rep.record(done, {"val_loss": vl, "val_bpb": metrics["val_bpb"]})
                rep.print(f"step {done}: val loss {vl:.4f}, {metrics['val_bpb']:.3f} bits/byte")
            if s.is_main and loop.due(done, cfg.sample_every, cfg.max_steps) and cfg.sample_prompts \
                    and cfg.parallel != "fsdp":
                write_samples(model, tokenizer, cfg.sample_prompts, done, s.out / "samples.jsonl")
                model.train()
            if loop.save_due(s, done, cfg.max_steps):
                loop.save(s, t, tokenizer, done, metrics, loader, final=done == cfg.max_steps, parent=cfg.init_from)
            rep.advance(done)
            if loop.stop_due(s, done):
                rep.print(f"stopped after step {done} (--stop-at); continue with --resume")
                break
    loop.finish(s)
    return metrics
