"""The world's rules: which frames are plausible and coherent, given what the story said before.

Choices:
- `check(frame, ctx)` reads one frame (a parsed or generated sentence) against a running Context
  (the protagonist, place, time of day, weather) and returns Faults, then advances the context. The
  generator calls the very same function to accept or reject its own sentences, so "every
  generated plausible story passes the rules" holds by construction, and a test checks it anyway.
- Two kinds of fault: plausibility (the world forbids it: a fish on the patio, a nap on a cactus,
  a patio in outer space, stars in the morning, a dog reading a book) and coherence (the story
  contradicts itself: "she" for Tom, "it" before anyone was introduced, a protagonist who changes
  name mid-story). Each fault names its rule, so a penalty can always say where it came from.
- Pronouns and unnamed subjects refer to the protagonist (the first character named). The grammar
  has one protagonist per story on purpose: it keeps agreement checkable without a coreference model.
- Unknown context is never a fault: "sat on the patio" with no place said yet is fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from tristage.world.entities import (
    ABSURD_PLACES,
    DAY,
    DETAIL_PLACES,
    DETAILS,
    FEELINGS,
    NO_SUN,
    OBJECTS,
    PLACES,
    POSSESSIVE,
    PRESENT,
    SPOTS,
    Character,
    Place,
    character,
)
from tristage.world.grammar import GOALS, PRONOUNS, Frame


class Fault(NamedTuple):
    attribute: str  # "plausibility" or "coherence"
    rule: str
    message: str


@dataclass
class Context:
    hero: Character | None = None
    place: Place | None = None
    time: str | None = None
    weather: str | None = None
    goals: list[str] = field(default_factory=list)  # goals stated so far, in order
    lost: str | None = None  # the object the protagonist is looking for

    def copy(self) -> Context:
        return Context(self.hero, self.place, self.time, self.weather, list(self.goals), self.lost)


_BASE = {
    "went": "go",
    "ran": "run",
    "walked": "walk",
    "swam": "swim",
    "flew": "fly",
    "hopped": "hop",
    "crawled": "crawl",
    "waddled": "waddle",
    "galloped": "gallop",
}
_PRESENT_TO_PAST = {v: k for k, v in PRESENT.items()}
_NIGHTLY = {"evening", "night"}


def _name(c: Character) -> str:
    return c.word if c.kind == "person" else f"a {c.word}"


def _owner_key(c: Character) -> str:
    return "person" if c.kind == "person" else c.word


def place_faults(c: Character | None, p: Place) -> list[Fault]:
    if p.kind == "absurd":
        return [Fault("plausibility", "absurd_place", ABSURD_PLACES[p.name])]
    if c is not None and p.name not in c.places:
        if c.word == "fish":
            return [Fault("plausibility", "fish_in_water", f"a fish lives in water, not {p.at}")]
        return [Fault("plausibility", "wrong_place", f"{_name(c)} does not belong {p.at}")]
    return []


def sit_faults(c: Character | None, spot_name: str, place: Place | None) -> list[Fault]:
    spot = SPOTS[spot_name]
    out = []
    if c is not None and "sit" not in c.can:
        out.append(Fault("plausibility", "cannot_sit", f"{_name(c)} cannot sit on anything"))
    if spot.hurts:
        out.append(Fault("plausibility", spot_name.replace(" ", "_"), spot.hurts))
    if c is not None and c.size > spot.capacity:
        out.append(Fault("plausibility", "too_big", f"{_name(c)} is too big for the {spot_name}"))
    return out + spot_place_faults(spot_name, place)


def spot_place_faults(spot_name: str, place: Place | None) -> list[Fault]:
    if place is not None and place.name not in SPOTS[spot_name].places:
        return [Fault("plausibility", "not_here", f"there is no {spot_name} {place.at}")]
    return []


def need_faults(needs: frozenset[str], ctx: Context, what: str) -> list[Fault]:
    """Faults for conditions (sun, night, beach, ...) the context contradicts."""
    out, p, t, w = [], ctx.place, ctx.time, ctx.weather
    for need in sorted(needs):
        bad = None
        if need == "day" and t is not None and t not in DAY:
            bad = f"{what} needs daylight, not {t}"
        elif need == "night" and t is not None and t not in _NIGHTLY:
            bad = f"there are no stars in the {t}"
        elif need == "sun" and t == "night":
            bad = "the sun does not shine at night"
        elif need == "sun" and w in NO_SUN:
            bad = f"there is no sun on a {w} day"
        elif need == "clear" and w in NO_SUN:
            bad = f"the sky is not clear on a {w} {t or 'day'}"
        elif need == "rain" and w is not None and w != "rainy":
            bad = f"it is {w}, not rainy"
        elif p is None:
            continue
        elif need == "outdoor" and p.kind not in ("outdoor", "water"):
            bad = f"{what} cannot happen {p.at}"
        elif need == "indoor" and p.kind != "indoor":
            bad = f"{what} happens indoors, not {p.at}"
        elif need == "water" and not p.water:
            bad = f"there is no water to swim in {p.at}"
        elif need == "beach" and p.name != "the beach":
            bad = f"{what} belongs at the beach, not {p.at}"
        elif need in DETAIL_PLACES and p.name not in DETAIL_PLACES[need]:
            bad = f"there are no {need} {p.at}"
        if bad:
            out.append(Fault("plausibility", f"needs_{need}", bad))
    return out


def _refer(frame: Frame, ctx: Context, faults: list[Fault]) -> Character | None:
    """Resolve who the sentence is about, updating the protagonist, and check references."""
    actor = None
    for slot in ("A", "an", "C"):
        phrase = frame.get(slot)
        if phrase is None:
            continue
        if phrase in PRONOUNS:
            if ctx.hero is None:
                faults.append(Fault("coherence", "pronoun_without_antecedent", f"'{phrase}' before anyone is named"))
            elif phrase != ctx.hero.pronoun:
                faults.append(
                    Fault(
                        "coherence",
                        "pronoun_agreement",
                        f"'{phrase}' does not fit {ctx.hero.subject} ({ctx.hero.pronoun})",
                    )
                )
            actor = ctx.hero
        else:
            c = character(phrase)
            if ctx.hero is None:
                ctx.hero = c
                if ctx.place is not None and not frame.get("place") and not frame.get("at"):
                    faults.extend(place_faults(c, ctx.place))
            elif c is not ctx.hero:
                faults.append(
                    Fault("coherence", "character_switch", f"the story is about {ctx.hero.subject}, not {c.subject}")
                )
            actor = c
    possessive = frame.get("P")
    if possessive is not None:
        owner = actor or ctx.hero
        if owner is None:
            faults.append(Fault("coherence", "pronoun_without_antecedent", f"'{possessive}' before anyone is named"))
        elif possessive != POSSESSIVE[owner.pronoun]:
            faults.append(
                Fault(
                    "coherence", "pronoun_agreement", f"'{possessive}' does not fit {owner.subject} ({owner.pronoun})"
                )
            )
    return actor


def _fact_faults(frame: Frame, c: Character | None) -> list[Fault]:
    act = frame.template.act
    if c is None:
        return []
    wrong = None
    if act == "fact_live" and frame.get("home") not in c.homes:
        wrong = f"{_name(c)} does not live {frame.get('home')}"
    elif act == "fact_eat" and frame.get("food") not in c.foods:
        wrong = f"{_name(c)} does not eat {frame.get('food')}"
    elif act == "fact_sound" and frame.get("sound") != c.sound:
        wrong = f"{_name(c)} does not say {frame.get('sound')}"
    elif act == "fact_move" and _PRESENT_TO_PAST[frame.get("moves")] not in c.moves:
        wrong = f"{_name(c)} does not get around that way ({frame.get('moves')})"
    return [Fault("plausibility", "wrong_fact", wrong)] if wrong else []


def check(frame: Frame, ctx: Context) -> list[Fault]:
    """The faults of one sentence in context; advances `ctx` (protagonist, place, time, weather, goals)."""
    t = frame.template
    faults: list[Fault] = []
    actor = _refer(frame, ctx, faults)
    what = "this"
    # what the sentence says about when and where
    if frame.get("time"):
        ctx.time = frame.get("time")
    if frame.get("weather"):
        ctx.weather = frame.get("weather")
    if t.text == "but then it started to rain.":
        ctx.weather = "rainy"
    if t.text == "soon the sun came out again.":
        ctx.weather = "sunny"
    if ctx.weather == "sunny" and ctx.time == "night" and (frame.get("time") or frame.get("weather")):
        faults.append(Fault("plausibility", "sun_at_night", "the sun does not shine at night"))
    where = frame.get("place") or frame.get("at")
    if where is not None:
        place = PLACES[where.split(" ", 1)[1] if frame.get("at") else where]
        ctx.place = place
        faults.extend(place_faults(actor, place))
    if frame.get("move") and actor is not None and frame.get("move") != "went":
        verb = frame.get("move")
        if verb not in actor.moves:
            faults.append(Fault("plausibility", "cannot_move", f"{_name(actor)} cannot {_BASE[verb]}"))
        elif verb == "swam" and where is not None and not ctx.place.water:
            faults.append(Fault("plausibility", "swim_on_land", f"nobody can swim to {ctx.place.name}"))
    if frame.get("spot"):
        if t.sits:
            faults.extend(sit_faults(actor, frame.get("spot"), ctx.place))
        else:
            faults.extend(spot_place_faults(frame.get("spot"), ctx.place))
    food = frame.get("food")
    if food and actor is not None and t.act in ("action", "success") and food not in actor.foods:
        faults.append(Fault("plausibility", "wrong_food", f"{_name(actor)} does not eat {frame.get('food')}"))
    obj = frame.get("obj")
    if obj and actor is not None and _owner_key(actor) not in OBJECTS[obj]:
        faults.append(Fault("plausibility", "wrong_object", f"{_name(actor)} has no {obj}"))
    if obj and t.act == "want":
        ctx.lost = obj
    elif obj and ctx.lost and obj != ctx.lost:
        faults.append(Fault("coherence", "object_changed", f"the lost thing was a {ctx.lost}, not a {obj}"))
    if t.goal:
        goal = GOALS[t.goal]
        what = f"to {goal.activity}"
        if actor is not None and goal.ability and goal.ability not in actor.can:
            faults.append(Fault("plausibility", "cannot_do", f"{_name(actor)} cannot {goal.activity}"))
        if t.act == "want" or t.wants:
            ctx.goals.append(t.goal)
    if frame.thing:
        thing, adjs = frame.thing, frame.get("adjs")
        places, looks = DETAILS[thing]
        look = next((lk for lk in looks if lk.adjectives == adjs), None)
        if ctx.place is not None and ctx.place.name not in places:
            faults.append(Fault("plausibility", "detail_not_here", f"there is no {thing} {ctx.place.at}"))
        if look is None:
            faults.append(Fault("plausibility", "odd_detail", f"{thing} is not {adjs}"))
        elif ctx.time is not None and ctx.time not in look.times:
            faults.append(Fault("plausibility", "detail_wrong_time", f"the {thing} is not {adjs} in the {ctx.time}"))
        elif look.clear and ctx.weather in NO_SUN:
            bad = f"the {thing} is not {adjs} when it is {ctx.weather}"
            faults.append(Fault("plausibility", "detail_wrong_weather", bad))
    faults.extend(need_faults(t.needs, ctx, what))
    if t.act.startswith("fact_"):
        faults.extend(_fact_faults(frame, actor))
    return faults


def detail_mood(frame: Frame) -> str | None:
    """The mood a sentence carries, if any (feelings, outcomes, details, closings)."""
    t = frame.template
    if t.mood:
        return t.mood
    if frame.get("feeling"):
        return FEELINGS[frame.get("feeling")]
    if frame.thing:
        for look in DETAILS[frame.thing][1]:
            if look.adjectives == frame.get("adjs"):
                return look.mood
    return None
