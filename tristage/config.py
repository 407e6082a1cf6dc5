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
- Fields shared by several commands are declared once, in a base dataclass (tristage/train/loop.py holds the
  training ones); a command that needs another default redeclares the field with `arg(default)` alone and
  inherits its help. Configs are `kw_only` so bases can have defaults and a command a required positional.
  `--help` lists a command's own flags first, then those of its bases.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tristage.io import atomic_write_text

T = TypeVar("T")


def arg(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, **kw: Any) -> Any:
    """A dataclass field with its `--help` text. Mutable defaults (lists, dicts) are copied per instance."""
    meta = {"help": help, "positional": positional}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any, optional: bool):
    def conv(s: str):
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


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (plus `--config`)."""
    p = argparse.ArgumentParser(
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
            p.add_argument(f.name, type=_converter(base, optional), help=help_, nargs="?", default=argparse.SUPPRESS)
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = f" (default: {default})" if has_default else " (required)"
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_ + shown)
        elif typing.get_origin(base) in (list, tuple):
            (elem,) = typing.get_args(base)[:1]
            p.add_argument(flag, dest=f.name, nargs="*", type=_converter(elem, False),
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
    """The YAML file's values for `cls`, checked against its fields."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of field: value at the top level")
    names = {f.name for f, _ in _fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"{path}: unknown field {key!r} for {cls.__name__} (known: {', '.join(sorted(names))})")
    return data


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for f, tp in _fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        base, optional = _unwrap_optional(tp)
        if v is None or typing.get_origin(base) in (list, tuple, dict) or base is typing.Any:
            out[f.name] = v
        elif typing.get_origin(base) is typing.Literal:
            if v not in typing.get_args(base):
                raise ValueError(f"{f.name}: {v!r} is not one of {typing.get_args(base)}")
            out[f.name] = v
        elif isinstance(base, type) and not isinstance(v, base):
            out[f.name] = _converter(base, optional)(str(v))
        else:
            out[f.name] = v
    return out


def parse(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
          description: str | None = None) -> T:
    """Build `cls` from defaults, an optional `--config` YAML, then flags."""
    parser = build_parser(cls, prog=prog, description=description)
    ns = vars(parser.parse_args(argv))
    cfg_file = ns.pop("__config__", None)
    values: dict[str, Any] = {}
    if cfg_file:
        values.update(load_yaml(cls, cfg_file))
    values.update(ns)
    missing = [f.name for f, _ in _fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        pos = {f.name for f, _ in _fields(cls) if f.metadata.get("positional")}
        parser.error("missing required: " + ", ".join(m.upper() if m in pos else "--" + m.replace("_", "-")
                                                      for m in missing))
    return cls(**_coerce(cls, values))


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
