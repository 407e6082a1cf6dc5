"""The command table: every command resolves to a Config dataclass and a main, and --help explains every flag."""

from __future__ import annotations

import dataclasses

import pytest

from tristage.cli import COMMANDS, _load, main


def _targets():
    for name, v in COMMANDS.items():
        if isinstance(v, dict):
            yield from ((f"{name} {sub}", t) for sub, (t, _) in v.items())
        else:
            yield name, v[0]


@pytest.mark.parametrize("name,target", list(_targets()))
def test_every_command_resolves_and_documents_its_flags(name, target, capsys):
    cfg_cls, fn, _ = _load(target)
    assert dataclasses.is_dataclass(cfg_cls) and callable(fn)
    with pytest.raises(SystemExit) as e:
        main([*name.split(), "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(cfg_cls):
        assert f.metadata.get("help"), f"{name}: flag {f.name} has no help text"
        if not f.metadata.get("positional"):
            assert "--" + f.name.replace("_", "-") in text, f"{name}: --{f.name} missing from --help"
