"""Typed configuration: a dataclass per command, overridable from YAML and from flags.

Choices:
- One plain `@dataclass` per command; each field's `help` lives in its metadata, so `--help`
  explains every flag from the same place the code reads it (`field(default=..., metadata={"help": ...})`,
  or the `arg()` shorthand below).
- Precedence: dataclass default < `--config FILE.yaml` < command-line flags.
- Booleans take `--flag` / `--no-flag`; lists take several values (`--targets q_proj v_proj`);
  `X | None` fields accept the string `none`.
- A run folder keeps the resolved config as config.yaml (`save_config`), so a run can be repeated
  with `--config run/config.yaml`.
- Unknown YAML keys are an error naming the file and the key: a typo must not be silently ignored.
- Fields shared by several commands are declared once, in a base dataclass (tristage/flags/base.py holds the
  training ones; every command's Config lives in tristage/flags/, without torch, so --help is instant); a command
  that needs another default redeclares the field with `arg(default)` alone and inherits its help. Configs are
  `kw_only` so bases can have defaults and a command a required positional.
  `--help` lists a command's own flags first, then those of its bases.
- Every numeric flag declares its valid range beside its help (`arg(1e-4, help=..., check=">0")`; also ">=0",
  ">=1", "[0, 1)", "(0, 1]", or a function returning the problem), inherited like the help text. `parse` checks
  every field before any work, and so does `validate(cfg)`, which a main called with a Config built in code calls.
  A Config may add cross-field checks in a `check_flags(self)` method. A bad value is a `UserError` naming the
  flag (`--lr must be > 0 (got 0.0)`), or the file and key when it came from YAML; every range check also refuses
  NaN and infinity, so a finite learning rate needs no separate rule.
- A YAML value of the wrong type is a `UserError` naming the file and the key; an argparse error is one line
  (`prog: argument --lr: invalid float value: 'x' (see prog --help)`), exit 2, without the usage block.
- `--help` appends "(default: X)" only where the help text does not already say what the default is.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tristage.io import UserError, atomic_write_text

T = TypeVar("T")
Check = str | Callable[[Any], str | None]
_BOUND = re.compile(r"(>=|>)\s*(-?[0-9.]+(?:e-?[0-9]+)?)")
_INTERVAL = re.compile(r"([\[(])\s*(-?[0-9.]+)\s*,\s*(-?[0-9.]+)\s*([\])])")


def arg(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, check: Check | None = None,
        **kw: Any) -> Any:
    """A dataclass field with its `--help` text and, for a number, its valid range `check`: ">0", ">=0", ">=1",
    an interval "[0, 1)" / "(0, 1]" / "[0, 0.5)", "finite", or a function of the value returning what is wrong with it
    (a phrase that follows the flag's name, e.g. "must be even (got 3)") or None. Mutable defaults (lists, dicts)
    are copied per instance."""
    meta = {"help": help, "positional": positional}
    if check is not None:
        meta["check"] = _range_check(check) if isinstance(check, str) else check
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _range_check(spec: str) -> Callable[[Any], str | None]:
    """The check function of a range spec (">0", ">=1", "[0, 1)", "(0, 1]", "finite"); a bad spec fails at
    import."""
    if spec == "finite":
        ok, rule = (lambda v: True), "(any finite value)"
    elif m := _BOUND.fullmatch(spec.strip()):
        op, lo = m.group(1), float(m.group(2))
        ok = (lambda v: v >= lo) if op == ">=" else (lambda v: v > lo)
        rule = f"{op} {m.group(2)}"
    elif m := _INTERVAL.fullmatch(spec.strip()):
        left, lo, hi, right = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)

        def ok(v: float) -> bool:
            return (v >= lo if left == "[" else v > lo) and (v <= hi if right == "]" else v < hi)

        rule = f"in {left}{m.group(2)}, {m.group(3)}{right}"
    else:
        raise ValueError(f"bad check {spec!r}: expected '>X', '>=X' or an interval like '[0, 1)'")

    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number {rule} (got {v!r})"
        if not math.isfinite(v):
            return f"must be a finite number{'' if spec == 'finite' else ' ' + rule} (got {v!r})"
        return None if ok(v) else f"must be {rule} (got {v!r})"

    return check


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any, optional: bool):
    def conv(s: str):
        if s is argparse.SUPPRESS:  # an absent positional: argparse converts its default too (Path would keep it)
            return s
        if optional and isinstance(s, str) and s.lower() in ("none", "null"):
            return None
        if tp is bool:
            if isinstance(s, bool):
                return s
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")
        if tp is Path:
            return Path(s)
        return tp(s)

    conv.__name__ = getattr(tp, "__name__", str(tp))
    return conv


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _declared_in(cls: type, name: str) -> int:
    """MRO index of the most basic class that declares field `name` (0 = `cls` itself)."""
    mro = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    return max(i for i, c in enumerate(mro) if name in c.__dict__.get("__annotations__", {}))


def field_help(cls: type, f: dataclasses.Field) -> str:
    """A field's help text; a field redeclared only to change its default inherits its base's text."""
    if f.metadata.get("help"):
        return f.metadata["help"]
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            for g in dataclasses.fields(base):
                if g.name == f.name and g.metadata.get("help"):
                    return g.metadata["help"]
    return ""


def field_check(cls: type, f: dataclasses.Field) -> Callable[[Any], str | None] | None:
    """A field's check; a field redeclared without one (to change its default or help) inherits its base's."""
    for c in cls.__mro__:
        if dataclasses.is_dataclass(c):
            for g in dataclasses.fields(c):
                if g.name == f.name and g.metadata.get("check"):
                    return g.metadata["check"]
    return None


def flag_name(f: dataclasses.Field) -> str:
    """How the user spells a field: `--max-len`, or `MODEL` for a positional."""
    return f.name.upper() if f.metadata.get("positional") else "--" + f.name.replace("_", "-")


def validate(cfg: Any, sources: Mapping[str, str | os.PathLike] | None = None) -> None:
    """Check every field of a Config against its declared range, then the Config's own cross-field
    `check_flags()` if it has one; the first problem is a UserError naming the flag (`--lr must be > 0 (got 0.0)`),
    or `FILE: key ...` for a field whose value came from the YAML file `sources[name]`. None (an optional flag
    left unset) is always valid."""
    cls = type(cfg)
    sources = sources or {}
    for f, _ in _fields(cls):
        check = field_check(cls, f)
        value = getattr(cfg, f.name)
        if check is None or value is None:
            continue
        if problem := check(value):
            where = f"{sources[f.name]}: {f.name}" if f.name in sources else flag_name(f)
            raise UserError(f"{where} {problem}")
    if callable(cross := getattr(cfg, "check_flags", None)):
        cross()


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit 2), without the usage block: the flag and the fix are what
    matter, and `--help` is one command away."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _shown_default(help_: str, has_default: bool, default: Any) -> str:
    """" (default: X)" after the help text, unless the text already says what the default is."""
    if not has_default:
        return " (required)"
    return "" if re.search(r"\(default\b", help_) else f" (default: {default})"


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (plus `--config`)."""
    p = _Parser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f, tp in sorted(_fields(cls), key=lambda ft: _declared_in(cls, ft[0].name)):
        base, optional = _unwrap_optional(tp)
        help_ = field_help(cls, f)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if f.metadata.get("positional"):
            # always optional for argparse: a YAML file may supply it; `parse` checks it is given somewhere
            if typing.get_origin(base) in (list, tuple):  # MODEL...: any number of values
                (elem,) = typing.get_args(base)[:1]
                p.add_argument(f.name, type=_converter(elem, False), help=help_, nargs="*", default=argparse.SUPPRESS)
            else:
                p.add_argument(f.name, type=_converter(base, optional), help=help_, nargs="?",
                               default=argparse.SUPPRESS)
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = _shown_default(help_, has_default, default)
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_ + shown)
        elif typing.get_origin(base) in (list, tuple):
            (elem,) = typing.get_args(base)[:1]
            # extend: `--data a --data b` is [a, b], as `--data a b` is (a repeated flag is never dropped)
            p.add_argument(flag, dest=f.name, nargs="*", action="extend", type=_converter(elem, False),
                           default=argparse.SUPPRESS, help=help_ + shown)
        elif typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            p.add_argument(flag, dest=f.name, choices=choices, default=argparse.SUPPRESS, help=help_ + shown)
        else:
            p.add_argument(flag, dest=f.name, type=_converter(base, optional), default=argparse.SUPPRESS,
                           metavar=getattr(base, "__name__", "X").upper(), help=help_ + shown)
    p.add_argument("--config", dest="__config__", metavar="FILE.yaml", default=None,
                   help="read defaults from this YAML file; flags given here override it")
    return p


def load_yaml(cls: type[T], path: str | os.PathLike) -> dict[str, Any]:
    """The YAML file's values for `cls`, checked against its fields (a UserError names the file and the key)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else f"{path}"
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of field: value at the top level")
    names = {f.name for f, _ in _fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"{path}: unknown field {key!r} for {cls.__name__} (known: {', '.join(sorted(names))})")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(cls: type, values: dict[str, Any], sources: Mapping[str, str | os.PathLike] | None = None
            ) -> dict[str, Any]:
    """Values converted to their fields' types; a value that does not fit (from YAML: flags are converted by
    argparse) is a UserError naming the file and the key."""
    sources = sources or {}
    out = {}
    for f, tp in _fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        base, optional = _unwrap_optional(tp)
        where = f"{sources[f.name]}: {f.name}" if f.name in sources else flag_name(f)
        if v is None:
            if not optional and f.name in sources:
                raise UserError(f"{where}: a value is needed (got null)")
            out[f.name] = v
        elif typing.get_origin(base) in (list, tuple):
            if not isinstance(v, (list, tuple)):
                raise UserError(f"{where}: expected a list, got {type(v).__name__} {v!r}")
            out[f.name] = v
        elif typing.get_origin(base) is dict or base is typing.Any:
            out[f.name] = v
        elif typing.get_origin(base) is typing.Literal:
            if v not in typing.get_args(base):
                raise UserError(f"{where}: {v!r} is not one of {', '.join(map(str, typing.get_args(base)))}")
            out[f.name] = v
        elif isinstance(v, bool) and base is not bool:
            raise UserError(f"{where}: expected {_type_name(base)}, got a boolean ({v!r})")
        elif isinstance(base, type) and not isinstance(v, base):
            # from YAML: a scalar read as another type (PyYAML reads 1e-4 as a string, 5 for a str field as int)
            try:
                if isinstance(v, (list, dict)) or (base is int and isinstance(v, float)):
                    raise ValueError
                out[f.name] = _converter(base, optional)(str(v))
            except (ValueError, argparse.ArgumentTypeError):
                raise UserError(f"{where}: expected {_type_name(base)}, got {type(v).__name__} {v!r}") from None
        else:
            out[f.name] = v
    return out


def parse(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
          description: str | None = None) -> T:
    """Build `cls` from defaults, an optional `--config` YAML, then flags, and `validate` it: a bad value is a
    UserError naming the flag (or the file and key), raised before the command does any work."""
    parser = build_parser(cls, prog=prog, description=description)
    ns = vars(parser.parse_args(argv))
    cfg_file = ns.pop("__config__", None)
    values: dict[str, Any] = {}
    if cfg_file:
        values.update(load_yaml(cls, cfg_file))
    sources = {k: cfg_file for k in values if k not in ns}
    values.update(ns)
    missing = [f.name for f, _ in _fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        pos = {f.name for f, _ in _fields(cls) if f.metadata.get("positional")}
        parser.error("missing required: " + ", ".join(m.upper() if m in pos else "--" + m.replace("_", "-")
                                                      for m in missing))
    cfg = cls(**_coerce(cls, values, sources))
    validate(cfg, sources)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (Paths become strings)."""

    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        return v

    return {f.name: clean(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
