"""What several commands' flags share: the Config bases of the training stages, the Literal types of their fields,
and the --device / --dtype checks. Torch-free, like every module of tristage/flags (see its __init__ for why).

    RunConfig          every run: a folder, a seed, a device, a precision, a progress bar
    TrainConfig        + the optimizer, its schedule, the loop's cadence, resuming, parallelism (pretrain)
    FinetuneConfig     + a starting model and JSONL records (sft, reward, dpo, and the RL stages to come)
    LoRAArgs           low-rank adapters (sft, dpo)
    PairDataArgs       preference-pair data (reward, dpo)

tristage/train/loop.py, data/preference.py, train/optim.py, train/distributed.py, train/losses.py and runtime.py
re-export what they used to define here, so `loop.FinetuneConfig`, `optim.Schedule` and the like still work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tristage.config import arg

Schedule = Literal["cosine", "wsd", "constant"]  # train/optim.py's lr_at
Parallel = Literal["ddp", "fsdp"]  # train/distributed.py's wrap
LossType = Literal["sigmoid", "ipo", "simpo", "orpo"]  # train/losses.py's dpo_loss
PairLayout = Literal["packed", "shared", "rows"]  # data/preference.py's pair_collator

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # runtime.resolve_dtype maps each
_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(0|[1-9][0-9]*))?")  # what torch.device accepts of these


# ----------------------------------------------------------------------------- checks
def dtype_problem(name: str) -> str | None:
    """What is wrong with `--dtype NAME` (None when nothing): the check of every dtype field."""
    if name == "auto" or name in DTYPE_NAMES:
        return None
    return f"must be auto, float32, bfloat16 or float16 (got {name!r})"


def device_problem(name: str) -> str | None:
    """What is wrong with `--device NAME` on this machine (None when nothing): auto, cpu, cuda, cuda:N or mps, and
    the accelerator it names must be there. The check of every device field."""
    if name in ("auto", "cpu"):
        return None
    m = _DEVICE.fullmatch(name)
    if m is None:
        return f"must be auto, cpu, cuda, cuda:N or mps (got {name!r})"
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return None
    # Only torch can say whether an accelerator is there, and importing it takes about two seconds: it is imported
    # here, when a cuda or mps device is asked for (a command that will run on it imports torch anyway), so that
    # --help, a bad flag and every CPU run are checked without it.
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"is {name!r}, but CUDA is not available on this machine (use cpu or auto)"
        if index is not None and int(index) >= torch.cuda.device_count():
            return f"is {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)"
    if kind == "mps" and not torch.backends.mps.is_available():
        return f"is {name!r}, but MPS is not available on this machine (use cpu or auto)"
    return None


# ----------------------------------------------------------------------------- configuration shared by stages
@dataclass(kw_only=True)
class RunConfig:
    """What every run has: a folder, a seed, a device, a precision, a progress bar."""

    out: str = arg("runs/run", help="run folder: config.yaml, metrics.jsonl, model/")
    seed: int = arg(0, help="seed for initialisation, the data split and the data order")
    device: str = arg("auto", check=device_problem, help="auto | cpu | cuda | cuda:N")
    dtype: str = arg("auto", check=dtype_problem,
                     help="autocast dtype: auto (bf16 where native) | float32 | bfloat16 | float16")
    progress: bool = arg(True, help="show a progress bar")


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """What every training run has: the optimizer, its schedule, the loop's cadence, resuming, parallelism."""

    grad_accum: int = arg(1, check=">=1",
                          help="micro-batches per optimizer step; global batch = batch x accum x processes")
    max_steps: int | None = arg(None, check=">=1", help="optimizer steps (default: from --epochs)")
    lr: float = arg(1e-4, check=">0", help="peak learning rate")
    min_lr_ratio: float = arg(0.1, check="[0, 1]", help="final learning rate as a fraction of --lr")
    warmup_steps: int = arg(10, check=">=0", help="linear warmup steps")
    schedule: Schedule = arg("cosine", help="cosine | wsd (warmup-stable-decay) | constant")
    weight_decay: float = arg(0.0, check=">=0", help="AdamW weight decay on matrices (and embeddings)")
    beta1: float = arg(0.9, check="[0, 1)", help="AdamW beta1")
    beta2: float = arg(0.95, check="[0, 1)", help="AdamW beta2")
    grad_clip: float = arg(1.0, check=">=0", help="clip the global gradient norm to this (0: off)")
    compile: bool = arg(False, help="torch.compile the model (pays compile time up front)")
    activation_checkpointing: bool = arg(False, help="recompute activations in backward to save memory")
    parallel: Parallel = arg("ddp", help="under torchrun: ddp (replicate) or fsdp (FSDP2 fully_shard)")
    eval_every: int = arg(100, check=">=0", help="validate every N steps (and at the end); 0: only at the end")
    save_every: int = arg(500, check=">=0", help="checkpoint every N steps (and at the end)")
    log_every: int = arg(10, check=">=0", help="write metrics every N steps")
    resume: bool = arg(False, help="continue the run in --out from its last checkpoint, exactly")
    overwrite: bool = arg(False, help="start over in an --out that already holds a run (its checkpoint is replaced)")
    stop_at: int | None = arg(None, check=">=1",
                              help="checkpoint and stop after this step (split a run into jobs; then --resume)")


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """A training run that starts from a model folder and reads JSONL records (chats or preference pairs)."""

    model: str = arg(help="starting model folder (tristage checkpoint or Hugging Face Llama/Qwen/Mistral)",
                     positional=True)
    data: list[str] = arg([], help="training records: JSONL/JSON files (.gz ok)")
    val_data: list[str] = arg([], help="validation records (default: hold out --val-fraction of --data)")
    val_fraction: float = arg(0.05, check="[0, 1)",
                              help="share of --data held out for validation when --val-data is not given")
    on_error: Literal["raise", "skip"] = arg("raise", help="invalid records: stop at the first, or skip and count")
    system_prompt: str | None = arg(None, help="system message for conversations that have none")
    max_len: int | None = arg(None, check=">=1", help="longest sequence in tokens (default: the model's context, "
                                                      "max_position_embeddings)")
    epochs: float = arg(1.0, check=">0", help="passes over the training data (ignored when --max-steps is set)")


@dataclass(kw_only=True)
class LoRAArgs:
    """Low-rank adapters instead of full fine-tuning."""

    lora_rank: int = arg(0, check=">=0", help="LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = arg(32.0, check=">0", help="LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = arg(0.0, check="[0, 1)", help="dropout on the LoRA input")
    lora_targets: list[str] = arg(LORA_TARGETS, help="module names that get adapters")


PAIR_LAYOUT_HELP = ("how pairs become rows: packed = each pair's prompt once, then both answers (the rejected one "
                    "masked from the chosen one), several pairs per row up to the longest pair's length; shared = "
                    "the same with one pair per row; rows = a row per answer. All three give the same log-probs "
                    "and scores")


@dataclass(kw_only=True)
class PairDataArgs:
    """The command-line fields of a stage that trains on preference pairs (reward, dpo)."""

    data: list[str] = arg([], help="preference pairs: JSONL/JSON of prompt|messages + chosen + rejected, or the "
                                   "Anthropic HH, long-form-QA or PandaLM shapes (.gz ok)")
    val_data: list[str] = arg([], help="validation pairs (default: hold out --val-fraction of --data)")
    system_prompt: str | None = arg(None, help="system message for prompts that have none")
    layout: PairLayout = arg("packed", help=PAIR_LAYOUT_HELP)
    max_len: int | None = arg(None, help="longest prompt + answer in tokens (default: the model's context, "
                                         "max_position_embeddings); the prompt is cut from the left (counted)")
