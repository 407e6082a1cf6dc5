"""`tristage demo`: the demo preset of `tristage pipeline` (run by tristage/demo.py:main). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from tristage.config import arg


@dataclass
class Config:
    """Run the whole lifecycle on the demo world: `tristage pipeline --preset demo` with a few of its settings as
    flags."""

    out: str = arg("runs/demo", help="the run folder (every stage's folder, report.md, report.html)")
    seed: int = arg(0, help="seed for the world and every stage")
    pretrain_steps: int = arg(400, check=">=1", help="pre-training optimizer steps")
    dpo_label_smoothing: float = arg(0.3, check="[0, 0.5)",
                                     help="conservative DPO: the assumed share of wrong labels (the simulated "
                                          "annotator disagrees with the gold scorer on about 1/3 of pairs)")
    label_samples: int = arg(4, check=">=2", help="answers per prompt in the AI-feedback round")
    rl_steps: int = arg(12, check=">=1", help="rollout batches of PPO and of GRPO")
    fresh: bool = arg(False, help="run every stage again, even those already done")
    dry_run: bool = arg(False, help="print what would run, resume or be skipped, and stop")
    progress: bool = arg(True, help="show the stages' progress bars")
