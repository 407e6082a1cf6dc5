"""Writing stories and answers: a plan of blocks, each sentence drawn from the grammar and checked by the rules.

Choices:
- A story is a plan of blocks (opening, want, action, details, obstacle, outcome, feeling, closing),
  sized to the requested length; each block draws a template and fills its slots from candidates
  the world suggests (spots found at the place, foods the character eats), then runs the same
  `rules.check` the gold scorer runs and redraws on any fault. Plausible stories are plausible by
  construction, not by hope.
- A Style says how polished a response is (how many vivid details, a full/plain/flat ending, how
  many sentences carry the mood) and which flaw, if any, it has: "absurd" (one sentence breaks a
  rule), "flat" (no outcome), "pronoun", "switch" (the protagonist changes), "wrong_character" / "wrong_place" /
  "wrong_mood" / "wrong_length" (a constraint ignored), "repeat", "garble", "truncate",
  "wrong_fact". Demonstrations, preference pairs and the pre-training corpus differ only in the
  Styles they draw, which is how preferences can reward what demonstrations teach weakly.
- Everything draws from the `random.Random` passed in, and never iterates a set of strings
  (whose order changes between runs), so one seed gives the same text on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tristage.world.entities import (
    CHARACTERS,
    DAY,
    DETAILS,
    FEELINGS,
    MOODS,
    NO_SUN,
    PLACES,
    PRESENT,
    SPOTS,
    TIMES,
    WEATHERS,
    Character,
    Place,
    character,
)
from tristage.world.grammar import GOALS, SLOT_VALUES, TEMPLATES, Frame, Template, render, slot_names, slot_type
from tristage.world.prompts import LENGTHS, Request, feasible_goals, owned_objects
from tristage.world.rules import Context, check, detail_mood

FLAWS = (
    "absurd",
    "flat",
    "pronoun",
    "switch",
    "wrong_character",
    "wrong_place",
    "wrong_mood",
    "wrong_length",
    "repeat",
    "garble",
    "truncate",
    "wrong_fact",
)


@dataclass(frozen=True)
class Style:
    details: int = 1  # vivid detail sentences wanted
    ending: str = "full"  # full (outcome + closing line), plain (ends on the outcome), flat (no outcome)
    mood_lines: int = 3  # sentences that carry the story's mood
    flaw: str | None = None  # one of FLAWS

    def __post_init__(self):
        if self.flaw is not None and self.flaw not in FLAWS:
            raise ValueError(f"unknown flaw {self.flaw!r} (known: {', '.join(FLAWS)})")
        if self.ending not in ("full", "plain", "flat"):
            raise ValueError(f"ending must be full, plain or flat, not {self.ending!r}")


_BY_TEXT = {t.text: t for t in TEMPLATES}
ABSURD_KINDS = ("place", "at", "spot", "food", "obj", "thing", "things", "adjs", "move", "moves", "home", "sound")


def _tpl(*texts: str) -> list[Template]:
    return [_BY_TEXT[x] for x in texts]


BLOCKS: dict[str, list[Template]] = {
    "intro": _tpl("once upon a time, there was {A}."),
    "intro_live": _tpl("once upon a time, there was {A} who lived {at}.", "{A} lived {at}."),
    "lived": _tpl("{A} lived {at}."),
    "go_time": _tpl("one {weather} {time}, {C} {move} to {place}."),
    "go": _tpl("one day, {C} {move} to {place}.", "{C} {move} to {place}."),
    "setting": _tpl("it was a {weather} {time} {at}."),
    "sit": _tpl("{C} sat on the {spot}."),
    "sit_at": _tpl("{C} sat on the {spot} {at}."),
    "sitnap": _tpl("{C} sat on the {spot} for a lazy {time} nap in the sun."),
    "obstacle": _tpl("but then it started to rain."),
    "persist": _tpl("{C} did not give up.", "soon the sun came out again."),
    "flat": [t for t in TEMPLATES if t.act == "flat"],
    "middle": [t for t in TEMPLATES if t.act == "middle"],
}
# openings: block sequences; the bool says whether it states the place
OPENINGS = [
    (("intro", "go_time"), True),
    (("go_time",), True),
    (("intro_live",), True),
    (("setting", "sit"), True),
    (("setting", "lived"), True),
    (("sit_at",), True),
    (("sitnap",), False),
    (("sit",), False),
]
_DETAILS = [t for t in TEMPLATES if t.act == "detail"]


def _goal_blocks(goal: str, act: str) -> list[Template]:
    return [t for t in TEMPLATES if t.goal == goal and t.act == act and not t.wants]


class Writer:
    """Writes one story sentence by sentence, keeping the same Context the scorer will keep."""

    def __init__(self, rng: random.Random, hero: Character, place: Place, time: str, weather: str, mood: str):
        self.rng, self.hero, self.place, self.time, self.weather, self.mood = rng, hero, place, time, weather, mood
        self.ctx = Context()
        self.frames: list[Frame] = []
        self.named = False
        self.lenient = False  # after an absurd sentence, later ones may inherit its absurdity
        self.keep_place = False  # an absurd sentence must not move the story from a requested place
        self.pending_absurd = False  # the next sentence that can break a rule, does
        owned = owned_objects(hero)
        self.obj = rng.choice(owned) if owned else None  # one lost thing per story
        self.food = rng.choice(hero.foods)  # one food looked for and eaten
        self.spot: str | None = None  # where the protagonist sits, once it has sat somewhere
        self.mood_extra = 0  # mood-carrying sentences still wanted beyond outcome and closing

    def _cands(self, kind: str, slots: dict[str, str], absurd: bool, t: Template) -> list[str]:
        h, p, rng = self.hero, self.place, self.rng
        if absurd and kind in ABSURD_KINDS and not (self.keep_place and kind in ("place", "at")):
            return SLOT_VALUES[kind]
        if kind == "C":
            return [h.subject if not self.named or rng.random() < 0.35 else h.pronoun]
        if kind in ("A", "an"):
            return [h.indefinite]
        if kind == "P":
            return [h.possessive]
        if kind == "place":
            return [p.name]
        if kind == "at":
            return [("in" if h.word == "fish" and p.water else p.prep) + " " + p.name]
        if kind == "time":
            return [self.time]
        if kind == "weather":
            return [self.weather]
        if kind == "spot" and t.sits and self.spot:
            return [self.spot]
        if kind == "spot":
            return [s for s, spot in SPOTS.items() if p.name in spot.places and not spot.hurts]
        if kind == "food":
            return [self.food]
        if kind == "obj":
            return [self.obj] if self.obj else []
        if kind in ("thing", "things"):
            return [th for th in SLOT_VALUES[kind] if p.name in DETAILS[th][0]]
        if kind == "adjs":
            time, weather = self.ctx.time or self.time, self.ctx.weather or self.weather
            looks = [
                lk
                for lk in DETAILS[(slots.get("thing") or slots["things"]).lower()][1]
                if time in lk.times and not (lk.clear and weather in NO_SUN)
            ]
            want = [lk.adjectives for lk in looks if lk.mood == self.mood]
            plain = [lk.adjectives for lk in looks if lk.mood is None]
            return want if self.mood_extra > 0 and want else plain or want
        if kind == "feeling":
            return [f for f, m in FEELINGS.items() if m == self.mood]
        if kind == "move":
            return ["went", *h.moves]
        if kind == "moves":
            return [PRESENT[m] for m in h.moves]
        if kind == "home":
            return list(h.homes)
        if kind == "sound":
            return [h.sound] if h.sound else []
        raise KeyError(kind)

    def say(self, templates: list[Template], fixed: dict[str, str] | None = None) -> Frame | None:
        """Add one sentence drawn from `templates`: plausible, or breaking a rule if one is pending."""
        fixed = fixed or {}
        if self.pending_absurd and any(
            slot_type(n) in ABSURD_KINDS and n not in fixed for t in templates for n in slot_names(t)
        ):
            frame = self._draw(templates, fixed, absurd=True)
            if frame is not None:
                self.pending_absurd = False
                return frame
        return self._draw(templates, fixed, absurd=False)

    def _draw(self, templates: list[Template], fixed: dict[str, str], absurd: bool) -> Frame | None:
        for _ in range(60 if absurd else 30):
            t = self.rng.choice(templates)
            slots = dict(fixed)
            for name in slot_names(t):
                if name not in slots:
                    cands = self._cands(slot_type(name), slots, absurd, t)
                    if not cands:
                        break
                    slots[name] = self.rng.choice(cands)
            else:
                frame = Frame(t, slots)
                plain = set(slots) <= {"C", "P"}
                if any(f.template == t and (plain or f.slots == slots) for f in self.frames):
                    continue  # never the same sentence twice (nor "she had a good idea" then "Lily had ...")
                ctx = self.ctx.copy()
                faults = check(frame, ctx)  # what a reader (the gold scorer) will see
                if any(f.attribute == "coherence" for f in faults):
                    continue
                if absurd and not any(f.attribute == "plausibility" for f in faults):
                    continue
                if not absurd and not self.lenient:
                    if self.ctx.place is None:  # the reader does not know the place yet, but the writer does
                        probe = self.ctx.copy()
                        probe.place = self.place
                        faults = faults + check(frame, probe)
                    if any(f.attribute == "plausibility" for f in faults):
                        continue
                self.ctx = ctx
                self.frames.append(frame)
                self.named = self.named or any(k in slots for k in ("C", "A", "an"))
                self.lenient = self.lenient or absurd
                if t.sits and not absurd:
                    self.spot = frame.get("spot")
                return frame
        return None


def _pick_hero(rng: random.Random, req: Request, fixed: dict[str, str], flaw: str | None) -> Character:
    for k in ("C", "A"):
        if k in fixed and character(fixed[k]) is not None:
            return character(fixed[k])
    pool = [c for c in CHARACTERS.values() if req.place is None or req.place in c.places]
    if req.char:
        hero = CHARACTERS[req.char]
        if flaw != "wrong_character":
            return hero
        same = [c for c in pool if c is not hero and c.kind == hero.kind] or [c for c in pool if c is not hero]
        return rng.choice(same)
    return rng.choice(pool)


def _weather(rng: random.Random, time: str, goal: str) -> str:
    bad = NO_SUN if goal == "stars" else ()  # a clear sky for stargazing
    return rng.choice([w for w in WEATHERS if not (w == "sunny" and time == "night") and w not in bad])


def _fixed_place(fixed: dict[str, str]) -> str | None:
    """The place a kept opening already names ("to the park", "at the beach"), if any."""
    if "place" in fixed:
        return fixed["place"].lower()
    if "at" in fixed:
        return fixed["at"].lower().split(" ", 1)[1]
    return None


def write_story(
    rng: random.Random, req: Request, style: Style = Style(), first: tuple[Template, dict[str, str]] | None = None
) -> str:
    """A story answering `req` in `style`; `first` fixes the first sentence's template and some slots."""
    return _finish(rng, plan_story(rng, req, style, first), style)


def plan_story(
    rng: random.Random, req: Request, style: Style = Style(), first: tuple[Template, dict[str, str]] | None = None
) -> list[Frame]:
    fixed = dict(first[1]) if first else {}
    flaw = style.flaw
    hero = _pick_hero(rng, req, fixed, flaw)
    place = PLACES[_place(rng, req, hero, fixed, flaw)]
    mood = req.mood
    if flaw == "wrong_mood" and mood:
        mood = rng.choice([m for m in MOODS if m != mood])
    goals = feasible_goals(hero, place, mood) or feasible_goals(hero, place)
    if fixed.get("time", "night") in DAY or fixed.get("weather") in NO_SUN:  # an opening that hides the stars
        goals = [g for g in goals if g != "stars"] or goals
    goal = req.goal if req.goal in feasible_goals(hero, place) else rng.choice(goals)
    success = mood != "sad" and (mood is not None or rng.random() < 0.85)
    story_mood = mood or (GOALS[goal].mood if success else "sad")
    time = fixed.get("time") or rng.choice(("evening", "night") if goal == "stars" else TIMES)
    weather = fixed.get("weather") or _weather(rng, time, goal)
    w = Writer(rng, hero, place, time, weather, story_mood)
    w.keep_place = req.place is not None
    opening = list(rng.choice(_openings(hero, req, goal, time in DAY and weather not in NO_SUN, first)))
    lo, hi = (3, 9) if req.kind == "free" and req.length is None else LENGTHS[req.length]
    if flaw == "wrong_length":
        lo, hi = {"short": (6, 8), "long": (3, 4), None: (2, 3) if rng.random() < 0.5 else (10, 11)}[req.length]
    target = rng.randint(lo, hi)
    ending = "flat" if flaw == "flat" else style.ending
    tail = ["close"] if ending == "full" else ["flat"] if ending == "flat" else []
    has_want = opening != ["sitnap"]
    core = len(opening) + has_want + (ending != "flat") + len(tail)
    if core > target and len(opening) > 1:
        opening = ["go_time"] if first is None else opening[:1]
        core = len(opening) + has_want + (ending != "flat") + len(tail)
    reserved = (ending != "flat") + (ending == "full")
    w.mood_extra = max(0, style.mood_lines - reserved)
    no_trouble = goal == "stars" or time not in DAY  # rain would hide the stars; no sun comes out at night
    extras = _extras(target - core, style.details, ending == "full" and w.mood_extra > 0, no_trouble)

    absurd_at = _absurd_at(rng, goal, extras, success and ending != "flat") if flaw == "absurd" else None

    def detail():
        moody = w.mood_extra > 0
        options = [t for t in _DETAILS if t.mood is None or (moody and t.mood == story_mood)]
        w.pending_absurd = w.pending_absurd or absurd_at == "detail"
        frame = w.say(options)
        if frame is not None and detail_mood(frame) == story_mood:
            w.mood_extra -= 1

    for i, block in enumerate(opening):
        templates = [first[0]] if first is not None and i == 0 else BLOCKS[block]
        w.pending_absurd = w.pending_absurd or (absurd_at == "opening" and i == 0)
        w.say(templates, fixed=fixed if i == 0 else None)
    if has_want:
        w.say(_goal_blocks(goal, "want"))
    for _ in range(extras["middle"]):
        w.say(BLOCKS["middle"])
    if extras["details"]:
        detail()
    if extras["action"]:
        w.pending_absurd = w.pending_absurd or absurd_at == "action"
        w.say(_goal_blocks(goal, "action"))
    if extras["trouble"]:
        w.say(BLOCKS["obstacle"])
        w.say(BLOCKS["persist"])
    for _ in range(extras["details"] - 1):
        detail()
    if ending != "flat":
        outcome = "success" if success else "failure"
        w.pending_absurd = w.pending_absurd or absurd_at == "outcome"
        w.say(_goal_blocks(goal, outcome))
    if extras["feel"]:
        w.say([t for t in TEMPLATES if t.act == "feel" and t.mood in (None, story_mood)])
    if "close" in tail:
        w.say([t for t in TEMPLATES if t.act == "close" and t.mood == story_mood])
    if "flat" in tail:
        w.say(BLOCKS["flat"])
    frames = w.frames
    if flaw in ("pronoun", "switch"):
        frames = _break_reference(rng, frames, hero, flaw)
    return frames


def _place(rng: random.Random, req: Request, hero: Character, fixed: dict[str, str], flaw: str | None) -> str:
    """Where the story happens: the opening's or the request's place when the hero can be there (and the flaw is not
    a wrong place), else one of the hero's places, preferring those where the requested goal can be reached."""
    name = _fixed_place(fixed) or req.place
    if name is None or name not in hero.places or (flaw == "wrong_place" and req.place):
        options = [p for p in sorted(hero.places) if p != req.place]
        if "spot" in fixed:  # a continuation that already sat somewhere stays where that is
            options = [p for p in options if p in SPOTS[fixed["spot"].lower()].places] or options
        fitting = [p for p in options if req.goal in feasible_goals(hero, PLACES[p], req.mood)]
        name = rng.choice(fitting or options)
    return name


def _absurd_at(rng: random.Random, goal: str, extras: dict[str, int], outcome: bool) -> str:
    """Where an absurd story's absurdity goes: the opening, or a detail, the action or the outcome when the story
    has one with a slot that can take it."""
    slotted = {act: any(slot_type(n) in ABSURD_KINDS for t in _goal_blocks(goal, act) for n in slot_names(t))
               for act in ("action", "success")}
    return rng.choice(["opening"] * 2 + ["detail"] * bool(extras["details"])
                      + ["action"] * (bool(extras["action"]) and slotted["action"])
                      + ["outcome"] * (outcome and slotted["success"]))


def _openings(hero: Character, req: Request, goal: str, sunny: bool,
              first: tuple[Template, dict[str, str]] | None) -> list[tuple[str, ...]]:
    """The opening block sequences this story may start with (`first`: the template a continuation starts from)."""
    ok = []
    for seq, says_place in OPENINGS:
        if ("sit" in seq or "sit_at" in seq or "sitnap" in seq) and "sit" not in hero.can:
            continue
        if "sitnap" in seq and (goal != "nap" or not sunny):
            continue
        if not says_place and (req.place or req.kind == "story"):
            continue
        if first is not None and first[0] not in BLOCKS[seq[0]]:
            continue
        ok.append(seq)
    return ok or [("go_time",)]


def _extras(room: int, details: int, feel: bool, no_trouble: bool) -> dict[str, int]:
    """How many of each optional block fit in `room` sentences, filled in this order of preference."""
    extras = {"details": 0, "action": 0, "feel": 0, "trouble": 0, "middle": 0}
    for name, cost, limit in (
        ("details", 1, details),
        ("action", 1, 1),
        ("feel", 1, int(feel)),
        ("trouble", 2, 0 if no_trouble else 1),
        ("details", 1, 3),
        ("middle", 1, 2),
        ("details", 1, 5),
    ):
        while room >= cost and extras[name] < limit:
            extras[name] += 1
            room -= cost
    return extras


def _break_reference(rng: random.Random, frames: list[Frame], hero: Character, flaw: str) -> list[Frame]:
    """Swap one later reference to the protagonist for a wrong pronoun or another character."""
    named = next((i for i, f in enumerate(frames) if "C" in f.slots or "A" in f.slots), len(frames))
    keys = ("C", "P") if flaw == "pronoun" else ("C",)
    spots = [(i, k) for i, f in enumerate(frames) if i > named for k in keys if k in f.slots]
    if not spots:
        return frames
    i, k = rng.choice(spots)
    if flaw == "pronoun" or k == "P":
        wrong = {"he": "she", "she": "he", "it": rng.choice(("he", "she"))}[hero.pronoun]
        value = wrong if k == "C" else {"he": "his", "she": "her"}[wrong]
    else:
        others = [c for c in CHARACTERS.values() if c.kind == hero.kind and c is not hero]
        value = rng.choice(others).subject
    frames = list(frames)
    frames[i] = Frame(frames[i].template, {**frames[i].slots, k: value})
    return frames


def _finish(rng: random.Random, frames: list[Frame], style: Style) -> str:
    sentences = [render(f) for f in frames]
    flaw = style.flaw
    if flaw == "repeat" and sentences:
        i = rng.randrange(len(sentences))
        sentences.insert(i, sentences[i])
    elif flaw == "garble" and sentences:
        i = rng.randrange(len(sentences))
        words = sentences[i].rstrip(".").split()
        rng.shuffle(words)
        sentences[i] = " ".join(words) + "."
    text = " ".join(sentences)
    if flaw == "truncate" and len(text.split()) > 4:
        words = text.split()
        cut = rng.randrange(max(3, len(words) // 2), len(words) - 1)
        text = " ".join(words[:cut]).rstrip(".,!?")
    return text


# ---- answers to questions -------------------------------------------------------------------------

_FACT = {
    "live": "{an} lives {home}.",
    "eat": "{an} eats {food}.",
    "sound": "{an} says {sound}.",
    "move": "{an} {moves}.",
}
_MORE = {
    "move": "{C} {moves} all day.",
    "eat": "{C} likes to eat {food}.",
    "sound": "{an} says {sound}.",
    "live": "{an} lives {home}.",
}


def write_answer(rng: random.Random, req: Request, style: Style = Style()) -> str:
    """An answer to a fact question; `style.details` adds a related fact, flaws make it wrong or long."""
    hero = CHARACTERS[req.char]
    if style.flaw == "wrong_character":
        # another animal that can still answer the relation asked (not every animal makes a sound)
        hero = rng.choice([c for c in CHARACTERS.values() if c.kind == "animal" and c is not hero
                           and (req.relation != "sound" or c.sound)])
    w = Writer(rng, hero, PLACES[sorted(hero.places)[0]], "morning", "sunny", "happy")
    w.pending_absurd = style.flaw == "wrong_fact"
    w.say(_tpl(_FACT[req.relation]))
    w.pending_absurd = False
    extra = 3 if style.flaw == "wrong_length" else min(style.details, 1)
    others = [r for r in _MORE if r != req.relation and (r != "sound" or hero.sound)]
    for r in rng.sample(others, len(others))[:extra]:
        w.say(_tpl(_MORE[r]))
    return _finish(rng, w.frames, style)


def write_facts(rng: random.Random, hero: Character, wrong: bool = False) -> str:
    """A short paragraph of facts about an animal (for the pre-training corpus); one is false if `wrong`."""
    w = Writer(rng, hero, PLACES[sorted(hero.places)[0]], "morning", "sunny", "happy")
    relations = [r for r in _FACT if r != "sound" or hero.sound]
    chosen = rng.sample(relations, rng.randint(2, len(relations)))
    false_at = rng.randrange(len(chosen)) if wrong else -1
    for i, r in enumerate(chosen):
        w.pending_absurd = w.pending_absurd or i == false_at
        w.say(_tpl(_MORE[r] if r in _MORE and w.frames and rng.random() < 0.5 else _FACT[r]))
    return " ".join(render(f) for f in w.frames)


# ---- continuations --------------------------------------------------------------------------------


def make_opening(rng: random.Random) -> tuple[str, tuple[Template, dict[str, str]]]:
    """The first words of a fresh story, cut before a slot, and what a continuation must keep."""
    while True:
        frames = plan_story(rng, Request("free"), Style())
        t, slots = frames[0].template, frames[0].slots
        names = slot_names(t)
        cuts = []
        for k, name in enumerate(names):
            kept = {n: slots[n] for n in names[:k]}
            head = t.text[: t.text.index("{" + name + "}")]
            for n, v in kept.items():
                head = head.replace("{" + n + "}", v)
            if len(head.split()) >= 3:
                cuts.append((head, kept, slots[name]))
        if cuts:
            head, kept, value = rng.choice(cuts)
            if value.lower().startswith("the ") and rng.random() < 0.7:
                head += "the "
            head = head.rstrip()
            return head[0].upper() + head[1:], (t, kept)


def continue_story(
    rng: random.Random, opening: str, first: tuple[Template, dict[str, str]], style: Style = Style()
) -> str:
    """A story that starts with `opening` (redrawn until it does; the first draw almost always does)."""
    req = Request("continue", opening=opening)
    text = ""
    for _ in range(20):
        text = write_story(rng, req, style, first)
        if text.lower().startswith(opening.lower()) or style.flaw == "truncate":
            return text
    return text
