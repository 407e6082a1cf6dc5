"""The gold scorer: how good a response is to a prompt, by the world's own rules.

`score(prompt, response) -> Score` with per-attribute scores and `overall` in [0, 1], deterministic,
and `reasons` naming the rule behind every penalty ("plausibility: sitting on a cactus hurts [cactus]
(sentence 1)"). Every stage is measured against it: does SFT follow instructions, does the reward
model agree with it, does PPO raise it or only the reward model's score.

Choices:
- The prompt is parsed from its text alone (prompts.parse_prompt), so the scorer works on any
  prompt, including the held-out ones and a user's paraphrase; an unrecognized prompt is scored as
  a free story (nothing requested, so instruction following does not count).
- Each sentence is parsed with the grammar and checked by the same rules the generator obeys.
  A sentence the grammar cannot parse gets graded partial credit, never an exception: fluency by
  the share of its words the world knows; plausibility and coherence from the characters, places
  and spots it mentions (a fish "swimming happily on the patio" is still caught).
- Attributes (1.0 = nothing to fault):
  instruction_following  the opening kept / the character, place and goal asked for / the question answered
  plausibility           0.5 per rule broken, scaled down by how much of the text could be understood
  coherence              0.5 per reference fault (pronoun agreement, a protagonist who changes)
  fluency                parsed sentences 1, unparsed by known words; repeats and truncation penalized
  length                 sentences within the asked range (short 2-4, long 7-10, default 4-8, answers 1-2)
  ending                 0.6 if a stated goal gets an outcome, +0.4 for a closing line (0.1 if flat)
  vividness              0.2 with no vivid detail, 0.7 with one, 1.0 with two or more
  mood                   share of mood-carrying sentences in the asked mood, times how many carry it (3 = all)
  Only the attributes that apply are counted in `overall` (a weighted mean): mood only when a
  mood was asked for; ending, vividness and mood not for answers to questions. The weights favour
  what a person would fault first: ignoring the request and writing nonsense.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from tristage.world.entities import CHARACTERS, FEELINGS, MOODS, PLACES, SPOTS, Character, character
from tristage.world.grammar import GOALS, VOCAB, Frame, normalize, parse_sentence, split_sentences
from tristage.world.prompts import CHAR_RX, Request, find_places, parse_prompt
from tristage.world.rules import Context, Fault, check, detail_mood, place_faults, sit_faults

ATTRIBUTES = ("instruction_following", "plausibility", "coherence", "fluency", "length", "ending", "vividness", "mood")
WEIGHTS = {
    "instruction_following": 3.0,
    "plausibility": 3.0,
    "coherence": 1.5,
    "fluency": 2.0,
    "length": 1.5,
    "ending": 1.0,
    "vividness": 1.0,
    "mood": 1.0,
}


@dataclass
class Score:
    overall: float
    attributes: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    counted: tuple[str, ...] = ATTRIBUTES  # the attributes that make up `overall`
    kind: str = "free"  # what the prompt asked for: continue | story | fact | free

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Reading:
    """What a response says, sentence by sentence."""

    frames: list[Frame | None] = field(default_factory=list)
    faults: list[list[Fault]] = field(default_factory=list)
    understood: list[bool] = field(default_factory=list)
    chars: list[Character] = field(default_factory=list)  # every character named, in order
    places: list[str] = field(default_factory=list)
    moods: list[str] = field(default_factory=list)
    ctx: Context = field(default_factory=Context)


_SPOT_RX = re.compile(r"\b(" + "|".join(sorted(SPOTS, key=len, reverse=True)) + r")\b")
_SITTING = {"sat", "sit", "sits", "sitting", "nap", "napped", "lay", "lying", "slept", "sleep", "sleeps"}
_PRONOUN_OF = {"he": "he", "his": "he", "him": "he", "she": "she", "her": "she", "hers": "she"}


def _fallback(sentence: str, ctx: Context, r: _Reading) -> tuple[list[Fault], bool]:
    """Faults and whether anything was recognized, for a sentence the grammar cannot parse."""
    low = sentence.lower().replace("lily pad", "lily_pad")
    words = re.findall(r"[a-z_]+", low)
    chars = [character(m) for m in CHAR_RX.findall(low)]
    chars = [c for c in chars if c is not None]
    faults: list[Fault] = []
    if chars and ctx.hero is None:
        ctx.hero = chars[0]
    r.chars.extend(chars)
    actor = chars[0] if chars else ctx.hero
    pronouns = {_PRONOUN_OF[w] for w in words if w in _PRONOUN_OF}
    if ctx.hero is not None and len(set(chars)) <= 1 and pronouns - {ctx.hero.pronoun}:
        bad = sorted(pronouns - {ctx.hero.pronoun})[0]
        faults.append(Fault("coherence", "pronoun_agreement", f"'{bad}' does not fit {ctx.hero.subject}"))
    places = find_places(low)
    for name in places:
        ctx.place = PLACES[name]
        faults.extend(place_faults(actor, ctx.place))
    r.places.extend(places)
    spots = [s.replace("_", " ") for s in _SPOT_RX.findall(low.replace("lily_pad", "lily pad"))]
    if spots and _SITTING & set(words):
        for s in spots:
            faults.extend(sit_faults(actor, s, ctx.place))
    if "sunny" in words and "night" in words:
        faults.append(Fault("plausibility", "sun_at_night", "the sun does not shine at night"))
    feelings = [FEELINGS[w] for w in words if w in FEELINGS]
    r.moods.extend(feelings)
    return faults, bool(chars or places or spots or feelings)


def _read(sentences: list[str]) -> _Reading:
    r = _Reading()
    for s in sentences:
        frame = parse_sentence(s)
        if frame is None:
            faults, understood = _fallback(s, r.ctx, r)
        else:
            faults, understood = check(frame, r.ctx), True
            for slot in ("A", "an", "C"):
                c = character(frame.get(slot) or "")
                if c is not None:
                    r.chars.append(c)
            where = frame.get("place") or frame.get("at")
            if where:
                r.places.append(where.split(" ", 1)[1] if frame.get("at") else where)
            mood = detail_mood(frame)
            if mood:
                r.moods.append(mood)
        r.frames.append(frame)
        r.faults.append(faults)
        r.understood.append(understood)
    return r


def _reason(attr: str, message: str, rule: str, i: int | None = None) -> str:
    return f"{attr}: {message} [{rule}]" + (f" (sentence {i + 1})" if i is not None else "")


def _fluency(sentences: list[str], text: str, r: _Reading, reasons: list[str]) -> float:
    seen, total = set(), 0.0
    for i, (s, frame) in enumerate(zip(sentences, r.frames)):
        key = normalize(s)
        if key in seen:
            reasons.append(_reason("fluency", "repeats an earlier sentence", "repeat", i))
            continue
        seen.add(key)
        words = re.findall(r"[a-z]+", key)
        value = 1.0 if frame is not None else 0.5 * sum(w in VOCAB for w in words) / max(1, len(words))
        if frame is None:
            reasons.append(_reason("fluency", "not a sentence the world's grammar can read", "unparsed", i))
        if any(a == b for a, b in zip(words, words[1:])):
            value *= 0.5
            reasons.append(_reason("fluency", "a word is repeated", "repeated_word", i))
        total += value
    fluency = total / len(sentences)
    if not text.rstrip().endswith((".", "!", "?")):
        fluency *= 0.7
        reasons.append(_reason("fluency", "the text stops mid-sentence", "truncated"))
    return fluency


def _instruction(req: Request, text: str, r: _Reading, reasons: list[str]) -> float:
    if req.kind == "fact":
        asked = CHARACTERS.get(req.char)
        facts = []
        hero = None
        for f in r.frames:
            if f is not None and f.template.act.startswith("fact_"):
                c = character(f.get("an") or "") or (hero if f.get("C") else None)
                hero = hero or c
                facts.append((f.template.act[5:], c))
        if any(rel == req.relation and c is asked for rel, c in facts):
            return 1.0
        if any(c is asked for _, c in facts):
            reasons.append(
                _reason("instruction_following", f"does not say what was asked ({req.relation})", "wrong_question")
            )
            return 0.4
        if facts:
            reasons.append(
                _reason("instruction_following", f"answers about another animal, not a {req.char}", "wrong_character")
            )
            return 0.2
        reasons.append(_reason("instruction_following", "does not answer the question", "no_answer"))
        return 0.3 if asked in r.chars else 0.0
    parts = []
    if req.opening:
        want = req.opening.lower().split()
        got = text.lower().split()
        ok = got[: len(want)] == want
        if not ok:
            n = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            reasons.append(_reason("instruction_following", f"does not start with '{req.opening}'", "opening"))
        parts.append(1.0 if ok else 0.5 * n / len(want))
    if req.char:
        asked = CHARACTERS[req.char]
        hero = r.ctx.hero
        if hero is asked:
            parts.append(1.0)
        else:
            got = f"one about {hero.subject}" if hero else "no character"
            reasons.append(
                _reason(
                    "instruction_following", f"asked for a story about {asked.subject}, got {got}", "wrong_character"
                )
            )
            parts.append(0.5 if asked in r.chars else 0.0)
    if req.place:
        ok = req.place in r.places
        if not ok:
            reasons.append(
                _reason("instruction_following", f"the story is not set {PLACES[req.place].at}", "missing_place")
            )
        parts.append(float(ok))
    if req.goal:
        ok = any(f is not None and f.template.goal == req.goal for f in r.frames)
        if not ok:
            reasons.append(
                _reason("instruction_following", f"nobody tries to {GOALS[req.goal].activity}", "missing_goal")
            )
        parts.append(float(ok))
    value = sum(parts) / len(parts) if parts else 1.0
    if all(f is not None and f.template.act.startswith("fact_") for f in r.frames):
        reasons.append(_reason("instruction_following", "a list of facts, not a story", "not_a_story"))
        value *= 0.3
    return value


def _ending(r: _Reading, reasons: list[str]) -> float:
    wanted: dict[str, int] = {}
    resolved = False
    for i, f in enumerate(r.frames):
        if f is None or not f.template.goal:
            continue
        t = f.template
        if t.act == "want" or t.wants:
            wanted.setdefault(t.goal, i)
        elif t.act in ("success", "failure") and t.goal in wanted:
            resolved = True
    value = 0.6 if resolved else 0.0
    if not wanted:
        reasons.append(_reason("ending", "no goal is ever set", "no_goal"))
    elif not resolved:
        goal = GOALS[next(iter(wanted))].activity
        reasons.append(_reason("ending", f"the goal ({goal}) never gets an outcome", "unresolved_goal"))
    last = r.frames[-1]
    act = last.template.act if last is not None else None
    if act in ("close", "feel"):
        value += 0.4
    elif act == "flat":
        value += 0.1
        reasons.append(_reason("ending", "a flat closing line", "flat_ending"))
    else:
        reasons.append(_reason("ending", "the story stops without a closing line", "no_closing"))
    return value


def _vividness(r: _Reading, reasons: list[str]) -> float:
    n = sum(1 for f in r.frames if f is not None and f.template.act == "detail")
    if n == 0:
        reasons.append(_reason("vividness", "no vivid detail", "no_detail"))
    elif n == 1:
        reasons.append(_reason("vividness", "only one vivid detail", "one_detail"))
    return {0: 0.2, 1: 0.7}.get(n, 1.0)


def _mood(req: Request, r: _Reading, reasons: list[str]) -> float:
    matches = sum(m == req.mood for m in r.moods)
    others = sorted({m for m in r.moods if m != req.mood})
    if others:
        reasons.append(_reason("mood", f"asked for {req.mood}, but parts are {' and '.join(others)}", "mood_mismatch"))
    if matches < 3:
        reasons.append(_reason("mood", f"only {matches} sentence(s) carry the {req.mood} mood", "mood_thin"))
    return (matches / len(r.moods) if r.moods else 0.0) * min(1.0, (matches + 1) / 4)


def score(prompt: str, response: str) -> Score:
    """Score `response` as an answer to `prompt` (any text for both)."""
    return score_request(parse_prompt(prompt or ""), response or "")


def score_request(req: Request, response: str) -> Score:
    """Score a response to an already parsed request."""
    text = " ".join(response.split())
    if req.kind == "continue" and req.opening and not text.lower().startswith(req.opening.lower()):
        joined = req.opening + " " + text  # the model may write only the continuation
        if text[:1].islower() or parse_sentence(split_sentences(joined)[0]) is not None:
            text = joined
    counted = {"continue": ATTRIBUTES, "story": ATTRIBUTES, "free": ATTRIBUTES[1:], "fact": ATTRIBUTES[:5]}[req.kind]
    if req.kind != "fact" and req.mood is None:
        counted = tuple(a for a in counted if a != "mood")
    sentences = split_sentences(text)
    if not sentences:
        attrs = {a: 0.0 for a in ATTRIBUTES}
        return Score(0.0, attrs, [_reason("fluency", "the response is empty", "empty")], counted, req.kind)
    r = _read(sentences)
    reasons: list[str] = []
    for i, faults in enumerate(r.faults):
        for f in dict.fromkeys(faults):  # a rule counts once per sentence
            reasons.append(_reason(f.attribute, f.message, f.rule, i))
    n_plaus = sum(len({f for f in fs if f.attribute == "plausibility"}) for fs in r.faults)
    n_coh = sum(len({f for f in fs if f.attribute == "coherence"}) for fs in r.faults)
    understood = sum(r.understood) / len(sentences)
    lo, hi = req.length_range
    n = len(sentences)
    length = max(0.0, 1.0 - 0.25 * max(lo - n, n - hi, 0))
    if length < 1:
        reasons.append(_reason("length", f"{n} sentence(s), asked for {lo}-{hi}", "length"))
    attrs = {
        "instruction_following": _instruction(req, text, r, reasons) if req.kind != "free" else 1.0,
        "plausibility": 0.5**n_plaus * (0.5 + 0.5 * understood),
        "coherence": 0.5**n_coh * (0.5 + 0.5 * understood),
        "fluency": _fluency(sentences, text, r, reasons),
        "length": length,
        "ending": _ending(r, reasons) if "ending" in counted else 1.0,
        "vividness": _vividness(r, reasons) if "vividness" in counted else 1.0,
        "mood": _mood(req, r, reasons) if req.mood in MOODS and "mood" in counted else 1.0,
    }
    attrs = {k: round(v, 4) for k, v in attrs.items()}
    overall = sum(WEIGHTS[a] * attrs[a] for a in counted) / sum(WEIGHTS[a] for a in counted)
    return Score(round(overall, 4), attrs, reasons, counted, req.kind)
