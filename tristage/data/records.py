"""The data-record layer every reader shares: one error, one loader, one prompt parser, one split, one set of roles.

Choices:
- One error: `tristage.io.DataError` (file, line, field, reason). A parser of one record does not know where the
  record came from, so it raises the error unlocated (`bad(reason, field)`), and `load_records`, which knows the file
  and the line, locates it (`DataError.at`). So every message reads `file:line: field 'x': reason`.
- One loader: `load_records` reads JSONL or a JSON list (detected by a leading `[`, whatever the suffix; .gz too) and
  passes each record through a parse function; `on_error="raise"` raises the first bad record, "skip" collects them
  all for `format_skipped`, which callers always print, so nothing is dropped silently. In a JSON list the "line" is
  the record's 1-based position. Command inputs that are plain JSONL of objects use `tristage.io.read_jsonl` and
  the same error. Files are read by `tristage.io.read_lines`, so a missing file, a folder, bytes that are not UTF-8
  (file:line), a damaged gzip or a line over `MAX_LINE_CHARS` is a DataError naming the file, a UTF-8 byte-order
  mark is skipped, and JSON that Python cannot hold as text (nesting too deep, a 5000-digit integer, a lone
  surrogate) is an invalid record like any other. A file with no record at all is an error, whatever `on_error`
  says: an empty input is a mistake, not an empty success.
- One definition of a valid message list (`check_turns`): roles are system/user/assistant (`ROLES`), a system
  message comes only first, contents are non-blank, the first non-system turn is the user's, and the list ends with
  the user's turn (a prompt) or the assistant's (a conversation to train on). Fields name the failing part, e.g.
  `messages[2].role`.
- One prompt parser (`prompt_messages`): a prompt is text (one user message) or such a message list ending with
  the user's turn. Preference files, `tristage score`, `tristage label` and `tristage generate` all read prompts
  through it.
- One train/validation split (`split_train_val`): a torch.randperm under a generator seeded with `seed` picks
  max(1, round(val_fraction * n)) items for validation (none when val_fraction is 0), in the permutation's order;
  the rest train in their original order. Same seed and items, same split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import jinja2
import torch

from tristage.io import MAX_LINE_CHARS, DataError, parse_json, read_jsonl, read_lines

T = TypeVar("T")
ROLES = ("system", "user", "assistant")
Turn = tuple[str, str, str, str]  # (role, content, the role's field, the content's field)


# ----------------------------------------------------------------------------- errors and fields
def bad(reason: str, field: str | None = None) -> DataError:
    """An unlocated DataError, what a parser of one record raises; `load_records` adds the file and line."""
    return DataError(None, None, reason, field)


def text_field(obj: Any, key: str, where: str, optional: bool = False) -> str | None:
    """obj[key] as a string (None when optional and absent); `where` is obj's own field ("" for the record)."""
    if not isinstance(obj, dict):
        raise bad(f"expected an object, got {type(obj).__name__}", where or None)
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise bad(f"expected a string, got {type(value).__name__}", f"{where}.{key}" if where else key)
    return value


def nonblank(text: Any, where: str) -> str:
    """text itself, if it is a string that is not blank."""
    if not isinstance(text, str):
        raise bad(f"expected a string, got {type(text).__name__}", where)
    if not text.strip():
        raise bad("empty content", where)
    return text


# ----------------------------------------------------------------------------- messages and prompts
def check_turns(turns: Sequence[Turn], last: Literal["user", "assistant"],
                field: str | None) -> list[dict[str, str]]:
    """Validated turns -> [{"role", "content"}]: a prompt when last="user", a conversation to train on when
    last="assistant". `field` names the whole list (for "the list has no such turn")."""
    for k, (role, content, role_field, content_field) in enumerate(turns):
        if role not in ROLES:
            raise bad(f"unknown role {role!r} (expected system, user or assistant)", role_field)
        if role == "system" and k > 0:
            raise bad("a system message may only come first", role_field)
        nonblank(content, content_field)
    what = "prompt" if last == "user" else "conversation"
    roles = [t[0] for t in turns]
    if last not in roles:
        raise bad(f"the {what} has no {last} turn", field)
    first = next(t for t in turns if t[0] != "system")
    if first[0] != "user":
        raise bad(f"the first turn is the {first[0]}'s, not the user's", first[2])
    if roles[-1] != last:
        raise bad(f"the {what} ends with a {roles[-1]} turn, not the {last}'s", turns[-1][2])
    return [{"role": r, "content": c} for r, c, _, _ in turns]


def prompt_messages(prompt: Any, field: str = "prompt") -> list[dict[str, str]]:
    """A prompt as chat messages: text = one user message; a list of {role, content} is checked by `check_turns`
    and must end with the user's turn. Raises an unlocated DataError naming the field (e.g. `prompt[1].role`)."""
    if isinstance(prompt, str):
        return check_turns([("user", prompt, field, field)], "user", field)
    if not isinstance(prompt, list) or not prompt:
        raise bad("expected a string or a non-empty list of messages", field)
    turns = [(text_field(m, "role", f"{field}[{i}]"), text_field(m, "content", f"{field}[{i}]"), f"{field}[{i}].role",
              f"{field}[{i}].content") for i, m in enumerate(prompt)]
    return check_turns(turns, "user", field)  # type: ignore[arg-type]


def prompt_field(obj: dict[str, Any]) -> str:
    """Which field of a {prompt: text | messages} or {messages} record holds its prompt ("prompt" first)."""
    for key in ("prompt", "messages"):
        if key in obj:
            return key
    raise bad("a record needs `prompt` (text or messages) or `messages`")


# ----------------------------------------------------------------------------- files
def _records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line, object) per JSONL line, or (1-based index, object) per element of a JSON list; a line that is not JSON
    yields an unlocated DataError in place of its object (so "skip" can go on). Reading problems (no such file, not
    UTF-8, a damaged gzip, a line over MAX_LINE_CHARS) raise located DataErrors (`read_lines`)."""
    lines = read_lines(path, MAX_LINE_CHARS)
    first = True
    for i, line in lines:
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):  # a JSON list: the whole file is one document
            try:
                data = parse_json(line + "".join(rest for _, rest in lines))
            except DataError as e:
                raise e.at(path, i + (e.line or 1) - 1) from None
            yield from enumerate(data, 1)
            return
        first = False
        try:
            obj = parse_json(line)
        except DataError as e:
            obj = e
        yield i, obj


def load_records(path: str | os.PathLike, parse: Callable[[Any, int], T],
                 on_error: Literal["raise", "skip"] = "raise") -> tuple[list[T], list[DataError]]:
    """Every record of a JSONL / JSON-list file (.gz ok) through `parse(obj, line)`, which raises a DataError (`bad`)
    for an invalid one -> (parsed records, located errors of the skipped ones); with on_error="raise" the first error
    is raised instead. A file with no record at all (empty, blank, or `[]`) is an error whatever on_error says."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    out, errors, n = [], [], 0
    for line, obj in _records(path):
        n += 1
        try:
            if isinstance(obj, DataError):
                raise obj
            out.append(parse(obj, line))
        except DataError as e:
            err = e if e.path is not None else e.at(path, line)
            if on_error == "raise":
                raise err from None
            errors.append(err)
    if not n:
        raise DataError(path, None, "no records (the file is empty)")
    return out, errors


def load_all(paths: Sequence[str | os.PathLike],
             load: Callable[[str | os.PathLike], tuple[list[T], list[DataError]]]) -> tuple[list[T], list[DataError]]:
    """`load` (e.g. load_conversations with its options bound) over several files -> (all records, all errors)."""
    out: list[T] = []
    errors: list[DataError] = []
    for p in paths:
        records, errs = load(p)
        out += records
        errors += errs
    return out, errors


def format_skipped(errors: Sequence[DataError], what: str = "invalid records") -> str:
    """'skipped N invalid records (first: file:line: reason)': print it always, zero included."""
    return f"skipped {len(errors)} {what}" + (f" (first: {errors[0]})" if errors else "")


# ----------------------------------------------------------------------------- splits
def split_train_val(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, val): max(1, round(val_fraction * n)) items for validation when val_fraction > 0 (none otherwise),
    picked by torch.randperm under a generator seeded with `seed` and kept in that order; train keeps the input
    order."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * len(items))) if val_fraction > 0 else 0
    return [items[i] for i in sorted(order[n_val:])], [items[i] for i in order[:n_val]]


# ----------------------------------------------------------------------------- prompt files (label, ppo, grpo)
@dataclass
class PromptRow:
    prompt: str | list[dict[str, str]]  # as written to the output records
    messages: list[dict[str, str]]  # ends with the user's turn
    line: int

    @property
    def text(self) -> str:
        """The last user message: what the world scorer, the annotator and python judges see."""
        return self.messages[-1]["content"]


def record_prompt(obj: dict[str, Any]) -> tuple[Any, list[dict[str, str]]]:
    """(the prompt as written, its chat messages) of a {prompt: text | messages} or {messages} record; a messages
    list is cut after its last user turn. Raises an unlocated DataError naming the field."""
    key = prompt_field(obj)
    value = obj[key]
    if isinstance(value, list):
        users = [i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user"]
        value = value[:users[-1] + 1] if users else value
    return value, prompt_messages(value, key)


def read_prompt_file(path: str | Path) -> list[PromptRow]:
    """{prompt: text | messages} or {messages} records (a messages list is cut after its last user turn);
    a bad record raises DataError with file, line and field (the prompt is checked by the one prompt parser,
    tristage.data.records.prompt_messages)."""
    rows = []
    for line, obj in read_jsonl(path):
        try:
            value, messages = record_prompt(obj)
        except DataError as e:
            raise e.at(path, line) from None
        rows.append(PromptRow(value, messages, line))
    return rows


def check_rendering(tokenizer: Any, rows: Sequence[PromptRow], path: str | Path) -> None:
    """Render every prompt with the chat template (+ generation prompt) before any sampling: a prompt the template
    refuses raises DataError at its file and line, not after minutes of work on the prompts before it."""
    for r in rows:
        try:
            tokenizer.apply_chat_template(r.messages, add_generation_prompt=True)
        except (ValueError, jinja2.TemplateError) as e:
            raise DataError(path, r.line, f"the chat template refuses this prompt: {e}") from None
