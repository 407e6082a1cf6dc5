"""The whole lifecycle from one YAML file, into one run folder: tokenizer, pre-training (or an imported model), SFT,
reward model, DPO, AI feedback, PPO, GRPO, evaluation and the arena, skipping what is done and resuming what was cut.

    tristage pipeline my.yaml --out runs/mine
    tristage pipeline --preset demo --out runs/demo              # what `make demo` runs
    tristage pipeline --preset text --out runs/text --set text=corpus.txt chats=chats.jsonl \\
        pairs=pairs.jsonl prompts=prompts.jsonl      # every stage on your own files
    tristage pipeline my.yaml --out runs/mine --dry-run          # what would run, resume or be skipped, and why
    tristage report runs/mine                                    # the report again, from the folder alone

The file:

    description: what this pipeline is                 (optional)
    vars:                                              (optional) values placeholders name; --set NAME=VALUE
      corpus: data/corpus.txt
    defaults:                                          (optional) given to every stage whose command has the key
      seed: 0
    stages:                                            in order; each runs after the ones above it
      tok:                                             the stage's name: its folder RUN/tok, its placeholder {tok}
        command: tokenizer                             world | tokenizer | prepare | pretrain | import | sft | reward
                                                       | dpo | label | ppo | grpo | eval | arena (default: the name)
        files: ["{corpus}"]                            the command's own keys, as in its `--config FILE.yaml`
      shards: {command: prepare, inputs: ["{corpus}"], tokenizer: "{tok}"}
      base: {command: pretrain, data: "{shards}", max_steps: 1000}
      sft: {model: "{base}/model", data: [chats.jsonl]}

Placeholders, in any string value: `{NAME}` is the folder of the stage NAME above (RUN/NAME; `{sft}/model` is its
model, `{label}/pairs.jsonl` the pairs of a label stage, `{eval}/answers/sft.jsonl` an eval stage's answers), `{run}`
the run folder, `{VAR}` a var (a list var alone as a list element is spliced into the list); `{{` and `}}` are
literal braces. The pipeline sets every stage's `out` (RUN/NAME; a label stage's RUN/NAME/pairs.jsonl) and its
resume / overwrite flags. Two commands exist only here: `import` (path: a Hugging Face model folder, linked as
RUN/NAME/model: swap it for a pretrain stage to start from an open model) and `eval` (models answer held-out prompts,
a scorer rates them: the gold scorer on the demo world, a reward model elsewhere; tristage/flags/pipeline.py).

Choices, and why:
- Placeholders rather than implicit wiring ("the previous stage's model"): each stage names the earlier folders it
  reads, so a pipeline can branch (DPO twice from different starts, an arena of any models), the file reads like
  the commands it replaces, and the dependencies are known before anything runs.
- A stage's keys are its command's --config keys, checked by the same code (tristage.config: types, ranges,
  cross-field checks), so settings move between a pipeline and a single command unchanged.
- Everything is checked before the first stage runs: the file's keys, commands, every value, placeholders naming no
  stage above, data files and model folders that do not exist. One line names the file, the stage and the key.
- Done markers with fingerprints, not the existence of an output: RUN/.pipeline/NAME.json holds a hash of the stage's
  resolved settings (paths inside the run written {run}/..., so a run folder can be moved), of the content of every
  file or folder it reads from outside the run, and of the fingerprints of the stages it reads from. A stage whose
  fingerprint matches is skipped; one whose settings or data changed runs again, and so does every stage reading
  from it (their fingerprints contain its). tristage's own code is not in the fingerprint: `--rerun NAME` runs a
  stage (and what reads from it) again.
- An interrupted stage resumes exactly: the training stages (pretrain, sft, reward, dpo, ppo, grpo) from their last
  checkpoint through their own --resume (their save_every bounds what a kill loses), the arena from its saved answers
  and battles; world, tokenizer, prepare, label, import and eval start over (they write their output at the end).
- Stages run in this process one after the other (no interpreter or torch start-up per stage). Each one's wall
  time and peak memory go into its stage.json for the report: the resident set's peak, reset per stage through
  /proc/self/clear_refs (Linux; elsewhere the process's peak so far) after what earlier stages freed is handed back
  (gc, malloc_trim), with the resident set at the stage's start beside it (what is still held from before: the
  stage's own growth is the difference), and on CUDA the peak allocation. The run
  folder also keeps pipeline.yaml (the file as run, after --set), pipeline.json (the stages in order) and
  environment.json (hardware, versions, seed): `tristage report RUN` needs nothing else.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import difflib
import gc
import glob
import hashlib
import importlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tristage.cli import COMMANDS
from tristage.config import _coerce, to_dict, validate
from tristage.flags.pipeline import Config, EvalConfig, ImportConfig
from tristage.io import UserError, atomic_write_text, check_writable, write_json

# command -> (its Config "module:Class", its main "module:function"): the stage commands' own, and this module's two
KINDS: dict[str, tuple[str, str]] = {
    "world": COMMANDS["world"]["generate"][:2],  # type: ignore[index]
    **{c: COMMANDS[c][:2] for c in ("tokenizer", "prepare", "pretrain")},  # type: ignore[misc]
    "import": ("tristage.flags.pipeline:ImportConfig", "tristage.pipeline:import_main"),
    **{c: COMMANDS[c][:2] for c in ("sft", "reward", "dpo", "label", "ppo", "grpo")},  # type: ignore[misc]
    "eval": ("tristage.flags.pipeline:EvalConfig", "tristage.pipeline:eval_main"),
    "arena": COMMANDS["arena"][:2],  # type: ignore[misc]
}
TRAINING = {"pretrain", "sft", "reward", "dpo", "ppo", "grpo"}  # resume from their checkpoint
MANAGED = ("out", "resume", "overwrite", "stop_at")  # set by the pipeline, never in the file
NOT_SETTINGS = (*MANAGED, "progress", "quiet")  # what does not change a stage's result: not in its fingerprint
# the keys whose values name files or folders (checked to exist, hashed into the fingerprint)
PATH_KEYS = {"data", "val_data", "prompts", "val_prompts", "files", "inputs", "model", "models", "init_from",
             "ref_model", "tokenizer", "reward", "value_model", "judge", "judge_prompt", "gold", "path",
             "reward_models", "pairs", "scorer"}
NOT_PATHS = {"gold", "world", "reward", "policy"}  # values of those keys that name no file
PRODUCT = {"world": "summary.json", "tokenizer": "tokenizer.json", "prepare": "meta.json", "label": "pairs.jsonl",
           "eval": "results.json", "arena": "summary.json"}  # else model/config.json: a finished stage's output
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
TOP_KEYS = ("description", "vars", "defaults", "stages")


@dataclass
class Stage:
    """One stage of a planned pipeline: its command's Config, resolved, and what it reads from."""

    name: str
    command: str
    cfg: Any
    deps: list[str]  # the stages above whose folders it reads
    fingerprint: str
    folder: Path

    @property
    def product(self) -> Path:
        return self.folder / PRODUCT.get(self.command, "model/config.json")


# ----------------------------------------------------------------------------- reading and checking the file
def preset_path(name: str) -> Path:
    return Path(str(resources.files("tristage.presets").joinpath(f"{name}.yaml")))


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The pipeline file as a mapping, its top-level keys checked."""
    try:
        with open(path, encoding="utf-8") as fh:
            spec = yaml.safe_load(fh) or {}
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with {', '.join(TOP_KEYS)}")
    for key in spec:
        if key not in TOP_KEYS:
            raise UserError(f"{path}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    for key in ("vars", "defaults", "stages"):
        if not isinstance(spec.get(key) or {}, dict):
            raise UserError(f"{path}: {key}: expected a mapping, got {type(spec[key]).__name__}")
    if not spec.get("stages"):
        raise UserError(f"{path}: stages: no stages")
    return spec


def apply_sets(spec: dict[str, Any], sets: list[str], where: str) -> None:
    """--set NAME=VALUE (a var), --set STAGE.KEY=VALUE (a stage's setting) and --set defaults.KEY=VALUE, VALUE read
    as YAML."""
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item}: expected NAME=VALUE or STAGE.KEY=VALUE")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:  # not YAML ("{sft}/model"): the text itself
            value = text
        if isinstance(value, dict) and text.lstrip().startswith("{"):  # {sft} read as a one-key mapping
            value = text
        stage, dot, field = key.partition(".")
        if stage == "defaults" and dot:
            spec["defaults"] = {**(spec.get("defaults") or {}), field: value}
        elif dot:
            stages = spec["stages"]
            if stage not in stages:
                raise UserError(f"--set {item}: {where} has no stage {stage!r} (stages: {', '.join(stages)})")
            stages[stage] = {**(stages[stage] or {}), field: value}
        else:
            spec.setdefault("vars", {})
            spec["vars"] = {**(spec["vars"] or {}), key: value}


def _suggest(word: str, known: list[str]) -> str:
    near = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def expand(value: Any, names: dict[str, Any], used: set[str], where: str) -> Any:
    """`value` with its placeholders replaced from `names` (stage folders, {run}, vars); the names used go into
    `used`. A list var alone as a list element is spliced into the list."""
    if isinstance(value, list):
        out: list[Any] = []
        for v in value:
            m = PLACEHOLDER.fullmatch(v) if isinstance(v, str) else None
            if m and m.group(1) and isinstance(names.get(m.group(1)), list):
                used.add(m.group(1))
                out += [expand(x, names, used, where) for x in names[m.group(1)]]
            else:
                out.append(expand(v, names, used, where))
        return out
    if isinstance(value, dict):
        return {k: expand(v, names, used, where) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        name = m.group(1)
        if name not in names:
            raise UserError(f"{where}: {{{name}}} names no stage above, var or {{run}}{_suggest(name, list(names))} "
                            f"(known here: {', '.join(names)})")
        used.add(name)
        v = names[name]
        if isinstance(v, (list, dict)):
            raise UserError(f"{where}: {{{name}}} is a list; use it alone as an element of a list")
        return str(v)

    return PLACEHOLDER.sub(sub, value)


def named_paths(key: str, value: Any) -> list[str]:
    """The files or folders a setting names: its paths, the PATH of rm:PATH / llm:PATH and NAME=PATH, the FILE of
    judge_prompt FILE:NAME; nothing for gold, world, python:... and the value model's reward / policy."""
    if key not in PATH_KEYS:
        return []
    out = []
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, str) or not v or v in NOT_PATHS or v.startswith("python:"):
            continue
        if key in ("models", "reward_models") and "=" in v and not Path(v).exists():
            v = v.split("=", 1)[1]
        kind, sep, rest = v.partition(":")
        if sep and kind in ("rm", "llm"):
            v = rest
        if key == "judge_prompt" and ":" in v and not Path(v).exists():
            v = v.rsplit(":", 1)[0]
        out.append(v)
    return out


def stage_out(command: str, folder: Path) -> str:
    return str(folder / "pairs.jsonl") if command == "label" else str(folder)


def build_stage(name: str, raw: Any, defaults: dict[str, Any], names: dict[str, Any], run: Path, where: str,
                fingerprints: dict[str, str]) -> Stage:
    """One stage's Config from its mapping in the file: every key, value, placeholder and named file checked."""
    at = f"{where}: stage {name}"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{at}: expected a mapping of the command's keys, got {type(raw).__name__}")
    raw = dict(raw)
    command = raw.pop("command", name)
    if command not in KINDS:
        raise UserError(f"{at}: command {command!r} is not a pipeline stage{_suggest(str(command), list(KINDS))} "
                        f"(stages: {', '.join(KINDS)}; `command:` defaults to the stage's name)")
    module, cls_name = KINDS[command][0].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        if key in MANAGED:
            raise UserError(f"{at}: {key} is set by the pipeline (out: RUN/{name}; an interrupted stage resumes "
                            "by itself), remove it")
        if key not in fields:
            raise UserError(f"{at}: unknown key {key!r} for tristage {command}{_suggest(key, fields)}")
    values = {k: v for k, v in defaults.items() if k in fields}
    sources = {k: f"{where}: defaults" for k in values}
    values.update(raw)
    sources.update({k: at for k in raw})
    used: set[str] = set()
    values = {k: expand(v, names, used, f"{at}: {k}") for k, v in values.items()}
    folder = run / name
    values["out"] = stage_out(command, folder)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{at}: missing {', '.join(missing)} (required by tristage {command})")
    try:
        cfg = cls(**_coerce(cls, values, sources))
        validate(cfg, sources)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{at}: {msg}") from None
    stages_used = sorted(u for u in used if u in fingerprints)
    inputs: dict[str, str] = {}
    for key in fields:
        for p in named_paths(key, getattr(cfg, key, None)):
            inside = [s for s in stages_used if _within(p, run / s)]
            if inside:
                continue  # made by a stage above: its fingerprint stands for it
            matches = sorted(glob.glob(p)) if key == "inputs" and glob.has_magic(p) else [p]
            if not matches or not all(os.path.exists(m) for m in matches):
                raise UserError(f"{at}: {key}: {p}: no such file or folder")
            for m in matches:
                inputs[_relocate(m, run)] = content_hash(Path(m))
    settings = _relocate({k: v for k, v in to_dict(cfg).items() if k not in NOT_SETTINGS}, run)
    fp = _hash(json.dumps({"command": command, "settings": settings, "inputs": inputs,
                           "stages": {s: fingerprints[s] for s in stages_used}}, sort_keys=True, default=str))
    return Stage(name, command, cfg, stages_used, fp, folder)


def _within(path: str, folder: Path) -> bool:
    p = os.path.abspath(path)
    f = os.path.abspath(folder)
    return p == f or p.startswith(f + os.sep)


def _relocate(value: Any, run: Path) -> Any:
    """Paths inside the run folder written {run}/..., in strings, lists and dicts."""
    if isinstance(value, str):
        root = str(run)
        return "{run}" if value == root else value.replace(root + os.sep, "{run}" + os.sep)  # also in sft=RUN/...
    if isinstance(value, list):
        return [_relocate(v, run) for v in value]
    if isinstance(value, dict):
        return {k: _relocate(v, run) for k, v in value.items()}
    return value


def _hash(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and contents, in sorted order)."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + content_hash(f).encode())
        return h.hexdigest()[:16]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def plan(spec: dict[str, Any], run: Path, where: str) -> list[Stage]:
    """Every stage's resolved Config and fingerprint, in order; the first problem is a UserError naming the file,
    the stage and the key, raised before anything runs."""
    variables = spec.get("vars") or {}
    unset = [k for k, v in variables.items() if v is None]
    if unset:
        raise UserError(f"{where}: vars {', '.join(unset)} not set: give them with --set "
                        + " ".join(f"{k}=..." for k in unset))
    stage_names = list(spec["stages"])
    clash = [k for k in variables if k in stage_names or k == "run"]
    if clash:
        raise UserError(f"{where}: vars: {clash[0]!r} is also a stage's name (or run); rename one")
    defaults = spec.get("defaults") or {}
    known = {f.name for c, _ in KINDS.values() for f in dataclasses.fields(_resolve(c))}
    for key in defaults:
        if key not in known or key in MANAGED:
            raise UserError(f"{where}: defaults: {key!r} is no stage command's key{_suggest(key, sorted(known))}")
    names: dict[str, Any] = {"run": str(run), **variables}
    stages: list[Stage] = []
    fingerprints: dict[str, str] = {}
    for name in stage_names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", str(name)):
            raise UserError(f"{where}: stage {name!r}: a stage's name is its folder: letters, digits, _ . -")
        s = build_stage(name, spec["stages"][name], defaults, names, run, where, fingerprints)
        stages.append(s)
        fingerprints[name] = s.fingerprint
        names[name] = str(s.folder)
    return stages


def _resolve(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- deciding and running
def marker_path(folder: Path) -> Path:
    """RUN/.pipeline/NAME.json: beside the stage's folder, not in it (a command may want its folder to itself)."""
    return folder.parent / ".pipeline" / f"{folder.name}.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(marker_path(folder).read_text())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def has_checkpoint(folder: Path) -> bool:
    return any((folder / sub / "training_state.pt").is_file() for sub in ("model", "adapter"))


def decide(stage: Stage, forced: bool) -> tuple[str, str]:
    """(skip | resume | run, why) for one stage, from its done marker."""
    m = read_marker(stage.folder)
    if forced:
        return "run", "--rerun"
    if m is None:
        return "run", "not run yet"
    same = m.get("fingerprint") == stage.fingerprint
    if m.get("status") == "done" and same:
        if not stage.product.exists():
            return "run", f"done before, but {stage.product} is gone"
        return "skip", "done"
    if m.get("status") == "running" and same:
        if stage.command in TRAINING and has_checkpoint(stage.folder):
            return "resume", "interrupted; resuming from its last checkpoint"
        if stage.command == "arena" and (stage.folder / "arena.json").exists():
            return "resume", "interrupted; keeping its answers and battles"
        return "run", "interrupted; starting over"
    return "run", "its settings or inputs changed" if m.get("status") == "done" else "interrupted with other settings"


def dependents(stages: list[Stage], roots: set[str]) -> set[str]:
    """`roots` and every stage that reads from them, directly or not."""
    out = set(roots)
    for s in stages:
        if out.intersection(s.deps):
            out.add(s.name)
    return out


def reset_peak_memory() -> dict[str, float]:
    """Start a new peak for this process's resident set and CUDA's allocations, after handing what earlier stages
    freed back to the system (gc, then glibc's malloc_trim), so the peak is this stage's as far as one process allows.
    Returns {"start_rss_mb": the resident set now} (Linux), which the stage's own growth is measured from."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss = _status_mb("VmRSS:")
    return {} if rss is None else {"start_rss_mb": rss}


def _status_mb(field: str) -> float | None:
    """A /proc/self/status field in MB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory() -> dict[str, float]:
    """{"peak_rss_mb": ..., "peak_cuda_mb": ... (on CUDA)} since the last reset."""
    out: dict[str, float] = {}
    hwm = _status_mb("VmHWM:")
    if hwm is not None:
        out["peak_rss_mb"] = hwm
    else:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin"
                                                                                   else 1024 ** 2)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of a stage main's return value (numbers, strings, lists, dicts; the rest dropped)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if depth < 6 and isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value[:200]]
    if depth < 6 and isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return None


def run_stage(stage: Stage, action: str, stop_at: int | None, progress: bool) -> bool:
    """Run (or resume) one stage in this process; True when it finished (False: stopped at --stop-at)."""
    cfg = stage.cfg
    if hasattr(cfg, "resume"):
        cfg.resume = action == "resume"
    if hasattr(cfg, "overwrite"):
        cfg.overwrite = action == "run"
    if stop_at is not None:
        cfg.stop_at = stop_at
    if hasattr(cfg, "progress"):
        cfg.progress = cfg.progress and progress
    if hasattr(cfg, "quiet"):
        cfg.quiet = cfg.quiet or not progress
    stage.folder.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    old = read_marker(stage.folder) or {}
    seconds_before = old.get("seconds", 0.0) if action == "resume" else 0.0
    marker = {"name": stage.name, "command": stage.command, "status": "running", "fingerprint": stage.fingerprint,
              "deps": stage.deps, "config": to_dict(cfg), "started": started, "seconds": seconds_before}
    write_json(marker_path(stage.folder), marker)
    marker.update(reset_peak_memory())
    t0 = time.perf_counter()
    try:
        result = _resolve(KINDS[stage.command][1])(cfg)
    except UserError as e:
        raise UserError(f"stage {stage.name}: {e}") from None
    except SystemExit as e:
        if isinstance(e.code, str):
            raise UserError(f"stage {stage.name}: {e.code}") from None
        raise
    except KeyboardInterrupt:
        print(f"pipeline: interrupted in stage {stage.name}; the same command resumes it", file=sys.stderr)
        raise
    finally:
        marker.update(seconds=seconds_before + time.perf_counter() - t0, **peak_memory())
        write_json(marker_path(stage.folder), marker)
    finished = stop_at is None
    marker.update(status="done" if finished else "running", result=_plain(result),
                  finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    write_json(marker_path(stage.folder), marker)
    return finished


def environment(seed: Any) -> dict[str, Any]:
    """Hardware and versions, for the report."""
    import torch

    from tristage import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = round(kb / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"tristage": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "memory_gb": mem, "gpus": gpus, "seed": seed,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(cfg: Config) -> int:
    validate(cfg)
    if (cfg.file is None) == (cfg.preset is None):
        raise UserError("give the pipeline's YAML FILE or --preset NAME (one of them)")
    path = preset_path(cfg.preset) if cfg.preset else Path(cfg.file)  # type: ignore[arg-type]
    where = f"preset {cfg.preset}" if cfg.preset else str(path)
    spec = load_spec(path)
    apply_sets(spec, cfg.set, where)
    run = Path(os.path.abspath(cfg.out))
    stages = plan(spec, run, where)
    by_name = {s.name: s for s in stages}
    for name in cfg.rerun:
        if name not in by_name:
            raise UserError(f"--rerun {name}: no such stage (stages: {', '.join(by_name)})")
    stop_stage, stop_step = None, None
    if cfg.stop_at:
        stop_stage, step = cfg.stop_at.rsplit(":", 1)
        stop_step = int(step)
        if stop_stage not in by_name or by_name[stop_stage].command not in TRAINING:
            raise UserError(f"--stop-at {cfg.stop_at}: {stop_stage!r} is not a training stage of this pipeline "
                            f"({', '.join(s.name for s in stages if s.command in TRAINING)})")
    forced = dependents(stages, set(cfg.rerun))
    check_writable(run, folder=True, flag="--out")
    # every stage decided before any runs (what is printed is what will happen): a stage reading from one that runs
    # again runs again too, even when its own fingerprint matches (that stage's output was gone, or --rerun)
    print(f"pipeline: {where} -> {run}")
    doomed: set[str] = set()
    actions: dict[str, tuple[str, str]] = {}
    for s in stages:
        action, why = decide(s, s.name in forced)
        if action == "skip" and doomed.intersection(s.deps):
            action, why = "run", f"{', '.join(sorted(doomed.intersection(s.deps)))} runs again"
        if action != "skip":
            doomed.add(s.name)
        actions[s.name] = action, why
        print(f"  {s.name:<12} {s.command:<9} {action:<6} {why}")
    if cfg.dry_run:
        return 0
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "pipeline.yaml", yaml.safe_dump(spec, sort_keys=False))
    write_json(run / "pipeline.json", {"source": where, "stages": [{"name": s.name, "command": s.command,
                                                                     "deps": s.deps} for s in stages]})
    if doomed or not (run / "environment.json").exists():  # the machine that ran (some of) the stages
        write_json(run / "environment.json", environment((spec.get("defaults") or {}).get("seed", 0)))
    t0 = time.perf_counter()
    for s in stages:
        action, why = actions[s.name]
        if action == "skip":
            continue
        print(f"pipeline: stage {s.name} ({s.command}): {'resuming' if action == 'resume' else 'running'} ({why})",
              flush=True)
        stop = stop_step if s.name == stop_stage else None
        if not run_stage(s, action, stop, cfg.progress):
            print(f"pipeline: stopped in stage {s.name} after step {stop} (--stop-at); the same command without "
                  "--stop-at resumes it")
            return 0
        m = read_marker(s.folder) or {}
        print(f"pipeline: stage {s.name} done in {m.get('seconds', 0):.0f} s", flush=True)
    print(f"pipeline: all {len(stages)} stages done ({time.perf_counter() - t0:.0f} s this time); run folder {run}")
    if doomed:
        env = json.loads((run / "environment.json").read_text())
        env.update(seconds=time.perf_counter() - t0,
                   load_average_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
        write_json(run / "environment.json", env)
    if cfg.report:
        from tristage.report import write_report

        md, html = write_report(run)
        print(f"pipeline: report {html} (and {md.name})")
    final = last_model(stages)
    if final is not None:
        print(f"pipeline: chat with the final model: tristage chat {final}")
    return 0


def last_model(stages: list[Stage]) -> Path | None:
    """The model folder of the last stage that trains a chat model (what a user wants to talk to)."""
    for s in reversed(stages):
        if s.command in ("sft", "dpo", "ppo", "grpo", "import", "pretrain"):
            return s.folder / "model"
    return None


# ----------------------------------------------------------------------------- the two pipeline-only commands
def import_main(cfg: ImportConfig) -> dict[str, Any]:
    """Check a Hugging Face model folder (architecture, tokenizer) and link it as OUT/model."""
    from tristage.train.loop import model_config

    src = Path(cfg.path).resolve()
    mcfg = model_config(src)  # a UserError naming the folder if it is not a supported causal LM
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"path {src}: no tokenizer.json")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "model"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise UserError(f"{link} is a folder already; the import stage links to {src} instead (move it away)")
    link.symlink_to(src, target_is_directory=True)
    info = {"path": str(src), "hidden_size": mcfg.hidden_size, "layers": mcfg.num_hidden_layers,
            "vocab_size": mcfg.vocab_size, "context": mcfg.max_position_embeddings}
    print(f"import: {src} ({mcfg.num_hidden_layers} layers x {mcfg.hidden_size}, vocab {mcfg.vocab_size}) "
          f"linked as {link}")
    return info


def _named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        p = Path(spec)
        return (p.parent.name if p.name == "model" else p.name), spec
    return name, path


def eval_main(cfg: EvalConfig) -> dict[str, Any]:
    """Each model answers the prompts (the shared engine; greedy by default); the scorer rates every answer; the
    mean per model with its 95% interval (normal approximation over prompts), the share of answers that end their
    turn, and the answers in OUT/answers/NAME.jsonl. With reward_models and pairs: each reward model's agreement
    with the gold scorer on the pairs (tristage.eval.world.reward_gold_agreement)."""
    import torch

    from tristage.data.records import check_rendering, read_prompt_file
    from tristage.eval.judges import make_judge
    from tristage.eval.world import mean_ci95, reward_gold_agreement
    from tristage.io import write_jsonl
    from tristage.rollout import load_chat_model, sample_answers
    from tristage.runtime import resolve_dtype
    from tristage.serve.engine import Engine, SamplingParams

    out = Path(cfg.out)
    rows = read_prompt_file(cfg.prompts)[:cfg.limit]
    if not rows:
        raise UserError(f"prompts {cfg.prompts}: no prompts")
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    judge = make_judge(cfg.scorer, device=device, dtype=dtype)
    if not hasattr(judge, "scores"):
        raise UserError(f"scorer {cfg.scorer}: a scorer is needed (gold, rm:PATH, python:MODULE:FUNCTION)")
    results: dict[str, Any] = {"scorer": cfg.scorer, "prompts": cfg.prompts, "n": len(rows), "models": {}}
    for spec in cfg.models:
        name, path = _named(spec)
        chat = load_chat_model(path, device, dtype, require_template=False)
        check_rendering(chat.tokenizer, rows, cfg.prompts)
        engine, tok = Engine(chat.model), chat.tokenizer
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_k=50 if cfg.temperature else 0, seed=cfg.seed, stop_ids=chat.stop_ids)
        answers: list[tuple[str, bool]] = []
        for i in range(0, len(rows), cfg.batch_size):
            for (r,) in sample_answers(engine, tok, [x.messages for x in rows[i:i + cfg.batch_size]], 1, params):
                # ended its turn: stopped on the end-of-turn token, not on end-of-text (a base model's empty answer)
                ended = r.finish_reason == "stop" and (r.tokens[-1] != tok.eos_id or len(chat.stop_ids) == 1)
                answers.append((r.text.strip(), ended))
        scores = [s[0] for s in judge.scores([r.messages for r in rows], [[a] for a, _ in answers])]
        mean, lo, hi = mean_ci95(scores)
        stop_rate = sum(e for _, e in answers) / len(answers)
        results["models"][name] = {"path": path, "mean": mean, "low": lo, "high": hi, "stop_rate": stop_rate}
        write_jsonl(out / "answers" / f"{name}.jsonl",
                    [{"prompt": r.prompt, "answer": a, "score": s, "ended": e}
                     for r, (a, e), s in zip(rows, answers, scores)])
        print(f"eval: {name}: {cfg.scorer} {mean:.3f} [{lo:.3f}, {hi:.3f}] on {len(rows)} prompts, ends its turn "
              f"{stop_rate:.0%}")
        del chat, engine
    for spec in cfg.reward_models:
        name, path = _named(spec)
        r = reward_gold_agreement(path, cfg.pairs)
        results.setdefault("reward_models", {})[name] = r
        print(f"eval: reward model {name} on {r['n']} held-out pairs: agrees with the gold scorer {r['reward']:.1%}; "
              f"the labels themselves {r['annotator']:.1%}")
    write_json(out / "results.json", results)
    return results
