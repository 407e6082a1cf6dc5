"""`tristage grpo`: stage 3b without a critic, GRPO / RLOO (run by tristage/stages/grpo.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.flags.base import TrainConfig
from tristage.flags.rl import RLArgs

Baseline = Literal["grpo", "grpo-unscaled", "rloo"]


@dataclass(kw_only=True)
class Config(RLArgs, TrainConfig):
    """GRPO / RLOO: critic-free RL from a reward model or any scoring function."""

    model: str = arg(help="starting policy folder (the SFT model; also the reference)", positional=True)
    reward: str = arg(help="reward: a reward-model folder (or rm:PATH) | gold (the demo world's scorer) | "
                           "python:MODULE:FUNCTION, f(prompt, [answers]) -> [scores]")
    out: str = arg("runs/grpo", help="run folder: config.yaml, metrics.jsonl, curves.png, model/, best/")
    baseline: Baseline = arg("grpo", help="grpo (group-normalised) | grpo-unscaled (Dr. GRPO) | rloo (leave-one-out,"
                                          " KL in the reward)")
    num_samples: int = arg(8, check=">=2", help="answers per prompt (the group)")
    batch_size: int = arg(8, check=">=1", help="prompts per rollout batch per process (x --num-samples answers)")
    ppo_epochs: int = arg(1, check=">=1", help="passes over each rollout batch (1 with --num-minibatches 1: one "
                                               "optimizer step, whose forward also gives the rollout's log-probs)")
    beta: float = arg(0.0, check=">=0", help="KL coefficient: grpo: beta * k3 per token in the loss; rloo: "
                                             "-beta * KL of the answer in its reward")
    loss_agg: Literal["token", "sequence"] = arg("token", help="token: mean over all answer tokens | sequence: "
                                                               "mean over answers of each answer's token mean")
    missing_eos_penalty: float = arg(0.0, check=">=0",
                                     help="subtracted from the reward of an answer that did not end its turn")
    lr: float = arg(1e-5, check=">0", help="peak learning rate")
