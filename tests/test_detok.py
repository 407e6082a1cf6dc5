"""The streaming detokenizer: increments never split a character, and they concatenate to the whole decode
(byte-level BPE with emoji and accented letters, byte fallback, a SentencePiece-style leading space, random ids)."""

from __future__ import annotations

import random

import pytest
import tokenizers
from tokenizers import decoders, models

from tristage.serve.detok import StreamDecoder, stream_text
from tristage.tokenizer import Tokenizer, train_bpe, train_char

TEXTS = [
    "Crème brûlée à la café, naïve façade; Ærøskøbing, Łódź, São Paulo.",
    "emoji: 🎉🐶 and a family 👩‍👩‍👧 and a flag 🇫🇷, then ok 👍🏽!",
    "combining: e\u0301 n\u0303; CJK 日本語のテキスト; math ∑ ∫ ≤ ≥; Ελληνικά; русский",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("detok")
    (root / "c.txt").write_text("the dog sat on the mat. café crème naïve.\n" * 50)
    return train_bpe([str(root / "c.txt")], vocab_size=300, min_frequency=1)


def pieces(tok, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(t) for t in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_equals_the_whole_decode(bpe, text):
    ids = bpe.encode(text)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # the test bites: some tokens hold part of a character
    out = pieces(bpe, ids)
    assert "".join(out) == bpe.decode(ids) == text
    assert not any("\ufffd" in p for p in out)  # a multi-byte character is held back until it is whole


def test_byte_fallback_and_random_ids_stream_equals_the_whole_decode(bpe, tmp_path):
    (tmp_path / "c.txt").write_text("the dog sat on the mat.\n")
    char = train_char([str(tmp_path / "c.txt")])
    for text in TEXTS:
        ids = char.encode(text)
        assert "".join(pieces(char, ids)) == char.decode(ids) == text
    rng = random.Random(0)
    for _ in range(50):  # what an untrained model emits: bytes that may never complete a character, specials
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randint(1, 40))]
        assert "".join(pieces(bpe, ids)) == bpe.decode(ids, skip_special_tokens=True)


def test_a_leading_space_is_kept_at_the_seam():
    raw = tokenizers.Tokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "!": 2, "<unk>": 3}, unk_token="<unk>"))
    raw.decoder = decoders.Metaspace()  # SentencePiece style: strips the space of a text's first token
    tok, ids = Tokenizer(raw), [0, 1, 2]
    assert tok.decode(ids) == "hello world!"
    assert "".join(tok.decode([i]) for i in ids) == "helloworld!"  # token by token would lose the space
    assert pieces(tok, ids) == ["hello", " world", "!", ""]


def test_stream_text_leaves_out_the_stop_token(bpe):
    ids, stop = bpe.encode(TEXTS[1]), bpe.encode("!")[0]  # a stop id that is not special (generation_config.json)
    events = [(t, None) for t in ids] + [(stop, "stop")]  # as `tristage generate` writes: the stop token left out
    out = list(stream_text(bpe, events))
    assert out[-1][1] == "stop" and all(r is None and t for t, r in out[:-1])
    assert "".join(t for t, _ in out) == bpe.decode(ids, skip_special_tokens=True) == TEXTS[1]
    n = next(n for n in range(len(ids), 0, -1) if bpe.decode(ids[:n]).endswith("\ufffd"))
    cut = ids[:n]  # cut inside a character: the held-back bytes come out at the end, as in the whole decode
    events = [(t, None) for t in cut[:-1]] + [(cut[-1], "length")]
    out = list(stream_text(bpe, events))
    assert out[-1][1] == "length" and "".join(t for t, _ in out) == bpe.decode(cut, skip_special_tokens=True)
