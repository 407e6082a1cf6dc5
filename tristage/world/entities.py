"""The demo world's entities: who and what exists, and the facts that the rules read.

Choices:
- Plain frozen dataclasses in module-level tables, so the whole world reads on a few screens and a
  test can enumerate it. Properties are sets of names (where a character can be, what it eats, how
  it moves), not a class hierarchy: a rule is then one set lookup, and its failure names the fact.
- Characters are animals (referred to as "the dog" / "it") and people (a name, "he" or "she"), so
  pronoun agreement is a real thing to get right. Sizes (tiny .. big) give rules like "a horse does
  not fit on a pillow"; a spot's `hurts` names why sitting there is a bad idea (cactus, stove).
- Three places are absurd for everyone (outer space, the moon, the volcano): they exist in the
  vocabulary so that a model can write them and the scorer can catch it.
- Moods are happy, calm and sad; every feeling word, detail and outcome may carry one, which is how
  the scorer measures whether a requested mood is carried through a story.
- The vocabulary is kept small on purpose (a few hundred words), so a 1-5M-parameter model trained
  for minutes on a CPU can learn the grammar, and its mistakes are about meaning, not spelling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TIMES = ("morning", "afternoon", "evening", "night")
DAY = frozenset({"morning", "afternoon"})
WEATHERS = ("sunny", "rainy", "windy", "snowy", "cloudy")
NO_SUN = frozenset({"rainy", "snowy", "cloudy"})  # weather in which nobody naps "in the sun"
MOODS = ("happy", "calm", "sad")
FEELINGS = {
    "happy": "happy", "glad": "happy", "proud": "happy", "cheerful": "happy",
    "calm": "calm", "sleepy": "calm", "cozy": "calm", "peaceful": "calm",
    "sad": "sad", "lonely": "sad", "gloomy": "sad", "upset": "sad",
}  # fmt: skip


@dataclass(frozen=True)
class Place:
    name: str  # with its article, as written: "the beach", "outer space"
    prep: str  # "at" -> "at the beach"
    kind: str  # outdoor | indoor | water | absurd
    water: bool = False  # somewhere to swim

    @property
    def at(self) -> str:
        return f"{self.prep} {self.name}"


_P = [
    Place("the park", "in", "outdoor"),
    Place("the garden", "in", "outdoor"),
    Place("the backyard", "in", "outdoor"),
    Place("the meadow", "in", "outdoor"),
    Place("the forest", "in", "outdoor"),
    Place("the hill", "on", "outdoor"),
    Place("the farm", "on", "outdoor"),
    Place("the desert", "in", "outdoor"),
    Place("the beach", "at", "outdoor", water=True),
    Place("the pond", "at", "water", water=True),
    Place("the lake", "at", "water", water=True),
    Place("the river", "by", "water", water=True),
    Place("the sea", "by", "water", water=True),
    Place("the kitchen", "in", "indoor"),
    Place("the living room", "in", "indoor"),
    Place("the bedroom", "in", "indoor"),
    Place("the library", "in", "indoor"),
    Place("the barn", "in", "indoor"),
    Place("outer space", "in", "absurd"),
    Place("the moon", "on", "absurd"),
    Place("the volcano", "on", "absurd"),
]
PLACES: dict[str, Place] = {p.name: p for p in _P}
ABSURD_PLACES = {
    "outer space": "no one can breathe in outer space",
    "the moon": "no one can play on the moon",
    "the volcano": "a volcano is far too hot to visit",
}

HOUSE = {"the kitchen", "the living room", "the bedroom"}
YARD = {"the park", "the garden", "the backyard"}
WILD = {"the meadow", "the forest", "the hill"}
FARM = {"the farm", "the barn"}
WATER = {"the pond", "the lake", "the river", "the sea"}
SHORE = WATER | {"the beach"}


@dataclass(frozen=True)
class Character:
    word: str  # "dog" or "Lily"
    kind: str  # "animal" or "person"
    pronoun: str  # he | she | it
    size: int  # 0 tiny, 1 small, 2 medium, 3 big
    moves: tuple[str, ...]  # past tense, first is the usual way ("swam" for a fish)
    places: frozenset[str]
    foods: tuple[str, ...]
    sound: str | None = None
    homes: tuple[str, ...] = ()
    can: frozenset[str] = field(default_factory=frozenset)  # abilities the goals need

    @property
    def subject(self) -> str:  # how a sentence names it
        return self.word if self.kind == "person" else f"the {self.word}"

    @property
    def indefinite(self) -> str:  # how an introduction names it
        if self.kind == "person":
            return f"a {'boy' if self.pronoun == 'he' else 'girl'} named {self.word}"
        return ("an " if self.word[0] in "aeiou" else "a ") + self.word

    @property
    def possessive(self) -> str:
        return POSSESSIVE[self.pronoun]


POSSESSIVE = {"he": "his", "she": "her", "it": "its"}
PRESENT = {"ran": "runs", "walked": "walks", "swam": "swims", "flew": "flies", "hopped": "hops",
           "crawled": "crawls", "waddled": "waddles", "galloped": "gallops"}  # fmt: skip

_ANIMAL_SPECS = [
    # word, size, moves, places, foods, sound, homes, extra abilities
    ("dog", 2, ("ran", "walked", "swam"), HOUSE | YARD | WILD | FARM | SHORE, ("bones",), "woof",
     ("in a house", "on a farm"), {"ball", "swim"}),
    ("cat", 1, ("ran", "walked"), HOUSE | YARD | FARM | {"the meadow", "the beach"}, ("fish",), "meow",
     ("in a house", "on a farm"), {"ball"}),
    ("fish", 0, ("swam",), WATER, ("bugs",), None, ("in the water", "in a pond", "in the sea", "in a river"),
     {"swim"}),
    ("duck", 1, ("waddled", "swam", "flew"), WATER | {"the park", "the farm", "the garden", "the meadow"},
     ("bread", "seeds", "bugs"), "quack", ("in a pond", "on a farm"), {"swim"}),
    ("bird", 0, ("flew", "hopped"), YARD | WILD | SHORE | {"the farm", "the barn", "the desert"},
     ("seeds", "berries", "bugs"), "tweet", ("in a nest", "in a tree"), set()),
    ("owl", 1, ("flew",), {"the forest", "the barn", "the farm", "the garden", "the park", "the meadow"},
     ("bugs",), "hoot", ("in a tree", "in the forest", "in a barn"), set()),
    ("frog", 0, ("hopped", "swam"), {"the pond", "the lake", "the river", "the garden", "the forest", "the meadow"},
     ("bugs",), "ribbit", ("in a pond",), {"swim"}),
    ("rabbit", 1, ("hopped", "ran"), YARD | WILD | {"the farm"}, ("carrots", "leaves"), None,
     ("in a burrow", "in the meadow"), set()),
    ("horse", 3, ("galloped", "ran", "walked"), FARM | {"the meadow", "the hill", "the beach", "the forest"},
     ("hay", "apples", "carrots"), "neigh", ("on a farm", "in a barn"), set()),
    ("cow", 3, ("walked",), FARM | {"the meadow", "the hill"}, ("grass", "hay"), "moo",
     ("on a farm", "in a barn"), set()),
    ("bear", 3, ("walked", "ran", "swam"), {"the forest", "the hill", "the river", "the lake", "the meadow"},
     ("honey", "berries", "fish"), "growl", ("in the forest", "in a cave"), {"swim"}),
    ("mouse", 0, ("ran",), HOUSE | FARM | {"the garden", "the meadow", "the library"}, ("cheese", "seeds"),
     "squeak", ("in a hole", "in a house"), set()),
    ("turtle", 1, ("crawled", "swam"), WATER | {"the beach", "the garden"}, ("leaves", "bugs"), None,
     ("in a pond", "in the sea"), {"swim"}),
]  # fmt: skip
_PERSON_PLACES = HOUSE | YARD | WILD | FARM | SHORE | {"the library", "the desert"}
_PERSON_CAN = {"sit", "look", "ball", "swim", "kite", "read", "build", "pick"}
BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack")
GIRLS = ("Lily", "Mia", "Anna", "Emma", "Lucy", "Rosa")

CHARACTERS: dict[str, Character] = {}
for _w, _s, _m, _pl, _f, _snd, _h, _can in _ANIMAL_SPECS:
    _can = set(_can) | ({"sit", "look"} if _w != "fish" else set())
    CHARACTERS[_w] = Character(_w, "animal", "it", _s, _m, frozenset(_pl), _f, _snd, _h, frozenset(_can))
for _names, _pr in ((BOYS, "he"), (GIRLS, "she")):
    for _n in _names:
        CHARACTERS[_n] = Character(_n, "person", _pr, 2, ("ran", "walked", "swam"), frozenset(_PERSON_PLACES),
                                   ("apples", "cookies", "berries", "bread", "carrots"), None, (),
                                   frozenset(_PERSON_CAN))  # fmt: skip
ANIMALS = [c for c in CHARACTERS.values() if c.kind == "animal"]
PEOPLE = [c for c in CHARACTERS.values() if c.kind == "person"]
FOODS = sorted({f for c in CHARACTERS.values() for f in c.foods})
HOMES = sorted({h for c in CHARACTERS.values() for h in c.homes})
SOUNDS = sorted({c.sound for c in CHARACTERS.values() if c.sound})
MOVES = ("went", "ran", "walked", "swam", "flew", "hopped", "crawled", "waddled", "galloped")


@dataclass(frozen=True)
class Spot:
    """Something to sit, lie or nap on."""

    name: str
    places: frozenset[str]
    capacity: int = 3  # the biggest size it holds
    hurts: str | None = None  # why sitting here is a bad idea


_S = [
    Spot("patio", frozenset({"the backyard", "the garden"})),
    Spot("porch", frozenset({"the backyard", "the farm"})),
    Spot("mat", frozenset({"the kitchen", "the living room", "the bedroom"}), 2),
    Spot("rug", frozenset({"the living room", "the bedroom", "the library"}), 2),
    Spot("sofa", frozenset({"the living room"}), 2),
    Spot("bed", frozenset({"the bedroom"}), 2),
    Spot("pillow", frozenset({"the bedroom", "the living room"}), 2),
    Spot("chair", frozenset({"the kitchen", "the library", "the living room"}), 2),
    Spot("bench", frozenset({"the park", "the garden"}), 2),
    Spot("blanket", frozenset({"the beach", "the park", "the meadow", "the garden", "the backyard"}), 2),
    Spot("grass", frozenset({"the park", "the garden", "the backyard", "the meadow", "the farm", "the hill"})),
    Spot("sand", frozenset({"the beach", "the desert"})),
    Spot("rock", frozenset(SHORE | {"the forest", "the hill", "the desert"})),
    Spot("log", frozenset({"the forest", "the river", "the pond", "the lake"})),
    Spot("hay", frozenset({"the farm", "the barn"})),
    Spot("branch", frozenset({"the forest", "the park", "the garden", "the backyard"}), 1),
    Spot("lily pad", frozenset({"the pond", "the lake"}), 0),
    Spot("cactus", frozenset({"the desert"}), hurts="sitting on a cactus hurts"),
    Spot("stove", frozenset({"the kitchen"}), hurts="a stove is too hot to sit on"),
]
SPOTS: dict[str, Spot] = {s.name: s for s in _S}

# things a character can lose and find, and who can own them
OBJECTS: dict[str, frozenset[str]] = {
    "ball": frozenset({"dog", "cat", "person"}),
    "bone": frozenset({"dog"}),
    "hat": frozenset({"person"}),
    "book": frozenset({"person"}),
    "shoe": frozenset({"person"}),
    "shell": frozenset({"person"}),
}

# Vivid details: "The <thing> was <adjectives>." Each thing says where it can be seen, and each pair
# of adjectives its mood and, where it matters, the times of day it needs.
_OUTDOOR = frozenset(p.name for p in _P if p.kind in ("outdoor", "water"))
_GRASS = frozenset({"the park", "the garden", "the backyard", "the meadow", "the farm", "the hill"})
_TREES = frozenset({"the forest", "the park", "the garden", "the backyard", "the hill"})
_FLOWERS = frozenset({"the garden", "the meadow", "the park", "the backyard"})
_INDOOR = frozenset(p.name for p in _P if p.kind == "indoor")


@dataclass(frozen=True)
class Look:
    adjectives: str  # "warm and soft"
    mood: str | None
    times: frozenset[str] = frozenset(TIMES)
    clear: bool = False  # needs a clear sky (not rainy, snowy or cloudy)


DETAILS: dict[str, tuple[frozenset[str], tuple[Look, ...]]] = {
    "sand": (frozenset({"the beach", "the desert"}),
             (Look("warm and soft", "happy", DAY), Look("cool and smooth", "calm"), Look("cold and wet", "sad"),
              Look("white and fine", None))),
    "grass": (_GRASS, (Look("bright and green", "happy", DAY), Look("green and soft", "calm"),
                       Look("wet and cold", "sad"), Look("long and thick", None))),
    "water": (frozenset(SHORE), (Look("clear and blue", "happy", DAY, True), Look("still and quiet", "calm"),
                                 Look("gray and cold", "sad"), Look("deep and wide", None))),
    "sky": (_OUTDOOR, (Look("blue and bright", "happy", DAY, True),
                       Look("pink and gold", "calm", frozenset({"evening"}), True),
                       Look("dark and still", "calm", frozenset({"evening", "night"})),
                       Look("gray and heavy", "sad"), Look("wide and open", None))),
    "air": (_OUTDOOR | _INDOOR, (Look("warm and sweet", "happy"), Look("fresh and cool", "calm"),
                                 Look("cold and damp", "sad"), Look("light and clean", None))),
    "flowers": (_FLOWERS, (Look("bright and sweet", "happy", DAY), Look("soft and pale", "calm"),
                           Look("dry and brown", "sad"), Look("red and yellow", None))),
    "trees": (_TREES, (Look("tall and green", "happy"), Look("quiet and still", "calm"),
                       Look("bare and gray", "sad"), Look("old and tall", None))),
    "room": (_INDOOR, (Look("bright and sunny", "happy", DAY, True), Look("warm and cozy", "calm"),
                       Look("dark and cold", "sad"), Look("small and tidy", None))),
}  # fmt: skip
ADJECTIVE_PAIRS = sorted({look.adjectives for _, looks in DETAILS.values() for look in looks})
DETAIL_PLACES = {"grass": _GRASS, "trees": _TREES, "flowers": _FLOWERS, "outdoor": _OUTDOOR, "indoor": _INDOOR}


_BY_PHRASE = {p: c for c in CHARACTERS.values() for p in (c.word.lower(), c.subject.lower(), c.indefinite.lower())}


def character(word: str) -> Character | None:
    """The character a word names ("dog", "the dog", "a dog", "Lily", "a girl named Lily"), if any."""
    w = word.lower().strip()
    c = _BY_PHRASE.get(w)
    if c is None:
        for prefix in ("a boy named ", "a girl named ", "the ", "an ", "a "):
            if w.startswith(prefix):
                return _BY_PHRASE.get(w[len(prefix) :])
    return c
