"""Preference pairs: every shape loads, bad records are located and counted, masks cover only the final reply,
batches shift labels right, and the loader resumes exactly and shards disjointly."""

from __future__ import annotations

import gzip
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import tokenizers
import torch
from conftest import shared_data

import tristage.data.preference as preference
from tristage.data.chat import IGNORE
from tristage.data.preference import (
    PairExample,
    PairLoader,
    Preference,
    _cut_at,
    _cut_rule,
    _fit,
    _fit_pair,
    _prompt_cut,
    collate_pairs,
    encode_preferences,
    encode_reply,
    load_preferences,
)
from tristage.io import DataError
from tristage.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_bpe, train_char

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A char-level ChatML tokenizer (unseen characters still round-trip through byte fallback)."""
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,!?:;'-\n", encoding="utf-8")
    return train_char([str(path)])


def write_jsonl(path: Path, rows: list) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


HH = {"chosen": "\n\nHuman: Hi there \n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:  Why not? ",
      "rejected": "\n\nHuman: Hi there \n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."}


# ----------------------------------------------------------------------------- loading
def test_load_every_shape(tmp_path):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.",
         "ratings": {"chosen": {"fluency": 5, "mood": 4}, "rejected": {"fluency": 2}}, "rationale": "Polite."},
        {"messages": [{"role": "system", "content": "Be kind."}, user("Q1"), assistant("A1"), user("Q2")],
         "chosen": "Yes.", "rejected": "No.", "score_chosen": 9.0},
        {"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": assistant("bad"), "meta": {"judge": 0.7}},
        HH,
        {"question": "Why?", "answer_a": "Because.", "answer_b": "Dunno.", "overall_preference": 1,
         "justification": "B is honest.", "answer_a_type": "human"},
        {"instruction": "Fix it.", "input": "teh", "response1": "the", "response2": "teh", "annotator1": 1,
         "annotator2": 0, "annotator3": 1, "idx": 7},
        {"instruction": "Greet.", "input": "", "response1": "Hi", "response2": "Hello", "annotator1": 2,
         "annotator2": 2, "annotator3": 1},
    ]
    prefs, errors = load_preferences(write_jsonl(tmp_path / "p.jsonl.gz", rows))
    assert errors == [] and [p.line for p in prefs] == list(range(1, 8))
    p = prefs[0]
    assert (p.prompt, p.chosen, p.rejected, p.rationale) == ([user("Say hi.")], "Hi!", "No.", "Polite.")
    assert p.ratings == {"chosen": {"fluency": 5.0, "mood": 4.0}, "rejected": {"fluency": 2.0}} and p.meta == {}
    assert prefs[1].prompt[0]["role"] == "system" and prefs[1].prompt[-1] == user("Q2")
    assert prefs[1].meta == {"score_chosen": 9.0} and prefs[1].ratings is None
    assert (prefs[2].prompt, prefs[2].chosen, prefs[2].rejected, prefs[2].meta) == ([user("Q")], "good", "bad",
                                                                                   {"judge": 0.7})
    assert prefs[3].prompt == [user("Hi there"), assistant("Hello!"), user("Tell me a joke.")]
    assert (prefs[3].chosen, prefs[3].rejected) == ("Why not?", "No.")
    lfqa = prefs[4]
    assert (lfqa.prompt, lfqa.chosen, lfqa.rejected, lfqa.rationale) == ([user("Why?")], "Dunno.", "Because.",
                                                                         "B is honest.")
    assert lfqa.meta == {"answer_a_type": "human", "chosen_answer": "b"}
    panda = prefs[5]
    assert (panda.prompt, panda.chosen, panda.rejected) == ([user("Fix it.\n\nteh")], "the", "teh")
    assert panda.meta == {"idx": 7, "votes": [1, 0, 1], "chosen_response": 1}
    assert (prefs[6].prompt, prefs[6].chosen, prefs[6].rejected) == ([user("Greet.")], "Hello", "Hi")
    # a JSON list, and the default system prompt only where the prompt has none
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows[:2], indent=2))
    prefs, _ = load_preferences(path, system_prompt="Default.")
    assert [p.prompt[0]["content"] for p in prefs] == ["Default.", "Be kind."] and prefs[1].line == 2


BAD = [  # record, reason, field
    ({"prompt": "x", "chosen": " ", "rejected": "y"}, "empty content", "chosen"),
    ({"prompt": "x", "chosen": "y", "rejected": 3}, "expected a string, got int", "rejected"),
    ({"prompt": "x", "chosen": "y", "rejected": "y"}, "chosen and rejected are identical", "rejected"),
    ({"prompt": [user("x"), assistant("y")], "chosen": "a", "rejected": "b"}, "ends with a assistant turn",
     "prompt[1].role"),
    ({"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "unknown role",
     "messages[0].role"),
    ({"messages": [user("x"), {"role": "system", "content": "s"}, user("z")], "chosen": "a", "rejected": "b"},
     "only come first", "messages[1].role"),
    ({"prompt": [user("x")], "chosen": [assistant("a"), assistant("b")], "rejected": "b"},
     "exactly one assistant message", "chosen"),
    ({"prompt": [user("x")], "chosen": [user("a")], "rejected": "b"}, "expected an assistant message",
     "chosen[0].role"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "ratings": {"chosen": {"f": "high"}, "rejected": {}}},
     "expected a number", "ratings.chosen.f"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "ratings": {"chosen": {}}}, "expected {'chosen'", "ratings"),
    ({"chosen": HH["chosen"], "rejected": "\n\nHuman: Other\n\nAssistant: No."}, "transcripts differ", "rejected"),
    ({"chosen": HH["chosen"], "rejected": HH["chosen"].replace("Why not? ", "Why not?\n")},
     "chosen and rejected are identical", "rejected"),
    ({"chosen": HH["chosen"], "rejected": "\n\nHuman: Hi there \n\nAssistant: "}, "transcripts differ", "rejected"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}, "empty content",
     "chosen"),
    ({"chosen": "Hi\n\nAssistant: a", "rejected": "Hi\n\nAssistant: b"}, "starting with", "chosen"),
    ({"question": "q", "answer_a": "a", "answer_b": "b", "overall_preference": 0}, "expected -1",
     "overall_preference"),
    ({"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 0, "annotator2": 1,
      "annotator3": 2}, "no majority preference", None),
    ({"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 0, "annotator2": 0,
      "annotator3": 1}, "no majority preference", None),
    ({"instruction": "i", "input": "", "response1": True, "response2": "b", "annotator1": 1, "annotator2": 1,
      "annotator3": 1}, "expected a string, got bool", "response1"),
    ({"prompt": "x"}, "unrecognised record", None),
    ("[1, 2]", "expected a JSON object", None),
    ('{"prompt": ', "invalid JSON", None),
]


@pytest.mark.parametrize("record,reason,field", BAD)
def test_invalid_record_raises_with_file_line_field(tmp_path, record, reason, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [HH, record])
    with pytest.raises(DataError, match=reason) as e:
        load_preferences(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, field)


def test_skip_collects_every_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [HH] + [r for r, _, _ in BAD] + [HH])
    prefs, errors = load_preferences(path, on_error="skip")
    assert [p.line for p in prefs] == [1, len(BAD) + 2]
    assert [e.line for e in errors] == list(range(2, len(BAD) + 2))
    assert [e.field for e in errors] == [f for _, _, f in BAD]
    assert all(reason in e.reason for e, (_, reason, _) in zip(errors, BAD))


# ----------------------------------------------------------------------------- the public files
def hh_final(text: str) -> str:
    return text.rsplit("\n\nAssistant: ", 1)[1].strip()


def test_hh_files():
    path = shared_data("preference/hh_rlhf_harmless_base_test.jsonl.gz")
    prefs, errors = load_preferences(path, on_error="skip")
    assert len(prefs) + len(errors) == 2312
    reasons = Counter(e.reason.split(" (")[0] for e in errors)
    assert reasons == {"the chosen and rejected transcripts differ before their final assistant turn": 5,
                       "empty content": 4}
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in prefs)
    raw = [json.loads(line) for line in gzip.open(shared_data("preference/hh_rlhf_helpful_base_test.jsonl.gz"), "rt")]
    same = sum(hh_final(r["chosen"]) == hh_final(r["rejected"]) for r in raw)  # counted by hand: 2 in this split
    prefs, errors = load_preferences(shared_data("preference/hh_rlhf_helpful_base_test.jsonl.gz"), on_error="skip")
    assert same == 2 and sum(e.reason == "chosen and rejected are identical" for e in errors) == same
    assert len(prefs) + len(errors) == len(raw) == 2354


def test_lfqa_file():
    path = shared_data("preference/lfqa_expert_pairwise_human_preferences.jsonl")
    raw = [json.loads(line) for line in open(path, encoding="utf-8")]
    prefs, errors = load_preferences(path)
    assert errors == [] and len(prefs) == len(raw) == 260
    for p, r in zip(prefs, raw):
        want = (r["answer_a"], r["answer_b"]) if r["overall_preference"] == -1 else (r["answer_b"], r["answer_a"])
        assert (p.chosen, p.rejected, p.prompt, p.rationale) == (*want, [user(r["question"])], r["justification"])


def test_pandalm_majority_matches_a_hand_count():
    path = shared_data("preference/pandalm_human_testset_v1.json.gz")
    raw = json.load(gzip.open(path, "rt"))
    majority = [r for r in raw if any([r[f"annotator{k}"] for k in (1, 2, 3)].count(w) >= 2 for w in (1, 2))]
    usable = [r for r in majority
              if all(isinstance(r[k], str) and r[k].strip() for k in ("response1", "response2"))]
    prefs, errors = load_preferences(path, on_error="skip")
    assert len(raw) == 999 and len(majority) == 894 and len(prefs) == len(usable) == 836
    assert sum(e.reason.startswith("no majority preference") for e in errors) == len(raw) - len(majority) == 105
    for p, r in zip(prefs, usable):
        votes = [r[f"annotator{k}"] for k in (1, 2, 3)]
        first = votes.count(1) >= 2
        assert p.meta["votes"] == votes and p.chosen == r["response1" if first else "response2"]
        assert p.prompt[0]["content"].startswith(r["instruction"]) and p.line == r["idx"] + 1


# ----------------------------------------------------------------------------- encoding
def masked(tok: Tokenizer, ids: list[int], mask: list[int]) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_mask_covers_only_the_final_reply(tok):
    prompt = [{"role": "system", "content": "Be brief."}, user("Where?"), assistant("On the mat."), user("And?")]
    pref = Preference(prompt, chosen="In the box.", rejected="Nowhere.", path="f", line=1)
    [ex], stats = encode_preferences(tok, [pref], max_len=999)
    assert stats.pairs == 1 and (stats.truncated, stats.dropped, stats.errors) == (0, 0, [])
    for ids, mask, reply in ((ex.chosen_ids, ex.chosen_mask, pref.chosen),
                             (ex.rejected_ids, ex.rejected_mask, pref.rejected)):
        full = tok.apply_chat_template([*prompt, assistant(reply)])
        assert ids == full[:len(ids)] and len(ids) == len(mask)
        assert masked(tok, ids, mask) == reply + EOT  # not "On the mat.<|im_end|>" from the prompt
        assert ids[-1] == tok.token_to_id(EOT) and mask[-1] == 1
        first = mask.index(1)
        assert all(mask[first:]) and tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert ex.ratings is None


def test_render_errors_are_counted(tok):
    good = Preference([user("Hi")], "Yes.", "No.", path="f", line=1)
    bad = Preference([user("Hi")], "Yes<|im_end|>", "No.", path="f", line=2)
    examples, stats = encode_preferences(tok, [good, bad], max_len=999, on_error="skip")
    assert len(examples) == 1 and [e.line for e in stats.errors] == [2] and "skipped 1" in str(stats)
    with pytest.raises(DataError, match="f:2"):
        encode_preferences(tok, [good, bad], max_len=999)


def test_truncation_keeps_the_reply_and_cuts_the_prompt_from_the_left(tok):
    pref = Preference([user("a long question " * 5)], chosen="Short.", rejected="A longer answer.")
    [full], _ = encode_preferences(tok, [pref], max_len=999)
    n = len(full.rejected_ids)  # the longer side
    [ex], stats = encode_preferences(tok, [pref], max_len=n - 10)
    assert stats.truncated == 1 and max(len(ex.chosen_ids), len(ex.rejected_ids)) == n - 10
    assert ex.rejected_ids == full.rejected_ids[10:] and ex.chosen_ids == full.chosen_ids[10:]  # same prompt cut
    assert masked(tok, ex.chosen_ids, ex.chosen_mask) == "Short." + EOT
    assert masked(tok, ex.rejected_ids, ex.rejected_mask) == "A longer answer." + EOT
    # a reply longer than max_len alone: no prompt left, the reply cut from the right
    [ex], stats = encode_preferences(tok, [pref], max_len=8)
    reply = len("A longer answer.") + 1  # chars + end-of-turn
    assert stats.truncated == 1 and ex.rejected_ids == full.rejected_ids[-reply:][:8] and all(ex.rejected_mask)
    assert ex.chosen_ids == full.chosen_ids[-7:] and all(ex.chosen_mask)  # "Short." + end-of-turn, whole
    examples, stats = encode_preferences(tok, [pref], max_len=n - 1, truncation="drop")
    assert examples == [] and (stats.dropped, stats.truncated) == (1, 0)


def test_ratings_follow_the_attribute_order(tok):
    prefs = [Preference([user("q")], "a", "b", ratings={"chosen": {"mood": 4, "fluency": 5},
                                                        "rejected": {"fluency": 1}}),
             Preference([user("q")], "c", "d")]
    examples, stats = encode_preferences(tok, prefs, max_len=999)
    assert stats.attributes == ["fluency", "mood"]
    r = examples[0].ratings
    assert r["chosen"] == [5.0, 4.0] and r["rejected"][0] == 1.0 and math.isnan(r["rejected"][1])
    assert examples[1].ratings is None
    batch = collate_pairs(examples, pad_id=0)
    assert batch["ratings"].shape == (4, 2) and batch["ratings"][0].tolist() == [5.0, 4.0]
    assert batch["ratings"][1].isnan().all() and batch["ratings"][2, 0] == 1.0  # pair 1 unrated; rejected rows 2, 3
    examples, _ = encode_preferences(tok, prefs, max_len=999, attributes=["mood"])
    assert examples[0].ratings["chosen"] == [4.0] and math.isnan(examples[0].ratings["rejected"][0])
    assert "ratings" not in collate_pairs(examples[1:], pad_id=0)


# ----------------------------------------------------------------------------- long pairs
def reference_encode(tok: Tokenizer, prefs: list[Preference], max_len: int, truncation: str):
    """What encode_preferences gives, from both sides rendered whole: (examples, truncated, dropped)."""
    out, truncated, dropped = [], 0, 0
    for p in prefs:
        (c, cm), (r, rm) = (encode_reply(tok, p.prompt, reply) for reply in (p.chosen, p.rejected))
        longest = max(len(c), len(r))
        if longest > max_len:
            if truncation == "drop":
                dropped += 1
                continue
            (c, cm), (r, rm) = _fit(c, cm, longest - max_len, max_len), _fit(r, rm, longest - max_len, max_len)
            truncated += 1
        out.append(PairExample(c, cm, r, rm))
    return out, truncated, dropped


def long_pairs(seed: int) -> list[Preference]:
    """Pairs of 10k-60k characters: a long chosen or rejected reply, both long, a long prompt, a long system
    message, assistant turns in the prompt, and a short pair."""
    rng = random.Random(seed)
    words = "the dog cat sat on a mat patio and then slept 🙂 é\n yes no".split(" ")
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    return [Preference([user(say(5))], say(8000), say(6)), Preference([user(say(5))], say(7), say(9000)),
            Preference([user(say(50))], say(8000), say(9000)), Preference([user(say(9000))], say(5), say(8)),
            Preference([user(say(30)), assistant(say(30)), user(say(20))], say(6000), say(10)),
            Preference([{"role": "system", "content": say(3000)}, user(say(3)), assistant(say(2)), user(say(4))],
                       say(3000), say(4000)),
            Preference([user(say(3))], say(40), say(41))]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bpe") / "c.txt"
    path.write_text("the dog sat on a mat patio and then slept. yes no the cat ran 🙂 é\n" * 300, encoding="utf-8")
    return train_bpe([str(path)], vocab_size=400)


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
@pytest.mark.parametrize("max_len", [8, 64, 300, 5000])
def test_long_pairs_encode_as_the_whole(tok, bpe, max_len, truncation):
    """A long reply is rendered from a prefix of its text: the same examples and counts as rendering both sides whole
    (a long prompt is rendered whole)."""
    for t in (tok, bpe):
        prefs = long_pairs(max_len)
        want, truncated, dropped = reference_encode(t, prefs, max_len, truncation)
        got, stats = encode_preferences(t, prefs, max_len, truncation)
        assert got == want and (stats.truncated, stats.dropped) == (truncated, dropped)


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_a_20mb_pair_is_fitted_within_seconds(bpe, truncation):
    """A 20 MB reply is encoded only as far as max_len needs (rendering it whole took about 45 s per side)."""
    reply = ("the dog sat on the mat 🙂 and then slept. " * 500_000)[:20_000_000]
    prompt = [user("Tell me everything.")]
    t0 = time.perf_counter()
    out, stats = encode_preferences(bpe, [Preference(prompt, "A short answer.", reply)], 512, truncation)
    assert time.perf_counter() - t0 < 5
    assert (stats.truncated, stats.dropped) == ((1, 0) if truncation == "truncate" else (0, 1))
    if out:  # each side keeps its reply's first 512 tokens, as the whole would
        want, _, _ = reference_encode(bpe, [Preference(prompt, "A short answer.", reply[:20_000])], 512, truncation)
        assert out == want and len(out[0].rejected_ids) == 512 and all(out[0].rejected_mask)


# ----------------------------------------------------------------------------- long prompts
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
PIECES = ["the", "dog", "cat's", "sat", "on", "a", "mat", "I'LL", "12345", "3.14", "🙂", "é", "e\u0301", "日本語の文",
          "yes!!", "no?", "--", "(x)", "don't", "<|", "|>", "im_end", "\u00a0x", "A"]
SEPS = [" ", " ", " ", " ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\u3000", "\u2009", "\x85", "", " \u0301", ". "]


def say_odd(rng: random.Random, n: int) -> str:
    """n words of letters, digits, contractions, punctuation, emoji, CJK, combining marks and odd whitespace."""
    return "".join(rng.choice(PIECES) + rng.choice(SEPS) for _ in range(n)).strip() or "x"


def regex_bpe(corpus: Path, pattern: str, nfc: bool) -> Tokenizer:
    """A Llama-3- or Qwen2-like byte-level BPE: a Split pre-tokenizer with their regex, then bytes (Qwen2: NFC)."""
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.normalizer = tokenizers.normalizers.NFC() if nfc else None
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), "isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=[
        tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train([str(corpus)], trainer)
    return Tokenizer(raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
                     chat_template=CHATML_TEMPLATE)


def metaspace_bpe(corpus: Path) -> Tokenizer:
    """A SentencePiece-like BPE (Metaspace): no cut is known to be exact for it, so long prompts render whole."""
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    raw.train([str(corpus)], trainer)
    return Tokenizer(raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
                     chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def toks(tok, bpe, tmp_path_factory) -> dict[str, Tokenizer]:
    """Every tokenizer kind a long prompt is cut for, and one it is not (metaspace), with their cut rules."""
    rng = random.Random(1)
    corpus = tmp_path_factory.mktemp("odd") / "c.txt"
    corpus.write_text("\n".join(say_odd(rng, 40) for _ in range(400)), encoding="utf-8")
    return {"char": tok, "bpe": bpe, "llama3": regex_bpe(corpus, LLAMA3_SPLIT, nfc=False),
            "qwen2": regex_bpe(corpus, QWEN2_SPLIT, nfc=True), "metaspace": metaspace_bpe(corpus),
            "bpe-plain": Tokenizer(bpe.tok, eos_token="<|endoftext|>", chat_template=PLAIN_TEMPLATE)}


RULES = {"char": "char", "bpe": "space", "llama3": "space", "qwen2": "space", "metaspace": None, "bpe-plain": "space"}


def test_cut_rules(toks):
    assert {name: _cut_rule(t) for name, t in toks.items()} == RULES


@pytest.mark.parametrize("name", [n for n, r in RULES.items() if r])
def test_a_cut_keeps_the_whole_texts_tokens(toks, name):
    """At every place the rule allows, the tokens of the text from there are the whole text's from there: the claim
    long prompts are encoded on, over odd text (special tokens, whitespace of every kind, digits, contractions,
    combining marks, CJK, emoji)."""
    t, rng = toks[name], random.Random(name)
    added = [a.content for a in t.tok.get_added_tokens_decoder().values()]
    checked = 0
    for _ in range(12):
        text = "".join(say_odd(rng, rng.randint(1, 40)) + rng.choice(["", "<|im_end|>\n<|im_start|>user\n", " "])
                       for _ in range(12))
        whole = t.tok.encode(text, add_special_tokens=False)
        first = {a: k for k, (a, _) in reversed(list(enumerate(whole.offsets)))}
        places = [x for x in range(2, len(text) - 2) if _cut_at(text, x, x - 1, RULES[name], added) == x]
        for x in rng.sample(places, min(len(places), 60)):
            tail = t.tok.encode(text[x:], add_special_tokens=False)
            k = first[x]  # a token of the whole starts there
            assert tail.ids == whole.ids[k:], (x, text[x - 5:x + 5])
            assert [(a + x, b + x) for a, b in tail.offsets] == whole.offsets[k:]
            checked += 1
    assert checked > 300


def long_prompts(seed: int, size: int) -> list[Preference]:
    """Pairs whose prompt holds about `size` words in a user message, a system message, an assistant turn inside
    it, or earlier turns, some with long replies too, and a prompt with no space to cut at."""
    rng = random.Random(seed)
    say = lambda n: say_odd(rng, n)  # noqa: E731
    system = {"role": "system", "content": say(size)}
    return [Preference([user(say(size))], say(5), say(7)),
            Preference([system, user(say(4))], say(6), say(3)),
            Preference([user(say(30)), assistant(say(size)), user(say(5))], say(5), say(8)),
            Preference([user(say(size)), assistant(say(40)), user(say(size // 20))], say(9), say(2)),
            Preference([system, user(say(size // 2))], say(size // 3), say(3)),
            Preference([user(say(size))], say(size), say(size // 2)),
            Preference([user("word" * size)], say(5), say(6))]


def fit_whole(whole: list[list[tuple[list[int], list[int]]]], max_len: int, truncation: str):
    """What encode_preferences gives from both sides rendered whole (encode_reply): (examples, truncated, dropped)."""
    out, truncated, dropped = [], 0, 0
    for sides in whole:
        fitted, cut = _fit_pair(sides, max_len, truncation)
        if fitted is None:
            dropped += 1
            continue
        truncated += cut
        out.append(PairExample(*fitted[0], *fitted[1]))
    return out, truncated, dropped


@pytest.mark.parametrize("max_len", [8, 64, 300, 1000, pytest.param(5000, marks=pytest.mark.slow)])
def test_long_prompts_encode_as_the_whole(toks, max_len, monkeypatch):
    """A long prompt is encoded from a cut near its end: the same examples and counts as rendering both sides whole,
    for every tokenizer kind, truncate and drop; only where no cut is known (no space to cut at, a metaspace
    tokenizer) is it rendered whole."""
    size = {8: 150, 64: 400, 300: 1500, 1000: 4000, 5000: 10500}[max_len]
    whole_renders = []
    real = preference.encode_reply

    def counted(tokenizer, prompt, reply, **kwargs):
        whole_renders.append(prompt)
        return real(tokenizer, prompt, reply, **kwargs)

    prefs = long_prompts(max_len, size)
    for name, t in toks.items():
        whole = [[real(t, p.prompt, reply) for reply in (p.chosen, p.rejected)] for p in prefs]
        cuts = [_prompt_cut(t, p.prompt, max_len, {}) is not None for p in prefs]
        assert cuts == [RULES[name] is not None] * 6 + [RULES[name] == "char"], name
        for truncation in ("truncate", "drop"):
            want, truncated, dropped = fit_whole(whole, max_len, truncation)
            whole_renders.clear()
            with monkeypatch.context() as m:
                m.setattr(preference, "encode_reply", counted)
                got, stats = encode_preferences(t, prefs, max_len, truncation)
            assert got == want and (stats.truncated, stats.dropped) == (truncated, dropped), (name, truncation)
            assert not any(cut and p.prompt in whole_renders for p, cut in zip(prefs, cuts)), name  # no fallback


def test_a_long_prompts_errors_are_the_whole_renders(toks):
    """A pair that cannot be rendered is the same error with a cut prompt as rendered whole."""
    text = " ".join(["the dog sat"] * 3000)
    for t in (toks["bpe"], toks["char"]):
        for pref in (Preference([user(text)], "Yes<|im_end|>", "No."), Preference([user(text)], "Yes.", "No<|pad|>"),
                     Preference([user(text + " <|im_start|> and on")], "Yes.", "No.")):
            assert _prompt_cut(t, pref.prompt, 64, {}) is not None
            with pytest.raises(ValueError) as whole:
                [encode_reply(t, pref.prompt, reply) for reply in (pref.chosen, pref.rejected)]
            _, stats = encode_preferences(t, [pref], 64, on_error="skip")
            assert [e.reason for e in stats.errors] == [str(whole.value)]


@pytest.mark.parametrize("name", ["bpe", "char"])
@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_a_20mb_prompt_is_fitted_within_seconds(toks, name, truncation):
    """A 20 MB prompt is encoded only from a cut near its end (rendering it whole took 25-40 s per side); its
    examples are those of a prompt holding only its last 60,000 characters, rendered whole."""
    t, text = toks[name], ("the dog sat on the mat 🙂 and then slept. " * 500_000)[:20_000_000]
    prefs = [Preference([{"role": "system", "content": "Be brief."}, user(text)], "A short answer.", "No.")]
    t0 = time.perf_counter()
    out, stats = encode_preferences(t, prefs, 512, truncation)
    assert time.perf_counter() - t0 < 5
    assert (stats.truncated, stats.dropped) == ((1, 0) if truncation == "truncate" else (0, 1))
    if out:
        short = [Preference([{"role": "system", "content": "Be brief."}, user(text[-60_000:])], "A short answer.",
                            "No.")]
        want, _, _ = reference_encode(t, short, 512, truncation)
        assert out == want and len(out[0].chosen_ids) == 512
        assert t.decode([i for i, m in zip(out[0].chosen_ids, out[0].chosen_mask) if m]) == "A short answer." + EOT


# ----------------------------------------------------------------------------- batching
def test_collate_shifts_labels_and_points_at_end_of_turn(tok):
    prefs = [Preference([user("Hi"), assistant("Hey"), user("Joke?")], "No joke.", "Knock knock, who is there?"),
             Preference([user("Why is the sky blue?")], "Scattering.", "Magic.")]
    examples, _ = encode_preferences(tok, prefs, max_len=999)
    pad = tok.pad_id
    batch = collate_pairs(examples, pad_id=pad)
    rows = [(e.chosen_ids, e.chosen_mask) for e in examples] + [(e.rejected_ids, e.rejected_mask) for e in examples]
    T = max(len(ids) for ids, _ in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, T) and batch["num_pairs"] == 2
    eot = tok.token_to_id(EOT)
    for b, (ids, mask) in enumerate(rows):
        want = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE] * (T - len(ids) + 1)
        assert batch["labels"][b].tolist() == want
        assert batch["input_ids"][b].tolist() == ids + [pad] * (T - len(ids))
        assert batch["last_index"][b] == len(ids) - 1 and batch["input_ids"][b, batch["last_index"][b]] == eot
        targets = [y for y in batch["labels"][b].tolist() if y != IGNORE]
        assert tok.decode(targets) == tok.decode([i for i, m in zip(ids, mask) if m])  # exactly the reply + eot
    # cross-entropy at each labelled position scores the reply's tokens: perfect logits give zero loss
    logits = torch.full((4, T, tok.vocab_size), -1e4)
    labels = batch["labels"]
    logits.scatter_(2, labels.clamp(min=0).unsqueeze(-1), 0.0)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    assert loss.item() < 1e-3 and "ratings" not in batch


def pairs(n: int) -> list[PairExample]:
    """Pair i has chosen ids [i, i + 1000] so a batch tells which pairs it holds."""
    return [PairExample([i, 1000 + i], [0, 1], [i, 2000 + i, 7], [0, 1, 1]) for i in range(n)]


def held(batch: dict) -> list[int]:
    return batch["input_ids"][:batch["num_pairs"], 0].tolist()


def test_loader_resumes_exactly():
    examples = pairs(11)
    ref = PairLoader(examples, batch_size=3, seed=5)
    assert ref.steps_per_epoch() == 4  # 3 + 3 + 3 + 2
    want = [held(next(ref)) for _ in range(10)]
    assert sorted(sum(want[:4], [])) == list(range(11)) and want[:4] != want[4:8]  # all pairs, reshuffled
    first = PairLoader(examples, batch_size=3, seed=5)
    got = [held(next(first)) for _ in range(6)]
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == (1, 2)
    resumed = PairLoader(examples, batch_size=3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    got += [held(next(resumed)) for _ in range(4)]
    assert got == want
    with pytest.raises(ValueError, match="batch_size"):
        PairLoader(examples, batch_size=2, seed=5).load_state_dict(state)
    dropping = PairLoader(examples, 3, seed=5, drop_last=True)
    assert dropping.steps_per_epoch() == 3 and [len(held(next(dropping))) for _ in range(4)] == [3, 3, 3, 3]


def test_ranks_see_disjoint_pairs():
    examples = pairs(10)
    loaders = [PairLoader(examples, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert [ld.steps_per_epoch() for ld in loaders] == [2, 2]  # 5 batches, cut to 4
    seen = [sum((held(next(ld)) for _ in range(2)), []) for ld in loaders]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 8
    batch = next(PairLoader(examples, batch_size=2, seed=1))
    assert batch["input_ids"].shape == (4, 3) and batch["labels"][0].tolist() == [1000 + held(batch)[0], -100, -100]
    with pytest.raises(ValueError, match="too few"):
        PairLoader(examples, batch_size=4, seed=1, world_size=4)
