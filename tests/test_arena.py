"""The arena: Bradley-Terry ratings pinned by known answers, bootstrap intervals, style control, online Elo, the
matrices, reading battles, `tristage leaderboard`, and `tristage arena` on tiny random models (resuming)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tristage.cli import main as cli_main
from tristage.eval.arena import (
    Battles,
    battle_counts,
    fit_bt,
    kendall_tau,
    leaderboard,
    online_elo,
    predicted_win_rates,
    read_battles,
    style_features,
    win_fractions,
)
from tristage.io import DataError

GAP_3_TO_1 = 400 * math.log10(3)  # the rating gap of a 75% win rate: 190.85 points


def battles(*groups: tuple[str, str, str, int]) -> Battles:
    """Battles from (model_a, model_b, winner, count) groups."""
    ma, mb, w = [], [], []
    for a, b, winner, n in groups:
        ma += [a] * n
        mb += [b] * n
        w += [winner] * n
    return Battles.from_lists(ma, mb, w)


def rating(board, model):
    return board.rating[board.models.index(model)]


def random_battles(n=2000, seed=0, ties=True, style=False):
    """n battles among 4 models of known strength (ties included), with a length feature when `style`."""
    rng = np.random.default_rng(seed)
    names, strength = ["w", "x", "y", "z"], np.array([200.0, 80.0, 0.0, -150.0])
    ma, mb, win, sa, sb = [], [], [], [], []
    for _ in range(n):
        i, j = rng.choice(4, 2, replace=False)
        p = 1 / (1 + 10 ** ((strength[j] - strength[i]) / 400))
        if ties and rng.random() < 0.15:
            win.append("tie")
        else:
            win.append("model_a" if rng.random() < p else "model_b")
        ma.append(names[i]), mb.append(names[j])
        sa.append({"length": float(rng.integers(10, 400))}), sb.append({"length": float(rng.integers(10, 400))})
    return Battles.from_lists(ma, mb, win, sa if style else None, sb if style else None)


# ----------------------------------------------------------------------------- known answers
def test_two_models_with_a_known_win_rate():
    b = battles(("A", "B", "model_a", 600), ("B", "A", "model_b", 150), ("A", "B", "model_b", 100),
                ("B", "A", "model_a", 150))  # A wins 750 of 1000, on both sides
    board = leaderboard(b, bootstrap=200, seed=0)
    assert board.models == ["A", "B"]
    assert rating(board, "A") - rating(board, "B") == pytest.approx(GAP_3_TO_1, abs=0.1)
    assert board.rating.mean() == pytest.approx(1000.0, abs=1e-6)
    assert predicted_win_rates(board.rating)[0, 1] == pytest.approx(0.75, abs=1e-4)
    # the interval: +-1.96 standard errors of the log-odds, sqrt(1 / (n p (1 - p))) = 0.073 -> +-14 points on the gap,
    # half of it on each model's rating
    assert board.lower[0] < board.rating[0] < board.upper[0]
    assert (board.upper[0] - board.lower[0]) / 2 == pytest.approx(1.96 * 0.0730 / math.log(10) * 400 / 2, rel=0.2)
    assert list(board.battles) == [1000, 1000] and (board.wins[0], board.losses[0], board.ties[0]) == (750, 250, 0)


def test_a_chain_of_three():
    """A beats B 3:1, B beats C 3:1, A and C never meet: on a tree the fit is each pair's own log-odds, so A - C is
    twice the gap and P(A beats C) = 9 / 10."""
    b = battles(("A", "B", "model_a", 300), ("A", "B", "model_b", 100), ("B", "C", "model_a", 300),
                ("B", "C", "model_b", 100))
    r, _ = fit_bt(b)
    assert r == pytest.approx([1000 + GAP_3_TO_1, 1000.0, 1000 - GAP_3_TO_1], abs=0.1)
    assert predicted_win_rates(r)[0, 2] == pytest.approx(0.9, abs=1e-4)


def test_ties_count_half_a_win_each_way():
    assert fit_bt(battles(("A", "B", "tie", 50), ("A", "B", "tie (bothbad)", 50)))[0] == pytest.approx([1000, 1000])
    # 500 wins and 500 ties: A scores 0.75 of the points, the same as 750 wins of 1000
    r, _ = fit_bt(battles(("A", "B", "model_a", 500), ("B", "A", "tie", 500)))
    assert r[0] - r[1] == pytest.approx(GAP_3_TO_1, abs=0.1)


def test_symmetric_under_swapping_sides():
    b = random_battles(style=True)
    rng = np.random.default_rng(1)
    s = b.swapped(rng.random(len(b)) < 0.5)
    assert not np.array_equal(s.a, b.a)
    for style in (None, ["length"]):
        x, y = leaderboard(b, bootstrap=50, style=style), leaderboard(s, bootstrap=50, style=style)
        assert x.models == y.models and np.allclose(x.rating, y.rating, atol=1e-6)
        if style is None:  # the same cells: the same resamples
            assert np.allclose(x.lower, y.lower, atol=1e-6) and np.allclose(x.upper, y.upper, atol=1e-6)
        else:
            assert np.allclose(x.style_coef, y.style_coef, atol=1e-6)


def test_invariant_to_battle_order_unlike_online_elo():
    b = random_battles(n=4000, ties=False)
    perm = np.random.default_rng(2).permutation(len(b))
    s = Battles(b.models, b.a[perm], b.b[perm], b.score[perm])
    x, y = leaderboard(b, bootstrap=100, seed=3), leaderboard(s, bootstrap=100, seed=3)
    assert np.allclose(x.rating, y.rating, atol=1e-8)
    assert np.allclose(x.lower, y.lower, atol=1e-8) and np.allclose(x.upper, y.upper, atol=1e-8)
    assert not np.allclose(x.online_elo, y.online_elo, atol=1.0)  # online Elo depends on the order
    # the fit recovers the true order and gaps (strengths 200, 80, 0, -150: mean 32.5)
    assert x.models == ["w", "x", "y", "z"]
    assert x.rating == pytest.approx(np.array([200, 80, 0, -150]) - 32.5 + 1000, abs=35)


def test_a_model_that_never_loses_stays_finite_and_its_interval_says_so():
    b = battles(("A", "B", "model_a", 10), ("C", "A", "model_b", 5), ("B", "C", "model_a", 10),
                ("B", "C", "model_b", 10))
    board = leaderboard(b, bootstrap=100)
    assert board.models[0] == "A" and np.isfinite(board.rating).all() and board.rating[0] < 3000
    assert board.upper[0] == math.inf and np.isfinite(board.lower[0]) and board.lower[0] > 1000
    row = board.rows()[0]
    assert row["upper"] is None and row["lower"] is not None
    assert any("A never lost" in n and "no upper bound" in n for n in board.notes)
    assert all(np.isfinite(board.upper[1:]))
    # a model that never won: no lower bound
    assert board.lower[board.models.index("B")] > -math.inf
    lone = leaderboard(battles(("A", "B", "model_a", 5)), bootstrap=20)
    assert lone.lower[1] == -math.inf and lone.upper[0] == math.inf


def test_anchor_and_disconnected_groups():
    b = battles(("A", "B", "model_a", 30), ("A", "B", "model_b", 10), ("C", "D", "tie", 10))
    board = leaderboard(b, bootstrap=50, anchor=("B", 1200.0))
    assert rating(board, "B") == pytest.approx(1200.0)
    assert rating(board, "A") - rating(board, "B") == pytest.approx(GAP_3_TO_1, abs=0.5)
    i = board.models.index("B")
    assert board.lower[i] == pytest.approx(1200.0) and board.upper[i] == pytest.approx(1200.0)
    assert any("2 groups never compared" in n for n in board.notes)


def test_style_control_removes_a_pure_length_effect():
    """Three models of equal skill; the judge prefers the longer answer, and 'verbose' writes longer ones. Without
    style control verbose tops the board by far; with it the three are level and the length coefficient is positive."""
    rng = np.random.default_rng(0)
    names, mean_len = ["terse", "plain", "verbose"], [100, 150, 400]
    ma, mb, win, sa, sb = [], [], [], [], []
    for _ in range(3000):
        i, j = rng.choice(3, 2, replace=False)
        la, lb = rng.uniform(0.3, 1.7) * mean_len[i], rng.uniform(0.3, 1.7) * mean_len[j]
        p = 1 / (1 + math.exp(-3 * (la - lb) / (la + lb + 1)))
        win.append("model_a" if rng.random() < p else "model_b")
        ma.append(names[i]), mb.append(names[j]), sa.append({"length": la}), sb.append({"length": lb})
    b = Battles.from_lists(ma, mb, win, sa, sb)
    plain = leaderboard(b, bootstrap=100)
    assert plain.models[0] == "verbose" and plain.rating[0] - plain.rating[1] > 150 and not plain.style_control
    assert plain.lower[0] > plain.upper[1]
    ctrl = leaderboard(b, bootstrap=100, style=[])
    assert ctrl.style == ["length"] and ctrl.style_control and all(r["style_control"] == ["length"]
                                                                   for r in ctrl.rows())
    assert np.abs(ctrl.rating - 1000).max() < 35
    assert (ctrl.rank == 1).all()  # every interval overlaps every other
    assert ctrl.style_coef[0] > 0 and ctrl.style_lower[0] > 0


def test_style_covariates_refused_or_dropped():
    b = random_battles(n=200, style=True)
    with pytest.raises(ValueError, match="not on every battle"):
        leaderboard(b, style=["bold"], bootstrap=0)
    with pytest.raises(ValueError, match="no style features"):
        leaderboard(random_battles(n=50), style=[], bootstrap=0)
    b.style_a["bold"] = np.zeros(len(b))
    b.style_b["bold"] = np.zeros(len(b))
    board = leaderboard(b, style=[], bootstrap=0)
    assert board.style == ["length"] and any("bold" in n for n in board.notes)


def test_online_elo_and_matrices():
    b = battles(("A", "B", "model_a", 1))
    assert online_elo(b) == pytest.approx([1002.0, 998.0])  # K = 4, expected score 1/2
    b = battles(("A", "B", "model_a", 3), ("B", "A", "model_a", 1), ("A", "B", "tie", 2), ("B", "C", "model_b", 4))
    assert battle_counts(b).tolist() == [[0, 6, 0], [6, 0, 4], [0, 4, 0]]
    w = win_fractions(b)
    assert w[0, 1] == pytest.approx(0.75) and w[1, 0] == pytest.approx(0.25) and (w[2, 1], w[1, 2]) == (1.0, 0.0)
    assert math.isnan(w[0, 2]) and math.isnan(w[0, 0])
    p = predicted_win_rates([1400.0, 1000.0])
    assert p[0, 1] == pytest.approx(10 / 11) and p[1, 0] == pytest.approx(1 / 11)


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert math.isnan(kendall_tau([1, 1], [1, 2]))


def test_bootstrap_is_seeded_and_fast():
    import time

    b = random_battles(n=20000, seed=5)
    t = time.perf_counter()
    x = leaderboard(b, bootstrap=300, seed=1)
    assert time.perf_counter() - t < 5
    y, z = leaderboard(b, bootstrap=300, seed=1), leaderboard(b, bootstrap=300, seed=2)
    assert np.array_equal(x.lower, y.lower) and not np.array_equal(x.lower, z.lower)
    assert (x.lower < x.median).all() and (x.median < x.upper).all()
    assert np.abs(x.median - x.rating).max() < 5


def test_style_features():
    f = style_features("# Title\n\n- one\n- two\n1. three\nsome **bold** and __more__")
    assert f == {"length": 56.0, "headers": 1.0, "lists": 3.0, "bold": 2.0}


# ----------------------------------------------------------------------------- reading battles
def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_battles_jsonl_json_list_and_conv_metadata(tmp_path):
    rows = [{"model_a": "x", "model_b": "y", "winner": "model_a", "style_a": {"length": 3}, "style_b": {"length": 1}},
            {"model_a": "y", "model_b": "x", "winner": "tie (bothbad)", "style_a": {"length": 2},
             "style_b": {"length": 5}}]
    b = read_battles(_write(tmp_path / "b.jsonl", rows))
    assert b.models == ["x", "y"] and b.score.tolist() == [1.0, 0.5] and b.features == ["length"]
    assert b.style_a["length"].tolist() == [3.0, 2.0]
    meta = {"sum_assistant_a_tokens": 10, "sum_assistant_b_tokens": 20, "header_count_a": {"h1": 1, "h2": 1},
            "header_count_b": {"h1": 0}, "list_count_a": {"ordered": 0}, "list_count_b": {"ordered": 2},
            "bold_count_a": {"**": 1}, "bold_count_b": {"**": 0}}
    (tmp_path / "b.json").write_text(json.dumps([{"model_a": "p", "model_b": "q", "winner": "model_b",
                                                  "conv_metadata": meta, "tstamp": 1}]))
    b = read_battles(tmp_path / "b.json")
    assert b.features == ["bold", "headers", "length", "lists"] and b.style_a["headers"].tolist() == [2.0]


@pytest.mark.parametrize("record,named", [
    ({"model_a": "x", "model_b": "y", "winner": "A"}, "field 'winner': expected one of model_a, model_b, tie"),
    ({"model_a": "x", "model_b": "x", "winner": "tie"}, "field 'model_b': model_a and model_b are the same"),
    ({"model_a": "x", "winner": "tie"}, "field 'model_b'"),
    ({"model_a": "", "model_b": "y", "winner": "tie"}, "field 'model_a'"),
    ({"model_a": "x", "model_b": "y", "winner": "tie", "style_a": {"length": "long"}, "style_b": {"length": 1}},
     "field 'style_a.length'"),
    ({"model_a": "x", "model_b": "y", "winner": "tie", "style_a": {"length": 1}}, "field 'style_b'"),
    ('{"model_a": "x",', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_a_bad_battle_is_located(tmp_path, record, named):
    good = {"model_a": "x", "model_b": "y", "winner": "model_a"}
    path = _write(tmp_path / "b.jsonl", [good, good, record])
    with pytest.raises(DataError) as e:
        read_battles(path)
    assert str(e.value).startswith(f"{path}:3:") and named in str(e.value)


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no battles"):
        read_battles(tmp_path / "e.jsonl")


# ----------------------------------------------------------------------------- tristage leaderboard
def _cli(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_leaderboard_command_writes_the_board(tmp_path, capsys):
    b = random_battles(n=600, style=True)
    rows = [{"model_a": b.models[x], "model_b": b.models[y], "winner": w, "style_a": {"length": la},
             "style_b": {"length": lb}} for x, y, w, la, lb in zip(b.a, b.b, b.winners(), b.style_a["length"],
                                                                   b.style_b["length"])]
    path = _write(tmp_path / "b.jsonl", rows)
    code, out, err = _cli(["leaderboard", str(path), "--json", str(tmp_path / "o.json"), "--bootstrap", "50",
                           "--matrices", str(tmp_path / "m.json"), "--anchor", "y=1200", "--png",
                           str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert "rating" in out and "95% interval" in out and "style control" not in out
    board = json.loads((tmp_path / "o.json").read_text())
    assert [r["model"] for r in board] == ["w", "x", "y", "z"]
    assert {"model", "rating", "lower", "upper", "battles"} <= set(board[0])
    assert board[2]["rating"] == 1200.0 and board[0]["lower"] < board[0]["rating"] < board[0]["upper"]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["models"] == ["w", "x", "y", "z"] and m["battles"][0][0] == 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = _cli(["leaderboard", str(path), "--bootstrap", "20", "--style-control"], capsys)
    assert code == 0 and "style control: length" in out


@pytest.mark.parametrize("argv,named", [
    (["--anchor", "nobody=1000"], "--anchor nobody: no such model"),
    (["--anchor", "x"], "--anchor must be MODEL=RATING"),
    (["--style-control", "--style-features", "bold"], "style feature 'bold' is not on every battle"),
    (["--style-features", "length"], "--style-features needs --style-control"),
    (["--models", "x", "nobody"], "--models: nobody not in"),
    (["--json", "/proc/x/board.json"], "--json /proc/x/board.json"),
])
def test_leaderboard_bad_input_is_one_line(tmp_path, capsys, argv, named):
    path = _write(tmp_path / "b.jsonl", [{"model_a": "x", "model_b": "y", "winner": "model_a"}])
    code, _, err = _cli(["leaderboard", str(path), "--bootstrap", "5", *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and named in err, err


def test_leaderboard_bad_file_is_one_line(tmp_path, capsys):
    path = _write(tmp_path / "b.jsonl", [{"model_a": "x", "model_b": "y", "winner": "model_a"},
                                         {"model_a": "x", "model_b": "y", "winner": "draw"}])
    code, _, err = _cli(["leaderboard", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{path}:2: field 'winner'" in err
    code, _, err = _cli(["leaderboard", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "missing.jsonl" in err and "no such file" in err


def test_vicuna80_human_votes():
    from conftest import shared_data

    b = read_battles(shared_data("arena/vicuna80/human_battles.jsonl"))
    assert len(b) == 7040 and len(b.models) == 9
    board = leaderboard(b, bootstrap=100)
    assert board.models[0] in ("gpt4", "claude") and board.models[-1] in ("bard", "gpt35")
    assert (board.upper - board.lower).max() < 80


# ----------------------------------------------------------------------------- tristage arena on tiny models
def by_length(prompt: str, responses: list[str]) -> list[float]:
    """The arena tests' python judge: longer is better. With ARENA_TEST_FAIL_AFTER=N set, the call after the Nth
    raises (an interruption in the middle of judging)."""
    import os

    global _calls
    _calls = globals().get("_calls", 0) + 1
    limit = os.environ.get("ARENA_TEST_FAIL_AFTER")
    if limit is not None and _calls > int(limit):
        raise KeyboardInterrupt("interrupted by the test")
    return [float(len(r)) for r in responses]


def _chat_model(tok, end_bias: float, seed: int):
    """A random model writing the corpus' characters and ending its turn at random lengths, sooner for a larger
    end_bias (hidden dim 0 is held constant, so the head's column 0 is a per-token logit bias; see test_label)."""
    import torch

    from tristage.model.gpt import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        for i in range(tok.vocab_size):
            piece = tok.id_to_token(i)
            if piece.startswith("<0x") or piece.startswith("<|"):
                model.lm_head.weight[i, 0] = -5.0
        model.lm_head.weight[tok.token_to_id("<|im_end|>"), 0] = end_bias
    return model


@pytest.fixture(scope="module")
def arena_setup(tiny_shards, tmp_path_factory):
    from tristage.model.hf import save_model
    from tristage.tokenizer import Tokenizer
    from tristage.world import generate

    root = tmp_path_factory.mktemp("arena")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    for name, bias, seed in (("terse", 2.5, 0), ("plain", 0.5, 1), ("wordy", -1.5, 2)):
        save_model(_chat_model(tok, bias, seed), root / name / "model", tok)
    prompts = [{"prompt": "where did the dog sit?"}, {"prompt": "the cat?"}, {"prompt": "a fish?"},
               {"prompt": [{"role": "system", "content": "be kind."}, {"role": "user", "content": "the bird?"}]},
               {"prompt": "tell me about the mat."}, {"prompt": "the porch"}]
    _write(root / "prompts.jsonl", prompts)
    generate(root / "world", seed=0, n_stories=10, n_sft=4, n_pref=4, n_eval=6)
    return root


def _arena(root, out, *extra, models=("terse", "plain", "wordy"), judge=None):
    return ["arena", *[str(root / m / "model") for m in models], "--prompts", str(root / "prompts.jsonl"),
            "--judge", judge or f"python:{__file__}:by_length", "--out", str(out), "--max-new-tokens", "24",
            "--batch-size", "4", "--judge-batch-size", "2", "--bootstrap", "50", "--no-progress", *extra]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_arena_ranks_the_models_and_writes_the_board(arena_setup, tmp_path, capsys):
    out = tmp_path / "a"
    code, text, err = _cli(_arena(arena_setup, out), capsys)
    assert code == 0, err
    battles = _lines(out / "battles.jsonl")
    assert len(battles) == 6 * 3  # every prompt x every pair
    assert {frozenset((b["model_a"], b["model_b"])) for b in battles} == {frozenset(p) for p in
                                                                         [("terse", "plain"), ("terse", "wordy"),
                                                                          ("plain", "wordy")]}
    assert len({(b["model_a"], b["model_b"]) for b in battles}) > 3  # sides drawn: both orders occur
    for b in battles:
        assert b["judge"].startswith("python:") and b["style_a"]["length"] >= 0
        if not b.get("identical"):
            sa, sb = b["score_a"], b["score_b"]
            assert b["winner"] == ("model_a" if sa > sb else "model_b" if sb > sa else "tie")
            assert (sa, sb) == (b["style_a"]["length"], b["style_b"]["length"])  # by_length scores the answer
    answers = {m: _lines(out / "answers" / f"{m}.jsonl") for m in ("terse", "plain", "wordy")}
    assert all(len(a) == 6 for a in answers.values())
    mean_len = {m: np.mean([len(r["answer"]) for r in a]) for m, a in answers.items()}
    assert mean_len["wordy"] > mean_len["terse"]
    board = json.loads((out / "leaderboard.json").read_text())
    assert [r["model"] for r in board][0] == max(mean_len, key=mean_len.get)
    assert {"model", "rating", "lower", "upper", "battles"} <= set(board[0]) and board[0]["battles"] == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["battles"] == 18 and summary["battles_judged"] == 18 and "kendall_tau" not in summary
    assert "rating" in text and "arena: 18 battles judged now" in text
    pytest.importorskip("matplotlib")
    assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    # the battles are a leaderboard file as they are
    code, text, err = _cli(["leaderboard", str(out / "battles.jsonl"), "--bootstrap", "10", "--style-control"], capsys)
    assert code == 0 and "style control: length" in text, err


def test_arena_resumes_after_an_interruption(arena_setup, tmp_path, capsys, monkeypatch):
    full = tmp_path / "full"
    assert _cli(_arena(arena_setup, full), capsys)[0] == 0
    # interrupted while answering: the second batch of the second model never finishes
    from tristage.stages import arena

    real, calls = arena.sample_answers, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(arena, "sample_answers", flaky)
    with pytest.raises(KeyboardInterrupt):
        cli_main(_arena(arena_setup, out))
    monkeypatch.setattr(arena, "sample_answers", real)
    assert len(_lines(out / "answers" / "plain.jsonl")) == 4 and not (out / "battles.jsonl").exists()
    with open(out / "answers" / "plain.jsonl", "a") as fh:
        fh.write('{"question_id": 4, "prompt": "tell me ab')  # a write cut short
    # interrupted while judging: after 4 calls of the judge function (one per prompt)
    monkeypatch.setenv("ARENA_TEST_FAIL_AFTER", "4")
    with pytest.raises(KeyboardInterrupt):
        cli_main(_arena(arena_setup, out))
    monkeypatch.delenv("ARENA_TEST_FAIL_AFTER")
    partial = _lines(out / "battles.jsonl")
    assert 0 < len(partial) < 18
    code, text, err = _cli(_arena(arena_setup, out), capsys)
    assert code == 0, err
    assert f"{18 - len(partial)} battles judged now, {len(partial)} kept from before" in text
    for m in ("terse", "plain", "wordy"):  # the same answers and battles as the uninterrupted run
        assert (out / "answers" / f"{m}.jsonl").read_text() == (full / "answers" / f"{m}.jsonl").read_text()
    assert (out / "battles.jsonl").read_text() == (full / "battles.jsonl").read_text()
    # a finished run only redraws the board; a model added later joins it
    code, text, err = _cli(_arena(arena_setup, out), capsys)
    assert code == 0 and "0 battles judged now, 18 kept" in text
    argv = _arena(arena_setup, out)
    argv.insert(4, f"plain2={arena_setup / 'plain' / 'model'}")
    code, text, err = _cli(argv, capsys)
    assert code == 0 and "18 battles judged now, 18 kept" in text, err
    assert (out / "answers" / "plain2.jsonl").read_text() == (out / "answers" / "plain.jsonl").read_text()
    twins = [b for b in _lines(out / "battles.jsonl") if {b["model_a"], b["model_b"]} == {"plain", "plain2"}]
    assert len(twins) == 6 and all(b["identical"] and b["winner"] == "tie" for b in twins)  # they answer alike


def test_arena_refuses_other_settings_in_the_same_out(arena_setup, tmp_path, capsys):
    out = tmp_path / "a"
    assert _cli(_arena(arena_setup, out, models=("terse", "plain")), capsys)[0] == 0
    code, _, err = _cli(_arena(arena_setup, out, models=("terse", "plain"), judge="gold"), capsys)
    assert code == 2 and "another judge setting, spec 'python:" in err and "--overwrite" in err
    code, _, err = _cli(_arena(arena_setup, out, "--temperature", "0.5", models=("terse", "plain")), capsys)
    assert code == 2 and "another sampling setting, temperature 0.7 (now 0.5)" in err
    code, _, err = _cli(_arena(arena_setup, out, "--limit", "2", models=("terse", "plain")), capsys)
    assert code == 2 and "other prompts (6 prompts, now 2)" in err
    argv = _arena(arena_setup, out, models=("terse", "wordy"))
    argv.insert(3, f"wordy={arena_setup / 'plain' / 'model'}")
    code, _, err = _cli(argv, capsys)
    assert code == 2 and "two models named 'wordy'" in err
    code, _, err = _cli(["arena", f"terse={arena_setup / 'wordy' / 'model'}", str(arena_setup / "plain" / "model"),
                         "--prompts", str(arena_setup / "prompts.jsonl"), "--judge", "gold", "--out", str(out),
                         "--overwrite", "--no-progress", "--bootstrap", "0", "--max-new-tokens", "8"], capsys)
    assert code == 0, err  # --overwrite starts over


def test_arena_with_world_llm_and_answer_files(arena_setup, tmp_path, capsys):
    from tristage.world import score

    root = arena_setup
    prompts = str(root / "world" / "eval" / "prompts.jsonl")
    out = tmp_path / "w"
    argv = _arena(root, out, judge="world", models=("terse", "wordy"))
    argv[argv.index("--prompts") + 1] = prompts
    code, text, err = _cli(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert "kendall_tau" in summary and set(summary["gold"]) == {"terse", "wordy"}
    assert len(summary["gold_pairs"]) == 1 and "as gold does" in text
    for b in _lines(out / "battles.jsonl"):
        if not b.get("identical"):
            assert 0 <= b["p_a"] <= 1 and {"gold_a", "gold_b"} <= set(b)
    answers = _lines(out / "answers" / "terse.jsonl")
    rows = [json.loads(x) for x in open(prompts).read().splitlines()]
    gold = np.mean([score(r["prompt"], a["answer"]).overall for r, a in zip(rows, answers)])
    assert summary["gold"]["terse"]["mean"] == pytest.approx(gold)
    # an llm judge with MT-bench's pairwise prompt, asked in both orders; the answers read back from files
    judge_prompts = tmp_path / "judge_prompts.jsonl"
    _write(judge_prompts, [{"name": "single", "type": "single", "prompt_template": "{question} {answer}"},
                           {"name": "pair-v2", "type": "pairwise", "system_prompt": "be fair.",
                            "prompt_template": "[Q]\n{question}\n[A]\n{answer_a}\n[B]\n{answer_b}",
                            "output_format": "[[A]]"}])
    out2 = tmp_path / "llm"
    code, text, err = _cli(["arena", f"t={out / 'answers' / 'terse.jsonl'}", f"w={out / 'answers' / 'wordy.jsonl'}",
                            "--prompts", prompts, "--judge", f"llm:{root / 'plain' / 'model'}", "--judge-prompt",
                            str(judge_prompts), "--out", str(out2), "--bootstrap", "20", "--no-progress"], capsys)
    assert code == 0, err
    battles = _lines(out2 / "battles.jsonl")
    assert len(battles) == 6 and json.loads((out2 / "arena.json").read_text())["models"]["t"]["kind"] == "answers"
    for b in battles:
        if not b.get("identical"):
            assert 0 < b["p_a_first"] < 1 and 0 < b["p_b_first"] < 1
            v1 = "model_a" if b["p_a_first"] > 0.5 else "model_b"
            v2 = "model_b" if b["p_b_first"] > 0.5 else "model_a"
            assert b["winner"] == (v1 if v1 == v2 else "tie") and b.get("inconsistent", False) == (v1 != v2)
    from tristage.eval.judges import load_judge_prompt

    jp = load_judge_prompt(str(judge_prompts))
    assert (jp.name, jp.system, jp.reply_prefix) == ("pair-v2", "be fair.", "[[")


def test_arena_samples_several_answers_per_prompt(arena_setup, tmp_path, capsys):
    root = arena_setup
    out = tmp_path / "k"
    code, _, err = _cli(_arena(root, out, "--samples", "3", "--limit", "4", models=("terse", "plain")), capsys)
    assert code == 0, err
    answers = _lines(out / "answers" / "terse.jsonl")
    assert [a["question_id"] for a in answers] == list(range(12))  # slot i*3 + j
    prompts = _lines(root / "prompts.jsonl")[:4]
    assert [a["prompt"] for a in answers] == [p["prompt"] for p in prompts for _ in range(3)]
    for i in range(4):  # the three samples of a prompt are drawn with their own seeds
        assert len({a["answer"] for a in answers[3 * i:3 * i + 3]}) > 1 or answers[3 * i]["finish_reason"] == "stop"
    battles = _lines(out / "battles.jsonl")
    assert sorted(b["question_id"] for b in battles) == list(range(12))
    one = tmp_path / "one"  # sample 0 is the answer a --samples 1 run draws
    assert _cli(_arena(root, one, "--limit", "4", models=("terse", "plain")), capsys)[0] == 0
    first = _lines(one / "answers" / "terse.jsonl")
    assert answers[0]["answer"] == first[0]["answer"]
    # an answers file serves K answers per prompt in file order, and too few is one located line
    out2 = tmp_path / "files"
    code, _, err = _cli(["arena", f"t={out / 'answers' / 'terse.jsonl'}", f"p={out / 'answers' / 'plain.jsonl'}",
                         "--prompts", str(root / "prompts.jsonl"), "--limit", "4", "--samples", "3", "--judge",
                         f"python:{__file__}:by_length", "--out", str(out2), "--bootstrap", "0", "--no-progress"],
                        capsys)
    assert code == 0, err
    def won(b, rename=lambda m: m):  # the winner's name (sides are drawn per name, so they differ)
        return rename(b[b["winner"]]) if b["winner"] in ("model_a", "model_b") else b["winner"]

    full = {"t": "terse", "p": "plain"}.get
    assert (sorted((b["question_id"], won(b, full)) for b in _lines(out2 / "battles.jsonl"))
            == sorted((b["question_id"], won(b)) for b in battles))
    code, _, err = _cli(["arena", f"t={out / 'answers' / 'terse.jsonl'}", f"p={out / 'answers' / 'plain.jsonl'}",
                         "--prompts", str(root / "prompts.jsonl"), "--limit", "4", "--samples", "4", "--judge",
                         "gold", "--out", str(tmp_path / "short"), "--no-progress"], capsys)
    assert code == 2 and "3 answer(s) to the prompt at" in err and "--samples 4 needs 4" in err, err
    code, _, err = _cli(_arena(root, tmp_path / "g", "--samples", "2", "--temperature", "0"), capsys)
    assert code == 2 and "--temperature 0" in err and err.count("\n") == 1, err


def test_gold_pairs_checks_the_board_where_gold_resolves_the_pair():
    from tristage.stages.arena import gold_pairs

    gold = {"a": [0.9, 0.8, 0.9, 0.8], "b": [0.5, 0.4, 0.5, 0.5], "c": [0.5, 0.5, 0.4, 0.5]}
    pairs = gold_pairs(["a", "b", "c"], [900.0, 1000.0, 1100.0], gold)
    by = {(p["model_a"], p["model_b"]): p for p in pairs}
    assert list(by) == [("c", "b"), ("c", "a"), ("b", "a")]  # the better-rated first
    assert by[("c", "b")]["gold_diff"] == pytest.approx(0.0) and not by[("c", "b")]["gold_resolved"]
    ca = by[("c", "a")]
    assert ca["gold_diff"] == pytest.approx(-0.375) and ca["gold_resolved"] and not ca["agree"]
    assert ca["rating_diff"] == pytest.approx(200.0)
    d = [-0.4, -0.4, -0.4, -0.3]  # b - a per slot: mean -0.375, sd 0.05, half-width 1.96 * 0.05 / 2
    assert by[("b", "a")]["high"] == pytest.approx(-0.375 + 1.96 * np.std(d, ddof=1) / 2)


@pytest.mark.parametrize("case,named", [
    ("one", "MODELS: an arena needs at least two models (got 1)"),
    ("missing", "no such model folder or file of answers"),
    ("no_prompts", "no such file"),
    ("short_answers", "no answer to the prompt at"),
    ("judge_prompt", "--judge-prompt applies to llm:PATH judges only"),
    ("anchor", "--anchor nobody: no such model"),
    ("judge", "--judge 'oracle'"),
    ("not_a_folder", "--out"),
])
def test_arena_bad_input_is_one_line(arena_setup, tmp_path, capsys, case, named):
    root = arena_setup
    argv = _arena(root, tmp_path / "o", models=("terse", "plain"))
    if case == "one":
        argv.remove(str(root / "plain" / "model"))
    elif case == "missing":
        argv[2] = str(root / "nope")
    elif case == "no_prompts":
        argv[argv.index("--prompts") + 1] = str(root / "nope.jsonl")
    elif case == "short_answers":
        _write(tmp_path / "ans.jsonl", [{"prompt": "the cat?", "answer": "meow"}])
        argv[2] = str(tmp_path / "ans.jsonl")
    elif case == "judge_prompt":
        argv += ["--judge-prompt", str(tmp_path / "j.jsonl")]
    elif case == "anchor":
        argv += ["--anchor", "nobody=1000"]
    elif case == "judge":
        argv[argv.index("--judge") + 1] = "oracle"
    elif case == "not_a_folder":
        (tmp_path / "file").write_text("x")
        argv[argv.index("--out") + 1] = str(tmp_path / "file")
    code, _, err = _cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and named in err, err


def test_mt_bench_judge_prompts_load():
    from conftest import shared_data

    from tristage.eval.judges import load_judge_prompt

    path = shared_data("arena/mt_bench/judge_prompts.jsonl")
    jp = load_judge_prompt(str(path))
    assert jp.name == "pair-v2" and jp.reply_prefix == "[[" and "impartial judge" in jp.system
    assert "{answer_b}" in jp.user and "B's Answer" in jp.messages("q?", "x", "y")[-1]["content"]
    with pytest.raises(ValueError, match="ref_answer_1"):
        load_judge_prompt(f"{path}:pair-math-v1")
