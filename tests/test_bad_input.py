"""Bad input through the real CLI: every user mistake is one clear line on stderr, exit 2, no traceback, naming the
file (and line) or the flag.

A table of cases per data-reading command (sft, reward, dpo, score, generate, label, prepare, tokenizer, world
score), then flags, damaged model folders and disks the output cannot be written to. Cases run in process through
`tristage.cli.main` (an uncaught exception is recorded as the traceback the console script would print); a few run
the console script itself for its exit status. A case marked xfail(strict) names what is still missing; when it is
fixed, the strict mark fails and must be removed.

Writing is made impossible with a path under a regular file (`file.txt/out.jsonl`): the tests may run as root,
where a read-only chmod does not stop writes.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from conftest import animal_pairs, tiny_config, write_jsonl

from tristage import cli

# ----------------------------------------------------------------------------- fixtures: models, good records

GOOD = {
    "chat": {"messages": [{"role": "user", "content": "what does the dog say?"},
                          {"role": "assistant", "content": "the dog says woof."}]},
    "pair": animal_pairs(1, 0)[0],
    "scored": {"prompt": "what does the dog say?", "response": "the dog says woof."},
    "prompt": {"prompt": "what does the dog say?"},
    "text": {"text": "the dog sat on the mat."},
}
# a record of the right shape whose field has the wrong type, and one missing what the command needs
WRONG = {"chat": {"messages": "hi"}, "pair": {"prompt": "p", "chosen": 3, "rejected": "b"},
         "scored": {"prompt": "p", "response": 3}, "prompt": {"prompt": 3}, "text": {"text": 3}}
MISSING = {"chat": {"conversation": []}, "pair": {"prompt": "p", "chosen": "a"}, "scored": {"prompt": "p"},
           "prompt": {"question": "p"}, "text": {"body": "the dog sat."}}
REFUSED = '{%- if messages[0].role == "system" %}{{ raise_exception("this model has no system role") }}{%- endif %}'


@pytest.fixture(scope="module")
def models(tiny_shards, tmp_path_factory) -> Path:
    """root/policy, root/rm, and damaged copies of them."""
    from safetensors.torch import load_file, save_file

    from tristage.model.gpt import build_model
    from tristage.model.hf import save_model
    from tristage.model.score import from_causal_lm, save_reward_model
    from tristage.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("bad_input")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(build_model(tiny_config(tok), seed=0), root / "policy", tok)
    save_reward_model(from_causal_lm(build_model(tiny_config(tok), seed=0), 1, seed=1), root / "rm", tok)
    shutil.copytree(tiny_shards / "tokenizer", root / "tok")

    def damaged(name: str, src: str = "policy") -> Path:
        shutil.copytree(root / src, root / name)
        return root / name

    (damaged("zero") / "model.safetensors").write_bytes(b"")
    st = damaged("trunc_st") / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    cfg = damaged("trunc_cfg") / "config.json"
    cfg.write_text(cfg.read_text()[:40])
    (damaged("no_tok") / "tokenizer.json").unlink()
    (damaged("no_weights") / "model.safetensors").unlink()
    tensors = load_file(root / "policy" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("layers.1.mlp.up_proj.weight")},
              damaged("no_tensor") / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((root / "policy" / "config.json").read_text())
    (damaged("shape") / "config.json").write_text(json.dumps({**c, "intermediate_size": c["intermediate_size"] + 8}))
    (damaged("arch") / "config.json").write_text(json.dumps({**c, "architectures": ["BertModel"],
                                                             "model_type": "bert"}))
    tc = json.loads((root / "policy" / "tokenizer_config.json").read_text())
    for name, src in (("refuses", "policy"), ("rm_refuses", "rm")):
        (damaged(name, src) / "tokenizer_config.json").write_text(
            json.dumps({**tc, "chat_template": REFUSED + tc["chat_template"]}))
    (root / "a_file.txt").write_text("not a folder\n")
    return root


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `tristage ARGV`, as the console script would end."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    except BaseException:  # what the console script would show
        traceback.print_exc()
        code = 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(code: int, err: str, needle: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert needle in err, f"{needle!r} not named in: {err[-2000:]}"
    assert len(err.strip().splitlines()) <= 3, err  # one clear line (a usage line may precede argparse's)


# ----------------------------------------------------------------------------- data files, per command
def bad_file(kind: str, tmp: Path, rec: str) -> tuple[Path, str]:
    """A damaged data file of `kind` for records like GOOD[rec], and what the message must name."""
    good = json.dumps(GOOD[rec]) + "\n"
    p = tmp / ("data.jsonl.gz" if kind in ("badgz", "truncgz") else "data.jsonl")
    if kind == "missing":
        return p, str(p)
    if kind == "dir":
        p.mkdir()
        return p, str(p)
    data: bytes = {
        "empty": b"",
        "blank": b"\n   \n\n",
        "badgz": b"this is not gzip data at all\n",
        "truncgz": gzip.compress((good * 400).encode())[:60],
        "latin1": good.encode() + b'{"prompt": "caf\xe9"}\n',  # latin-1, not UTF-8
        "badjson": (good + '{"prompt": "unclosed\n').encode(),
        "array": (good + "[1, 2, 3]\n").encode(),
        "wrongtype": (good + json.dumps(WRONG[rec]) + "\n").encode(),
        "missingfield": (good + json.dumps(MISSING[rec]) + "\n").encode(),
        "hugeline": (good + "{" + "x" * 3_000_000 + "\n").encode(),
    }[kind]
    p.write_bytes(data)
    line_level = kind in ("latin1", "badjson", "array", "wrongtype", "missingfield", "hugeline")
    return p, f"{p}:2" if line_level else str(p)


JSONL_KINDS = ["missing", "empty", "blank", "dir", "badgz", "truncgz", "latin1", "badjson", "array", "wrongtype",
               "missingfield", "hugeline"]

# command -> (record kind, argv builder (models, data file, tmp))
TRAIN = ["--max-steps", "1", "--no-progress", "--device", "cpu", "--max-len", "64"]
COMMANDS = {
    "sft": ("chat", lambda m, f, t: ["sft", m / "policy", "--data", f, "--out", t / "run", *TRAIN]),
    "reward": ("pair", lambda m, f, t: ["reward", m / "policy", "--data", f, "--out", t / "run", *TRAIN]),
    "dpo": ("pair", lambda m, f, t: ["dpo", m / "policy", "--data", f, "--out", t / "run", *TRAIN]),
    "score": ("scored", lambda m, f, t: ["score", m / "rm", f, "--no-progress"]),
    "generate": ("prompt", lambda m, f, t: ["generate", m / "policy", "--input", f, "--output", t / "o.jsonl",
                                            "--max-new-tokens", "2"]),
    "label": ("prompt", lambda m, f, t: ["label", m / "policy", "--prompts", f, "--out", t / "o.jsonl", "--judge",
                                         "gold", "--max-new-tokens", "2", "--no-progress"]),
    "world score": ("scored", lambda m, f, t: ["world", "score", f, "--quiet"]),
    "prepare": ("text", lambda m, f, t: ["prepare", "--inputs", f, "--tokenizer", m / "tok", "--out", t / "shards"]),
}

# (command, kind) -> what is still missing, for the cases that do not yet end cleanly
XFAIL: dict[tuple[str, str], str] = {}


def _data_cases():
    for cmd in COMMANDS:
        for kind in JSONL_KINDS:
            reason = XFAIL.get((cmd, kind))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(cmd, kind, id=f"{cmd.replace(' ', '_')}-{kind}", marks=marks)


@pytest.mark.parametrize("cmd,kind", list(_data_cases()))
def test_bad_data_file(cmd, kind, models, tmp_path, capsys):
    rec, argv = COMMANDS[cmd]
    path, needle = bad_file(kind, tmp_path, rec)
    code, _, err = run(argv(models, path, tmp_path), capsys)
    assert_clean(code, err, needle)


def test_prompts_the_template_refuses_are_located(models, tmp_path, capsys):
    """generate / score / label: a system message the chat template raises on names file:line before any work."""
    sys_user = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "what does the dog say?"}]
    rows = [GOOD["prompt"], {"prompt": sys_user}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    msgs = write_jsonl(tmp_path / "m.jsonl", [GOOD["prompt"], {"messages": sys_user}])
    scored = write_jsonl(tmp_path / "s.jsonl", [GOOD["scored"], {"prompt": sys_user, "response": "woof."}])
    for argv, needle in [
        (["generate", models / "refuses", "--input", msgs, "--output", tmp_path / "o.jsonl"], f"{msgs}:2"),
        (["score", models / "rm_refuses", scored, "--no-progress"], f"{scored}:2"),
        (["label", models / "refuses", "--prompts", prompts, "--out", tmp_path / "o.jsonl", "--judge", "gold",
          "--no-progress"], f"{prompts}:2"),
    ]:
        code, _, err = run(argv, capsys)
        assert_clean(code, err, needle)
        assert not (tmp_path / "o.jsonl").exists()


def test_a_utf8_bom_is_accepted(models, tmp_path, capsys):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD["scored"]) + "\n").encode())
    code, out, err = run(["score", models / "rm", f, "--no-progress"], capsys)
    assert code == 0 and "Traceback" not in err and "1 records" in out, err


def test_preference_stages_without_pairs_say_so(models, tmp_path, capsys):
    """No --data, or no pair left once the invalid ones are skipped: one line, exit 2 (it was a ValueError)."""
    identical = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a.", "rejected": "a."}] * 3)
    for cmd in ("dpo", "reward"):
        code, _, err = run([cmd, models / "policy", "--out", tmp_path / cmd, "--no-progress"], capsys)
        assert_clean(code, err, "no --data given")
        code, _, err = run([cmd, models / "policy", "--data", identical, "--on-error", "skip", "--out",
                            tmp_path / f"{cmd}2", "--no-progress"], capsys)
        assert_clean(code, err, f"no usable training pairs in {identical}")
        assert "skipped 3 invalid records" in err


# ----------------------------------------------------------------------------- text inputs: tokenizer, prepare
def text_file(kind: str, tmp: Path) -> tuple[Path, str]:
    good = "the dog sat on the mat.\nthe cat sat on the porch.\n"
    p = tmp / ("c.txt.gz" if kind in ("badgz", "truncgz") else "c.jsonl" if kind == "jsonl" else "c.txt")
    if kind == "missing":
        return p, str(p)
    if kind == "dir":
        p.mkdir()
        return p, str(p)
    p.write_bytes({"empty": b"", "blank": b"\n\n  \n", "badgz": b"not gzip", "latin1": good.encode() + b"caf\xe9\n",
                   "truncgz": gzip.compress(good.encode() * 200)[:50], "binary": bytes(range(256)) * 20,
                   "jsonl": b'{"text": 3}\n', "utf16": good.encode("utf-16")}[kind])
    return p, f"{p}:3" if kind == "latin1" else str(p)


TEXT_KINDS = ["missing", "empty", "blank", "dir", "badgz", "truncgz", "latin1", "binary", "jsonl", "utf16"]
TEXT_COMMANDS = {
    "tokenizer": lambda m, f, t: ["tokenizer", "--files", f, "--out", t / "tok", "--kind", "char"],
    "prepare": lambda m, f, t: ["prepare", "--inputs", f, "--tokenizer", m / "tok", "--out", t / "shards"],
}
TEXT_XFAIL: dict[tuple[str, str], str] = {}


def _text_cases():
    for cmd in TEXT_COMMANDS:
        for kind in TEXT_KINDS:
            reason = TEXT_XFAIL.get((cmd, kind))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(cmd, kind, id=f"{cmd}-text-{kind}", marks=marks)


@pytest.mark.parametrize("cmd,kind", list(_text_cases()))
def test_bad_text_file(cmd, kind, models, tmp_path, capsys):
    path, needle = text_file(kind, tmp_path)
    code, _, err = run(TEXT_COMMANDS[cmd](models, path, tmp_path), capsys)
    assert_clean(code, err, needle)


# ----------------------------------------------------------------------------- flags and YAML
def _flag_cases():
    good_chat = "{data}/chat.jsonl"
    sft = ["sft", "{m}/policy", "--data", good_chat, "--out", "{t}/run", "--no-progress"]
    dpo = ["dpo", "{m}/policy", "--data", "{data}/pair.jsonl", "--out", "{t}/run", "--no-progress"]
    reward = ["reward", "{m}/policy", "--data", "{data}/pair.jsonl", "--out", "{t}/run", "--no-progress"]
    gen = ["generate", "{m}/policy", "--prompt", "hi"]
    pre = ["pretrain", "--data", "{shards}", "--out", "{t}/run", "--no-progress", "--max-steps", "1"]
    cases = [
        (sft + ["--lr", "0"], "--lr"), (sft + ["--lr", "nan"], "--lr"), (sft + ["--lr", "-1e-4"], "--lr"),
        (sft + ["--beta2", "1.0"], "--beta2"), (sft + ["--max-steps", "0"], "--max-steps"),
        (sft + ["--lora-rank", "-1"], "--lora-rank"), (sft + ["--grad-accum", "0"], "--grad-accum"),
        (sft + ["--stop-at", "0"], "--stop-at"), (sft + ["--tokens-per-batch", "0"], "--tokens-per-batch"),
        (sft + ["--max-len", "100000"], "--max-len"), (sft + ["--lr", "abc"], "--lr"),
        (sft + ["--device", "cuda:7"], "--device"), (sft + ["--val-fraction", "1.5"], "--val-fraction"),
        (dpo + ["--beta", "0"], "--beta"), (dpo + ["--batch-size", "0"], "--batch-size"),
        (reward + ["--margin-scale", "-1"], "--margin-scale"),
        (gen + ["--temperature", "-1"], "--temperature"), (gen + ["--top-p", "0"], "--top-p"),
        (gen + ["--top-p", "1.5"], "--top-p"), (gen + ["--max-new-tokens", "0"], "--max-new-tokens"),
        (gen + ["--batch-size", "0"], "--batch-size"),
        (["generate", "{m}/policy"], "--prompt"),
        (["generate", "{m}/policy", "--input", "{data}/prompt.jsonl"], "--output"),
        (["score", "{m}/rm", "{data}/scored.jsonl", "--batch-size", "0"], "--batch-size"),
        (["label", "{m}/policy", "--prompts", "{data}/prompt.jsonl", "--out", "{t}/o.jsonl", "--judge", "gold",
          "--num-samples", "1"], "--num-samples"),
        (["label", "{m}/policy", "--prompts", "{data}/prompt.jsonl", "--out", "{t}/o.jsonl", "--judge", "oracle"],
         "--judge"),
        (["label", "{m}/policy", "--prompts", "{data}/prompt.jsonl", "--out", "{t}/o.jsonl", "--judge",
          "python:no_such_module_here:f"], "no_such_module_here"),
        (pre + ["--num-layers", "0"], "--num-layers"), (pre + ["--eval-batches", "0"], "--eval-batches"),
        (pre + ["--hidden-size", "30", "--num-heads", "4"], "--num-heads"),
        (["world", "score"], "FILE"),
        (sft + ["--config", "{data}/bad_type.yaml"], "lr"),
        (sft + ["--config", "{data}/unknown_key.yaml"], "learning_rate"),
        (sft + ["--config", "{data}/not_there.yaml"], "not_there.yaml"),
    ]
    for argv, needle in cases:
        yield pytest.param(argv, needle, id=" ".join(a for a in argv[:1] + argv[-2:] if "{" not in a))


@pytest.fixture
def good_data(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for name, rec in GOOD.items():
        write_jsonl(d / f"{name}.jsonl", [rec] * 8 if name != "pair" else animal_pairs(8, 0))
    (d / "bad_type.yaml").write_text("lr: fast\n")
    (d / "unknown_key.yaml").write_text("learning_rate: 0.1\n")
    return d


FLAG_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("argv,needle", list(_flag_cases()))
def test_bad_flag(argv, needle, models, good_data, tiny_shards, tmp_path, capsys, request):
    if (reason := FLAG_XFAIL.get(request.node.callspec.id)) is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    fill = {"m": models, "t": tmp_path, "data": good_data, "shards": tiny_shards}
    code, _, err = run([a.format(**fill) for a in argv], capsys)
    assert_clean(code, err, needle)


# ----------------------------------------------------------------------------- model folders
def _model_cases():
    chat, pair, scored = "{data}/chat.jsonl", "{data}/pair.jsonl", "{data}/scored.jsonl"
    for name in ["missing", "zero", "trunc_st", "trunc_cfg", "no_tok", "no_weights", "no_tensor", "shape", "arch",
                 "rm", "a_file.txt"]:
        folder = "{m}/" + name
        yield pytest.param(["sft", folder, "--data", chat, "--out", "{t}/run", *TRAIN], name, id=f"sft-{name}")
        yield pytest.param(["generate", folder, "--prompt", "hi", "--max-new-tokens", "2"], name,
                           id=f"generate-{name}")
    for name in ["missing", "policy", "trunc_cfg", "a_file.txt"]:
        yield pytest.param(["score", "{m}/" + name, scored, "--no-progress"], name, id=f"score-{name}")
    yield pytest.param(["dpo", "{m}/policy", "--ref-model", "{m}/zero", "--data", pair, "--out", "{t}/run", *TRAIN],
                       "zero", id="dpo-ref-zero")
    yield pytest.param(["label", "{m}/policy", "--prompts", "{data}/prompt.jsonl", "--out", "{t}/o.jsonl", "--judge",
                        "rm:{m}/policy", "--no-progress"], "policy", id="label-rm-judge-is-a-policy")
    yield pytest.param(["label", "{m}/rm", "--prompts", "{data}/prompt.jsonl", "--out", "{t}/o.jsonl", "--judge",
                        "gold", "--no-progress"], "rm", id="label-policy-is-an-rm")
    yield pytest.param(["prepare", "--inputs", "{data}/text.jsonl", "--tokenizer", "{m}/missing", "--out",
                        "{t}/shards"], "missing", id="prepare-no-tokenizer")


MODEL_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("argv,name", list(_model_cases()))
def test_damaged_model_folder(argv, name, models, good_data, tmp_path, capsys, request):
    if (reason := MODEL_XFAIL.get(request.node.callspec.id)) is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    code, _, err = run([a.format(m=models, t=tmp_path, data=good_data) for a in argv], capsys)
    assert_clean(code, err, str(models / name))


# ----------------------------------------------------------------------------- disks
def _disk_cases():
    nowhere = "{m}/a_file.txt/out"  # under a regular file: no one can write there, root included
    data = "{data}"
    yield "score", ["score", "{m}/rm", f"{data}/scored.jsonl", "--output", nowhere + ".jsonl", "--no-progress"]
    yield "generate", ["generate", "{m}/policy", "--input", f"{data}/prompt.jsonl", "--output", nowhere + ".jsonl"]
    yield "label", ["label", "{m}/policy", "--prompts", f"{data}/prompt.jsonl", "--out", nowhere + ".jsonl",
                    "--judge", "gold", "--no-progress"]
    yield "sft", ["sft", "{m}/policy", "--data", f"{data}/chat.jsonl", "--out", nowhere, *TRAIN]
    yield "reward", ["reward", "{m}/policy", "--data", f"{data}/pair.jsonl", "--out", nowhere, *TRAIN]
    yield "dpo", ["dpo", "{m}/policy", "--data", f"{data}/pair.jsonl", "--out", nowhere, *TRAIN]
    yield "pretrain", ["pretrain", "--data", "{shards}", "--out", nowhere, "--max-steps", "1", "--no-progress"]
    yield "world_score", ["world", "score", f"{data}/scored.jsonl", "--out", nowhere + ".jsonl", "--quiet"]
    yield "prepare", ["prepare", "--inputs", f"{data}/text.jsonl", "--tokenizer", "{m}/tok", "--out", nowhere]
    yield "tokenizer", ["tokenizer", "--files", "{m}/a_file.txt", "--out", nowhere, "--kind", "char"]
    yield "score_proc", ["score", "{m}/rm", f"{data}/scored.jsonl", "--output", "/proc/tristage/out.jsonl",
                         "--no-progress"]


DISK_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("name,argv", [pytest.param(n, a, id=n) for n, a in _disk_cases()])
def test_output_that_cannot_be_written(name, argv, models, good_data, tiny_shards, tmp_path, capsys, monkeypatch,
                                      request):
    """Named before any work: the model weights are never read."""
    if name in DISK_XFAIL:
        request.applymarker(pytest.mark.xfail(strict=True, reason=DISK_XFAIL[name]))
    import tristage.model.hf as hf
    import tristage.model.score as score_model

    def no_loading(*a, **k):
        raise AssertionError("model weights were read before the output was checked")

    for mod in (hf, score_model):
        if hasattr(mod, "read_tensors"):
            monkeypatch.setattr(mod, "read_tensors", no_loading)
    fill = {"m": models, "t": tmp_path, "data": good_data, "shards": tiny_shards}
    argv = [a.format(**fill) for a in argv]
    code, _, err = run(argv, capsys)
    target = next(a for a in argv if "a_file.txt/out" in a or a.startswith("/proc/"))
    assert_clean(code, err, target)


def test_a_full_disk_names_the_output(models, good_data, tmp_path, capsys, monkeypatch):
    """ENOSPC while the results are written (after the up-front check passed): the path, exit 2."""
    import errno
    import os

    import tristage.io as io

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    out = tmp_path / "scored.jsonl"
    code, _, err = run(["score", models / "rm", good_data / "scored.jsonl", "--output", out, "--no-progress"], capsys)
    assert_clean(code, err, str(out))
    assert "No space left" in err and not out.exists() and not list(tmp_path.glob(".scored.jsonl.*"))


# ----------------------------------------------------------------------------- the console script itself
def _script(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tristage.cli", *map(str, args)], input=stdin, capture_output=True,
                          timeout=120)


def test_console_script_exit_status(models, tmp_path):
    """The exit statuses in a real process: 2 for a missing file, 2 for an output that cannot be written."""
    missing = tmp_path / "nope.jsonl"
    p = _script(["score", models / "rm", missing, "--no-progress"])
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err and str(missing) in err, err
    good = write_jsonl(tmp_path / "s.jsonl", [GOOD["scored"]])
    p = _script(["score", models / "rm", good, "--output", models / "a_file.txt" / "o.jsonl", "--no-progress"])
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err and "a_file.txt" in err, err


def test_a_diverging_run_is_the_users_error(models, tmp_path):
    """--lr 1e6 sends the loss to NaN within a few steps: one line naming the step and the fix, exit 2, no
    checkpoint (it used to be a FloatingPointError's traceback, exit 1)."""
    chats = write_jsonl(tmp_path / "chat.jsonl", [GOOD["chat"]] * 8)
    p = _script(["sft", models / "policy", "--data", chats, "--out", tmp_path / "run", "--lr", "1e6",
                 "--max-steps", "20", "--no-progress"])
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and re.search(r"at step \d+; .*--lr", err), err
    assert not (tmp_path / "run" / "model").exists()


def test_chat_with_non_utf8_input(models):
    """Bytes that are not UTF-8 on stdin: the line is refused with a note and the chat goes on (to /exit)."""
    p = _script(["chat", models / "policy", "--max-new-tokens", "2"], stdin=b"caf\xe9 \xff\n/exit\n")
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "not valid UTF-8" in p.stdout.decode(errors="replace")
