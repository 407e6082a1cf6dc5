"""Flags the RL stages share (`tristage ppo`, `tristage grpo`; run by tristage/stages/ppo.py and grpo.py)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg
from tristage.flags.base import Schedule


@dataclass(kw_only=True)
class RLArgs:
    """Prompts, sampling, the update's shape and the held-out monitor."""

    prompts: list[str] = arg([], help="training prompts: JSONL of {prompt: text | messages} (or {messages}, cut after "
                                      "the last user turn)")
    val_prompts: list[str] = arg([], help="held-out prompts for the monitor (default: hold out --val-fraction)")
    val_fraction: float = arg(0.05, check="[0, 1)", help="share of --prompts held out when --val-prompts is not given")
    eval_prompts: int = arg(64, check=">=1", help="held-out prompts the monitor answers (the first N)")
    gold: str | None = arg(None, help="gold scorer the monitor reports beside the reward (and picks out/best by): "
                                      "gold (the demo world) | python:MODULE:FUNCTION")
    ref_model: str | None = arg(None, help="reference model for the KL (default: the starting policy)")
    max_new_tokens: int | None = arg(None, check=">=1", help="longest answer in tokens (default: 128, or half the "
                                                              "model's context when that is less)")
    temperature: float = arg(1.0, check=">0", help="sampling temperature (also applied when log-probs are "
                                                   "recomputed)")
    batch_size: int = arg(16, check=">=1", help="prompts per rollout batch per process")
    num_minibatches: int = arg(1, check=">=1", help="optimizer steps per pass over a rollout batch")
    micro_batch_size: int | None = arg(None, check=">=1",
                                       help="answers per forward pass (default: a whole minibatch)")
    clip: float = arg(0.2, check=">0", help="PPO clip range of the probability ratio")
    max_steps: int | None = arg(None, check=">=1", help="rollout batches to train on (default: from --epochs)")
    epochs: float = arg(1.0, check=">0", help="passes over the prompts (when --max-steps is not set)")
    schedule: Schedule = arg("constant", help="cosine | wsd | constant (over optimizer steps)")
    warmup_steps: int = arg(0, check=">=0", help="linear warmup (optimizer steps)")
    eval_every: int = arg(10, check=">=0", help="run the held-out monitor every N steps (and at the end)")
    save_every: int = arg(50, check=">=0", help="checkpoint every N steps (and at the end)")
    log_every: int = arg(1, check=">=0", help="write metrics every N steps")
