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

from functools import partial

from tristage.data.chat import ChatLoader, encode_conversations, format_skipped, load_conversations
from tristage.data.records import load_all, split_train_val
from tristage.flags.sft import Config
from tristage.io import UserError
from tristage.train import loop


def load_chats(cfg: Config, tokenizer):
    """(train examples, val examples, messages printed about what was skipped or truncated)."""

    if not cfg.data:
        raise UserError("sft: no --data given")
    load = partial(load_conversations, on_error=cfg.on_error, system_prompt=cfg.system_prompt)
    train, errors = load_all(cfg.data, load)
    if cfg.val_data:
        val, verr = load_all(cfg.val_data, load)
        errors += verr
    else:
        train, val = split_train_val(train, cfg.val_fraction, cfg.seed)
    notes = [format_skipped(errors)]
    tr, tr_stats = encode_conversations(tokenizer, train, cfg.max_len, cfg.truncation, on_error=cfg.on_error)
    va, va_stats = encode_conversations(tokenizer, val, cfg.max_len, cfg.truncation, on_error=cfg.on_error)
    notes += [f"train: {tr_stats}", f"val: {va_stats}"]
    if not tr:
        raise UserError(f"sft: no usable training conversations in {', '.join(cfg.data)}")
    return tr, va, notes


def main(cfg: Config) -> dict:
    s = loop.start(cfg, "sft")
    cfg.max_len = loop.fit_max_len(cfg.max_len, cfg.model)  # before any data is read; config.yaml keeps the value
    tokenizer = loop.chat_tokenizer(cfg.model)
    train, val, notes = load_chats(cfg, tokenizer)
    model = loop.load_policy(s)
    loop.add_lora(s, model)
    t = loop.prepare(s, model)
    d = s.d
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    loader = ChatLoader(train, cfg.tokens_per_batch, pad_id, mode=cfg.mode, seq_len=cfg.max_len, seed=cfg.seed,
                        rank=d.rank, world_size=d.world_size)
    val_batches = []
    if val and len(val) >= d.world_size:
        vl = ChatLoader(val, cfg.tokens_per_batch, pad_id, mode=cfg.mode, seq_len=cfg.max_len, seed=cfg.seed,
                        rank=d.rank, world_size=d.world_size)
        val_batches = [vl.collate(b) for b in vl.plan(0)]
    steps_per_epoch = max(1, len(loader.plan(0)) // cfg.grad_accum)
    max_steps = loop.total_steps(cfg, steps_per_epoch)
    start = loop.restore(s, t, loader)
    n_params, n_train = loop.trained_params(model)
    loop.announce(s, *notes, f"{n_params / 1e6:.2f}M params, {n_train / 1e6:.3f}M trained "
                             f"({'LoRA' if s.lora else 'full'}); {len(train)} train / {len(val)} val conversations; "
                             f"{cfg.mode} at {loader.efficiency():.0%} real tokens; {steps_per_epoch} steps/epoch, "
                             f"{max_steps} steps; {s.dtype}, {s.device}")

    metrics: dict = {}
    with loop.Reporter(s, max_steps, start) as rep:
        for step in range(start, max_steps):
            micro = [next(loader) for _ in range(cfg.grad_accum)]
            m = loop.train_step(s, t, micro, lambda mdl, b: (loop.lm_loss_sum(mdl, b), {}), loop.target_count,
                                step, max_steps)
            rep.watch(step + 1, m)
            tokens, flops = loop.step_work(micro, model.config, d.world_size)
            rep.count(sum(int(b["num_tokens"]) for b in micro) * d.world_size, tokens, flops)
            done = step + 1
            if loop.due(done, cfg.log_every, max_steps):
                metrics = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "real_tok_per_s": rep.rate(),
                           **rep.work(),
                           "epoch": loader.epoch + loader.index / max(1, len(loader.plan(loader.epoch)))}
                rep.record(done, metrics, f"loss {m['loss']:.3f}  {metrics['real_tok_per_s']:,.0f} tok/s")
            if val_batches and loop.due(done, cfg.eval_every, max_steps):
                metrics["val_loss"] = loop.evaluate_loss(t.wrapped, val_batches, s.device, s.dtype, d)
                rep.record(done, {"val_loss": metrics["val_loss"]})
                rep.print(f"step {done}: val loss {metrics['val_loss']:.4f}")
            if loop.save_due(s, done, max_steps):
                loop.save(s, t, tokenizer, done, metrics, loader, final=done == max_steps, parent=cfg.model)
            rep.advance(done)
            if loop.stop_due(s, done):
                break
    loop.finish(s)
    return metrics
