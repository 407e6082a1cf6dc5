"""`tristage pipeline` on a tiny demo world: every stage command in one file, finished stages skipped, an interrupted
stage resumed exactly, a changed input rerun with what reads from it, every mistake named before anything runs, and
the shipped presets checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import shared_data, tiny_config, write_jsonl

from tristage import cli

# the whole lifecycle at toy size: a character tokenizer, a 2-layer model of width 32, a few steps per stage
TINY = """
description: the lifecycle at toy size
vars:
  eval_prompts: {eval_prompts}
defaults: {{seed: 0, device: cpu, dtype: float32, log_every: 1}}
stages:
  world: {{n_stories: 100, n_sft: 40, n_pref: 40, n_eval: 6, quiet: true}}
  tokenizer: {{files: ["{{world}}/pretrain/train.txt"], kind: char}}
  shards: {{command: prepare, inputs: ["{{world}}/pretrain/train.txt", "{{world}}/pretrain/val.txt"],
           tokenizer: "{{tokenizer}}", val_fraction: 0.2}}
  base:
    command: pretrain
    data: "{{shards}}"
    depth: 1
    hidden_size: 32
    num_heads: 2
    seq_len: 160
    batch_size: 2
    max_steps: 4
    lr: 3.0e-3
    warmup_steps: 1
    eval_every: 2
    eval_batches: 1
    save_every: 2
    sample_prompts: ["The dog"]
  sft: {{model: "{{base}}/model", data: ["{{world}}/sft/train.jsonl"], max_len: 160, tokens_per_batch: 320,
        max_steps: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 2, save_every: 2}}
  reward: {{model: "{{sft}}/model", data: ["{{world}}/preference/train.jsonl"], max_len: 160, batch_size: 2,
           max_steps: 2, eval_every: 2, save_every: 2}}
  dpo: {{model: "{{sft}}/model", data: ["{{world}}/preference/train.jsonl"], max_len: 160, batch_size: 2,
        max_steps: 2, eval_every: 2, save_every: 2}}
  label: {{model: "{{dpo}}/model", prompts: "{{world}}/eval/prompts.jsonl", judge: world, num_samples: 2, limit: 3,
          max_new_tokens: 8}}
  ppo: {{model: "{{sft}}/model", reward: "{{reward}}/model", prompts: ["{{world}}/eval/prompts.jsonl"],
        val_prompts: ["{{world}}/eval/prompts.jsonl"], gold: gold, batch_size: 2, max_steps: 2, max_new_tokens: 8,
        ppo_epochs: 1, eval_every: 2, eval_prompts: 2, save_every: 1}}
  grpo: {{model: "{{sft}}/model", reward: gold, prompts: ["{{world}}/eval/prompts.jsonl"],
         val_prompts: ["{{world}}/eval/prompts.jsonl"], batch_size: 1, num_samples: 2, max_steps: 2, max_new_tokens: 8,
         eval_every: 0, save_every: 1}}
  eval: {{models: ["sft={{sft}}/model", "dpo={{dpo}}/model", "ppo={{ppo}}/model"], prompts: "{{eval_prompts}}",
         limit: 4, max_new_tokens: 8, reward_models: ["reward={{reward}}/model"],
         pairs: "{{world}}/preference/val.jsonl"}}
  arena: {{models: ["sft={{eval}}/answers/sft.jsonl", "dpo={{eval}}/answers/dpo.jsonl",
                   "ppo={{eval}}/answers/ppo.jsonl"],
          prompts: "{{eval_prompts}}", judge: world, limit: 4, bootstrap: 20}}
"""
PREFIX = ("world", "tokenizer", "shards", "base", "sft")  # the stages up to the one interrupted in the resume test
PROMPTS = [{"prompt": p} for p in ("Tell me a story about Tom.", "Write a story about a dog in the park.",
                                   "Tell me a happy story about a cat.", "Write a short story about Mia.")]


def write_pipeline(root: Path, only: tuple[str, ...] | None = None) -> Path:
    """root/pipeline.yaml (and its external prompts file), optionally only the stages `only`."""
    import yaml

    prompts = root / "prompts.jsonl"
    if not prompts.exists():
        write_jsonl(prompts, PROMPTS)
    spec = yaml.safe_load(TINY.format(eval_prompts=prompts))
    if only:
        spec["stages"] = {k: v for k, v in spec["stages"].items() if k in only}
    path = root / ("pipeline.yaml" if only is None else "prefix.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def pipeline(*args: str) -> int:
    return cli.main(["pipeline", *map(str, args), "--no-progress"])


def tiny_run(tmp_path_factory) -> Path:
    """The tiny pipeline run once per test session (test_report.py reads it too)."""
    root = tmp_path_factory.getbasetemp() / "tiny_pipeline"
    run = root / "run"
    if not (run / "report.html").exists():
        root.mkdir(exist_ok=True)
        assert pipeline(write_pipeline(root), "--out", run) == 0
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


def _marker(run: Path, name: str) -> dict:
    return json.loads((run / ".pipeline" / f"{name}.json").read_text())


def _plan(capsys) -> dict[str, str]:
    """stage -> skip | run | resume, from the plan a pipeline printed."""
    out = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line.split()[2] for line in out if line.startswith("  ")}


def test_every_stage_runs_and_writes_its_folder(run):
    for name in ("base", "sft", "reward", "dpo", "ppo", "grpo"):
        assert (run / name / "model" / "config.json").is_file(), name
    assert (run / "label" / "pairs.jsonl").is_file()
    for name in ("world", "tokenizer", "shards", "base", "sft", "reward", "dpo", "label", "ppo", "grpo", "eval",
                 "arena"):
        m = _marker(run, name)
        assert m["status"] == "done" and len(m["fingerprint"]) == 16 and m["seconds"] > 0, name
        assert m["peak_rss_mb"] > 0
    assert _marker(run, "sft")["deps"] == ["base", "world"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"sft", "dpo", "ppo"} and results["n"] == 4
    assert 0.5 <= results["reward_models"]["reward"]["annotator"] <= 1
    m = results["models"]["sft"]
    assert m["low"] <= m["mean"] <= m["high"]
    assert json.loads((run / "arena" / "summary.json").read_text())["battles"] == 3 * 4
    assert (run / "report.md").is_file() and (run / "report.html").is_file()


def test_a_rerun_skips_every_finished_stage(run, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.glob(".pipeline/*.json")}
    assert pipeline(run.parent / "pipeline.yaml", "--out", run, "--no-report") == 0
    assert set(_plan(capsys).values()) == {"skip"}
    assert {p: p.stat().st_mtime_ns for p in run.glob(".pipeline/*.json")} == before


def test_a_changed_input_reruns_its_stage_and_what_reads_from_it(run, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, symlinks=True)  # a run folder can move: paths inside it are {run}/... in fingerprints
    assert pipeline(run.parent / "pipeline.yaml", "--out", moved, "--dry-run") == 0
    assert set(_plan(capsys).values()) == {"skip"}
    # a setting of sft: sft and every stage reading from it (directly or not) run again, the ones above it do not
    assert pipeline(run.parent / "pipeline.yaml", "--out", moved, "--dry-run", "--set", "sft.lr=0.002") == 0
    plan = _plan(capsys)
    assert {k for k, v in plan.items() if v == "run"} == {"sft", "reward", "dpo", "label", "ppo", "grpo", "eval",
                                                          "arena"}
    # the content of a file from outside the run (same name, same settings): what reads it runs again, for real
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, PROMPTS[:1] + PROMPTS[2:] + PROMPTS[1:2])  # another order: another content
    spec = (run.parent / "pipeline.yaml").read_text().replace(str(run.parent / "prompts.jsonl"), str(prompts))
    (tmp_path / "p.yaml").write_text(spec)
    assert pipeline(tmp_path / "p.yaml", "--out", moved, "--no-report") == 0
    plan = _plan(capsys)
    assert {k for k, v in plan.items() if v == "run"} == {"eval", "arena"}
    old = json.loads((run / "eval" / "answers" / "sft.jsonl").read_text().splitlines()[1])
    new = json.loads((moved / "eval" / "answers" / "sft.jsonl").read_text().splitlines()[1])
    assert old["prompt"] != new["prompt"]
    # --rerun forces a stage and what reads from it
    assert pipeline(tmp_path / "p.yaml", "--out", moved, "--dry-run", "--rerun", "eval") == 0
    assert {k for k, v in _plan(capsys).items() if v == "run"} == {"eval", "arena"}
    # the stages reading from a stage that ran again in another invocation (a file of the stages up to sft) run again
    # too: their fingerprints hold sft's
    prefix = write_pipeline(run.parent, only=PREFIX)
    assert pipeline(prefix, "--out", moved, "--no-report", "--set", "sft.lr=0.002") == 0
    assert pipeline(run.parent / "pipeline.yaml", "--out", moved, "--dry-run", "--set", "sft.lr=0.002") == 0
    plan = _plan(capsys)
    assert plan["sft"] == "skip" and plan["reward"] == plan["ppo"] == plan["arena"] == "run"


def test_an_interrupted_stage_resumes_exactly(run, tmp_path, capsys):
    spec = write_pipeline(run.parent, only=PREFIX)
    out = tmp_path / "split"
    assert pipeline(spec, "--out", out, "--stop-at", "sft:2", "--no-report") == 0
    assert _marker(out, "sft")["status"] == "running"
    assert json.loads((out / "sft" / "model" / "tristage.json").read_text())["step"] == 2
    capsys.readouterr()
    assert pipeline(spec, "--out", out, "--no-report") == 0
    plan = _plan(capsys)
    assert plan["sft"] == "resume" and plan["base"] == "skip"
    assert _marker(out, "sft")["status"] == "done"

    def losses(r: Path) -> list[tuple]:
        rows = [json.loads(x) for x in (r / "sft" / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x.get("loss"), x.get("val_loss")) for x in rows]

    assert losses(out) == losses(run)  # step for step, bit for bit, as the uninterrupted run
    assert (out / "sft" / "model" / "model.safetensors").read_bytes() == \
        (run / "sft" / "model" / "model.safetensors").read_bytes()
    # the same stages have the same fingerprints in the full pipeline: it would skip them
    assert _marker(out, "sft")["fingerprint"] == _marker(run, "sft")["fingerprint"]


BAD = [
    ("stages: {sft: {lrr: 1}}", "stage sft: unknown key 'lrr' for tristage sft"),
    ("stages: {sft: {model: m, data: [d.jsonl], lr: 0}}", "stage sft: lr must be > 0 (got 0.0)"),
    ("stages: {sft: {model: m, data: [d.jsonl], lr: fast}}", "stage sft: lr: expected float"),
    ("stages: {sft: {model: m, data: [d.jsonl], out: x}}", "stage sft: out is set by the pipeline"),
    ("stages: {sft: {model: m, data: [nope.jsonl]}}", "stage sft: data: nope.jsonl: no such file or folder"),
    ("stages: {sft: {model: nope, data: [d.jsonl]}}", "stage sft: model: nope: no such file or folder"),
    ("stages: {sft: {model: '{base}/model', data: [d.jsonl]}}", "stage sft: model: {base} names no stage above"),
    ("stages: {rl: {command: ppo, model: m, reward: 'rm:nope', prompts: [d.jsonl]}}",
     "stage rl: reward: nope: no such file"),
    ("stages: {sft: {data: [d.jsonl]}}", "stage sft: missing model"),
    ("stages: {x: {command: chat}}", "stage x: command 'chat' is not a pipeline stage"),
    ("stages: {sft: [1]}", "stage sft: expected a mapping"),
    ("stagez: {}", "unknown key 'stagez'"),
    ("vars: {data: null}\nstages: {sft: {model: m, data: ['{data}']}}",
     "vars data not set: give them with --set data=..."),
    ("defaults: {lrr: 1}\nstages: {sft: {model: m}}", "defaults: 'lrr' is no stage command's key"),
    ("stages: {sft: {model: m, data: [d.jsonl]}}\n  bad: [", "not valid YAML"),
]


@pytest.mark.parametrize("text,named", BAD, ids=[n for _, n in BAD])
def test_a_mistake_is_one_line_naming_stage_and_key_before_anything_runs(tmp_path, capsys, monkeypatch, text, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "p.yaml").write_text(text)
    assert cli.main(["pipeline", "p.yaml", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and err.startswith("tristage pipeline: p.yaml"), err
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_flag_mistakes(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("stages: {world: {n_stories: 5}}")
    for argv, named in [(["--out", "r"], "FILE or --preset"), (["--preset", "nope", "--out", "r"], "--preset"),
                        ([str(tmp_path / "p.yaml"), "--out", "r", "--stop-at", "world:3"], "not a training stage"),
                        ([str(tmp_path / "p.yaml"), "--out", "r", "--rerun", "nope"], "--rerun nope: no such stage"),
                        ([str(tmp_path / "p.yaml"), "--out", "r", "--set", "nope.x=1"], "no stage 'nope'")]:
        assert cli.main(["pipeline", *argv]) == 2
        assert named in capsys.readouterr().err


def test_the_demo_preset_is_what_make_demo_and_tristage_demo_run(tmp_path, capsys):
    assert pipeline("--preset", "demo", "--out", tmp_path / "demo", "--dry-run") == 0
    plan = _plan(capsys)
    assert list(plan) == ["world", "tokenizer", "shards", "base", "sft", "reward", "dpo", "label", "dpo_round2",
                          "ppo", "grpo", "eval", "arena"]
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--pretrain-steps", "7", "--dry-run"]) == 0
    assert list(_plan(capsys)) == list(plan)
    from tristage.pipeline import load_spec, preset_path

    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "tristage pipeline --preset demo" in make or "tristage demo" in make
    assert load_spec(preset_path("demo"))["stages"]["base"]["max_steps"] == 400


def test_the_text_preset_runs_on_shared_data(tmp_path, capsys):
    """Every stage of the text preset on the first records of real files (plain text, Alpaca records, Anthropic HH
    pairs; prompts: the Alpaca instructions), at toy size."""
    import gzip

    text = shared_data("pretrain/tinyshakespeare.txt").read_text()[:20000]
    chats = shared_data("sft/alpaca_libre_ok.jsonl").read_text().splitlines()[:40]
    with gzip.open(shared_data("preference/hh_rlhf_helpful_base_test.jsonl.gz"), "rt") as fh:
        pairs = [next(fh) for _ in range(30)]
    (tmp_path / "text.txt").write_text(text)
    (tmp_path / "chats.jsonl").write_text("\n".join(chats) + "\n")
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as fh:
        fh.write("".join(pairs))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": json.loads(c)["instruction"]} for c in chats[:8]])
    files = [f"text={tmp_path / 'text.txt'}", f"chats={tmp_path / 'chats.jsonl'}",
             f"pairs={tmp_path / 'pairs.jsonl.gz'}", f"prompts={tmp_path / 'prompts.jsonl'}"]
    toy = ["tokenizer.vocab_size=300", "shards.val_fraction=0.2", "base.depth=1", "base.seq_len=128",
           "base.batch_size=2", "base.max_steps=2", "base.eval_every=2", "base.eval_batches=1", "sft.max_len=128",
           "sft.max_steps=2", "sft.tokens_per_batch=512", "reward.max_len=128", "reward.max_steps=2",
           "reward.batch_size=2", "dpo.max_len=128", "dpo.max_steps=2", "dpo.batch_size=2", "ppo.max_new_tokens=8",
           "ppo.batch_size=2", "ppo.max_steps=1", "ppo.eval_every=0", "ppo.ppo_epochs=1", "rloo.max_new_tokens=8",
           "rloo.batch_size=1", "rloo.num_samples=2", "rloo.max_steps=1", "rloo.eval_every=0", "eval.limit=2",
           "eval.max_new_tokens=8", "arena.limit=2", "arena.max_new_tokens=8", "arena.bootstrap=10",
           "defaults.dtype=float32", "defaults.device=cpu"]
    assert cli.main(["pipeline", "--preset", "text", "--out", str(tmp_path / "t"), "--no-progress", "--set",
                     *files, *toy]) == 0
    results = json.loads((tmp_path / "t" / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["base", "sft", "dpo", "ppo", "rloo"] and results["scorer"].startswith("rm:")
    assert (tmp_path / "t" / "report.html").is_file()
    capsys.readouterr()
    # the files are required: named, with the flag that gives them
    assert cli.main(["pipeline", "--preset", "text", "--out", str(tmp_path / "t")]) == 2
    assert "--set text=" in capsys.readouterr().err


def test_the_gpu_preset_parses(tmp_path, capsys, tiny_shards):
    from tristage.model.gpt import build_model
    from tristage.model.hf import save_model
    from tristage.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(build_model(tiny_config(tok), seed=0), tmp_path / "qwen", tok)
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]}])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "go"}])
    sets = [f"model={tmp_path / 'qwen'}", f"chats={tmp_path / 'chats.jsonl'}", f"pairs={tmp_path / 'pairs.jsonl'}",
            f"prompts={tmp_path / 'pairs.jsonl'}", "device=cpu"]
    assert pipeline("--preset", "gpu-0.5b", "--out", tmp_path / "g", "--dry-run", "--set", *sets) == 0
    assert list(_plan(capsys)) == ["base", "sft", "reward", "dpo", "ppo", "eval"]
