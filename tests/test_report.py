"""`tristage report`: rebuilt from a run folder alone (a copy of the tiny pipeline's run), self-contained HTML with
its plots embedded, model output escaped, the over-optimisation point found and marked."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from test_pipeline import tiny_run

from tristage import cli
from tristage.report import overoptimisation_point


@pytest.fixture()
def run(tmp_path_factory, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run(tmp_path_factory), copy, symlinks=True)
    for f in ("report.md", "report.html"):
        (copy / f).unlink()
    shutil.rmtree(copy / "report")
    return copy


def test_the_report_is_rebuilt_from_the_folder_alone(run, capsys):
    assert cli.main(["report", str(run)]) == 0
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    for section in ("Environment", "Stages", "Losses", "RL: ppo (ppo)", "RL: grpo (grpo)", "Reward model",
                    "Scores on held-out prompts (eval)", "Arena (arena)", "Answers side by side", "Settings"):
        assert f"## {section}" in md and f"<h2>{section}</h2>" in page, section
    stages = md[md.index("## Stages"):md.index("## Losses")]
    for name in ("world", "tokenizer", "shards", "base", "sft", "reward", "dpo", "label", "ppo", "grpo", "eval",
                 "arena"):
        assert f"| {name} |" in stages, name
    # every training stage counts its tokens and MFU, and its memory: peak (growth over the stage's start)
    for name in ("base", "sft", "reward", "dpo", "ppo", "grpo"):
        cells = next(r for r in stages.splitlines() if r.startswith(f"| {name} |")).split(" | ")
        tokens, mfu, memory = cells[4], cells[6], cells[7]
        assert re.fullmatch(r"[0-9,]+", tokens) and int(tokens.replace(",", "")) > 0, (name, cells)
        assert re.fullmatch(r"[0-9.]+%", mfu) and 0 < float(mfu[:-1]) < 100, (name, cells)
        assert re.fullmatch(r"[0-9,]+ MB \([+-][0-9,]+\)", memory), (name, cells)
    # one self-contained file: every image inline, nothing fetched from elsewhere
    images = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(images) == md.count("![") >= 5 and all(s.startswith("data:image/png;base64,") for s in images)
    assert "http" not in page.replace("http-equiv", "")
    for ref in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):  # the markdown's images lie beside it
        assert (run / ref).is_file(), ref
    # the gold table and the arena board carry intervals; the settings are the pipeline file's
    assert re.search(r"\| sft \| [0-9.]+ \| \\\[[0-9.]+, [0-9.]+\\\] \|", md)
    assert "95% interval" in md[md.index("## Arena"):]
    assert "tokenizer:" in md[md.index("## Settings"):]


def test_model_output_is_text(run):
    path = run / "eval" / "answers" / "sft.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["answer"] = "<script>alert(1)</script> | *bold* `code`\nsecond line"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["report", str(run)]) == 0
    page, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; | *bold*" in page
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt; \\| \\*bold\\* \\`code\\`<br>second" in md


def test_the_overoptimisation_point_is_found_and_marked(run):
    def h(step, reward, gold, kl):
        return {"step": step, "eval_reward": reward, "eval_gold": gold, "eval_kl": kl, "eval_reward_stderr": 0.01,
                "eval_gold_stderr": 0.005}

    rising = [h(0, 0.5, 0.80, 0.0), h(4, 0.6, 0.82, 0.5), h(8, 0.7, 0.85, 1.0)]
    assert overoptimisation_point(rising) is None
    hacked = rising + [h(12, 0.9, 0.78, 2.0)]  # the reward still rises, gold falls by more than 2 standard errors
    assert overoptimisation_point(hacked)["step"] == 8
    noisy = rising + [h(12, 0.9, 0.845, 2.0)]  # a fall within the noise is not one
    assert overoptimisation_point(noisy) is None
    assert overoptimisation_point([{k: v for k, v in x.items() if k != "eval_gold"} for x in hacked]) is None
    (run / "ppo" / "curves.json").write_text(json.dumps(hacked))
    assert cli.main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "Over-optimisation: the held-out reward rose after step 8 while the gold score fell" in md


def test_not_a_run_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a pipeline run folder" in err
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
