"""Streaming detokenization: generated token ids in, text increments out, whole characters only.

    for text, finish_reason in stream_text(tokenizer, engine.stream(ids, params)):
        print(text, end="", flush=True)

Used by `tristage chat`, `tristage generate --prompt` and anything else that shows tokens as they come.

Choices, and why:
- The "prefix offset / read offset" method of text-generation servers: decode a short window of tokens
  `ids[prefix:]` and the part of it already shown `ids[prefix:read]`, and emit the difference. Decoding the new
  token with the previous piece as left context keeps decoders that treat the start of a text specially (a
  SentencePiece leading space, merged pieces) from changing the text at the seam, and the cost per token is the
  window, not the whole answer (decoding the whole answer at every token is quadratic in its length).
- Hold back while the window's text ends in U+FFFD: a character split across tokens (byte-level BPE, byte
  fallback) decodes as the replacement character until its last byte arrives. `flush` emits the rest at the end;
  bytes that never complete a character stay U+FFFD, as in a decode of the whole answer. On a byte-level BPE the
  increments concatenate to exactly the whole answer's decode (tested with emoji and accented letters).
- Special tokens are skipped and a stop token is left out, as in the response text `tristage generate` writes,
  so what a terminal shows is what JSONL mode writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class StreamDecoder:
    """Push token ids one at a time; each push returns the text that became final (often "", never half a char)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoded window: the last emitted piece, kept as left context
        self.read = 0  # ids[:read] have been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text held back so far (a character that never completed stays U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip_special_tokens)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=self.skip_special_tokens)
        if len(text) <= len(shown) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]


def stream_text(tokenizer: Any, events: Iterable[tuple[int, str | None]]) -> Iterator[tuple[str, str | None]]:
    """`Engine.stream`'s (token, finish_reason) events -> (text, finish_reason) increments.

    Only non-empty increments are yielded, except the last one, which always comes and carries the finish reason
    ("stop": the stop token itself is left out of the text).
    """
    decoder = StreamDecoder(tokenizer)
    for token, reason in events:
        text = decoder.push(token) if reason != "stop" else ""
        if reason is not None:
            yield text + decoder.flush(), reason
        elif text:
            yield text, None


def response_text(tok: Any, tokens: list[int], finish_reason: str) -> str:
    """The text of a finished generation: special tokens skipped, the stop token (last, when it stopped) left out."""
    return tok.decode(tokens[:-1] if finish_reason == "stop" else tokens, skip_special_tokens=True)
