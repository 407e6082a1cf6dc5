"""`tristage ppo`: stage 3b, PPO against a reward model (run by tristage/stages/ppo.py:main)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg
from tristage.flags.base import TrainConfig
from tristage.flags.rl import RLArgs


@dataclass(kw_only=True)
class Config(RLArgs, TrainConfig):
    """PPO against a reward model (RLHF), from an SFT model."""

    model: str = arg(help="starting policy folder (the SFT model; also the reference)", positional=True)
    reward: str = arg(help="reward: a reward-model folder (tristage reward, or rm:PATH) | gold (the demo world's "
                           "scorer) | python:MODULE:FUNCTION, f(prompt, [answers]) -> [scores]")
    out: str = arg("runs/ppo", help="run folder: config.yaml, metrics.jsonl, curves.png, model/, best/, value/")
    value_model: str = arg("reward", help="value model start: reward (the reward model; the policy when the "
                                          "reward is a function) | policy | a reward-model folder")
    ppo_epochs: int = arg(4, check=">=1", help="passes over each rollout batch")
    beta: float = arg(0.05, check=">=0", help="KL coefficient: -beta * KL(policy || reference) per token, in the "
                                              "reward (not in the loss)")
    kl_target: float | None = arg(None, check=">0", help="adaptive KL: steer beta toward this KL per answer (nats)")
    kl_horizon: int = arg(10000, check=">=1", help="adaptive KL horizon (answers)")
    gamma: float = arg(1.0, check="[0, 1]", help="GAE discount")
    lam: float = arg(0.95, check="[0, 1]", help="GAE lambda")
    value_clip: float = arg(0.2, check=">0", help="value clip range around the rollout's values")
    vf_coef: float = arg(0.1, check=">=0", help="weight of the value loss")
    missing_eos_penalty: float = arg(1.0, check=">=0",
                                     help="subtracted from the score of an answer that did not end its turn")
    lr: float = arg(1e-5, check=">0", help="peak learning rate of the policy")
    value_lr: float | None = arg(None, check=">0", help="peak learning rate of the value model (default: --lr; "
                                                       "the same schedule)")
