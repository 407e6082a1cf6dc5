"""Preference pairs for reward models and DPO: load them in the common shapes, encode both responses, batch them.

Choices:
- Loading is records.py's (JSONL or a JSON list, .gz too, located errors; the prompt is `records.prompt_messages`). A
  pair is a prompt (messages ending with the user's turn, optional system first), a chosen and a rejected reply,
  optional per-attribute `ratings` {"chosen": {attr: number}, "rejected": {...}}, an optional `rationale`, and `meta`
  (the record's `meta` object plus every top-level key the shape does not use, e.g. judge scores, so nothing is lost).
  The shape is detected per record:
  * `prompt` (a string = one user message, or a list of messages) or `messages`, with `chosen` / `rejected` each a
    string, one assistant message, or a list of exactly one (TRL's conversational shape);
  * Anthropic HH: only `chosen` and `rejected`, two whole transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...". They are
    split at those markers (turn contents stripped); everything before the last assistant turn must be the same in
    both and becomes the prompt. The public test splits hold a few pairs whose transcripts differ earlier or end
    with an empty reply: errors, not guesses;
  * long-form QA expert pairs: `question`, `answer_a`, `answer_b`, `overall_preference` -1 (A) or 1 (B), the expert's
    `justification` as the rationale;
  * PandaLM: `instruction` (+ "\\n\\n" + `input` when non-empty), `response1`, `response2`, three annotators voting
    1, 2 or 0 (tie). The reply with at least two of the three votes wins; anything else has no majority preference
    and is an error (skippable, counted), as is a pair whose replies are not non-blank strings (the file holds a
    few JSON `true`s and empty replies).
  A pair whose two replies are the same (after stripping) teaches nothing; it is reported as an error too, so a
  skip counts it. Errors are DataErrors with file, line and field; `on_error` raises or collects.
- Encoding: each side is chat.render(prompt + [assistant reply]): the ids of tokenizer.apply_chat_template and a mask
  of which only the last run (the final reply up to and including its end-of-turn token) is kept, so assistant turns
  inside the prompt are context, never scored. Tokens after the last masked one are dropped: a sequence ends on its
  end-of-turn token, where a reward head reads.
- Too long (> max_len tokens): "truncate" removes the same number of prompt tokens from the left of both sides (the
  two replies keep the same context, which a reward margin or a DPO log-ratio compares), as many as the longer side
  needs; a reply that alone exceeds max_len loses its prompt and is cut from the right (its end-of-turn token with
  it). "drop" drops the pair. Both are counted in PairStats, like render errors. A long reply is rendered only as
  far as that rule can need (chat.render_window, as for chats: the first max_len + prompt + 2 tokens), and a long
  prompt only from a cut near its end (`_prompt_cut`; only its last tokens can survive): the cut is where the
  tokens of the text that follows are provably the whole text's (`_cut_rule`: before a space that follows a letter
  or digit for GPT-2-style regex pre-tokenizers, ours, Llama-3's and Qwen2's; anywhere for a char-level one), and
  the tail holds max_len + CUT_MARGIN of the prompt's tokens. So a 20 MB reply or prompt is truncated or dropped in
  about a second with the result of rendering it whole (`encode_pair`, tested on random long prompts and at each
  place a cut is allowed). A tokenizer with no cut known to be exact (SentencePiece-style Metaspace, a normalizer
  other than NFC, another split regex) or a prompt with no place to cut near its end still renders whole.
- Batches: one forward pass over 2B rows, chosen rows then rejected rows, right-padded so plain causal attention is
  exact for the real tokens; labels are pre-shifted like chat.py's (labels[:, t] = ids[t + 1] where that token is
  in the reply, else -100), so the per-token cross-entropy at t is -log p(reply token t + 1), and summed per row the
  sequence log-probability DPO needs. `last_index` is each row's last real token. Ratings become a [2B, A] float
  tensor in a fixed attribute order, NaN where missing.
- PairLoader: an endless iterator; each epoch shuffles pair indices with a torch.Generator seeded from (seed, epoch),
  cuts them into batches of `batch_size` pairs, and rank r of W takes batches r, r + W, ... (cut to a multiple of W, so
  every rank runs the same number of steps on distinct pairs). Its position is (epoch, index), kept by position.py as
  ChatLoader's is, so state_dict/load_state_dict resume exactly. No length bucketing: pairs are short and order stays
  unbiased.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import jinja2
import torch

from tristage.data.chat import IGNORE, render_window
from tristage.data.position import advance, resume_position
from tristage.data.records import (
    bad,
    check_turns,
    format_skipped,
    load_all,
    load_records,
    nonblank,
    prompt_messages,
    split_train_val,
    text_field,
)
from tristage.flags.base import PAIR_LAYOUT_HELP, PairDataArgs, PairLayout  # noqa: F401 (re-exported)
from tristage.io import DataError, UserError
from tristage.tokenizer import Tokenizer


# ----------------------------------------------------------------------------- loading
@dataclass
class Preference:
    prompt: list[dict[str, str]]  # the conversation before the replies; ends with a user message
    chosen: str
    rejected: str
    ratings: dict[str, dict[str, float]] | None = None  # {"chosen": {attr: value}, "rejected": {attr: value}}
    rationale: str | None = None
    meta: dict = field(default_factory=dict)  # anything else the record carried (judge scores, annotator votes)
    path: str = ""
    line: int | None = None


_HH_MARKER = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _reply(value: Any, key: str) -> str:
    """A reply: a string, one assistant message, or a list of exactly one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise bad(f"expected exactly one assistant message, got {len(value)}", key)
        value, key = value[0], f"{key}[0]"
    if isinstance(value, dict):
        if (role := text_field(value, "role", key)) != "assistant":
            raise bad(f"expected an assistant message, got role {role!r}", f"{key}.role")
        value, key = value.get("content"), f"{key}.content"
    return nonblank(value, key)


def _hh_turns(text: Any, key: str) -> list[tuple[str, str]]:
    """An HH transcript -> (role, stripped content) turns; it must start with Human and end with Assistant."""
    if not isinstance(text, str):
        raise bad(f"expected an HH transcript string (no 'prompt' or 'messages' given), got {type(text).__name__}",
                  key)
    parts = _HH_MARKER.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise bad("expected a transcript starting with '\\n\\nHuman: '", key)
    turns = [(_HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if turns[-1][0] != "assistant":
        raise bad("the transcript does not end with an assistant turn", key)
    return turns


def _hh(obj: dict) -> dict[str, Any]:
    chosen, rejected = _hh_turns(obj["chosen"], "chosen"), _hh_turns(obj["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        k = next((k for k, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                 min(len(chosen), len(rejected)) - 1)
        raise bad(f"the chosen and rejected transcripts differ before their final assistant turn (at turn {k + 1})",
                  "rejected")
    where = [f"chosen (turn {k + 1})" for k in range(len(chosen))]
    prompt = check_turns([(r, c, w, w) for (r, c), w in zip(chosen[:-1], where)], "user", "chosen")
    return {"prompt": prompt, "chosen": nonblank(chosen[-1][1], "chosen"),
            "rejected": nonblank(rejected[-1][1], "rejected")}


def _lfqa(obj: dict) -> dict[str, Any]:
    pref = obj.get("overall_preference")
    if pref not in (-1, 1) or isinstance(pref, bool):
        raise bad(f"expected -1 (answer_a preferred) or 1 (answer_b preferred), got {pref!r}", "overall_preference")
    a, b = nonblank(obj.get("answer_a"), "answer_a"), nonblank(obj.get("answer_b"), "answer_b")
    rationale = text_field(obj, "justification", "", optional=True)
    return {"prompt": prompt_messages(obj.get("question"), "question"), "chosen": a if pref == -1 else b,
            "rejected": b if pref == -1 else a, "rationale": rationale if rationale and rationale.strip() else None,
            "meta": {"chosen_answer": "a" if pref == -1 else "b"}}


def _pandalm(obj: dict) -> dict[str, Any]:
    votes = []
    for k in ("annotator1", "annotator2", "annotator3"):
        if obj.get(k) not in (0, 1, 2) or isinstance(obj.get(k), bool):
            raise bad(f"expected 1 (response1 better), 2 (response2 better) or 0 (tie), got {obj.get(k)!r}", k)
        votes.append(obj[k])
    winner, n = Counter(votes).most_common(1)[0]
    if winner == 0 or n < 2:
        raise bad(f"no majority preference (votes {votes})")
    user, inp = text_field(obj, "instruction", ""), text_field(obj, "input", "", optional=True)
    if inp and inp.strip():
        user = f"{user}\n\n{inp}"
    r1, r2 = nonblank(obj.get("response1"), "response1"), nonblank(obj.get("response2"), "response2")
    return {"prompt": check_turns([("user", user, "instruction", "instruction")], "user", "instruction"),
            "chosen": r1 if winner == 1 else r2, "rejected": r2 if winner == 1 else r1,
            "meta": {"votes": votes, "chosen_response": winner}}


def _ratings(value: Any) -> dict[str, dict[str, float]] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"chosen", "rejected"}:
        raise bad("expected {'chosen': {attribute: number}, 'rejected': {attribute: number}}", "ratings")
    out: dict[str, dict[str, float]] = {}
    for side in ("chosen", "rejected"):
        if not isinstance(value[side], dict):
            raise bad(f"expected an object of attribute: number, got {type(value[side]).__name__}", f"ratings.{side}")
        for attr, x in value[side].items():
            if not isinstance(x, int | float) or isinstance(x, bool):
                raise bad(f"expected a number, got {type(x).__name__}", f"ratings.{side}.{attr}")
            if isinstance(x, int) and abs(x) > 2**1023 or not math.isfinite(x):  # NaN, Infinity: JSON numbers too
                raise bad(f"expected a finite number, got {x if isinstance(x, float) else 'an integer too large'}",
                          f"ratings.{side}.{attr}")
        out[side] = {attr: float(x) for attr, x in value[side].items()}
    return out


# the keys each shape reads; any other top-level key goes to meta
_SHAPES = (("question", _lfqa, {"question", "answer_a", "answer_b", "overall_preference", "justification"}),
           ("response1", _pandalm, {"instruction", "input", "response1", "response2", "annotator1", "annotator2",
                                    "annotator3"}))


def parse_preference(obj: Any, system_prompt: str | None = None) -> dict[str, Any]:
    """One record in any supported shape -> Preference fields (prompt, chosen, rejected, ratings, rationale, meta);
    raises an unlocated DataError (records.bad)."""
    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    shape = next(((parse, used) for key, parse, used in _SHAPES if key in obj), None)
    if shape is not None:
        fields, used = shape[0](obj), shape[1]
    elif "chosen" in obj and "rejected" in obj:
        if "prompt" in obj and "messages" in obj:
            raise bad("both 'prompt' and 'messages' given: expected one")
        key = "prompt" if "prompt" in obj else "messages" if "messages" in obj else None
        if key is None:
            fields = _hh(obj)
        else:
            fields = {"prompt": prompt_messages(obj[key], key), "chosen": _reply(obj["chosen"], "chosen"),
                      "rejected": _reply(obj["rejected"], "rejected")}
        used = {"prompt", "messages", "chosen", "rejected"}
    else:
        raise bad(f"unrecognised record: expected 'chosen'/'rejected' (with 'prompt' or 'messages', or HH "
                  f"transcripts), 'question'/'answer_a'/'answer_b' or 'response1'/'response2', got keys {sorted(obj)}")
    if fields["chosen"].strip() == fields["rejected"].strip():
        raise bad("chosen and rejected are identical", "rejected")
    fields["ratings"] = _ratings(obj.get("ratings"))
    if "rationale" in obj:
        rationale = text_field(obj, "rationale", "", optional=True)
        fields["rationale"] = rationale if rationale and rationale.strip() else None
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise bad(f"expected an object, got {type(meta).__name__}", "meta")
    extra = {k: v for k, v in obj.items() if k not in used | {"ratings", "rationale", "meta"}}
    fields["meta"] = {**extra, **fields.get("meta", {}), **meta}
    if system_prompt and fields["prompt"][0]["role"] != "system":
        fields["prompt"].insert(0, {"role": "system", "content": system_prompt})
    return fields


def load_preferences(path: str | os.PathLike, on_error: Literal["raise", "skip"] = "raise",
                     system_prompt: str | None = None) -> tuple[list[Preference], list[DataError]]:
    """Read a preference file (JSONL or JSON list, optionally .gz) -> (valid pairs, errors of skipped records)."""
    return load_records(path, lambda obj, line: Preference(**parse_preference(obj, system_prompt), path=str(path),
                                                           line=line), on_error)


# ----------------------------------------------------------------------------- encoding
@dataclass
class PairExample:
    chosen_ids: list[int]  # prompt + chosen reply, ending on its end-of-turn token
    chosen_mask: list[int]  # 1 on the final reply's tokens (end-of-turn included), 0 elsewhere
    rejected_ids: list[int]
    rejected_mask: list[int]
    ratings: dict[str, list[float]] | None = None  # {"chosen": [...], "rejected": [...]} in attribute order


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0  # prompt cut from the left (or a reply cut from the right) to fit max_len
    dropped: int = 0  # too long with truncation="drop"
    errors: list[DataError] = field(default_factory=list)  # pairs that failed to render (skipped)
    attributes: list[str] = field(default_factory=list)  # the order of PairExample.ratings

    def __str__(self) -> str:
        return (f"{self.pairs} pairs; {self.truncated} truncated, {self.dropped} dropped (too long); "
                + format_skipped(self.errors, "pairs that failed to render"))


def encode_reply(tokenizer: Tokenizer, prompt: list[dict[str, str]], reply: str,
                 **template_kwargs: Any) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + [reply]: mask only on the reply's tokens, ids cut after its last one."""
    ids, mask, _, _ = _render_side(tokenizer, prompt, reply, None, None, **template_kwargs)
    return ids, mask


# ----------------------------------------------------------------------------- a long prompt's tail
CUT_MARGIN = 64  # tokens a prompt's tail holds beyond max_len (_prompt_cut)
# Split pre-tokenizer patterns (Llama-3 / cl100k, Qwen2) of which no match holds a letter or digit followed by a
# space, and which match every character: like ByteLevel's GPT-2 regex, they start a pre-token at such a space.
_SPACE_SPLITS = tuple(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits
                      + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+" for digits in (r"\p{N}{1,3}", r"\p{N}"))


class Cut(NamedTuple):
    """Where a side's text is encoded from (_prompt_cut): the whole text's tokens from `begin` on are those of
    text[begin:]; `tokens` of them come before the generation prompt's end, character `reply_at`."""
    begin: int
    tokens: int
    reply_at: int


def _cut_rule(tokenizer: Tokenizer) -> str | None:
    """Where a text may be cut so that the tokens of what follows are the whole text's from there on: "space" before
    a space that follows a letter or digit (a byte-level GPT-2 regex or a `_SPACE_SPLITS` pattern, no normalizer or
    NFC, which composes nothing with a space: the match holding the letter ends there, and the regex, with no
    look-behind, goes on from the space as it would from the text's start; the model tokenizes each pre-token
    alone), "char" between any two characters (a char-level BPE: no pre-tokenizer, no normalizer, no merges or
    affixes), or None (not known, e.g. a custom component: render whole). Added tokens are kept away from the cut
    (`_cut_at`); each is split out before the rest is tokenized."""
    try:
        return _cut_rule_of(tokenizer.tok)
    except Exception:  # a component that does not serialize
        return None


def _cut_rule_of(tok: Any) -> str | None:
    norm = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else None
    if tok.pre_tokenizer is None:
        model = json.loads(tok.model.__getstate__()) if norm is None else {}
        char = (model.get("type") == "BPE" and not model.get("merges") and not model.get("continuing_subword_prefix")
                and not model.get("end_of_word_suffix") and model.get("dropout") is None
                and (model.get("byte_fallback") or not model.get("fuse_unk")))
        return "char" if char else None
    if norm not in (None, {"type": "NFC"}):
        return None
    pre = json.loads(tok.pre_tokenizer.__getstate__())
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regex = [st.get("type") == "ByteLevel" and st.get("use_regex") is True
             or st.get("type") == "Split" and st.get("behavior") == "Isolated" and st.get("invert") is False
             and st.get("pattern", {}).get("Regex") in _SPACE_SPLITS for st in steps]
    byte_map = [st.get("type") == "ByteLevel" and st.get("use_regex") is False for st in steps]
    return "space" if regex[:1] == [True] and all(byte_map[1:]) else None


def _cut_at(text: str, pos: int, lo: int, rule: str, added: list[str]) -> int | None:
    """The last cut at or before `pos` (and after `lo`) that `rule` allows, with no added token's text within reach
    (one could match across the cut, or strip the whitespace next to it), or None."""
    reach = max(map(len, added), default=0) + 2

    def clear(x: int) -> bool:
        near = text[max(0, x - reach):x + reach]
        return not text[x - 1].isspace() and not text[x + 1].isspace() and not any(a in near for a in added)

    x = min(pos, len(text) - 2)
    while x > lo:
        if rule == "space":
            x = text.rfind(" ", lo, x + 1)
            if x <= lo:
                return None
            if unicodedata.category(text[x - 1])[0] in "LN" and clear(x):
                return x
        elif not text[x].isspace() and clear(x):
            return x
        x -= 1
    return None


def _prompt_cut(tokenizer: Tokenizer, prompt: list[dict[str, str]], max_len: int,
                template_kwargs: dict[str, Any]) -> Cut | None:
    """For a long prompt, a Cut whose tail holds at least max_len + CUT_MARGIN of its tokens: only those can survive
    the left truncation (module notes), so each side is encoded from there (chat.render_window). The tail starts
    from 4 characters per token and doubles until it holds them; None when the prompt is under twice the tail, the
    tokenizer has no known exact cut (_cut_rule), or no cut is allowed in the tail's first half (render whole)."""
    want = max_len + CUT_MARGIN
    chars = 4 * want
    if 2 * chars >= sum(len(m["content"]) for m in prompt) or (rule := _cut_rule(tokenizer)) is None:
        return None  # (a short prompt is not rendered here: most are)
    try:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **template_kwargs)
    except (ValueError, jinja2.TemplateError):  # the whole render reports it
        return None
    added = [t.content for t in tokenizer.tok.get_added_tokens_decoder().values()]
    while 2 * chars < len(text):
        begin = _cut_at(text, len(text) - chars, len(text) - 2 * chars, rule, added)
        if begin is None:
            return None
        tokens = len(tokenizer.tok.encode(text[begin:], add_special_tokens=False).ids)
        if tokens >= want:
            return Cut(begin, tokens, len(text))
        chars *= 2
    return None


def _render_side(tokenizer: Tokenizer, prompt: list[dict[str, str]], reply: str, need: int | None, cut: Cut | None,
                 /, **template_kwargs: Any) -> tuple[list[int], list[int], int | None, bool] | None:
    """`encode_reply` from the first tokens only (at least `need` of them; chat.render_window) when the text is long:
    (ids, mask, start, complete). complete: the reply's last token is among them, and ids and mask are encode_reply's
    exactly. Else the side goes on past ids: with `start` (the reply's first token) its mask is 1 from there to the
    end of ids; with start None the reply begins after them (a prompt longer than the tokens rendered).

    With a Cut, the side is encoded from cut.begin and all of it counts from there: the whole side's ids and mask
    from that token on. The reply's run of 1s must then begin inside the window and within the reply (its first
    token overlapping it), else None (the whole render decides): the prompt's assistant turns may be cut off, so
    runs are not counted, and a token trained in the window's first turn may be untrained in the whole."""
    ids, offsets, mask, more = render_window(tokenizer, [*prompt, {"role": "assistant", "content": reply}], need,
                                             cut.begin if cut else 0, template_kwargs)
    if cut is not None:
        last = len(ids) - 1 if more else max((t for t, m in enumerate(mask) if m), default=-1)
        if last < 0 or not mask[last]:
            return None
        start = last
        while start > 0 and mask[start - 1]:
            start -= 1
        if start == 0 or offsets[start][1] <= cut.reply_at:
            return None
        return ids[:last + 1], [0] * start + [1] * (last + 1 - start), start, not more
    if more:  # a token after these is trained: is it the reply's? Every assistant turn is one run of 1s in the mask
        runs = [t for t, m in enumerate(mask) if m and (t == 0 or not mask[t - 1])]
        if len(runs) <= sum(m["role"] == "assistant" for m in prompt) or not mask[-1]:
            return ids, [0] * len(ids), None, False
        return ids, [0] * runs[-1] + [1] * (len(ids) - runs[-1]), runs[-1], False
    last = max((t for t, m in enumerate(mask) if m), default=-1)
    if last < 0:
        raise ValueError("the reply has no tokens in the loss mask")
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:last + 1], [0] * start + [1] * (last + 1 - start), start, True


def _fit(ids: list[int], mask: list[int], cut: int, max_len: int) -> tuple[list[int], list[int]]:
    """Drop `cut` tokens from the left of the prompt part; a reply longer than max_len is cut from the right."""
    start = mask.index(1)
    if cut <= start and len(ids) - cut <= max_len:
        return ids[cut:], mask[cut:]
    return ids[start:start + max_len], mask[start:start + max_len]


Side = tuple[list[int], list[int]]


def _fit_pair(sides: list[Side], max_len: int, truncation: str) -> tuple[list[Side] | None, bool]:
    """Both whole sides fitted to max_len (see the module notes): (sides, or None when dropped; whether truncated)."""
    longest = max(len(ids) for ids, _ in sides)
    if longest <= max_len:
        return sides, False
    if truncation == "drop":
        return None, False
    return [_fit(ids, mask, longest - max_len, max_len) for ids, mask in sides], True


def encode_pair(tokenizer: Tokenizer, p: Preference, max_len: int, truncation: Literal["truncate", "drop"],
                **template_kwargs: Any) -> tuple[list[Side] | None, bool]:
    """[(chosen ids, mask), (rejected ids, mask)] fitted to max_len, or None when dropped, and whether truncated:
    what fitting both sides rendered whole gives (_fit_pair), in time bounded by max_len for a long reply or prompt.

    A side is rendered from a prefix of its text (chat.render_window, as chats are). When a reply goes on past its
    side's first max_len + P + 1 tokens, P being the longer prompt, the longer side exceeds that, so the prompt cut
    from the left (longest - max_len tokens) is longer than either prompt: each side keeps the first max_len tokens
    of its reply (or the pair is dropped), which those first tokens hold. A long prompt is encoded from a cut in its
    text (_prompt_cut) after which both sides have the whole render's tokens, k of them before it in each (the text
    before the cut is the same); the tail holds over max_len tokens, so both renders are fitted, and counted from
    the cut, lengths, prompt lengths and the left cut all drop by k: the same rule keeps the same tokens, which all
    lie past the cut. A prompt longer than the tokens rendered (or a tail that cannot decide) renders both whole."""
    cut = _prompt_cut(tokenizer, p.prompt, max_len, template_kwargs)
    need = max_len + 2 + (cut.tokens if cut else 0)
    for _ in range(2):  # P is known after the first pass: the second renders max_len + P + 2 tokens
        sides = [_render_side(tokenizer, p.prompt, reply, need, cut, **template_kwargs)
                 for reply in (p.chosen, p.rejected)]
        if any(side is None for side in sides):  # a tail whose reply run cannot be told apart
            break
        if all(complete for *_, complete in sides):
            if cut and max(len(ids) for ids, *_ in sides) <= max_len:  # never, with max_len + CUT_MARGIN tokens
                break
            return _fit_pair([(ids, mask) for ids, mask, _, _ in sides], max_len, truncation)
        if any(start is None for _, _, start, _ in sides):  # a prompt longer than the tokens rendered
            break
        prompt = max(start for _, _, start, _ in sides)
        if all(complete or len(ids) > max_len + prompt for ids, _, _, complete in sides):
            if truncation == "drop":
                return None, False
            return [(ids[start:start + max_len], mask[start:start + max_len]) for ids, mask, start, _ in sides], True
        need = max_len + prompt + 2
    return _fit_pair([encode_reply(tokenizer, p.prompt, reply, **template_kwargs) for reply in (p.chosen, p.rejected)],
                     max_len, truncation)


def encode_preferences(tokenizer: Tokenizer, prefs: Sequence[Preference], max_len: int,
                       truncation: Literal["truncate", "drop"] = "truncate",
                       on_error: Literal["raise", "skip"] = "raise", attributes: list[str] | None = None,
                       **template_kwargs: Any) -> tuple[list[PairExample], PairStats]:
    """Render both sides of each pair and fit them to max_len tokens (`encode_pair`). `attributes` orders the ratings
    (default: the sorted union over `prefs`); a missing rating is NaN."""
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', not {truncation!r}")
    if attributes is None:
        attributes = sorted({a for p in prefs if p.ratings for side in p.ratings.values() for a in side})
    out, stats = [], PairStats(attributes=list(attributes))
    for p in prefs:
        try:
            sides, truncated = encode_pair(tokenizer, p, max_len, truncation, **template_kwargs)
        except (ValueError, jinja2.TemplateError) as e:  # the template refused it, or special tokens in the text
            err = DataError(p.path, p.line, str(e))
            if on_error == "raise":
                raise err from e
            stats.errors.append(err)
            continue
        if sides is None:
            stats.dropped += 1
            continue
        stats.truncated += truncated
        ratings = None
        if p.ratings is not None:
            ratings = {side: [p.ratings.get(side, {}).get(a, math.nan) for a in attributes]
                       for side in ("chosen", "rejected")}
        (c_ids, c_mask), (r_ids, r_mask) = sides
        out.append(PairExample(c_ids, c_mask, r_ids, r_mask, ratings))
    stats.pairs = len(out)
    return out, stats


def load_pair_splits(data: list[str], val_data: list[str], val_fraction: float, seed: int, tokenizer: Tokenizer,
                     max_len: int, on_error: Literal["raise", "skip"] = "raise", system_prompt: str | None = None):
    """Load, split (unless val_data is given) and encode pairs -> (train PairExamples, val PairExamples, rating
    attribute names, notes to print: skipped records, truncation). What the reward and dpo stages start from."""
    def load(path):
        return load_preferences(path, on_error=on_error, system_prompt=system_prompt)

    if not data:
        raise UserError("no --data given: the preference pairs to train on (JSONL/JSON files)")
    train, errors = load_all(data, load)
    if val_data:
        val, verr = load_all(val_data, load)
        errors += verr
    else:  # a single pair trains rather than validates
        train, val = split_train_val(train, val_fraction if len(train) > 1 else 0.0, seed)
    notes = [format_skipped(errors)]
    tr, tr_stats = encode_preferences(tokenizer, train, max_len, on_error=on_error)
    va, va_stats = encode_preferences(tokenizer, val, max_len, on_error=on_error, attributes=tr_stats.attributes)
    notes += [f"train: {tr_stats}", f"val: {va_stats}"]
    if not tr:
        raise UserError(f"no usable training pairs in {', '.join(data)} ({tr_stats}; {notes[0]})")
    return tr, va, tr_stats.attributes, notes


# ----------------------------------------------------------------------------- batching
def _ratings_tensor(examples: Sequence[PairExample]) -> torch.Tensor | None:
    """[2B, A] ratings, chosen rows then rejected rows (NaN = missing); None when no pair has ratings."""
    if not any(e.ratings is not None for e in examples):
        return None
    A = {len(e.ratings["chosen"]) for e in examples if e.ratings is not None}
    if len(A) != 1:
        raise ValueError(f"pairs rate different numbers of attributes: {sorted(A)}")
    missing = [math.nan] * A.pop()
    return torch.tensor([e.ratings["chosen"] if e.ratings else missing for e in examples]
                        + [e.ratings["rejected"] if e.ratings else missing for e in examples], dtype=torch.float)


def collate_pairs(examples: Sequence[PairExample], pad_id: int) -> dict[str, Any]:
    """2B right-padded rows, chosen then rejected: input_ids, labels (pre-shifted, -100 off the reply), last_index
    [2B] (each row's last real token), ratings [2B, A] (NaN = missing; only when some pair has ratings), num_pairs,
    num_inputs (real tokens)."""
    rows = [(e.chosen_ids, e.chosen_mask) for e in examples] + [(e.rejected_ids, e.rejected_mask) for e in examples]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(ids) - 1] = torch.tensor([i if m else IGNORE for i, m in zip(ids[1:], mask[1:])])
    batch = {"input_ids": input_ids, "labels": labels,
             "last_index": torch.tensor([len(ids) - 1 for ids, _ in rows]), "num_pairs": len(examples),
             "num_inputs": sum(len(ids) for ids, _ in rows)}
    ratings = _ratings_tensor(examples)
    if ratings is not None:
        batch["ratings"] = ratings
    return batch


def collate_pairs_shared(examples: Sequence[PairExample], pad_id: int, pack: bool = False) -> dict[str, Any]:
    """Pairs as segments of shared rows: each pair's prompt once, then its chosen reply, then its rejected reply,
    with positions restarting at the reply for the rejected part and a mask that keeps it from seeing the chosen
    part, so each reply's logits equal those of its own separate sequence while the prompt is computed once
    (prompts are usually most of a pair's tokens). The prompt is the longest common prefix of both sides before
    either reply. pack=False: one pair per row; pack=True: first-fit decreasing into as few rows as the longest
    pair's length allows (no row grows past it, so packing only removes padding); segments never see each other.

    input_ids, position_ids [R, L]; attn_mask [R, 1, L, L] (True = may attend); the scored tokens as flat gathers:
    lp_row, lp_pos (the position whose logits predict the token), lp_tok, lp_seq (0..B-1 chosen, B..2B-1 rejected);
    last_row, last_pos [2B] (each reply's last token, where a reward head reads); ratings [2B, A] as collate_pairs;
    num_pairs B; num_inputs (real tokens: each prompt once)."""
    B = len(examples)
    segs = []  # per pair: ids, positions, parts (0 prompt, 1 chosen, 2 rejected), gathers, last (relative)
    for b, e in enumerate(examples):
        c, r = e.chosen_ids, e.rejected_ids
        s = 0
        limit = min(e.chosen_mask.index(1), e.rejected_mask.index(1))
        while s < limit and c[s] == r[s]:
            s += 1
        C, R = len(c) - s, len(r) - s
        at_r = lambda t, s=s, C=C: t if t < s else s + C + (t - s)  # noqa: E731  index in the segment of r[t]
        gathers = ([(t - 1, c[t], b) for t in range(1, len(c)) if e.chosen_mask[t]]
                   + [(at_r(t - 1), r[t], B + b) for t in range(1, len(r)) if e.rejected_mask[t]])
        segs.append((c + r[s:], list(range(s + C)) + list(range(s, s + R)), [0] * s + [1] * C + [2] * R,
                     gathers, (s + C - 1, s + C + R - 1)))
    L = max(len(g[0]) for g in segs)
    rows: list[list[int]] = []  # pair indices per row
    if pack:
        fill: list[int] = []
        for b in sorted(range(B), key=lambda b: -len(segs[b][0])):
            n = len(segs[b][0])
            k = next((k for k, f in enumerate(fill) if f + n <= L), len(fill))
            if k == len(fill):
                rows.append([])
                fill.append(0)
            rows[k].append(b)
            fill[k] += n
    else:
        rows = [[b] for b in range(B)]
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), L), dtype=torch.long)
    part = torch.full((len(rows), L), 3, dtype=torch.long)
    seg = torch.full((len(rows), L), -1, dtype=torch.long)
    gathers, last = [], [None] * (2 * B)
    for k, members in enumerate(rows):
        o = 0
        for b in sorted(members):
            ids, pos, parts, g, (lc, lr) = segs[b]
            n = len(ids)
            input_ids[k, o:o + n], position_ids[k, o:o + n] = torch.tensor(ids), torch.tensor(pos)
            part[k, o:o + n], seg[k, o:o + n] = torch.tensor(parts), b
            gathers += [(k, o + t, tok, q) for t, tok, q in g]
            last[b], last[B + b] = (k, o + lc), (k, o + lr)
            o += n
        # padding keeps position 0: its positions are never read (no real token attends to it, its labels are
        # -100), and counting on from 0 would pass the model's context in a row longer than one sequence
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]  # padding (-1) sees earlier padding only: no empty rows
    crossing = (part[:, :, None] == 2) & (part[:, None, :] == 1)  # rejected query, chosen key
    g = torch.tensor(sorted(gathers, key=lambda x: x[3]), dtype=torch.long).view(-1, 4)
    lt = torch.tensor(last, dtype=torch.long)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "attn_mask": (causal & same & ~crossing)[:, None],
             "lp_row": g[:, 0], "lp_pos": g[:, 1], "lp_tok": g[:, 2], "lp_seq": g[:, 3],
             "last_row": lt[:, 0], "last_pos": lt[:, 1], "num_pairs": B, "num_inputs": sum(len(x[0]) for x in segs)}
    ratings = _ratings_tensor(examples)
    if ratings is not None:
        batch["ratings"] = ratings
    return batch


def pair_collator(layout: PairLayout):
    """The collate function of a pair layout: (examples, pad_id) -> batch."""
    if layout == "rows":
        return collate_pairs
    if layout in ("shared", "packed"):
        return functools.partial(collate_pairs_shared, pack=layout == "packed")
    raise ValueError(f"unknown pair layout {layout!r}: expected packed, shared or rows")


class PairLoader:
    """Endless batches of `batch_size` pairs per rank, reshuffled each epoch, resumable exactly.

    Each epoch's shuffled pairs are cut into batches (the last one short, or dropped with drop_last); rank r of
    world_size takes batches r, r + W, ... of them (cut to a multiple of W, so every rank runs the same steps).
    `pad_id` fills the padding (any id will do: padding follows the real tokens and its labels are -100).
    """

    def __init__(self, examples: Sequence[PairExample], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, pad_id: int = 0, layout: PairLayout = "rows"):
        if batch_size < 1 or not examples or not 0 <= rank < world_size:
            raise ValueError(f"bad loader arguments: batch_size {batch_size}, {len(examples)} pairs, "
                             f"rank {rank}/{world_size}")
        self.examples, self.batch_size, self.seed, self.pad_id = list(examples), batch_size, seed, pad_id
        self.collate = pair_collator(layout)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        n = len(self.examples) // batch_size if drop_last else -(-len(self.examples) // batch_size)
        self._steps = n // world_size
        if self._steps == 0:
            raise ValueError(f"{len(self.examples)} pairs make {n} batches of {batch_size}: too few for "
                             f"{world_size} ranks")
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    def steps_per_epoch(self) -> int:
        return self._steps

    def plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of pair indices) in `epoch`."""
        if self._cached[0] == epoch:
            return self._cached[1]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)  # one stream per (seed, epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        mine = batches[self.rank:self._steps * self.world_size:self.world_size]
        self._cached = (epoch, mine)
        return mine

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch, self.epoch, self.index = advance(self.plan, self.epoch, self.index)
        return self.collate([self.examples[i] for i in batch], self.pad_id)

    def settings(self) -> dict[str, Any]:
        """What decides the plans: a saved position resumes only under the same settings."""
        return {"seed": self.seed, "batch_size": self.batch_size, "n_pairs": len(self.examples), "rank": self.rank,
                "world_size": self.world_size, "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = resume_position(state, self.settings())
