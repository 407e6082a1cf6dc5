"""The command table: every command resolves to a Config dataclass and a main, --help explains every flag, and
neither --help nor a refused flag imports torch."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys

import pytest

from tristage.cli import COMMANDS, _resolve, main
from tristage.config import arg, field_help, validate
from tristage.io import UserError


def _targets():
    """(command, (its Config "module:Class", its main "module:function", one-line help)) for every command."""
    for name, v in COMMANDS.items():
        if isinstance(v, dict):
            yield from ((f"{name} {sub}", e) for sub, e in v.items())
        else:
            yield name, v


@pytest.mark.parametrize("name,target", list(_targets()))
def test_every_command_resolves_and_documents_its_flags(name, target, capsys):
    cfg_cls, fn = _resolve(target[0]), _resolve(target[1])
    assert dataclasses.is_dataclass(cfg_cls) and callable(fn)
    assert target[0].startswith("tristage.flags."), f"{name}: its Config belongs in tristage/flags/ (no torch)"
    # the main's module still has the Config under its old name (`dpo.Config(...)`, `tokenizer.TrainConfig(...)`)
    assert cfg_cls in vars(sys.modules[fn.__module__]).values(), f"{name}: {fn.__module__} does not import its Config"
    with pytest.raises(SystemExit) as e:
        main([*name.split(), "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(cfg_cls):  # a field redeclared for another default inherits its base's text
        assert field_help(cfg_cls, f), f"{name}: flag {f.name} has no help text"
        if not f.metadata.get("positional"):
            assert "--" + f.name.replace("_", "-") in text, f"{name}: --{f.name} missing from --help"


_NO_TORCH = """
import sys
from tristage.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print("exit", code, "torch" in sys.modules)
"""


@pytest.mark.parametrize("line", [f"{name} --help" for name, _ in _targets()] + ["dpo m --beta 0", "pretrain --lr 0"])
def test_help_and_a_refused_flag_do_not_import_torch(line):
    """--help needs only the Config (tristage/flags/), not the command's module: importing torch takes ~2 s."""
    p = subprocess.run([sys.executable, "-c", _NO_TORCH.format(argv=line.split())], capture_output=True, text=True,
                       timeout=60)
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("exit 0" if "--help" in line else "exit 2"), (last, p.stderr)
    assert last.endswith("False"), f"`tristage {line}` imported torch"


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


# ----------------------------------------------------------------------------- one error contract
def _run(argv, capsys):
    """(exit code, stderr) of `tristage ARGV` run in process; argparse's own errors arrive as SystemExit(2)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _assert_user_error(argv, named, capsys):
    code, err = _run(argv, capsys)
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err and err.count("\n") == 1, err  # one line
    assert err.startswith("tristage "), err
    for text in named if isinstance(named, tuple) else (named,):
        assert text in err, (argv, err)
    return err


# (command line, what the message must name); positional folders need not exist: flags are checked before any work
BAD_FLAGS = [
    ("tokenizer --vocab-size 0", "--vocab-size must be >= 1 (got 0)"),
    ("prepare --inputs x --tokenizer t --out o --val-fraction 1", "--val-fraction"),
    ("prepare --inputs x --tokenizer t --out o --shard-tokens 0", "--shard-tokens"),
    ("prepare --inputs x --tokenizer t --out o --workers 0", "--workers"),
    ("pretrain --lr 0", "--lr must be > 0 (got 0.0)"),
    ("pretrain --lr nan", ("--lr", "finite")),
    ("pretrain --lr inf", ("--lr", "finite")),
    ("pretrain --beta1 -0.1", "--beta1"),
    ("pretrain --beta2 1", "--beta2 must be in [0, 1) (got 1.0)"),
    ("pretrain --batch-size 0", "--batch-size"),
    ("pretrain --grad-accum 0", "--grad-accum"),
    ("pretrain --max-steps 0", "--max-steps must be >= 1"),
    ("pretrain --seq-len 0", "--seq-len"),
    ("pretrain --eval-batches 0", "--eval-batches must be >= 1"),
    ("pretrain --eval-every -1", "--eval-every"),
    ("pretrain --save-every -1", "--save-every"),
    ("pretrain --log-every -1", "--log-every"),
    ("pretrain --warmup-steps -1", "--warmup-steps"),
    ("pretrain --grad-clip -1", "--grad-clip"),
    ("pretrain --stop-at 0", "--stop-at must be >= 1"),
    ("pretrain --depth 0", "--depth"),
    ("pretrain --num-heads 3", ("--num-heads 3", "256")),
    ("pretrain --hidden-size 96 --num-heads 32", ("--num-heads", "even")),
    ("pretrain --num-heads 4 --num-kv-heads 3", "--num-kv-heads 3"),
    ("sft m --epochs 0", "--epochs must be > 0"),
    ("sft m --max-len 0", "--max-len"),
    ("sft m --tokens-per-batch 0", "--tokens-per-batch"),
    ("sft m --val-fraction 1", "--val-fraction"),
    ("sft m --max-steps 0", "--max-steps"),
    ("sft m --lora-rank -1", "--lora-rank must be >= 0"),
    ("sft m --lora-alpha 0", "--lora-alpha"),
    ("sft m --lora-dropout 1", "--lora-dropout"),
    ("reward m --margin-scale -1", "--margin-scale must be >= 0"),
    ("reward m --batch-size 0", "--batch-size"),
    ("reward m --center-coef -0.5", "--center-coef"),
    ("dpo m --beta 0", "--beta must be > 0"),
    ("dpo m --label-smoothing 0.5", "--label-smoothing must be in [0, 0.5)"),
    ("dpo m --gamma inf", "--gamma"),
    ("dpo m --lr -1e-5", "--lr"),
    ("plan --depth 4 --mfu 1.5", "--mfu must be in (0, 1]"),
    ("plan --depth 4 --num-gpus 0", "--num-gpus"),
    ("chat m --temperature -1", "--temperature must be >= 0"),
    ("chat m --top-p 0", "--top-p must be in (0, 1]"),
    ("chat m --top-p 1.5", "--top-p"),
    ("chat m --top-k -1", "--top-k"),
    ("chat m --max-new-tokens 0", "--max-new-tokens must be >= 1"),
    ("generate m --prompt hi --max-new-tokens 0", "--max-new-tokens"),
    ("generate m --prompt hi --batch-size 0", "--batch-size"),
    ("generate m --prompt hi --temperature -0.5", "--temperature"),
    ("generate m --prompt hi --dtype half", "--dtype"),
    ("generate m --prompt hi --device tpu", "--device"),
    ("score rm f.jsonl --batch-size 0", "--batch-size"),
    ("score rm f.jsonl --max-len 0", "--max-len"),
    ("ppo m --reward r --ppo-epochs 0", "--ppo-epochs must be >= 1 (got 0)"),
    ("grpo m --reward r --num-samples 1", "--num-samples must be >= 2 (got 1)"),
    ("label m --prompts p --out o --judge gold --num-samples 1", "--num-samples must be >= 2"),
    ("label m --prompts p --out o --judge gold --top-p 0", "--top-p"),
    ("label m --prompts p --out o --judge gold --max-new-tokens 0", "--max-new-tokens"),
    ("label m --prompts p --out o --judge gold --judge-batch-size 0", "--judge-batch-size"),
    ("arena m1 m2 --prompts p --judge gold --out o --temperature -1", "--temperature must be >= 0"),
    ("arena m1 m2 --prompts p --judge gold --out o --bootstrap -1", "--bootstrap"),
    ("arena m1 m2 --prompts p --judge gold --out o --anchor m1", "--anchor must be MODEL=RATING"),
    ("leaderboard b.jsonl --bootstrap -1", "--bootstrap must be >= 0 (got -1)"),
    ("leaderboard b.jsonl --anchor gpt4", "--anchor must be MODEL=RATING"),
    ("leaderboard b.jsonl --prior-sd 0", "--prior-sd must be > 0"),
    ("demo --pretrain-steps 0", "--pretrain-steps"),
    ("demo --label-samples 1", "--label-samples"),
    ("demo --dpo-label-smoothing 0.5", "--dpo-label-smoothing"),
    ("pipeline --preset nope --out r", "--preset must be one of"),
    ("report r --examples 0", "--examples must be >= 1"),
    ("world generate --out o --val-frac 2", "--val-frac"),
    ("world generate --out o --n-sft -1", "--n-sft"),
    ("pretrain --lr fast", "--lr: invalid float value: 'fast'"),  # argparse's own error, on one line
    ("world score", "FILE"),  # no file: says so
    ("export-votes votes.db", "OUT"),  # no output file: says so
    ("serve m --port 0", "--port must be in [1, 65535] (got 0)"),
    ("serve m --max-batch 0", "--max-batch must be >= 1"),
    ("serve m --log-level loud", "--log-level"),
    ("serve m --threads -1", "--threads must be >= 0"),
]


@pytest.mark.parametrize("line,named", BAD_FLAGS, ids=[c for c, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_exit_2(line, named, capsys):
    _assert_user_error(line.split(), named, capsys)


@pytest.mark.parametrize("name,target", list(_targets()))
def test_every_default_is_valid(name, target):
    cfg_cls = _resolve(target[0])
    required = {f.name: ["x"] if f.type.startswith("list") else "x" for f in dataclasses.fields(cfg_cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    validate(cfg_cls(**required))


def test_every_command_has_a_bad_flag_case():
    tested = {" ".join(line.split()[:2]) if line.startswith("world") else line.split()[0] for line, _ in BAD_FLAGS}
    assert tested == {name for name, _ in _targets()}


def test_a_yaml_value_of_the_wrong_type_names_the_file_and_key(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    for text, named in [("lr: fast\n", ("run.yaml: lr", "float", "'fast'")),
                        ("lr: 0\n", ("run.yaml: lr must be > 0",)),
                        ("tokens_per_batch: 2.5\n", ("run.yaml: tokens_per_batch", "int")),
                        ("tokens_per_batch: true\n", ("run.yaml: tokens_per_batch", "boolean")),
                        ("data: a.jsonl\n", ("run.yaml: data", "list")),
                        ("mode: zigzag\n", ("run.yaml: mode", "'zigzag'", "packed")),
                        ("lr: [1\n", ("run.yaml", "YAML")),
                        ("- lr\n", ("run.yaml", "mapping"))]:
        y.write_text(text)
        _assert_user_error(["sft", "m", "--config", str(y)], named, capsys)
    y.write_text("lr: 0\n")  # a flag given on the command line wins over the file, and is what gets checked
    _assert_user_error(["sft", "m", "--config", str(y), "--lr", "-1"], "--lr must be > 0 (got -1.0)", capsys)
    _assert_user_error(["sft", "m", "--config", str(tmp_path / "none.yaml")], ("--config", "none.yaml"), capsys)


def test_device_cuda_without_cuda_names_the_flag(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for line in ("sft m --device cuda", "pretrain --device cuda:1", "generate m --prompt hi --device cuda",
                 "score rm f.jsonl --device cuda", "chat m --device cuda"):
        _assert_user_error(line.split(), ("--device", "CUDA is not available"), capsys)


def test_help_states_each_default_once(capsys):
    for name, _ in _targets():
        with pytest.raises(SystemExit):
            main([*name.split(), "--help"])
        text = capsys.readouterr().out
        assert not re.search(r"\(default\b[^)]*\)\s*\(default", text), f"{name}: a default stated twice"
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    assert "(default: 0.1)" in capsys.readouterr().out  # defaults the text does not state are still shown


@dataclasses.dataclass
class _FakeConfig:
    """A command whose main fails as told."""

    fail: str = arg("none", help="how to fail")


def _fake_main(cfg: _FakeConfig) -> int:
    if cfg.fail == "exit":
        raise SystemExit("tristage fake: give --x (exits as a message)")
    if cfg.fail == "missing":
        open("/nonexistent/data.jsonl")
    if cfg.fail == "user":
        raise UserError("m/config.json: truncated")
    if cfg.fail == "bug":
        raise RuntimeError("an internal failure")
    return 0


def test_error_contract_user_mistakes_exit_2_internal_failures_propagate(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "fake", (f"{__name__}:_FakeConfig", f"{__name__}:_fake_main", "fails as told"))
    assert main(["fake"]) == 0
    _assert_user_error(["fake", "--fail", "exit"], "tristage fake: give --x", capsys)
    assert "tristage fake: tristage fake" not in _run(["fake", "--fail", "exit"], capsys)[1]
    _assert_user_error(["fake", "--fail", "missing"], "/nonexistent/data.jsonl: No such file", capsys)
    _assert_user_error(["fake", "--fail", "user"], "tristage fake: m/config.json: truncated", capsys)
    with pytest.raises(RuntimeError):  # not a user's mistake: its traceback, and exit 1 from the interpreter
        main(["fake", "--fail", "bug"])
