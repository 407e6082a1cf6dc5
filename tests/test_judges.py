"""Judges behind two interfaces: scalar (gold, python, rm) and pairwise (world annotator, llm), the round robin, and
make_judge's spec parsing. The llm and rm judges inside `tristage label` are tested in test_label.py."""

from __future__ import annotations

import pytest
import torch

from tristage.eval.judges import (
    AnnotatorJudge,
    GoldJudge,
    PairwiseJudge,
    PythonJudge,
    ScalarJudge,
    make_judge,
    round_robin,
)
from tristage.world import Annotator, score

PROMPT = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "Tell me a story about Tom."}]
ANSWERS = ["Tom sat on the mat. The end.", "Tom walked to the park with his dog, and they played until dark.",
           "cat"]


def shortest(prompt: str, responses: list[str]) -> list[float]:
    assert prompt == PROMPT[-1]["content"]  # python judges see the last user message
    return [-float(len(r)) for r in responses]


def not_numbers(prompt: str, responses: list[str]):
    return ["x" for _ in responses]


def test_specs_give_the_judge_of_each_interface():
    assert isinstance(make_judge("gold"), GoldJudge) and isinstance(make_judge("gold"), ScalarJudge)
    world = make_judge("world", annotator_temperature=0.0, seed=3)
    assert isinstance(world, AnnotatorJudge) and isinstance(world, PairwiseJudge)
    assert not isinstance(world, ScalarJudge) and not isinstance(make_judge("gold"), PairwiseJudge)
    assert (world.annotator.temperature, world.annotator.seed) == (0.0, 3)
    python = make_judge(f"python:{__file__}:shortest")
    assert isinstance(python, PythonJudge) and python.spec == f"python:{__file__}:shortest"
    assert make_judge("python:test_judges:shortest").fn.__name__ == "shortest"  # a module path works too
    for bad in ("oracle", "gold:x", "world:1", "rm:", "llm:", "python:nofunction"):
        with pytest.raises(ValueError):
            make_judge(bad)
    with pytest.raises(ValueError, match="has no function"):
        make_judge(f"python:{__file__}:missing")


def test_scalar_judges_score_each_answer():
    gold = make_judge("gold").scores([PROMPT, PROMPT], [ANSWERS, ANSWERS[:2]])
    assert gold == [[score(PROMPT[-1]["content"], a).overall for a in ANSWERS],
                    [score(PROMPT[-1]["content"], a).overall for a in ANSWERS[:2]]]
    assert make_judge(f"python:{__file__}:shortest").scores([PROMPT], [ANSWERS]) == [[-len(a) for a in ANSWERS]]
    with pytest.raises(ValueError, match="list of numbers"):
        make_judge(f"python:{__file__}:not_numbers").scores([PROMPT], [ANSWERS])


def test_annotator_judge_is_the_world_annotator():
    judge = make_judge("world", annotator_temperature=0.1, seed=7)
    annotator = Annotator(0.1, 7)
    p = judge.compare([PROMPT, PROMPT], [ANSWERS[0], ANSWERS[2]], [ANSWERS[1], ANSWERS[0]])
    want = [annotator.compare(PROMPT[-1]["content"], ANSWERS[0], ANSWERS[1]),
            annotator.compare(PROMPT[-1]["content"], ANSWERS[2], ANSWERS[0])]
    assert p == [w.p_a for w in want]
    assert judge.judgement(PROMPT, ANSWERS[0], ANSWERS[1]) == want[0]  # the same seeded draw, ratings, rationale


class Fixed:
    """A pairwise judge with a position bias: P(A) = table[a][b] + bias."""

    def __init__(self, table: dict[str, dict[str, float]], bias: float):
        self.spec, self.stats, self.table, self.bias, self.asked = "fixed", {}, table, bias, []

    def compare(self, prompts, a, b):
        self.asked.append(len(a))
        return [self.table[x][y] + self.bias for x, y in zip(a, b)]


def test_round_robin_asks_every_ordered_pair_once_and_cancels_position_bias():
    cands = ["a", "b", "c"]
    table = {"a": {"b": 0.6, "c": 0.7}, "b": {"a": 0.4, "c": 0.5}, "c": {"a": 0.3, "b": 0.5}}
    judge = Fixed(table, bias=0.2)
    beats, two = round_robin(judge, [PROMPT, PROMPT], [cands, cands[:2]])
    assert judge.asked == [6 + 2]  # one batched call, k(k-1) questions per prompt
    assert isinstance(judge, PairwiseJudge)
    want = torch.tensor([[0.0, 0.6, 0.7], [0.4, 0.0, 0.5], [0.3, 0.5, 0.0]])
    torch.testing.assert_close(beats, want)  # the +0.2 for whoever is shown first cancels
    torch.testing.assert_close(two, want[:2, :2])
    assert round_robin(judge, [], []) == []
