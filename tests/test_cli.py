"""The command table: every command resolves to a Config dataclass and a main, and --help explains every flag."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys

import pytest

from tristage.cli import COMMANDS, _load, main
from tristage.config import field_help


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
    for f in dataclasses.fields(cfg_cls):  # a field redeclared for another default inherits its base's text
        assert field_help(cfg_cls, f), f"{name}: flag {f.name} has no help text"
        if not f.metadata.get("positional"):
            assert "--" + f.name.replace("_", "-") in text, f"{name}: --{f.name} missing from --help"


def test_a_reader_that_stops_early_gets_no_traceback():
    cli = [sys.executable, "-m", "tristage.cli"]
    for args in (["--help"], ["sft", "--help"]):
        shell = subprocess.run(f"{shlex.join(cli + args)} | head -1", shell=True, capture_output=True, text=True,
                               timeout=60)
        assert shell.stdout.startswith("usage: tristage") and shell.stderr == ""
        # the reader gone before the first write (deterministic, unlike `head`'s race): a quiet exit 1 or 0
        p = subprocess.Popen(cli + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.close()
        err = p.stderr.read()
        assert p.wait(timeout=60) in (0, 1) and "Traceback" not in err and "BrokenPipeError" not in err, err
