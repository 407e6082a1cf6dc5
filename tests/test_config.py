"""Config: dataclass defaults < YAML < flags; unknown keys are errors; the CLI dispatches and explains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from tristage.cli import main as cli_main
from tristage.config import arg, parse, save_config, validate
from tristage.io import UserError


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


def test_a_repeated_list_flag_adds_its_values():
    assert parse(Demo, ["in.txt", "--targets", "a", "--targets", "b", "c"]).targets == ["a", "b", "c"]
    assert parse(Demo, ["in.txt", "--targets"]).targets == []  # given empty: empty, not the default


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


@dataclass(kw_only=True)
class Base:
    """Checked fields."""

    lr: float = arg(1e-3, help="learning rate", check=">0")
    beta: float = arg(0.9, help="beta", check="[0, 1)")
    top_p: float = arg(1.0, help="nucleus mass", check="(0, 1]")
    limit: int | None = arg(None, help="at most N", check=">=1")
    even: int = arg(2, help="an even number", check=lambda v: None if v % 2 == 0 else f"must be even (got {v})")


@dataclass(kw_only=True)
class Child(Base):
    """A command redeclaring fields for other defaults (and help): the checks are inherited."""

    lr: float = arg(5e-4)
    beta: float = arg(0.5, help="another beta")
    width: int = arg(64, help="width")
    heads: int = arg(4, help="heads")

    def check_flags(self) -> None:
        if self.width % self.heads:
            raise UserError(f"--heads {self.heads} does not divide --width {self.width}")


@pytest.mark.parametrize("argv,message", [
    (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
    (["--lr=-inf"], "--lr must be a finite number > 0 (got -inf)"),
    (["--lr", "nan"], "--lr must be a finite number > 0 (got nan)"),
    (["--beta", "1"], "--beta must be in [0, 1) (got 1.0)"),
    (["--beta", "-0.01"], "--beta must be in [0, 1) (got -0.01)"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (got 0.0)"),
    (["--limit", "0"], "--limit must be >= 1 (got 0)"),
    (["--even", "3"], "--even must be even (got 3)"),
    (["--heads", "3"], "--heads 3 does not divide --width 64"),
])
def test_each_flag_is_checked_against_its_declared_range(argv, message):
    with pytest.raises(UserError) as e:
        parse(Child, argv)
    assert str(e.value) == message


def test_valid_edges_pass_and_unset_optionals_are_not_checked():
    cfg = parse(Child, ["--beta", "0", "--top-p", "1", "--limit", "1", "--lr", "1e-9"])
    assert (cfg.beta, cfg.top_p, cfg.limit, cfg.lr) == (0.0, 1.0, 1, 1e-9)
    assert parse(Child, []).limit is None
    validate(Child(lr=1))  # an int where a float is declared is a number all the same
    with pytest.raises(UserError, match="--lr must be > 0"):  # a Config built in code: validate checks it
        validate(Child(lr=0.0))
    with pytest.raises(ValueError, match="bad check"):
        arg(1, help="x", check="positive")


def test_a_yaml_value_is_named_by_its_file_and_key(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-4\nbeta: 2\n")  # PyYAML reads 1e-4 as a string: converted, as before
    with pytest.raises(UserError, match=r"c\.yaml: beta must be in \[0, 1\) \(got 2\.0\)"):
        parse(Child, ["--config", str(y)])
    assert parse(Child, ["--config", str(y), "--beta", "0.5"]).lr == 1e-4
    y.write_text("steps: ten\n")
    with pytest.raises(UserError, match=r"c\.yaml: steps: expected int, got str 'ten'"):
        parse(Demo, ["in.txt", "--config", str(y)])
    y.write_text("targets: q\n")
    with pytest.raises(UserError, match=r"c\.yaml: targets: expected a list"):
        parse(Demo, ["in.txt", "--config", str(y)])
