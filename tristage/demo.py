"""The demo: the whole lifecycle on the demo world, on a laptop CPU, with no downloads.

    make demo                                  # = tristage pipeline --preset demo --out runs/demo
    tristage demo --out runs/demo              # the same, with a few settings as flags
    tristage demo --pretrain-steps 100         # shorter pre-training (a different run: later stages run again)

It is the `demo` preset of `tristage pipeline` (tristage/presets/demo.yaml): the world's data, a BPE tokenizer,
pre-training, SFT, a reward model, conservative DPO, one round of AI feedback + DPO, PPO against the reward model,
GRPO with the gold scorer as a verifier, every model scored by the gold scorer on held-out prompts, and an arena
judged by the simulated annotator; report.md / report.html in the run folder. Finished stages are skipped and an
interrupted one resumes (tristage/pipeline.py); --fresh runs everything again.
"""

from __future__ import annotations

from tristage.flags.demo import Config
from tristage.flags.pipeline import Config as PipelineConfig
from tristage.pipeline import load_spec, preset_path
from tristage.pipeline import main as pipeline_main


def pipeline_config(cfg: Config) -> PipelineConfig:
    """The `tristage pipeline --preset demo` these flags mean."""
    sets = [f"base.max_steps={cfg.pretrain_steps}", f"label.num_samples={cfg.label_samples}",
            f"ppo.max_steps={cfg.rl_steps}", f"grpo.max_steps={cfg.rl_steps}"]
    sets += [f"{s}.label_smoothing={cfg.dpo_label_smoothing}" for s in ("dpo", "dpo_round2")]
    sets.append(f"defaults.seed={cfg.seed}")
    stages = list(load_spec(preset_path("demo"))["stages"])
    return PipelineConfig(preset="demo", out=cfg.out, set=sets, rerun=stages if cfg.fresh else [],
                          dry_run=cfg.dry_run, progress=cfg.progress)


def main(cfg: Config) -> int:
    return pipeline_main(pipeline_config(cfg))
