"""The training loop's parts, shared by every training stage: plain functions a stage calls, top to bottom.

    s = loop.start(cfg, "sft")                              # process group, precision, seed, run folder, resume state
    model = loop.load_policy(s)                             # cfg.model, or the checkpoint being resumed
    loop.add_lora(s, model)                                 # adapters when --lora-rank > 0 (new or resumed)
    t = loop.prepare(s, model)                              # DDP/FSDP, optimizer, compile
    start = loop.restore(s, t, loader)                      # optimizer, data position, RNG: exactly where it stopped
    loop.announce(s, "what this run is")                    # config.yaml, a summary line
    with loop.Reporter(s, max_steps, start) as rep:         # progress bar + metrics.jsonl
        for step in range(start, max_steps):
            m = loop.train_step(s, t, micro_batches, loss_fn, count, step, max_steps)
            ...                                             # the stage's logging and evaluation
            if loop.save_due(s, done, max_steps):
                loop.save(s, t, tokenizer, done, metrics, loader, final=done == max_steps)
            if loop.stop_due(s, done): break

Choices, and why:
- Functions, not a Trainer class: each stage's loop stays visible in its own file (what it logs, when it evaluates,
  what a batch is), and the parts no stage should write twice live here: run set-up, resume, LoRA, wrapping, the
  optimizer step, checkpoints, metrics and the progress bar. Stages share data (the Config bases RunConfig <
  TrainConfig < FinetuneConfig and LoRAArgs, defined in tristage/flags/base.py so that --help needs no torch, and
  importable from here too), not behaviour.
- `train_step` takes `loss_fn(model, batch) -> (summed loss, {name: summed statistic})` and `count(batch) -> its
  denominator` (trained tokens, or pairs). The denominator is read from the batches before any forward pass and
  summed over every micro-batch and process, so each micro-batch's backward already carries the scale
  world_size / n_global and the gradient is exactly that of the mean over the global batch, whatever the split
  into micro-batches and processes (DDP averages gradients over processes; x world_size turns that into a sum).
  Statistics come back summed over the global batch and divided by the same denominator.
- A non-finite loss or gradient norm stops the run naming the step, before the optimizer step, so no checkpoint
  is ever written from a poisoned state; `save` also refuses weights that went non-finite in the last update.
  Either is a `Diverged` error (a UserError: one line and exit 2 from the CLI, with a hint about the learning rate).
  A finite run can still diverge (a learning rate far too large): `Reporter.watch` warns in plain words when the
  loss rises far above its start or the gradients vanish while the loss stays high.
- Runs cannot be destroyed by accident: `start` refuses an --out that already holds a checkpoint unless --resume
  (continue it) or --overwrite (start over) is given, finishes a checkpoint swap that a kill interrupted
  (io.recover_folder), and names a damaged training_state.pt instead of failing inside torch.load.
- --max-len defaults to the model's own context (max_position_embeddings) and may not exceed it (`fit_max_len`),
  checked from config.json before any data is read.
- A checkpoint is a Hugging Face model folder with `training_state.pt` (optimizer, data position, RNG, step)
  inside it, written atomically; with LoRA it is the PEFT adapter folder, and the merged model is written at the
  end. Weights and optimizer state are gathered from every process first (collectives under FSDP).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tristage.config import save_config, to_dict, validate
from tristage.flags.base import (  # noqa: F401 (re-exported: the Config bases of every training stage)
    LORA_TARGETS,
    FinetuneConfig,
    LoRAArgs,
    RunConfig,
    TrainConfig,
)
from tristage.flops import flops_per_token, peak_flops
from tristage.io import UserError, check_writable, recover_folder
from tristage.model.hf import config_from_hf, is_score_config, load_model, read_hf_config, save_model
from tristage.model.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from tristage.runtime import (
    autocast,
    progress,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    to_device,
)
from tristage.tokenizer import Tokenizer
from tristage.train import distributed as dist
from tristage.train.optim import build_optimizer, lr_at, set_lr


# ----------------------------------------------------------------------------- run set-up and resume
@dataclass
class Session:
    """One training run on this process: its config, process group, precision, folders and resume state."""

    cfg: Any
    stage: str
    d: dist.Dist
    dtype: torch.dtype
    out: Path
    ckpt: Path  # the checkpoint folder: out/model, or out/adapter with LoRA
    state: dict[str, Any] | None  # training_state.pt of the checkpoint being resumed, else None
    tokens_seen: int = 0  # tokens processed so far, all processes (the Reporter counts; checkpoints keep it)

    @property
    def device(self) -> torch.device:
        return self.d.device

    @property
    def is_main(self) -> bool:
        return self.d.is_main

    @property
    def lora(self) -> bool:
        return getattr(self.cfg, "lora_rank", 0) > 0


def start(cfg: Any, stage: str) -> Session:
    """Join the process group (under torchrun), pick the precision, seed every RNG, and read the resume state."""
    validate(cfg)  # every flag in range (parse did it for the CLI; a Config built in code is checked here)
    d = dist.init(cfg.device)
    dtype = resolve_dtype(cfg.dtype, d.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    check_writable(out, folder=True, flag="--out")  # before any work: a run that cannot save is lost
    lora = getattr(cfg, "lora_rank", 0) > 0
    ckpt = out / ("adapter" if lora else "model")
    overwrite = getattr(cfg, "overwrite", False)
    if cfg.resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run, or start it over")
    if d.is_main:
        for folder in (out / "model", out / "adapter"):
            if note := recover_folder(folder):
                print(f"{stage}: {note}")
    dist.barrier(d)
    state = None
    if cfg.resume:
        state = read_training_state(ckpt, lora)
    elif not overwrite:
        held = [f for f in (out / "model", out / "adapter") if f.exists()]
        if held:
            raise UserError(f"--out {out} already holds a run ({held[0]}): continue it with --resume, start over "
                            "with --overwrite, or choose another --out")
    return Session(cfg, stage, d, dtype, out, ckpt, state, int((state or {}).get("tokens_seen", 0)))


def read_training_state(ckpt: Path, lora: bool) -> dict[str, Any]:
    """ckpt/training_state.pt; a missing or damaged one is a UserError saying what to do."""
    path = ckpt / "training_state.pt"
    if not path.is_file():
        other = ckpt.with_name("model" if lora else "adapter")
        hint = ""
        if (other / "training_state.pt").is_file():
            hint = (" (the run in this folder trained without LoRA: resume with --lora-rank 0)" if lora else
                    " (the run in this folder trained LoRA adapters: resume with its --lora-rank)")
        raise UserError(f"--resume: no checkpoint to resume in {ckpt} (no training_state.pt){hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load's errors on a truncated or foreign file vary (RuntimeError, EOFError, ...)
        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged (a truncated "
                        "copy?): start over with --overwrite") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "loader", "rng"} <= state.keys():
        raise UserError(f"{path}: not a tristage training state (expected step, optimizer, loader, rng)")
    return state


def model_config(folder: str | os.PathLike, kind: Literal["causal", "reward", "any"] = "causal") -> Any:
    """The ModelConfig of a model folder, read from its config.json before any weights or data: a missing or
    damaged folder, an unsupported architecture, or the wrong kind of model (a reward model where a language model
    is trained, or the reverse) is a UserError naming the folder."""
    hf = read_hf_config(folder)
    if kind == "causal" and is_score_config(hf):
        raise UserError(f"{folder}: a reward model ({', '.join(hf['architectures'])}), not a language model; this "
                        "stage starts from a causal LM folder (a base, SFT or DPO model)")
    if kind == "reward" and not is_score_config(hf):
        raise UserError(f"{folder}: not a reward model (architectures {hf.get('architectures')}; expected "
                        "*ForSequenceClassification)")
    return config_from_hf(hf, source=str(Path(folder) / "config.json"))


def fit_max_len(max_len: int | None, *folders: str | os.PathLike, kind: Literal["causal", "reward", "any"] = "causal",
                flag: str = "--max-len") -> int:
    """--max-len resolved against the models it feeds: None gives the smallest context (max_position_embeddings)
    of `folders`; a value above it is a UserError naming both numbers, before any work."""
    contexts = [(model_config(f, kind).max_position_embeddings, f) for f in folders]
    ctx, where = min(contexts, key=lambda c: c[0])
    if max_len is None:
        return ctx
    if max_len > ctx:
        raise UserError(f"{flag} {max_len} exceeds the context of {where}: {ctx} positions "
                        f"(max_position_embeddings); use {flag} {ctx} or less")
    return max_len


def chat_tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer of a model folder, which must carry a chat template (every stage after pre-training)."""
    if not (Path(folder) / "tokenizer.json").is_file():
        raise UserError(f"{folder}: no tokenizer (tokenizer.json); every stage after pre-training reads the model "
                        "folder's own tokenizer and chat template")
    tokenizer = Tokenizer.load(folder)
    if not tokenizer.chat_template:
        raise UserError(f"{folder}: the tokenizer has no chat_template; add one to tokenizer_config.json")
    return tokenizer


def load_policy(s: Session) -> nn.Module:
    """The causal LM to train, in fp32: the checkpoint being resumed (full fine-tuning), else cfg.model."""

    resume_full = s.state is not None and not s.lora
    return load_model(s.ckpt if resume_full else s.cfg.model, device=s.device, dtype=torch.float32)


def add_lora(s: Session, model: nn.Module) -> None:
    """With --lora-rank > 0: fresh adapters (seeded), or the resumed run's adapters; otherwise nothing."""
    if not s.lora:
        return

    if s.state is not None:
        load_adapter(model, s.ckpt, trainable=True)
    else:
        cfg = s.cfg
        torch.manual_seed(cfg.seed)
        apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                     target_modules=list(cfg.lora_targets)))


@dataclass
class Trainee:
    """A model being trained: the plain module (its parameters and checkpoints), what runs the forward pass
    (wrapped for DDP/FSDP, maybe compiled) and its optimizer."""

    model: nn.Module
    wrapped: nn.Module
    opt: torch.optim.Optimizer


def prepare(s: Session, model: nn.Module, lr_scale: Callable[[str], float] | None = None) -> Trainee:
    """Training mode, activation checkpointing, DDP/FSDP wrapping (before the optimizer: FSDP2 swaps parameters
    for DTensors), AdamW over the trainable parameters, and torch.compile if asked."""
    cfg = s.cfg
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.train()
    wrapped = dist.wrap(model, s.d, cfg.parallel)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                          **({"lr_scale": lr_scale} if lr_scale else {}))  # a factor on --lr per parameter name
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return Trainee(model, wrapped, opt)


def restore(s: Session, t: Trainee, loader: Any) -> int:
    """Put the optimizer, the data loader and the RNGs back as the checkpoint left them; the step to start at."""
    if s.state is None:
        return 0
    dist.load_optim_state(t.wrapped, t.opt, s.state["optimizer"], s.d)
    loader.load_state_dict(s.state["loader"])
    set_rng_state(s.state["rng"])
    return s.state["step"]


def total_steps(cfg: Any, steps_per_epoch: int) -> int:
    """--max-steps, or enough optimizer steps for --epochs passes (at least one)."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))


def announce(s: Session, *lines: str) -> None:
    """Create the run folder, write the resolved config.yaml, print `stage: line` for each line (main process)."""
    if s.is_main:
        s.out.mkdir(parents=True, exist_ok=True)
        save_config(s.cfg, s.out / "config.yaml")
        for line in lines:
            print(f"{s.stage}: {line}")


def step_work(micro: Sequence[dict[str, Any]], cfg: Any, world_size: int, lm_head: bool = True) -> tuple[int, float]:
    """(real tokens, training FLOPs) of one optimizer step's micro-batches on all processes (this process's times
    world_size): each batch's num_inputs at the training FLOPs per token of its row length (PaLM's convention)."""
    tokens = sum(b["num_inputs"] for b in micro)
    flops = sum(b["num_inputs"] * flops_per_token(cfg, b["input_ids"].shape[1], lm_head=lm_head) for b in micro)
    return tokens * world_size, flops * world_size


def trained_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


# ----------------------------------------------------------------------------- the optimizer step
DIVERGED_HINT = "the run diverged: is the learning rate far too large? lower --lr, or warm up longer (--warmup-steps)"


class Diverged(UserError, FloatingPointError):
    """A run whose loss, gradients or weights went NaN or inf. It is the hyperparameters' doing (a learning rate far
    too large, most often), not a bug: a user's error, so the CLI prints its one line naming the step and exits 2
    instead of showing a traceback. Still a FloatingPointError for code that catches one."""


LossFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train_step(s: Session, t: Trainee, micro: Sequence[dict[str, Any]], loss_fn: LossFn,
               count: Callable[[dict[str, Any]], float], step: int, max_steps: int) -> dict[str, float]:
    """One optimizer step over `micro` (this process's micro-batches): learning rate from the schedule, gradient
    accumulation to the global mean, clipping, a finite check naming the step, AdamW.

    Returns {"loss", each statistic of loss_fn (global sum / global count), "lr", "grad_norm", "count"}.
    """
    cfg = s.cfg
    lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    set_lr(t.opt, lr)
    n_local = torch.tensor(float(sum(count(b) for b in micro)), device=s.device)
    n_global = dist.all_reduce_sum(n_local, s.d).item()
    names: list[str] = []
    totals = torch.zeros(1, dtype=torch.float64, device=s.device)
    for i, batch in enumerate(micro):
        batch = to_device(batch, s.device)
        with dist.no_sync(t.wrapped, i == len(micro) - 1), autocast(s.device, s.dtype):
            loss_sum, stats = loss_fn(t.wrapped, batch)
            (loss_sum * (s.d.world_size / n_global)).backward()
        names = list(stats)
        vals = torch.stack([x.detach().double() for x in (loss_sum, *stats.values())])
        totals = vals if i == 0 else totals + vals
    grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in t.model.parameters() if p.requires_grad],
                                                     cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
    sums = dist.all_reduce_sum(totals, s.d).tolist()
    loss = sums[0] / max(n_global, 1)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f"{s.stage}: loss {loss} / grad norm {grad_norm} at step {step + 1}; stopping without writing "
                       f"a checkpoint from this state ({DIVERGED_HINT})")
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    return {"loss": loss, **{k: v / max(n_global, 1) for k, v in zip(names, sums[1:])}, "lr": lr,
            "grad_norm": grad_norm, "count": n_global}


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the targets that are not `ignore_index`.

    batch: input_ids [B, T]; labels [B, T] already aligned with the inputs (labels[:, t] is the token that
    should follow input_ids[:, :t+1]); optional position_ids [B, T] and attn_mask [B, 1, T, T] (packing).
    """
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=batch.get("attn_mask"))
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=ignore_index,
                           reduction="sum")


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens of a language-model batch (labels that are not -100)."""
    return int((batch["labels"] != -100).sum())


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                  dtype: torch.dtype, d: dist.Dist | None = None) -> float:
    """Mean next-token loss over all target tokens of fixed validation batches (on every process, under DDP)."""
    was = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            total[0] += lm_loss_sum(model, batch).double()
        total[1] += (batch["labels"] != -100).sum()
    if d is not None:
        dist.all_reduce_sum(total, d)
    model.train(was)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- checkpoints
def due(done: int, every: int, total: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return bool(every and done % every == 0) or done == total


def stop_due(s: Session, done: int) -> bool:
    """--stop-at reached: checkpoint and leave the loop (continue later with --resume)."""
    return s.cfg.stop_at is not None and done >= s.cfg.stop_at


def save_due(s: Session, done: int, total: int) -> bool:
    return due(done, s.cfg.save_every, total) or stop_due(s, done)


def save(s: Session, t: Trainee, tokenizer: Any, step: int, metrics: dict[str, Any], loader: Any, *, final: bool,
         parent: str | None, save_fn: Callable[..., Any] | None = None, state: dict[str, Any] | None = None,
         meta: dict[str, Any] | None = None) -> None:
    """Write the checkpoint of step `step` atomically: the model folder with training_state.pt beside the weights
    (or, with LoRA, the adapter folder, plus the merged model folder when `final`). `save_fn` writes the model
    folder (default: a causal LM's); `state` and `meta` add keys to training_state.pt and tristage.json."""

    bad = dist.all_reduce_sum(nonfinite_count(t.model, s.device), s.d).item()  # every rank, before the gathers
    if bad:
        raise Diverged(f"{s.stage}: {int(bad)} weights are NaN or inf after step {step}; stopping without writing a "
                       f"checkpoint from this state ({DIVERGED_HINT})")
    full = dist.full_state_dict(t.wrapped, s.d)  # collectives under FSDP: every rank calls both, in this order
    training_state = {"step": step, "tokens_seen": s.tokens_seen, **(state or {}),
                      "optimizer": dist.full_optim_state(t.wrapped, t.opt, s.d),
                      "loader": loader.state_dict(), "rng": rng_state()}
    if s.is_main:
        info = {"stage": s.stage, "parent": parent, "step": step, "tokens": s.tokens_seen, **(meta or {}),
                "config": to_dict(s.cfg), "metrics": metrics}
        if s.lora:

            save_adapter(t.model, s.ckpt, base_model_path=s.cfg.model, training_state=training_state)
            if final:
                save_model(merge_lora(copy.deepcopy(t.model)), s.out / "model", tokenizer, dtype=torch.float32,
                           meta=info)
        else:
            (save_fn or save_model)(t.model, s.ckpt, tokenizer, state_dict=full, dtype=torch.float32,
                                    training_state=training_state, meta=info)
    dist.barrier(s.d)


def nonfinite_count(model: nn.Module, device: torch.device) -> torch.Tensor:
    """How many of this process's parameter values are NaN or inf (its shards under FSDP), as a float tensor."""
    n = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        x = p.detach()
        x = x.to_local() if hasattr(x, "to_local") else x  # an FSDP2 DTensor: this rank's shard
        n += (~torch.isfinite(x)).sum().to(device)
    return n


def finish(s: Session) -> None:
    """Leave the process group (under torchrun)."""
    dist.shutdown(s.d)


# ----------------------------------------------------------------------------- metrics and progress
LOSS_RISE = 3.0  # a loss above LOSS_RISE x its start + 1 has diverged (every stage's losses are >= 0)
GRAD_VANISH = 1e-6  # a gradient norm below this share of the first one has vanished


def warnings(first: tuple[int, float, float], step: int, loss: float, grad_norm: float) -> list[tuple[str, str]]:
    """(kind, message) for each sign of a run going wrong at `step`, compared with `first` = (step, loss, gradient
    norm) of the first step: the loss rising far above its start (a learning rate too large), or the gradients
    vanishing while the loss stays near its start (a saturated model that will learn nothing more). Sound runs
    stay far from both: a loss that falls, or that settles, never triggers either."""
    s0, l0, g0 = first
    out = []
    if loss > LOSS_RISE * l0 + 1.0:
        out.append(("rise", f"the loss rose from {l0:.4g} at step {s0} to {loss:.4g} at step {step}: training "
                            "is diverging (is --lr far too large?); the saved model may be ruined"))
    if g0 > 0 and grad_norm < GRAD_VANISH * g0 and loss > 0.5 * l0:
        out.append(("vanish", f"the gradients vanished at step {step} (norm {grad_norm:.3g}, {g0:.3g} at step "
                              f"{s0}) while the loss is still {loss:.4g}: the model has saturated and learns "
                              "nothing more (is --lr far too large?)"))
    return out


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step, appended and flushed) + TensorBoard if installed."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop records past the checkpoint we resume from: they will be produced again
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.fh = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may not be installed

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except Exception:  # tensorboard not installed: jsonl only
            self.tb = None

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v)
                                for k, v in values.items()}}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


class Reporter:
    """A run's progress bar, metrics.jsonl and throughput meter (all quiet on processes other than the main one).

    metrics.jsonl keeps the records up to the step being resumed from and drops later ones (they are produced
    again); a fresh run starts a fresh file."""

    def __init__(self, s: Session, total: int, start: int):
        self.log = MetricsLog(s.out, enabled=s.is_main, resume_step=start if s.state is not None else None)
        self.bar = progress(s.cfg.progress and s.is_main)
        self.task = self.bar.add_task(s.stage, total=total, completed=start, info="")
        self.is_main = s.is_main
        self.s = s
        self._t, self._n, self._flops = time.perf_counter(), 0.0, 0.0
        self._mfu: float | None = None
        self._peak_flops: float | None = None
        self._first: tuple[int, float, float] | None = None  # (step, loss, grad norm) of the first step run here
        self._warned: set[str] = set()

    def __enter__(self) -> Reporter:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)
        self.log.close()

    def count(self, n: float, tokens: int = 0, flops: float = 0.0) -> None:
        """Add `n` units (tokens, pairs, answers) to the throughput meter, and the `tokens` and model `flops` of the
        work that processed them (all processes) to the run's token count and the MFU meter."""
        self._n += n
        self._flops += flops
        self.s.tokens_seen += tokens

    def rate(self) -> float:
        """Units per second since the last call (or the start); resets the meter. `work()` then gives the tokens so
        far and the MFU over the same interval."""
        if self._flops and self._peak_flops is None:  # measured once (on a CPU); its time is not the run's
            t = time.perf_counter()
            self._peak()
            self._t += time.perf_counter() - t
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        r, self._mfu = self._n / dt, (self._flops / dt / self._peak() if self._flops else None)
        self._t, self._n, self._flops = now, 0.0, 0.0
        return r

    def work(self) -> dict[str, Any]:
        """{"tokens": processed so far, "mfu": over the last `rate()` interval (when FLOPs were counted)}."""
        return {"tokens": self.s.tokens_seen, **({"mfu": self._mfu} if self._mfu is not None else {})}

    def _peak(self) -> float:
        if self._peak_flops is None:
            self._peak_flops = peak_flops(self.s.device, self.s.dtype) * self.s.d.world_size
        return self._peak_flops

    def record(self, step: int, metrics: dict[str, Any], info: str | None = None) -> None:
        """Append metrics to metrics.jsonl; `info` replaces the text beside the progress bar."""
        self.log.log(step, **metrics)
        if info is not None:
            self.bar.update(self.task, info=info)

    def print(self, text: str) -> None:
        if self.is_main:
            self.bar.console.print(text)

    def watch(self, step: int, m: dict[str, Any]) -> None:
        """Warn once per kind, in plain words, when a run goes wrong with every number still finite (`warnings`)."""
        if self._first is None:
            self._first = (step, m["loss"], m["grad_norm"])
        for kind, text in warnings(self._first, step, m["loss"], m["grad_norm"]):
            if kind not in self._warned:
                self._warned.add(kind)
                self.print(f"[bold red]warning:[/] {text}")

    def advance(self, done: int) -> None:
        self.bar.update(self.task, completed=done)
