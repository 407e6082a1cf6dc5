"""`tristage <command> [flags]`: one console script, one subcommand per stage or tool.

Each command is a `(Config dataclass, main(cfg))` pair living in its own module; the CLI only turns
flags (and an optional `--config FILE.yaml`) into the dataclass and calls `main`. Modules are
imported lazily so `tristage --help` does not pay for importing torch. A reader that stops early
(`tristage --help | head -1`) ends the command quietly, as Unix tools do, instead of with a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from tristage import __version__
from tristage.config import parse
from tristage.io import DataError

# name -> (target "module:ConfigClass:function", one-line help); a dict value is a command group.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "tokenizer": ("tristage.tokenizer:TrainConfig:train_main", "train a byte-level BPE tokenizer on text files"),
    "prepare": ("tristage.data.pretrain:PrepareConfig:prepare_main", "tokenize corpora into token shards"),
    "pretrain": ("tristage.stages.pretrain:Config:main", "stage 1: pre-train a model on token shards"),
    "plan": ("tristage.plan:Config:main", "compute planner: FLOPs, time, cost, compute-optimal size"),
    "sft": ("tristage.stages.sft:Config:main", "stage 2: instruction-tune a model on chats (full or LoRA)"),
    "chat": ("tristage.serve.chat:Config:main", "chat with a model in the terminal (streaming, multi-turn)"),
    "generate": ("tristage.serve.generate:Config:main", "sample from a model: --prompt text, or JSONL in/out"),
    "demo": ("tristage.demo:Config:main", "run the pipeline on the demo world (what `make demo` runs)"),
    "reward": ("tristage.stages.reward:Config:main", "stage 3a: train a reward model on preference pairs"),
    "dpo": ("tristage.stages.dpo:Config:main", "stage 3a: DPO / IPO / cDPO / SimPO / ORPO on preference pairs"),
    "score": ("tristage.serve.score:Config:main", "score prompts + responses (or pairs) with a reward model"),
    "label": ("tristage.stages.label:Config:main", "AI feedback: sample k answers per prompt, a judge picks the pair"),
    "world": {
        "generate": ("tristage.world.cli:GenerateConfig:generate_main", "write the demo world's data for every stage"),
        "score": ("tristage.world.cli:ScoreConfig:score_main", "score prompts + responses with the gold scorer"),
    },
}


def _load(target: str):
    mod, cfg_name, fn_name = target.split(":")
    m = importlib.import_module(mod)
    return getattr(m, cfg_name), getattr(m, fn_name), m


def _usage(prefix: str, table: dict) -> str:
    lines = [f"usage: {prefix} <command> [flags]   ({prefix} <command> --help for its flags)", "", "commands:"]
    for name, v in table.items():
        if isinstance(v, dict):
            lines.append(f"  {name:<12} " + ", ".join(v) + f"  ({prefix} {name} --help)")
        else:
            lines.append(f"  {name:<12} {v[1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _dispatch(argv)
        finally:  # (also after --help's SystemExit) a closed pipe shows up here, not in the flush at exit
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away: point stdout at devnull so the interpreter's own flush at exit cannot fail again,
        # and exit 1 without a traceback (the recipe in Python's `signal` documentation)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table: dict = COMMANDS
    prefix = "tristage"
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(prefix, table))
            return 0
        if argv[0] == "--version":
            print(__version__)
            return 0
        name = argv.pop(0)
        if name not in table:
            print(f"{prefix}: unknown command {name!r}\n\n" + _usage(prefix, table), file=sys.stderr)
            return 2
        entry = table[name]
        prefix = f"{prefix} {name}"
        if isinstance(entry, dict):
            table = entry
            continue
        cfg_cls, fn, mod = _load(entry[0])
        desc = (mod.__doc__ or entry[1]).strip()
        cfg = parse(cfg_cls, argv, prog=prefix, description=desc)

        try:
            result = fn(cfg)
        except DataError as e:  # bad input: the file, line and field say it all; no traceback
            print(f"{prefix}: {e}", file=sys.stderr)
            return 2
        return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
