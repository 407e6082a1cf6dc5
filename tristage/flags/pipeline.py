"""`tristage pipeline` (run by tristage/pipeline.py:main), and the two stage commands that exist only inside a
pipeline: `import` (a Hugging Face model folder as a stage) and `eval` (every model's score on held-out prompts).
Torch-free, like every module of tristage/flags."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from tristage.config import arg
from tristage.flags.base import device_problem, dtype_problem
from tristage.io import UserError


def preset_names() -> list[str]:
    """The presets shipped in tristage/presets/ (NAME.yaml)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("tristage.presets").iterdir()
                  if p.name.endswith(".yaml"))


def preset_problem(name: str) -> str | None:
    if name in preset_names():
        return None
    return f"must be one of {', '.join(preset_names())} (got {name!r})"


def stop_at_problem(spec: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_.-]+:[1-9][0-9]*", spec):
        return None
    return f"must be STAGE:STEP, e.g. pretrain:100 (got {spec!r})"


@dataclass(kw_only=True)
class Config:
    """Run the whole lifecycle from one YAML file (or a shipped preset) into one run folder."""

    file: str | None = arg(None, positional=True,
                           help="the pipeline's YAML file (stages, their data and settings; see the description)")
    preset: str | None = arg(None, check=preset_problem,
                             help="a shipped pipeline instead of FILE: demo (the demo world on a CPU) | text (your "
                                  "own files, with --set) | gpu-0.5b (an imported ~0.5B model on one GPU)")
    out: str = arg(help="the run folder: one folder per stage, pipeline.yaml, report.md / report.html")
    set: list[str] = arg([], help="NAME=VALUE sets a var of the file, STAGE.KEY=VALUE one setting of a stage, "
                                  "defaults.KEY=VALUE a default (VALUE read as YAML); several after one --set: "
                                  "--set text=a.txt sft.epochs=3")
    rerun: list[str] = arg([], help="run these stages again even when done (and every stage that reads from them)")
    stop_at: str | None = arg(None, check=stop_at_problem,
                              help="STAGE:STEP: checkpoint and stop after step STEP of that training stage, and stop "
                                   "the pipeline there (the same command again resumes it)")
    dry_run: bool = arg(False, help="check everything, print what would run, resume or be skipped and why, and stop")
    report: bool = arg(True, help="write report.md and report.html into the run folder at the end")
    progress: bool = arg(True, help="show the stages' progress bars")


@dataclass
class ImportConfig:
    """A Hugging Face model folder (Llama / Qwen2 / Qwen3 / Mistral) brought into the run as a stage."""

    path: str = arg(help="the model folder (config.json, safetensors, tokenizer.json)")
    out: str = arg("runs/import", help="the stage folder: model/ is a link to PATH (the weights are not copied)")


@dataclass
class EvalConfig:
    """Every model answers the same held-out prompts; a scorer (the demo world's gold scorer by default) rates the
    answers; the mean per model with its 95% interval."""

    models: list[str] = arg(help="NAME=PATH of each model folder to evaluate")
    prompts: str = arg(help="held-out prompts: JSONL of {prompt: text | messages} (or {messages})")
    out: str = arg("runs/eval", help="folder for results.json and answers/NAME.jsonl (an arena reads these)")
    scorer: str = arg("gold", help="gold (the demo world's scorer) | rm:PATH | python:MODULE:FUNCTION")
    limit: int | None = arg(200, check=">=1", help="use only the first N prompts")
    max_new_tokens: int = arg(160, check=">=1", help="tokens per answer at most")
    temperature: float = arg(0.0, check=">=0", help="sampling temperature (0 = greedy)")
    batch_size: int = arg(64, check=">=1", help="prompts per generation batch")
    reward_models: list[str] = arg([], help="NAME=PATH of reward models to check against the gold scorer on --pairs")
    pairs: str | None = arg(None, help="held-out preference pairs for the reward models' agreement with gold")
    seed: int = arg(0, help="seed of the answers when sampling")
    device: str = arg("cpu", check=device_problem, help="cpu, cuda, cuda:1, mps")
    dtype: str = arg("float32", check=dtype_problem, help="float32, bfloat16, float16, or auto")

    def check_flags(self) -> None:
        if self.reward_models and self.pairs is None:
            raise UserError("reward_models needs pairs (held-out preference pairs to compare them with gold on)")
