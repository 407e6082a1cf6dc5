"""The simulated annotator: a noisy person who compares two responses and says why.

Choices:
- The choice is a Bradley-Terry draw on the gold overall scores: P(A preferred) =
  sigmoid((gold_A - gold_B) / temperature). Temperature 0 is a perfect annotator; at the default
  0.1 a gap of 0.1 in gold score is picked right 73% of the time, a gap of 0.3 95%. So the labels are
  realistically imperfect, and how imperfect is known exactly (`expected_agreement`), which lets a
  test check the noise and lets later stages say how close a reward model gets to the ceiling.
- Per-attribute ratings are on a 1-5 scale (as fine-grained human feedback is collected): the gold
  attribute score plus Gaussian noise with standard deviation `temperature`, rounded.
- The rationale names the attributes where the chosen response is better and the rule behind the
  rejected one's worst penalties: the detailed guidance a bare "A beats B" lacks.
- The noise is drawn from a generator seeded by sha256(seed, prompt, a, b), not from a stateful
  stream: the same question gets the same answer whatever order pairs are labelled in, in any
  process, so labelling a model's own samples is reproducible.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import asdict, dataclass

from tristage.world.gold import ATTRIBUTES, Score, score

_score = functools.lru_cache(maxsize=8192)(score)  # the same response is often compared several times

_PRAISE = {
    "instruction_following": "follows the request more closely",
    "plausibility": "makes more sense",
    "coherence": "keeps its characters straight",
    "fluency": "reads more smoothly",
    "length": "has a better length",
    "ending": "has a more satisfying ending",
    "vividness": "has more vivid detail",
    "mood": "carries the requested mood through",
}


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def preference_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """P(A is preferred) under the annotator's Bradley-Terry model."""
    if temperature <= 0:
        return 1.0 if gold_a > gold_b else 0.0 if gold_a < gold_b else 0.5
    return sigmoid((gold_a - gold_b) / temperature)


def expected_agreement(gold_diffs: list[float], temperature: float) -> float:
    """The expected share of labels that agree with gold on pairs with these (non-zero) gold gaps."""
    diffs = [abs(d) for d in gold_diffs if d != 0]
    return sum(preference_probability(d, 0.0, temperature) for d in diffs) / max(1, len(diffs))


@dataclass
class Judgement:
    chosen: str
    rejected: str
    a_preferred: bool
    ratings: dict[str, dict[str, int]]  # {"chosen": {attribute: 1..5}, "rejected": {...}}
    rationale: str
    p_a: float  # the probability the annotator had of preferring A
    gold_chosen: float
    gold_rejected: float

    def to_record(self, prompt: str) -> dict:
        """A preference record in the project's format."""
        return {
            "prompt": prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "ratings": self.ratings,
            "rationale": self.rationale,
        }

    def to_dict(self) -> dict:
        return asdict(self)


class Annotator:
    """Labels any two responses to a prompt: `Annotator(temperature=0.1, seed=0).compare(prompt, a, b)`."""

    def __init__(self, temperature: float = 0.1, seed: int = 0):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature, self.seed = temperature, seed

    def _rng(self, prompt: str, a: str, b: str) -> random.Random:
        h = hashlib.sha256("\x00".join((str(self.seed), prompt, a, b)).encode()).digest()
        return random.Random(int.from_bytes(h[:8], "big"))

    def _ratings(self, s: Score, rng: random.Random) -> dict[str, int]:
        out = {}
        for attr in ATTRIBUTES:
            noisy = s.attributes[attr] + rng.gauss(0.0, self.temperature)
            out[attr] = int(min(5, max(1, round(1 + 4 * noisy))))
        return out

    def compare(self, prompt: str, a: str, b: str) -> Judgement:
        rng = self._rng(prompt, a, b)
        sa, sb = _score(prompt, a), _score(prompt, b)
        p_a = preference_probability(sa.overall, sb.overall, self.temperature)
        a_wins = rng.random() < p_a
        (c, sc), (r, sr) = ((a, sa), (b, sb)) if a_wins else ((b, sb), (a, sa))
        ratings = {"chosen": self._ratings(sc, rng), "rejected": self._ratings(sr, rng)}
        return Judgement(c, r, a_wins, ratings, rationale(sc, sr), p_a, sc.overall, sr.overall)


def rationale(chosen: Score, rejected: Score) -> str:
    """A short explanation, from the chosen response's side."""
    better = [a for a in chosen.counted if chosen.attributes[a] - rejected.attributes[a] >= 0.1]
    better.sort(key=lambda a: rejected.attributes[a] - chosen.attributes[a])
    if better:
        praise = [_PRAISE[a] for a in better[:3]]
        text = "The chosen response " + (", ".join(praise[:-1]) + " and " if len(praise) > 1 else "") + praise[-1] + "."
    else:
        text = "The two responses are close; the chosen one reads a little better overall."
    flaws = [
        r.split(" [")[0].split(": ", 1)[1]
        for r in rejected.reasons
        if r.split(":")[0] in ("instruction_following", "plausibility", "coherence", "ending", "mood")
    ]
    flaws = list(dict.fromkeys(flaws))[:2]
    if flaws:
        text += " The rejected one: " + "; ".join(flaws) + "."
    return text
