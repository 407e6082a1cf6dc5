"""Chat data for SFT: load conversations, render them to (ids, loss mask), batch them padded or packed.

Choices:
- Loading: records.py's reader (JSONL or a JSON list, .gz too; located DataErrors; `on_error` raises the first or
  skips and collects them all, and `format_skipped` says how many: callers always print it). The shape is detected
  per record: `messages` (OpenAI: role/content), `conversations` (ShareGPT: from/value, human|user|gpt|
  assistant|chatgpt|system, optional top-level `system`), else Alpaca (`instruction`, optional `input`, `output`,
  optional `system`; user = instruction + "\\n\\n" + input when input is non-empty and not the self-instruct
  placeholder "<noinput>"). Only role and content are kept. A record is valid when its turns pass
  `records.check_turns` ending with the assistant's: roles are system/user/assistant, a system message comes only
  first, contents are non-blank strings, the first non-system turn is the user's, and it ends with an assistant turn.
- Loss mask, for any chat template (ours with {% generation %} tags, or imported Llama-3 / Qwen ones without): the
  conversation is rendered once; assistant message i spans the text between render(messages[:i], generation
  prompt) and render(messages[:i+1]). Both must be prefixes of the full text, or the template is reported as unfit
  (one that renders past turns differently, e.g. dropping old reasoning, cannot be trained turn by turn this way).
  The full text is encoded once with offsets; a token is marked when it overlaps a span (transformers' rule for
  `return_assistant_tokens_mask`, so ours equals it on generation-tagged templates: a token merging the header's
  last newline with a reply's leading whitespace is trained). Each span's mask is then cut after its first
  end-of-turn token (`tokenizer.stop_ids`), so `<|im_end|>` / `<|eot_id|>` is trained and the newline after it is
  not; a template ending turns in plain text keeps its whole span. Rendering is linear in the conversation's length
  (the encoding's ids and offsets are read once). `encode_conversations` needs only the first max_len + 2 tokens: a
  long text (over 16 characters per needed token) is encoded from a prefix, doubled until it holds the tokens needed
  plus a margin of PREFIX_MARGIN that is left out (where a cut in mid-word may encode differently), and only the
  replies that start within it are located; whether a later token is trained decides "longer than max_len". So a
  20 MB reply is truncated or dropped in a fraction of a second, with the ids and masks of the whole (tested).
  `render_window` encodes the text from a given character on (preference.py's long prompts, cut where the tokens
  that follow are the whole text's); the template's checks still see the whole conversation.
  The ids are those of `tokenizer.apply_chat_template` (text encoded without adding special tokens, as transformers
  does: a BOS comes from the template's `{{ bos_token }}`, never from the post-processor). Contents holding a
  special-token string are refused: they would encode as control tokens and break the turn structure.
- Targets: an example is x = ids[:-1], y = ids[1:] with y = -100 where mask[1:] is 0 (labels are pre-shifted: loss =
  cross_entropy(logits, labels), no further shift). Tokens after the last trained target are dropped (they would
  only predict untrained tokens), so an untruncated example's last target is its end-of-turn token. Longer examples are
  truncated from the right or dropped (`truncation`); both are counted in EncodeStats, and an example left with no
  trained target is dropped and counted.
- Padded batches are right-padded with -100 labels, and plain causal attention (attn_mask None) is exact for the real
  tokens since padding comes after them. Labels never look at pad_id, so pad_id may equal eos or the end-of-turn
  token without masking it (the classic "model never stops" bug).
- Packing: best-fit decreasing bin packing (deterministic, typically > 95% full); doc ids give a block-diagonal causal
  mask (`make_attention_mask`) and positions restarting per conversation, so a conversation's loss does not depend on
  its row mates (tested). Rows are packed once; each epoch shuffles rows (packed) or examples (padded) with a generator
  seeded by (seed, epoch). The loader's position is (epoch, index), kept by position.py as PairLoader's is:
  state_dict/load_state_dict resume exactly. The dense [B, 1, T, T] mask is simple and fine at SFT lengths; varlen
  attention would avoid it.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
import numpy as np
import torch

from tristage.data.position import advance, resume_position
from tristage.data.records import Turn, bad, check_turns, format_skipped, load_records, text_field
from tristage.io import DataError
from tristage.model.gpt import make_attention_mask, positions_from_doc_ids
from tristage.tokenizer import Tokenizer

IGNORE = -100
PREFIX_MARGIN = 256  # tokens left out at the end of a prefix's encoding (see _encode)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


# ----------------------------------------------------------------------------- loading
@dataclass
class Conversation:
    messages: list[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]
    path: str = ""
    line: int | None = None


def _turns(obj: Any) -> tuple[list[Turn], str | None]:
    """(role, content, role field, content field) per message, and the list's field name."""
    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    for key, role_key, text_key, roles in (("messages", "role", "content", None),
                                           ("conversations", "from", "value", SHAREGPT_ROLES)):
        if key in obj:
            if not isinstance(obj[key], list) or not obj[key]:
                raise bad("expected a non-empty list of messages", key)
            turns = []
            if key == "conversations" and (system := text_field(obj, "system", "", optional=True)):
                turns.append(("system", system, "system", "system"))
            for i, m in enumerate(obj[key]):
                where = f"{key}[{i}]"
                role, text = text_field(m, role_key, where), text_field(m, text_key, where)
                turns.append((roles.get(role, role) if roles else role, text, f"{where}.{role_key}",
                              f"{where}.{text_key}"))
            return turns, key
    if "instruction" in obj or "output" in obj:  # Alpaca
        system, inp = text_field(obj, "system", "", optional=True), text_field(obj, "input", "", optional=True)
        user = text_field(obj, "instruction", "")
        if inp and inp.strip() and inp.strip() != "<noinput>":
            user = f"{user}\n\n{inp}"
        turns = [("system", system, "system", "system")] if system else []
        return turns + [("user", user, "instruction", "instruction"),
                        ("assistant", text_field(obj, "output", ""), "output", "output")], None
    raise bad(f"unrecognised record: expected 'messages', 'conversations' or 'instruction'/'output', "
              f"got keys {sorted(obj)}")


def parse_record(obj: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """One record in any supported shape -> validated messages; raises an unlocated DataError (records.bad)."""
    turns, list_field = _turns(obj)
    messages = check_turns(turns, "assistant", list_field)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def load_conversations(path: str | os.PathLike, on_error: Literal["raise", "skip"] = "raise",
                       system_prompt: str | None = None) -> tuple[list[Conversation], list[DataError]]:
    """Read a chat file (JSONL or JSON list, optionally .gz) -> (valid conversations, errors of skipped records)."""
    return load_records(path, lambda obj, line: Conversation(parse_record(obj, system_prompt), str(path), line),
                        on_error)


# ----------------------------------------------------------------------------- rendering
def _encode(tokenizer: Tokenizer, text: str, need: int | None,
            begin: int = 0) -> tuple[list[int], list[tuple[int, int]], bool]:
    """(ids, character offsets, complete) of text[begin:], offsets counted in `text`: all its tokens (complete), or,
    when `need` is given and the text is long, only its first tokens, at least `need` of them, from encoding a prefix
    of the text: the prefix doubles from 16 characters per needed token until it holds `need` + PREFIX_MARGIN tokens,
    and its last PREFIX_MARGIN tokens, those a cut in mid-word could change, are left out."""
    def shifted(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(a + begin, b + begin) for a, b in offsets] if begin else offsets

    if need is not None:
        chars = 16 * (need + PREFIX_MARGIN)
        while begin + chars < len(text):
            enc = tokenizer.tok.encode(text[begin:begin + chars], add_special_tokens=False)
            ids = enc.ids
            if len(ids) >= need + PREFIX_MARGIN:
                return ids[:-PREFIX_MARGIN], shifted(enc.offsets[:-PREFIX_MARGIN]), False
            chars *= 2
    enc = tokenizer.tok.encode(text[begin:] if begin else text, add_special_tokens=False)
    return enc.ids, shifted(enc.offsets), True


def render_prefix(tokenizer: Tokenizer, messages: list[dict[str, str]], need: int | None,
                  **template_kwargs: Any) -> tuple[list[int], list[int], bool]:
    """`render`, cut short for long conversations: (ids, mask, more) where ids and mask are the first tokens of the
    whole conversation's (all of them, or at least `need`), and `more` says whether a token after them is trained
    (so the whole example is longer than these tokens). With need None it is `render` (more is False)."""
    ids, _, mask, more = render_window(tokenizer, messages, need, 0, template_kwargs)
    return ids, mask, more


def render_window(tokenizer: Tokenizer, messages: list[dict[str, str]], need: int | None, begin: int,
                  template_kwargs: dict[str, Any]) -> tuple[list[int], list[tuple[int, int]], list[int], bool]:
    """`render_prefix` of the rendered text from character `begin` on: (ids, offsets, mask, more), the offsets
    counted in the whole text (the checks and the assistant turns' spans still see all of it); with begin 0 it is
    render_prefix's. Whether these tokens are the whole text's from some point on is the caller's to know:
    preference.py's `_prompt_cut` picks a `begin` where they are."""
    specials = tokenizer.special_tokens
    for k, m in enumerate(messages):
        if hit := next((s for s in specials if s in m["content"]), None):
            raise ValueError(f"message {k} ({m['role']}) contains the special token {hit!r} in its text")
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    ids, offsets, complete = _encode(tokenizer, text, need, begin)
    # enc.ids / enc.offsets build a new Python list on every access: they are read once above (read per token,
    # they made rendering quadratic in the conversation's length)
    cover = len(text) if complete else offsets[-1][1]  # the characters the tokens reach
    spans, more = [], False
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False,
                                               **template_kwargs)
        if len(before) >= cover and not complete:  # this reply's tokens all come after the ones encoded
            more = True
            break
        upto = text if i == len(messages) - 1 else tokenizer.apply_chat_template(messages[:i + 1], tokenize=False,
                                                                                 **template_kwargs)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(f"chat template unfit for turn-by-turn loss masking: rendering the first {i} messages "
                             f"(+ generation prompt) or the first {i + 1} is not a prefix of the whole conversation "
                             f"(the template renders earlier turns differently once later ones follow)")
        spans.append((len(before), len(upto)))
    n, mask, stops = len(ids), [0] * len(ids), set(tokenizer.stop_ids)
    t = 0
    for start, end in spans:
        while t < n and offsets[t][1] <= start:  # tokens ending before the span
            t += 1
        stopped = False
        while t < n and offsets[t][0] < end:  # tokens overlapping it, up to its first end-of-turn
            if not stopped:
                mask[t] = 1
                stopped = ids[t] in stops
            t += 1
        if t == n and not stopped and not complete:  # the span goes on past the tokens encoded
            more = True
    return ids, offsets, mask, more


def render(tokenizer: Tokenizer, messages: list[dict[str, str]], **template_kwargs: Any) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation (= tokenizer.apply_chat_template) and a 0/1 mask of the assistant turns."""
    ids, mask, _ = render_prefix(tokenizer, messages, None, **template_kwargs)
    return ids, mask


# ----------------------------------------------------------------------------- examples
@dataclass
class Example:
    """input_ids = ids[:-1]; labels = ids[1:] with -100 where that next token is not trained."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def make_example(ids: list[int], mask: list[int]) -> Example | None:
    """Shift to (x, y) and drop the tokens after the last trained one; None if nothing is trained."""
    last = max((t for t, m in enumerate(mask) if m), default=0)
    if last == 0:
        return None
    return Example(ids[:last], [ids[t] if mask[t] else IGNORE for t in range(1, last + 1)])


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # cut from the right to max_len, trained targets left
    dropped: int = 0  # too long with truncation="drop", or no trained target left after truncation
    errors: list[DataError] = field(default_factory=list)  # conversations that failed to render (skipped)

    def __str__(self) -> str:
        return (f"{self.examples} examples; {self.truncated} truncated, {self.dropped} dropped (too long, or "
                f"nothing left to train); " + format_skipped(self.errors, "conversations that failed to render"))


def encode_conversations(tokenizer: Tokenizer, conversations: Sequence[Conversation], max_len: int,
                         truncation: Literal["truncate", "drop"] = "truncate",
                         on_error: Literal["raise", "skip"] = "raise",
                         **template_kwargs: Any) -> tuple[list[Example], EncodeStats]:
    """Render, shift and fit conversations to max_len positions (len(input_ids) <= max_len)."""
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', not {truncation!r}")
    out, stats = [], EncodeStats()
    for conv in conversations:
        try:
            ids, mask, more = render_prefix(tokenizer, conv.messages, max_len + 2, **template_kwargs)
        except (ValueError, jinja2.TemplateError) as e:  # the template refused it, or special tokens in the text
            err = DataError(conv.path, conv.line, str(e))
            if on_error == "raise":
                raise err from e
            stats.errors.append(err)
            continue
        # more: a target after the first max_len + 2 tokens is trained, so the example is longer than max_len
        ex = Example(ids[:max_len + 1], [ids[t] if mask[t] else IGNORE for t in range(1, max_len + 2)]) if more \
            else make_example(ids, mask)
        if ex is not None and len(ex) > max_len:
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len]) if truncation == "truncate" else None
            if ex is not None and any(y != IGNORE for y in ex.labels):
                stats.truncated += 1
            else:
                ex = None
        if ex is None:
            stats.dropped += 1
            continue
        out.append(ex)
    stats.examples = len(out)
    return out, stats


# ----------------------------------------------------------------------------- batching
def pad_batch(examples: Sequence[Example], pad_id: int, pad_to: int | None = None) -> dict[str, Any]:
    """Right-padded batch: input_ids, labels (pre-shifted, -100 = no loss), position_ids [B, T], attn_mask None
    (causal is exact: padding only follows real tokens), num_tokens (trained targets), num_inputs (real tokens)."""
    B, T = len(examples), pad_to or max(len(e) for e in examples)
    ids, labels = torch.full((B, T), pad_id, dtype=torch.long), torch.full((B, T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e)], labels[b, :len(e)] = torch.tensor(e.input_ids), torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T).expand(B, T), "attn_mask": None,
            "num_tokens": int((labels != IGNORE).sum()), "num_inputs": sum(len(e) for e in examples)}


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest bin it fits in. Deterministic (ties by index)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens > seq_len {capacity}: truncate or drop it first")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    return bins


def pack_rows(examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> dict[str, Any]:
    """Rows of packed examples -> input_ids, labels, position_ids, doc_ids [B, T] (padding: doc -1), attn_mask
    [B, 1, T, T] (causal within a conversation), num_tokens, num_inputs, rows (the example indices per row)."""
    B, T = len(rows), seq_len
    ids, labels = torch.full((B, T), pad_id, dtype=torch.long), torch.full((B, T), IGNORE, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row):
            e = examples[i]
            ids[b, pos:pos + len(e)], labels[b, pos:pos + len(e)] = torch.tensor(e.input_ids), torch.tensor(e.labels)
            doc_ids[b, pos:pos + len(e)] = d
            pos += len(e)
    return {"input_ids": ids, "labels": labels, "position_ids": positions_from_doc_ids(doc_ids), "doc_ids": doc_ids,
            "attn_mask": make_attention_mask(doc_ids, T), "num_tokens": int((labels != IGNORE).sum()),
            "num_inputs": int((doc_ids >= 0).sum()), "rows": [list(r) for r in rows]}


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0,
         rows_per_batch: int = 1) -> tuple[list[dict[str, Any]], float]:
    """All examples packed into [rows_per_batch, seq_len] batches; returns (batches, efficiency = real / slots)."""
    bins = pack_bins([len(e) for e in examples], seq_len)
    batches = [pack_rows(examples, bins[k:k + rows_per_batch], seq_len, pad_id)
               for k in range(0, len(bins), rows_per_batch)]
    return batches, sum(map(len, examples)) / max(1, len(bins) * seq_len)


class ChatLoader:
    """Endless batches of at most `tokens_per_batch` slots (B x T), reshuffled each epoch, resumable exactly.

    packed: [tokens_per_batch // seq_len, seq_len] rows of packed conversations. padded: as many examples (in the
    epoch's shuffled order) as fit with B x longest <= tokens_per_batch. Rank r of world_size takes batches
    r, r + W, ... of each epoch's list (cut to a multiple of W, so every rank runs the same number of steps).
    """

    def __init__(self, examples: Sequence[Example], tokens_per_batch: int, pad_id: int,
                 mode: Literal["packed", "padded"] = "packed", seq_len: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if mode not in ("packed", "padded") or not examples or not 0 <= rank < world_size:
            raise ValueError(f"bad loader arguments: mode={mode!r}, {len(examples)} examples, rank {rank}/{world_size}")
        self.examples, self.pad_id, self.mode, self.seed = list(examples), pad_id, mode, seed
        self.seq_len = seq_len or max(map(len, self.examples))
        self.tokens_per_batch, self.rank, self.world_size = tokens_per_batch, rank, world_size
        if tokens_per_batch < self.seq_len:
            raise ValueError(f"tokens_per_batch {tokens_per_batch} < seq_len {self.seq_len}: no row fits")
        lengths = [len(e) for e in self.examples]
        self.bins = pack_bins(lengths, self.seq_len) if mode == "packed" else []
        if mode == "padded" and max(lengths) > self.seq_len:
            raise ValueError(f"an example has {max(lengths)} tokens > seq_len {self.seq_len}")
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    def plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches in `epoch`: lists of bin indices (packed) or example indices (padded)."""
        if self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "packed":
            order, r = rng.permutation(len(self.bins)).tolist(), self.tokens_per_batch // self.seq_len
            batches = [order[k:k + r] for k in range(0, len(order), r)]
        else:
            batches, longest = [[]], 0
            for i in rng.permutation(len(self.examples)).tolist():
                n = len(self.examples[i])
                if batches[-1] and (len(batches[-1]) + 1) * max(longest, n) > self.tokens_per_batch:
                    batches.append([])
                    longest = 0
                batches[-1].append(i)
                longest = max(longest, n)
        W = self.world_size
        mine = batches[self.rank:len(batches) // W * W:W]
        if not mine:
            raise ValueError(f"{len(batches)} batches per epoch cannot feed {W} ranks")
        self._cached = (epoch, mine)
        return mine

    def collate(self, batch: list[int]) -> dict[str, Any]:
        if self.mode == "packed":
            return pack_rows(self.examples, [self.bins[j] for j in batch], self.seq_len, self.pad_id)
        return pad_batch([self.examples[i] for i in batch], self.pad_id)

    def efficiency(self, epoch: int = 0) -> float:
        """Real tokens / slots (B x T) over this rank's batches of an epoch."""
        real = slots = 0
        for batch in self.plan(epoch):
            rows = [self.bins[j] for j in batch] if self.mode == "packed" else [[i] for i in batch]
            lens = [sum(len(self.examples[i]) for i in row) for row in rows]
            real, slots = real + sum(lens), slots + len(rows) * (self.seq_len if self.mode == "packed" else max(lens))
        return real / slots

    def __iter__(self) -> ChatLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch, self.epoch, self.index = advance(self.plan, self.epoch, self.index)
        return self.collate(batch)

    def settings(self) -> dict[str, Any]:
        """What decides the plans: a saved position resumes only under the same settings."""
        return {"seed": self.seed, "mode": self.mode, "tokens_per_batch": self.tokens_per_batch,
                "seq_len": self.seq_len, "n_examples": len(self.examples), "rank": self.rank,
                "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = resume_position(state, self.settings())
