"""`tristage score`: reward-model scores of prompts + responses and of preference pairs, rendered as the reward
stage renders them; located errors for bad records."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tristage.model.gpt import build_model
from tristage.model.score import from_causal_lm, per_row, save_reward_model
from tristage.serve import score
from tristage.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def rm_folder(tiny_shards, tmp_path_factory):
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    rm = from_causal_lm(build_model(tiny_config(tok), seed=0), 2, seed=1, labels=["reward", "fluency"],
                        weights=[1.0, 0.5])
    folder = tmp_path_factory.mktemp("score") / "rm"
    save_reward_model(rm, folder, tok)
    return folder


def _load(folder):
    from tristage.model.score import load_reward_model

    return load_reward_model(folder, dtype=torch.float32).eval(), Tokenizer.load(folder)


def _hand_ids(tok, messages, response):
    """The reward stage's sequence, built by hand: prompt + generation prompt, the reply, its end-of-turn token."""
    im_end = tok.token_to_id("<|im_end|>")
    return tok.apply_chat_template(messages, add_generation_prompt=True) + tok.encode(response) + [im_end]


@torch.no_grad()
def _hand_scores(rm, tok, messages, response):
    ids = _hand_ids(tok, messages, response)
    return rm(torch.tensor([ids]), at=per_row(torch.tensor([len(ids) - 1])))[0]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_equal_the_reward_model_on_hand_built_ids(rm_folder, tmp_path):
    rows = [{"prompt": "what does the dog say?", "response": "the dog says woof.", "id": 1},
            {"prompt": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "and the cat?"}],
             "response": "meow."},
            {"messages": [{"role": "user", "content": "the fish?"}], "response": "the fish sat on the pond. " * 3}]
    src = _write(tmp_path / "in.jsonl", rows)
    summary = score.main(score.Config(rm=str(rm_folder), file=str(src), output=str(tmp_path / "out.jsonl"),
                                      batch_size=2, progress=False))
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    rm, tok = _load(rm_folder)
    assert len(out) == 3 and out[0]["id"] == 1  # input fields kept, input order kept
    for row, o in zip(rows, out):
        msgs = score.prompt_messages(row.get("prompt", row.get("messages")))
        want = _hand_scores(rm, tok, msgs, row["response"])
        assert list(o["scores"]) == ["reward", "fluency"]
        assert o["scores"]["reward"] == pytest.approx(want[0].item(), abs=1e-5)
        assert o["scores"]["fluency"] == pytest.approx(want[1].item(), abs=1e-5)
        assert o["score"] == pytest.approx(want[0].item() + 0.5 * want[1].item(), abs=1e-5)
        assert score.encode_for_reward(tok, msgs, row["response"], 1024) == _hand_ids(tok, msgs, row["response"])
    assert summary["responses"] == 3 and summary["truncated"] == 0
    assert summary["mean"] == pytest.approx(sum(o["score"] for o in out) / 3, abs=1e-6)
    # score_texts, the importable API, agrees
    s = score.score_texts(rm, tok, [r.get("prompt", r.get("messages")) for r in rows], [r["response"] for r in rows],
                          batch_size=3)
    assert torch.allclose(rm.combine(s), torch.tensor([o["score"] for o in out]), atol=1e-5)


def test_truncation_keeps_the_end(rm_folder, tmp_path, capsys):
    rm, tok = _load(rm_folder)
    msgs = [{"role": "user", "content": "a long story please " * 4}]
    full = _hand_ids(tok, msgs, "the dog sat.")
    assert len(full) > 40
    assert score.encode_for_reward(tok, msgs, "the dog sat.", 40) == full[-40:]
    src = _write(tmp_path / "in.jsonl", [{"prompt": msgs, "response": "the dog sat."},
                                         {"prompt": "hi", "response": "hi."}])
    summary = score.main(score.Config(rm=str(rm_folder), file=str(src), max_len=40, progress=False,
                                      output=str(tmp_path / "o.jsonl")))
    assert summary["truncated"] == 1
    assert "1 sequences truncated to 40 tokens" in capsys.readouterr().out
    with torch.no_grad():
        want = rm.combine(rm(torch.tensor([full[-40:]]), at=per_row(torch.tensor([39]))))[0].item()
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["score"] == pytest.approx(want, abs=1e-5)


def test_pairs_accuracy_and_margin_equal_a_hand_count(rm_folder, tmp_path, capsys):
    animals = ["dog", "cat", "bird", "fish", "cow", "owl"]
    places = ["mat", "porch", "patio", "pond"]
    rows = [{"prompt": f"where did the {a} sit?", "chosen": f"the {a} sat on the {places[i % 4]}.",
             "rejected": f"{'the ' * (i % 3)}{a} sat by the {places[(i + 1) % 4]}"}
            for i, a in enumerate(animals * 2)]
    src = _write(tmp_path / "pairs.jsonl", rows)
    summary = score.main(score.Config(rm=str(rm_folder), file=str(src), output=str(tmp_path / "out.jsonl"),
                                      progress=False))
    rm, tok = _load(rm_folder)
    c = [rm.combine(_hand_scores(rm, tok, score.prompt_messages(r["prompt"]), r["chosen"])[None]).item() for r in rows]
    r_ = [rm.combine(_hand_scores(rm, tok, score.prompt_messages(r["prompt"]), r["rejected"])[None]).item()
          for r in rows]
    wins = sum(a > b for a, b in zip(c, r_))
    assert 0 < wins < len(rows)  # a random head: some pairs each way, so the count is tested both ways
    assert summary["pairs"] == len(rows)
    assert summary["accuracy"] == pytest.approx(wins / len(rows))
    assert summary["margin"] == pytest.approx(sum(a - b for a, b in zip(c, r_)) / len(rows), abs=1e-5)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["score_chosen"] for o in out] == pytest.approx(c, abs=1e-5)
    assert [o["score_rejected"] for o in out] == pytest.approx(r_, abs=1e-5)
    assert f"accuracy {wins / len(rows):.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("bad,field", [({"prompt": "hi", "response": 3}, "response"),
                                       ({"prompt": "hi", "chosen": "a."}, "rejected"),
                                       ({"prompt": [{"role": "assistant", "content": "x"}], "response": "y"}, "prompt"),
                                       ({"response": "y"}, None)])
def test_bad_record_names_file_line_and_field(rm_folder, tmp_path, capsys, bad, field):
    from tristage.cli import main
    from tristage.io import DataError

    src = _write(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "ok."}, bad])
    with pytest.raises(DataError) as e:
        score.main(score.Config(rm=str(rm_folder), file=str(src), progress=False))
    assert e.value.line == 2 and e.value.field == field
    assert str(e.value).startswith(f"{src}:2:")
    assert main(["score", str(rm_folder), str(src), "--no-progress"]) == 2
    assert f"{src}:2:" in capsys.readouterr().err
