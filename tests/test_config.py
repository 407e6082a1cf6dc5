"""Config: dataclass defaults < YAML < flags; unknown keys are errors; the CLI dispatches and explains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from tristage.cli import main as cli_main
from tristage.config import arg, parse, save_config


@dataclass
class Demo:
    """A demo command."""

    data: str = arg(positional=True, help="input file")
    steps: int = arg(10, help="how many steps")
    lr: float = arg(1e-3, help="learning rate")
    name: str | None = arg(None, help="optional name")
    fast: bool = arg(False, help="go fast")
    kind: Literal["a", "b"] = arg("a", help="which kind")
    targets: list[str] = arg(["q", "v"], help="modules")


def test_defaults_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 20\nlr: 0.5\nname: x\n")
    cfg = parse(Demo, ["in.txt", "--config", str(y), "--lr", "0.25", "--fast", "--targets", "a", "b", "--kind", "b"])
    assert (cfg.data, cfg.steps, cfg.lr, cfg.name, cfg.fast, cfg.kind, cfg.targets) == \
        ("in.txt", 20, 0.25, "x", True, "b", ["a", "b"])
    assert parse(Demo, ["in.txt", "--name", "none"]).name is None
    assert parse(Demo, ["in.txt"]).targets == ["q", "v"]


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown field 'stepz'"):
        parse(Demo, ["in.txt", "--config", str(y)])


def test_missing_positional_and_bad_type_exit(capsys):
    with pytest.raises(SystemExit):
        parse(Demo, [])
    with pytest.raises(SystemExit):
        parse(Demo, ["in.txt", "--steps", "many"])
    assert "invalid int value" in capsys.readouterr().err


def test_saved_config_round_trips(tmp_path):
    cfg = parse(Demo, ["in.txt", "--steps", "7", "--no-fast"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse(Demo, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_help_lists_every_flag_with_its_text(capsys):
    with pytest.raises(SystemExit):
        parse(Demo, ["--help"])
    text = capsys.readouterr().out
    for flag, helptext in [("--steps", "how many steps"), ("--fast", "go fast"), ("--targets", "modules"),
                           ("--config", "YAML")]:
        assert flag in text and helptext in text


def test_cli_top_level_help_and_unknown_command(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "generate" in out
    assert cli_main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    out = tmp_path / "out.jsonl"
    assert cli_main(["generate", str(tmp_path), "--input", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "Traceback" not in err and not out.exists()
