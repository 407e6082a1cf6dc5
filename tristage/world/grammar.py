"""The world's sentence grammar: one table of templates that both writes and reads sentences.

Choices:
- A sentence is a template with typed slots ("{C} sat on the {spot}."): the generator fills the
  slots, the gold scorer compiles the same template into a regular expression whose slot groups
  match the slot's vocabulary. One table is the single source of truth, so the scorer parses
  exactly what the generator can write (a test enumerates this) and the two cannot drift apart.
- Each template carries its meaning: an act (intro, go, sit, want, action, success, failure, feel,
  detail, close, flat, fact_*), the goal it belongs to, the mood it carries and the conditions it
  needs ("sun", "night", "beach", ...). The rules (rules.py) read only these and the slot values.
- Parsing is case-insensitive and whole-sentence (`fullmatch`); anything else is "unparsed" and the
  scorer falls back to word-level partial credit. Slots are typed by name; a trailing digit lets a
  template use a type twice.
- Goals are small scripts (want -> action -> success | failure) in one table, GOALS, because
  "a goal, an action, an outcome" is the multi-sentence coherence the stories teach.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tristage.world.entities import (
    ADJECTIVE_PAIRS,
    CHARACTERS,
    DETAILS,
    FEELINGS,
    FOODS,
    HOMES,
    MOVES,
    OBJECTS,
    PLACES,
    PRESENT,
    SOUNDS,
    SPOTS,
    TIMES,
    WEATHERS,
)


@dataclass(frozen=True)
class Template:
    text: str  # lower case, with {slot}s, ending in "."
    act: str
    goal: str | None = None
    mood: str | None = None
    needs: frozenset[str] = frozenset()  # conditions: day, night, sun, outdoor, indoor, water, beach, ...
    sits: bool = False  # the {spot} is sat or lain on (not just looked under)
    wants: bool = False  # also states the goal (e.g. "sat on the mat for a lazy nap")


def T(text: str, act: str, goal: str | None = None, mood: str | None = None, needs: str = "", **kw) -> Template:
    return Template(text, act, goal, mood, frozenset(needs.split()), **kw)


@dataclass(frozen=True)
class Goal:
    activity: str  # "fly a kite": what a prompt asks for and "wanted to ..." says
    ability: str | None  # what the character must be able to do (entities.Character.can)
    needs: str  # conditions on the place for wanting it at all
    mood: str  # the mood of its success (a failure is sad)
    want: tuple[str, ...]
    action: tuple[str, ...]
    success: tuple[str, ...]
    failure: tuple[str, ...]


GOALS: dict[str, Goal] = {
    "kite": Goal("fly a kite", "kite", "outdoor", "happy", (), ("{C} held the string tight and ran.",),
                 ("at last, the kite flew high up in the sky.",), ("the kite got stuck in a tall tree.",)),
    "nap": Goal("take a nap", "sit", "", "calm", (),
                ("{C} lay down on the {spot}.", "{C} found a soft spot on the {spot}."),
                ("{C} fell asleep in the warm sun.", "{C} slept for a long time."), ("{C} could not fall asleep.",)),
    "find": Goal("find a lost thing", None, "", "happy", ("{C} lost {P} {obj}.", "{C} wanted to find {P} {obj}."),
                 ("{C} looked under the {spot}.", "{C} looked everywhere for {P} {obj}."),
                 ("at last, {C} found {P} {obj} under the {spot}.", "{C} found {P} {obj} at last."),
                 ("{P} {obj} was gone for good.",)),
    "swim": Goal("go for a swim", "swim", "water", "happy", (), ("{C} jumped into the water.",),
                 ("{C} swam and splashed for a long time.",), ("the water was too cold to swim.",)),
    "read": Goal("read a book", "read", "", "calm", (), ("{C} opened {P} book.",), ("{C} read the whole book.",),
                 ("{C} could not find {P} book.",)),
    "sandcastle": Goal("build a sandcastle", "build", "beach", "happy", (), ("{C} dug in the sand.",),
                       ("{C} built a big sandcastle.",), ("a big wave washed the sandcastle away.",)),
    "eat": Goal("find some food", None, "", "happy", ("{C} was hungry.",), ("{C} looked for some {food}.",),
                ("{C} ate some {food}.",), ("{C} could not find any food.",)),
    "stars": Goal("see the stars", "look", "outdoor", "calm", (), ("{C} looked up at the sky.",),
                  ("{C} saw many bright stars.",), ("clouds hid the stars.",)),
    "ball": Goal("play with a ball", "ball", "", "happy", (), ("{C} chased the ball.",),
                 ("{C} played with the ball until dinner time.",), ("the ball rolled far away.",)),
    "flowers": Goal("pick some flowers", "pick", "flowers", "happy", (), ("{C} walked among the flowers.",),
                    ("{C} picked a big bunch of flowers.",), ("all the flowers were gone.",)),
}  # fmt: skip
# conditions a goal's sentences need beyond the goal's own (stars shine at night, naps "in the sun")
_EXTRA_NEEDS = {"{C} fell asleep in the warm sun.": "sun", "{C} saw many bright stars.": "outdoor night clear"}


def _goal_templates() -> list[Template]:
    out = []
    for name, g in GOALS.items():
        wants = list(g.want) or [f"{{C}} wanted to {g.activity}."]
        for act, texts in (("want", wants), ("action", g.action), ("success", g.success), ("failure", g.failure)):
            for text in texts:
                mood = g.mood if act == "success" else "sad" if act == "failure" else None
                needs = (g.needs if act == "want" else "") + " " + _EXTRA_NEEDS.get(text, "")
                sits = "{spot}" in text and act == "action" and name == "nap"
                out.append(T(text, act, name, mood, needs, sits=sits))
    return out


TEMPLATES: list[Template] = [
    # openings and settings
    T("once upon a time, there was {A}.", "intro"),
    T("once upon a time, there was {A} who lived {at}.", "intro"),
    T("{A} lived {at}.", "intro"),
    T("one {weather} {time}, {C} {move} to {place}.", "go"),
    T("it was a {weather} {time} {at}.", "setting"),
    T("one day, {C} {move} to {place}.", "go"),
    T("{C} {move} to {place}.", "go"),
    T("{C} sat on the {spot}.", "sit", sits=True),
    T("{C} sat on the {spot} {at}.", "sit", sits=True),
    T("{C} sat on the {spot} for a lazy {time} nap in the sun.", "sit", "nap", needs="sun", sits=True, wants=True),
    T("{C} took a nap on the {spot}.", "success", "nap", "calm", sits=True),
    *_goal_templates(),
    # the middle of a story
    T("but then it started to rain.", "obstacle"),
    T("{C} did not give up.", "persist"),
    T("{C} thought for a moment.", "middle"),
    T("{C} had a good idea.", "middle"),
    T("soon the sun came out again.", "persist", needs="day"),
    # vivid details
    T("the {thing} was {adjs}.", "detail"),
    T("the {things} were {adjs}.", "detail"),
    T("birds sang in the trees.", "detail", mood="happy", needs="trees day"),
    T("the waves splashed on the sand.", "detail", needs="beach"),
    T("a soft wind blew through the grass.", "detail", mood="calm", needs="grass"),
    T("the stars twinkled in the sky.", "detail", mood="calm", needs="outdoor night clear"),
    T("the rain tapped on the window.", "detail", mood="calm", needs="indoor rain"),
    T("the sun was warm on {P} back.", "detail", mood="happy", needs="outdoor sun"),
    # feelings and endings
    T("{C} felt {feeling}.", "feel"),
    T("{C} was very {feeling}.", "feel"),
    T("{C} was {feeling}.", "feel"),
    T("{C} smiled from ear to ear.", "feel", mood="happy"),
    T("{C} let out a long sigh.", "feel", mood="sad"),
    T("it was the best day ever.", "close", mood="happy"),
    T("it was a calm and peaceful day.", "close", mood="calm"),
    T("it was a long and sad day.", "close", mood="sad"),
    T("{C} went home with a big smile.", "close", mood="happy"),
    T("{C} went home slowly.", "close", mood="sad"),
    T("{C} rested quietly.", "close", mood="calm"),
    T("then {C} went home.", "flat"),
    T("the end.", "flat"),
    # facts (answers to questions)
    T("{an} lives {home}.", "fact_live"),
    T("{an} eats {food}.", "fact_eat"),
    T("{an} says {sound}.", "fact_sound"),
    T("{an} {moves}.", "fact_move"),
    T("{C} {moves} all day.", "fact_move"),
    T("{C} likes to eat {food}.", "fact_eat"),
]

_NAMES = [c.word.lower() for c in CHARACTERS.values() if c.kind == "person"]
_ANIMALS = [c.word for c in CHARACTERS.values() if c.kind == "animal"]
PRONOUNS = ("he", "she", "it")
SLOT_VALUES: dict[str, list[str]] = {
    "C": _NAMES + [f"the {a}" for a in _ANIMALS] + list(PRONOUNS),
    "P": ["his", "her", "its"],
    "A": [f"a {g} named {n}" for g in ("boy", "girl") for n in _NAMES]
    + [c.indefinite for c in CHARACTERS.values() if c.kind == "animal"],
    "an": [c.indefinite for c in CHARACTERS.values() if c.kind == "animal"],
    "place": list(PLACES),
    "at": [f"{prep} {p}" for p in PLACES for prep in ("in", "at", "on", "by", "near")],
    "spot": list(SPOTS),
    "time": list(TIMES),
    "weather": list(WEATHERS),
    "feeling": list(FEELINGS),
    "food": FOODS,
    "obj": list(OBJECTS),
    "thing": [t for t in DETAILS if t not in ("flowers", "trees")],
    "things": ["flowers", "trees"],
    "adjs": ADJECTIVE_PAIRS,
    "move": list(MOVES),
    "moves": list(PRESENT.values()),
    "home": HOMES,
    "sound": SOUNDS,
}
_SLOT = re.compile(r"\{(\w+?)\d*\}")


def slot_names(template: Template) -> list[str]:
    """The slot names of a template in order ("adjs", "C", ...), with their digits."""
    return re.findall(r"\{(\w+)\}", template.text)


def slot_type(name: str) -> str:
    return name.rstrip("0123456789")


def _compile(t: Template) -> re.Pattern:
    parts, pos = [], 0
    body = t.text[:-1]  # the final "."; a sentence may end in . or !
    for m in _SLOT.finditer(body):
        parts.append(re.escape(body[pos : m.start()]))
        name = body[m.start() + 1 : m.end() - 1]
        values = sorted(SLOT_VALUES[m.group(1)], key=len, reverse=True)
        parts.append(f"(?P<{name}>" + "|".join(re.escape(v) for v in values) + ")")
        pos = m.end()
    parts.append(re.escape(body[pos:]))
    return re.compile("".join(parts))


# (literal start, template, pattern): a template is only tried on sentences starting with its literal text
_COMPILED = [(t.text.split("{")[0].rstrip("."), t, _compile(t)) for t in TEMPLATES]


@dataclass
class Frame:
    """A parsed (or generated) sentence: its template and slot values as written."""

    template: Template
    slots: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._low = {k: v.lower() for k, v in self.slots.items()}

    def get(self, name: str) -> str | None:
        """A slot's value in lower case (None if the template has no such slot)."""
        return self._low.get(name)

    @property
    def thing(self) -> str | None:
        """The thing a detail sentence describes ("sand", "flowers")."""
        return self.get("thing") or self.get("things")


def normalize(sentence: str) -> str:
    """Lower case, single spaces, no final punctuation: the form templates are matched against."""
    return re.sub(r"\s+", " ", sentence.strip().lower()).rstrip(".!? ")


def parse_sentence(sentence: str) -> Frame | None:
    s = normalize(sentence)
    for start, t, rx in _COMPILED:
        if not s.startswith(start):
            continue
        m = rx.fullmatch(s)
        if m:
            return Frame(t, {k: v for k, v in m.groupdict().items() if v is not None})
    return None


def render(frame: Frame) -> str:
    """The sentence for a frame, with its first letter capitalized."""
    text = frame.template.text
    for name, value in frame.slots.items():
        text = text.replace("{" + name + "}", value)
    return text[0].upper() + text[1:]


_SPLIT = re.compile(r"[^.!?]+[.!?]*")


def split_sentences(text: str) -> list[str]:
    """Sentences with their end punctuation (a last one may lack it: a truncated text)."""
    return [s.strip() for s in _SPLIT.findall(text) if s.strip(" \n\t.!?")]


def vocabulary() -> set[str]:
    """Every word the grammar can write (lower case)."""
    words = set()
    for t in TEMPLATES:
        words.update(w for w in re.findall(r"[a-z]+", _SLOT.sub(" ", t.text)))
    for values in SLOT_VALUES.values():
        for v in values:
            words.update(re.findall(r"[a-z]+", v))
    return words


VOCAB = frozenset(vocabulary())
