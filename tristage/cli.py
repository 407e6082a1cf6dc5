"""`tristage <command> [flags]`: one console script, one subcommand per stage or tool.

Each command is a `(Config dataclass, main(cfg))` pair: the Config in tristage/flags/ (torch-free), the main in
the command's own module; the CLI only turns flags (and an optional `--config FILE.yaml`) into the dataclass and
calls `main`. Modules are imported lazily, and the main's module only to run the command, so neither
`tristage --help` nor `tristage <command> --help` (nor a flag refused by its check) pays for importing torch. A
reader that stops early (`tristage --help | head -1`) ends the command quietly, as Unix tools do, instead of with a
traceback.

One error contract for every command: a user's mistake is one line on stderr, `tristage <command>: <what>`,
naming the flag or the file (and line and field where there is one), and exit 2, never a traceback. A user's
mistake is a `tristage.io.UserError` (DataError is one), a `SystemExit("message")`, or an OSError naming a path
(a missing file, a folder where a file was expected, no permission, a full or read-only disk); the flags are
checked by `config.parse` before the command starts. Anything else is an internal failure: its traceback, exit 1.
"""

from __future__ import annotations

import ast
import errno
import importlib
import importlib.util
import os
import sys

from tristage import __version__
from tristage.config import parse
from tristage.io import UserError

# an OSError with one of these is about the user's machine (disk full, read-only), even without a file name
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# these are about the user's paths even when raised with a message only (`FileNotFoundError("no checkpoint in X")`)
_USER_OSERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

# name -> (its Config "module:Class", its main "module:function", one-line help); a dict value is a command group.
# Every Config lives in tristage/flags/, which never imports torch: --help and the flag checks need only the Config,
# and the main's module (which imports torch) is imported only to run the command (tristage/flags/__init__.py).
COMMANDS: dict[str, tuple[str, str, str] | dict[str, tuple[str, str, str]]] = {
    "tokenizer": ("tristage.flags.tokenizer:TrainConfig", "tristage.tokenizer:train_main",
                  "train a byte-level BPE tokenizer on text files"),
    "prepare": ("tristage.flags.prepare:PrepareConfig", "tristage.data.pretrain:prepare_main",
                "tokenize corpora into token shards"),
    "pretrain": ("tristage.flags.pretrain:Config", "tristage.stages.pretrain:main",
                 "stage 1: pre-train a model on token shards"),
    "plan": ("tristage.flags.plan:Config", "tristage.plan:main",
             "compute planner: FLOPs, time, cost, compute-optimal size"),
    "sft": ("tristage.flags.sft:Config", "tristage.stages.sft:main",
            "stage 2: instruction-tune a model on chats (full or LoRA)"),
    "chat": ("tristage.flags.chat:Config", "tristage.serve.chat:main",
             "chat with a model in the terminal (streaming, multi-turn)"),
    "generate": ("tristage.flags.generate:Config", "tristage.serve.generate:main",
                 "sample from a model: --prompt text, or JSONL in/out"),
    "demo": ("tristage.flags.demo:Config", "tristage.demo:main",
             "run the pipeline on the demo world (what `make demo` runs)"),
    "pipeline": ("tristage.flags.pipeline:Config", "tristage.pipeline:main",
                 "the whole lifecycle from one YAML file (or a preset), resumable, with a report"),
    "report": ("tristage.flags.report:Config", "tristage.report:main",
               "write a pipeline run's report.md / report.html from its folder"),
    "reward": ("tristage.flags.reward:Config", "tristage.stages.reward:main",
               "stage 3a: train a reward model on preference pairs"),
    "dpo": ("tristage.flags.dpo:Config", "tristage.stages.dpo:main",
            "stage 3a: DPO / IPO / cDPO / SimPO / ORPO on preference pairs"),
    "score": ("tristage.flags.score:Config", "tristage.serve.score:main",
              "score prompts + responses (or pairs) with a reward model"),
    "ppo": ("tristage.flags.ppo:Config", "tristage.stages.ppo:main",
            "stage 3b: RLHF, PPO against a reward model (value model, GAE, KL in the reward)"),
    "grpo": ("tristage.flags.grpo:Config", "tristage.stages.grpo:main",
             "stage 3b: critic-free RL, GRPO / RLOO with a reward model or any Python scorer"),
    "label": ("tristage.flags.label:Config", "tristage.stages.label:main",
              "AI feedback: sample k answers per prompt, a judge picks the pair"),
    "arena": ("tristage.flags.arena:Config", "tristage.stages.arena:main",
              "an automatic arena: models answer prompts, a judge decides every pair, a leaderboard ranks them"),
    "leaderboard": ("tristage.flags.leaderboard:Config", "tristage.eval.leaderboard:main",
                    "rank models from pairwise battles: Bradley-Terry ratings with bootstrap intervals"),
    "export-votes": ("tristage.flags.export_votes:Config", "tristage.serve.votes:export_main",
                     "the web page's votes and annotations as preference pairs (JSONL)"),
    "serve": ("tristage.flags.serve:Config", "tristage.serve.server:main",
              "serve models over an OpenAI-compatible API (continuous batching), and the web pages with --db"),
    "world": {
        "generate": ("tristage.flags.world:GenerateConfig", "tristage.world.cli:generate_main",
                     "write the demo world's data for every stage"),
        "score": ("tristage.flags.world:ScoreConfig", "tristage.world.cli:score_main",
                  "score prompts + responses with the gold scorer"),
    },
}


def _resolve(target: str):
    """The object `module:name` names (importing the module)."""
    mod, name = target.split(":")
    return getattr(importlib.import_module(mod), name)


def _description(target: str, fallback: str) -> str:
    """The docstring of the module `target` ("module:function") names, read from its source without importing it
    (importing a stage module imports torch, about two seconds, for a --help that needs only this text); the
    one-line help when it has none. Parsing the file takes milliseconds, and the text stays in one place: the
    module's own docstring, where it documents the command."""
    spec = importlib.util.find_spec(target.split(":")[0])
    doc = None
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        with open(spec.origin, encoding="utf-8") as fh:
            doc = ast.get_docstring(ast.parse(fh.read()), clean=False)
    return (doc or fallback).strip()


def _usage(prefix: str, table: dict) -> str:
    lines = [f"usage: {prefix} <command> [flags]   ({prefix} <command> --help for its flags)", "", "commands:"]
    for name, v in table.items():
        if isinstance(v, dict):
            lines.append(f"  {name:<12} " + ", ".join(v) + f"  ({prefix} {name} --help)")
        else:
            lines.append(f"  {name:<12} {v[2]}")
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
        config_target, main_target, help_ = entry
        cfg_cls, description = _resolve(config_target), _description(main_target, help_)
        try:
            cfg = parse(cfg_cls, argv, prog=prefix, description=description)  # --help ends here, without torch
            result = _resolve(main_target)(cfg)
        except SystemExit as e:
            if not isinstance(e.code, str):  # --help (0), argparse's own one-line errors (2), an exit status
                raise
            return _user_error(prefix, e.code)
        except UserError as e:  # the message names the flag, or the file, line and field
            return _user_error(prefix, str(e))
        except UnicodeDecodeError as e:  # a reader that did not locate it; the bytes' reason, at least
            return _user_error(prefix, f"input is not UTF-8 text ({e.reason} at byte {e.start})")
        except OSError as e:
            if e.filename is None and e.errno not in _USER_ERRNOS and not isinstance(e, _USER_OSERRORS):
                raise
            where = "".join(f"{n}: " for n in (e.filename, e.filename2) if n is not None)
            return _user_error(prefix, f"{where}{e.strerror or e}")
        return result if isinstance(result, int) else 0


def _user_error(prefix: str, message: str) -> int:
    """`prefix: message` on one line of stderr (a message that already starts with the prefix keeps one); exit 2."""
    message = message.removeprefix(f"{prefix}: ").strip()
    print(f"{prefix}: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
