"""What a user can ask the world for: requests, their wording, and reading a request back from text.

Choices:
- A Request is the meaning of a prompt (kind, character, place, mood, length, goal, opening or the
  fact asked for). `render_prompt` words it in one of several phrasings; `parse_prompt` recovers it
  from text alone, by keyword spotting rather than by matching our own phrasings, so the gold
  scorer works on any prompt from the world (and on a user's paraphrase that uses its words).
- Kinds: "continue" (a story that starts with given words), "story" (a story about a character,
  optionally at a place, with a goal, a mood and a length: the constraints), "fact" (where does a
  fish live; what does it eat; what sound does it make; how does it move), and "free" (anything
  else, scored as an unconstrained story).
- Requests are sampled only where the world allows them (a cat is never asked for at the sea; a calm
  story only where a calm goal is possible), so every request has a good answer.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from tristage.world.entities import ANIMALS, CHARACTERS, MOODS, OBJECTS, PLACES, Character, Place
from tristage.world.grammar import GOALS
from tristage.world.rules import Context, need_faults

LENGTHS = {"short": (2, 4), "long": (7, 10), None: (4, 8)}
FACT_LENGTH = (1, 2)
FREE_LENGTH = (2, 10)
RELATIONS = ("live", "eat", "sound", "move")
# goals a prompt may ask for ("who wants to fly a kite"); finding and eating are only told, not asked
REQUESTABLE = ("kite", "nap", "swim", "read", "sandcastle", "stars", "ball", "flowers")


@dataclass(frozen=True)
class Request:
    kind: str  # continue | story | fact | free
    char: str | None = None  # Character.word
    place: str | None = None  # Place.name
    mood: str | None = None
    length: str | None = None  # short | long
    goal: str | None = None
    opening: str | None = None  # the words a continued story must start with
    relation: str | None = None  # live | eat | sound | move (facts)

    @property
    def length_range(self) -> tuple[int, int]:
        if self.kind == "fact":
            return FACT_LENGTH
        if self.kind == "free":
            return FREE_LENGTH
        return LENGTHS[self.length]


def owned_objects(hero: Character) -> list[str]:
    key = "person" if hero.kind == "person" else hero.word
    return [obj for obj, owners in OBJECTS.items() if key in owners]


def feasible_goals(hero: Character, place: Place | None, mood: str | None = None) -> list[str]:
    """Goals this character can pursue at this place whose success carries `mood` (any for sad or None)."""
    return list(_feasible(hero, place, mood))


@functools.cache
def _feasible(hero: Character, place: Place | None, mood: str | None) -> tuple[str, ...]:
    out = []
    for name, g in GOALS.items():
        if g.ability and g.ability not in hero.can:
            continue
        if need_faults(frozenset(g.needs.split()), Context(place=place), "it"):
            continue
        if name == "find" and not owned_objects(hero):
            continue
        if mood in ("happy", "calm") and g.mood != mood:
            continue
        out.append(name)
    return tuple(out)


def _who(rng: random.Random, c: Character) -> str:
    if c.kind == "animal":
        return c.indefinite
    return c.word if rng.random() < 0.5 else c.indefinite


def render_prompt(rng: random.Random, req: Request) -> str:
    """One wording of a request."""
    if req.kind == "continue":
        form = rng.choice(
            (
                "Help me write a story which starts, '{}...'",
                "Continue this story: '{}...'",
                "Write a story that begins with '{}...'",
            )
        )
        return form.format(req.opening)
    if req.kind == "fact":
        c = CHARACTERS[req.char]
        a = c.indefinite
        forms = {
            "live": (f"Where does {a} live?", f"Tell me where {a} lives."),
            "eat": (f"What does {a} eat?", f"Tell me what {a} eats."),
            "sound": (f"What sound does {a} make?", f"What does {a} say?"),
            "move": (f"How does {a} move?", f"How does {a} get around?"),
        }[req.relation]
        return rng.choice(forms)
    about = _who(rng, CHARACTERS[req.char]) if req.char else rng.choice(("someone", "an animal"))
    if req.place:
        about += " " + PLACES[req.place].at
    if req.goal:
        about += f" who wants to {GOALS[req.goal].activity}"
    adjs = [a for a in (req.length, req.mood) if a]
    r = rng.random()
    if not adjs:
        return rng.choice(
            (
                f"Tell me a story about {about}.",
                f"Can you tell me a story about {about}?",
                f"Write a story about {about}.",
            )
        )
    if r < 0.5:
        return f"Write a {', '.join(adjs)} story about {about}."
    if r < 0.8:
        return f"Tell me a story about {about}. Make it {' and '.join(adjs)}."
    return f"I would like a {' and '.join(adjs)} story about {about}."


def sample_request(rng: random.Random, kind: str) -> Request:
    """A random request of a kind ("story" or "fact"; continuations come from written stories)."""
    if kind == "fact":
        relation = rng.choice(RELATIONS)
        pool = [c for c in ANIMALS if c.sound] if relation == "sound" else ANIMALS
        return Request("fact", char=rng.choice(pool).word, relation=relation)
    hero = rng.choice(list(CHARACTERS.values()))
    place = rng.choice(sorted(hero.places)) if rng.random() < 0.6 else None
    p = PLACES[place] if place else None
    mood = rng.choice(MOODS) if rng.random() < 0.4 else None
    if mood and not feasible_goals(hero, p, mood):
        mood = None
    goals = [g for g in feasible_goals(hero, p, mood) if g in REQUESTABLE]
    goal = rng.choice(goals) if goals and rng.random() < 0.3 else None
    length = rng.choice(("short", "long")) if rng.random() < 0.3 else None
    return Request("story", char=hero.word, place=place, mood=mood, length=length, goal=goal)


# ---- reading a request back from text -------------------------------------------------------------

_OPENING = re.compile(r"['\"‘“](.+?)(?:\.\.\.|…)\s*['\"’”]", re.S)
_FACT = [
    ("live", re.compile(r"\bwhere (?:does|do) (?:a|an|the) (\w+) live|\bwhere (?:a|an|the) (\w+) lives")),
    ("eat", re.compile(r"\bwhat (?:does|do) (?:a|an|the) (\w+) eat|\bwhat (?:a|an|the) (\w+) eats")),
    ("sound", re.compile(r"\bwhat sound (?:does|do) (?:a|an|the) (\w+) make|\bwhat does (?:a|an|the) (\w+) say")),
    ("move", re.compile(r"\bhow (?:does|do) (?:a|an|the) (\w+) (?:move|get around)")),
]
CHAR_RX = re.compile(
    r"\b(" + "|".join(sorted((c.word.lower() for c in CHARACTERS.values()), key=len, reverse=True)) + r")\b"
)
_PLACE_RX = re.compile(r"\b(" + "|".join(sorted(PLACES, key=len, reverse=True)) + r")\b")


def find_character(text: str) -> Character | None:
    """The first character a text names."""
    m = CHAR_RX.search(text.lower())
    if m is None:
        return None
    return CHARACTERS.get(m.group(1)) or CHARACTERS.get(m.group(1).capitalize())


def find_places(text: str) -> list[str]:
    return _PLACE_RX.findall(text.lower())


def parse_prompt(prompt: str) -> Request:
    """The request a prompt makes, read from its text alone."""
    text = " ".join(prompt.split())
    low = text.lower()
    m = _OPENING.search(text)
    if m and "stor" in low:
        return Request("continue", opening=m.group(1).strip())
    for relation, rx in _FACT:
        fm = rx.search(low)
        if fm:
            c = CHARACTERS.get(fm.group(1) or fm.group(2) or "")
            if c is not None:
                return Request("fact", char=c.word, relation=relation)
    if "story" not in low:
        return Request("free")
    c = find_character(text)
    places = find_places(text)
    mood = next((md for md in MOODS if re.search(rf"\b{md}\b", low)), None)
    length = next((ln for ln in ("short", "long") if re.search(rf"\b{ln}\b", low)), None)
    goal = next((g for g in REQUESTABLE if GOALS[g].activity in low), None)
    return Request(
        "story", char=c.word if c else None, place=places[0] if places else None, mood=mood, length=length, goal=goal
    )
