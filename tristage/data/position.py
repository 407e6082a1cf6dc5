"""Where an endless, epoch-shuffled loader stands: the bookkeeping ChatLoader and PairLoader share.

Such a loader plans each epoch's batches as a pure function of its settings and the epoch number (`plan(epoch)`:
that epoch's batches for this rank), so its position is two numbers: the epoch and how many of its batches were
taken (`index`). Taking a batch past the end of an epoch's plan starts the next epoch. state_dict() is that
position plus the settings that decide the plans ({"epoch", "index", **settings}); resuming checks the settings
match, so a saved position means the same batches, and refuses a state saved by a loader that would plan
differently, naming what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def advance(plan: Callable[[int], Sequence[T]], epoch: int, index: int) -> tuple[T, int, int]:
    """Take the batch after position (epoch, index) -> (that batch, the position after it)."""
    if index >= len(plan(epoch)):
        epoch, index = epoch + 1, 0
    return plan(epoch)[index], epoch, index + 1


def resume_position(state: dict[str, Any], settings: dict[str, Any]) -> tuple[int, int]:
    """(epoch, index) of a saved loader state, after checking it was saved under the same settings."""
    diff = [k for k in settings if state.get(k) != settings[k]]
    if diff:
        raise ValueError("loader state does not match this loader: " +
                         ", ".join(f"{k} {state.get(k)!r} != {settings[k]!r}" for k in diff))
    return int(state["epoch"]), int(state["index"])
