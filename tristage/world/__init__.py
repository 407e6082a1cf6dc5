"""The demo world: procedurally generated stories with physical and social rules, data for every stage,
and a gold scorer that knows the truth.

Public API (what later stages call):
    score(prompt, response) -> Score          gold per-attribute scores, overall in [0, 1], reasons
    Annotator(temperature, seed).compare(prompt, a, b) -> Judgement   a noisy, explained preference
    generate(out, seed=..., ...) -> summary    write pretrain/ sft/ preference/ eval/ under `out`
    read_documents(path), read_prompts(path), read_eval_prompts(path)   loaders for the files it writes

Modules: entities (who and what exists), grammar (sentence templates that write and parse), rules
(plausibility and coherence), prompts (requests and their wording), stories (the writer), gold (the
scorer), annotator (simulated preferences), data (the files), cli (`tristage world ...`).
"""

from tristage.world.annotator import Annotator, Judgement, expected_agreement, preference_probability
from tristage.world.data import generate, read_documents, read_eval_prompts, read_prompts
from tristage.world.gold import ATTRIBUTES, Score, score

__all__ = [
    "ATTRIBUTES",
    "Annotator",
    "Judgement",
    "Score",
    "expected_agreement",
    "generate",
    "preference_probability",
    "read_documents",
    "read_eval_prompts",
    "read_prompts",
    "score",
]
