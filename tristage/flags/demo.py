"""`tristage demo`: the pipeline on the demo world (run by tristage/demo.py:main)."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg


@dataclass
class Config:
    """Run the pipeline on the demo world."""

    out: str = arg("runs/demo", help="folder for everything the demo writes")
    seed: int = arg(0, help="seed for the world and every stage")
    n_stories: int = arg(30000, check=">=1", help="pre-training stories to generate")
    vocab_size: int = arg(2048, check=">=1", help="BPE vocabulary size")
    depth: int = arg(4, check=">=1", help="model size knob (layers; width 64*depth)")
    pretrain_steps: int = arg(400, check=">=1", help="pre-training optimizer steps")
    seq_len: int = arg(256, check=">=1", help="pre-training context length")
    batch_size: int = arg(16, check=">=1", help="pre-training micro-batch")
    sft_epochs: float = arg(2.0, check=">0", help="instruction-tuning passes over the world's conversations")
    sft_lr: float = arg(1e-3, check=">0", help="instruction-tuning learning rate")
    eval_prompts: int = arg(200, check=">=1",
                            help="held-out prompts the base and SFT models answer for the gold scorer")
    rm_epochs: float = arg(1.0, check=">0", help="reward-model passes over the world's preference pairs")
    rm_lr: float = arg(3e-4, check=">0", help="reward-model learning rate")
    dpo_epochs: float = arg(1.0, check=">0", help="DPO passes over the world's preference pairs")
    dpo_lr: float = arg(3e-5, check=">0", help="DPO learning rate")
    dpo_beta: float = arg(0.1, check=">0", help="DPO beta")
    dpo_label_smoothing: float = arg(0.3, check="[0, 0.5)",
                                     help="conservative DPO: the assumed share of wrong labels (the simulated "
                                               "annotator disagrees with the gold scorer on about 1/3 of pairs)")
    label_prompts: int = arg(600, check=">=1", help="training prompts the policy answers for the AI-feedback round")
    label_samples: int = arg(4, check=">=2", help="answers per prompt in the AI-feedback round")
    fresh: bool = arg(False, help="redo every step even if its output exists")
