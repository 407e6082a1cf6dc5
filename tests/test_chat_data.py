"""Chat data: loading and validation, assistant-only loss masks for any template, padding and packing."""

from __future__ import annotations

import gzip
import json
import random
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import processors

from tristage.data.chat import (
    IGNORE,
    ChatLoader,
    Conversation,
    Example,
    encode_conversations,
    format_skipped,
    load_conversations,
    make_example,
    pack,
    pack_bins,
    pad_batch,
    render,
)
from tristage.io import DataError
from tristage.model.gpt import ModelConfig, build_model
from tristage.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
hsettings = settings(max_examples=150, deadline=None)


def shared_data(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: 26 Jul 2024\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
ALL_SPECIALS = [*SPECIAL_TOKENS, *LLAMA3_SPECIALS]
PLAIN_TEMPLATE = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where did the dog sit?"},
        {"role": "assistant", "content": "On the patio."}, {"role": "user", "content": "And the cat 🙂?"},
        {"role": "assistant", "content": "On the mat,\n\tasleep."}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["the", "dog", "cat", "sat", "on", "patio", "mat", "user", "assistant", "system", "yes", "no", "🙂", "é"]
    ends = ["\n", "\n\n", "\n\n\n", "\t"]
    text = "".join(" ".join(rng.choices(words, k=rng.randint(2, 12))) + rng.choice(ends) for _ in range(3000))
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chatml(corpus) -> Tokenizer:
    return train_bpe([str(corpus)], vocab_size=400)


@pytest.fixture(scope="module")
def llama3(corpus) -> Tokenizer:
    """A Llama-3-like tokenizer: BOS from the template, a BOS-adding post-processor, no generation tags."""
    raw = train_bpe([str(corpus)], vocab_size=400, special_tokens=LLAMA3_SPECIALS).tok
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return Tokenizer(raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)


# ----------------------------------------------------------------------------- loading
def write_jsonl(path: Path, rows: list) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_all_shapes(tmp_path):
    rows = [{"messages": CHAT},
            {"instruction": "Add.", "input": "1 + 2", "output": "3"},
            {"instruction": "Greet.", "input": "<noinput>", "output": "Hi!", "system": "Be kind."},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "S."}]
    convs, errors = load_conversations(write_jsonl(tmp_path / "c.jsonl.gz", rows))
    assert errors == [] and [c.line for c in convs] == [1, 2, 3, 4]
    assert convs[0].messages == CHAT
    assert convs[1].messages == [{"role": "user", "content": "Add.\n\n1 + 2"}, {"role": "assistant", "content": "3"}]
    assert convs[2].messages[0] == {"role": "system", "content": "Be kind."}
    assert convs[2].messages[1]["content"] == "Greet."
    assert [m["role"] for m in convs[3].messages] == ["system", "user", "assistant"]
    # a JSON list (ShareGPT, as FastChat ships it); the optional system prompt fills in where none is given
    path = tmp_path / "c.json"
    path.write_text(json.dumps([rows[3], {"conversations": rows[3]["conversations"]}], indent=2))
    convs, _ = load_conversations(path, system_prompt="Default.")
    assert [c.messages[0]["content"] for c in convs] == ["S.", "Default."] and convs[1].line == 2


BAD = [  # record, reason, field
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role",
     "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \n"}]}, "empty content",
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}]}, "ends with a user turn", "messages[2].role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn", "messages"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "expected a string, got int", "messages[0].content"),
    ({"messages": "hi"}, "non-empty list", "messages"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, "not the user's", "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "only come first", "messages[1].role"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, "unknown role 'bot'",
     "conversations[1].from"),
    ({"instruction": "x", "output": ""}, "empty content", "output"),
    ({"instruction": ["x"], "output": "y"}, "expected a string, got list", "instruction"),
    ({"prompt": "x"}, "unrecognised record", None),
    ("[1, 2]", "expected a JSON object", None),
    ('{"messages": [', "invalid JSON", None),
]


@pytest.mark.parametrize("record,reason,field", BAD)
def test_invalid_record_raises_with_file_line_field(tmp_path, record, reason, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, record])
    with pytest.raises(DataError, match=reason) as e:
        load_conversations(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, field)


def test_skip_collects_every_bad_record(tmp_path):
    rows = [{"messages": CHAT}] + [r for r, _, _ in BAD] + [{"messages": CHAT}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    convs, errors = load_conversations(path, on_error="skip")
    assert len(convs) == 2 and len(errors) == len(BAD) and [e.line for e in errors] == list(range(2, len(BAD) + 2))
    assert format_skipped(errors) == f"skipped {len(BAD)} invalid records (first: {path}:2: field " \
                                     "'messages[0].role': unknown role 'robot' (expected system, user or assistant))"
    assert format_skipped([]) == "skipped 0 invalid records"
    as_list = tmp_path / "mixed.json"  # in a JSON list the "line" is the record's 1-based position
    as_list.write_text(json.dumps([json.loads(r) if isinstance(r, str) and r.startswith("[") else r
                                   for r in rows if not (isinstance(r, str) and r.startswith("{"))]))
    _, errors = load_conversations(as_list, on_error="skip")
    assert errors[0].line == 2 and errors[0].field == "messages[0].role"


# ----------------------------------------------------------------------------- rendering
def masked_runs(mask: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for t, m in enumerate(mask):
        if m:
            if not runs or runs[-1][-1] != t - 1:
                runs.append([])
            runs[-1].append(t)
    return runs


def check_mask(tok: Tokenizer, msgs: list[dict], eot: str, strip: bool = False) -> tuple[list[int], list[int]]:
    """The mask covers exactly each assistant reply followed by its end-of-turn token, one run per reply."""
    ids, mask = render(tok, msgs)
    assert ids == tok.apply_chat_template(msgs)  # one encode of the full text = the template's ids
    replies = [(m["content"].strip() if strip else m["content"]) for m in msgs if m["role"] == "assistant"]
    runs = masked_runs(mask)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        got, want = tok.decode([ids[t] for t in run]), reply + eot
        # one exception, transformers' rule too: the header's newline merged into one token with the reply's
        # leading whitespace is trained (strip=True templates never produce it)
        assert got == want or (not strip and reply[:1].isspace() and got == "\n" + want), (got, want)
        assert ids[run[-1]] == tok.token_to_id(eot)
    return ids, mask


def test_render_chatml_single_and_multi_turn(chatml):
    ids, mask = check_mask(chatml, CHAT[1:3], "<|im_end|>")
    assert chatml.decode([i for i, m in zip(ids, mask) if m]) == "On the patio.<|im_end|>"
    assert chatml.decode([i for i, m in zip(ids, mask) if not m]) == \
        "<|im_start|>user\nWhere did the dog sit?<|im_end|>\n<|im_start|>assistant\n\n"
    ids, mask = check_mask(chatml, CHAT, "<|im_end|>")
    assert chatml.decode([i for i, m in zip(ids, mask) if m]) == \
        "On the patio.<|im_end|>On the mat,\n\tasleep.<|im_end|>"
    assert chatml.token_to_id("<|im_start|>") not in [i for i, m in zip(ids, mask) if m]
    # a reply starting with newlines: the header's newline merges with the first into one token, which is trained
    # (as transformers does); the mask never reaches further back
    ids, mask = check_mask(chatml, STRADDLE, "<|im_end|>")
    assert chatml.decode([i for i, m in zip(ids, mask) if m]) == "\n\n\nyes<|im_end|>"


def test_render_llama3_template_without_generation_tags(llama3):
    ids, mask = check_mask(llama3, CHAT, "<|eot_id|>", strip=True)
    assert ids[0] == llama3.bos_id and ids.count(llama3.bos_id) == 1  # from the template, not the post-processor
    eot = llama3.token_to_id("<|eot_id|>")
    assert sum(m for i, m in zip(ids, mask) if i == eot) == 2 and ids.count(eot) == 5  # system, 2 user, 2 replies
    check_mask(llama3, [CHAT[1], {"role": "assistant", "content": "  padded reply \n"}], "<|eot_id|>", strip=True)


def test_render_plain_text_template_keeps_whole_span(chatml):
    tok = Tokenizer(chatml.tok, eos_token="<|endoftext|>", chat_template=PLAIN_TEMPLATE)
    ids, mask = render(tok, CHAT[1:3])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "On the patio.\n"  # no end-of-turn token: all of it


def test_render_errors(chatml):
    history_changes = "{% for m in messages %}{{ m['role'] + (':' if loop.last else '=') + m['content'] }}{% endfor %}"
    tok = Tokenizer(chatml.tok, chat_template=history_changes)
    with pytest.raises(ValueError, match="unfit for turn-by-turn"):
        render(tok, CHAT)
    injected = [CHAT[1], {"role": "assistant", "content": "a<|im_end|>b"}]
    with pytest.raises(ValueError, match="special token '<|im_end|>'"):
        render(chatml, injected)
    conv = [Conversation(CHAT, "f.jsonl", 1), Conversation(injected, "f.jsonl", 2)]
    examples, stats = encode_conversations(chatml, conv, max_len=999, on_error="skip")
    assert len(examples) == 1 and stats.errors[0].line == 2 and "skipped 1" in str(stats)
    with pytest.raises(DataError, match="f.jsonl:2"):
        encode_conversations(chatml, conv, max_len=999)
    no_system = Tokenizer(chatml.tok, chat_template="{% if messages[0]['role'] == 'system' %}"  # as Gemma's does
                          "{{ raise_exception('System role not supported') }}{% endif %}" + chatml.chat_template)
    _, stats = encode_conversations(no_system, [Conversation(CHAT[1:]), conv[0]], max_len=999, on_error="skip")
    assert stats.examples == 1 and stats.errors[0].line == 1 and "System role not supported" in str(stats.errors[0])


STRADDLE = [CHAT[1], {"role": "assistant", "content": "\n\nyes"}]
# render refuses contents holding special-token strings (tested above); hypothesis does try them
text = st.text(min_size=1, max_size=24).filter(lambda s: s.strip() and not any(t in s for t in ALL_SPECIALS))
conversations = st.tuples(st.one_of(st.none(), text), st.lists(st.tuples(text, text), min_size=1, max_size=4)).map(
    lambda c: ([{"role": "system", "content": c[0]}] if c[0] else [])
    + [{"role": r, "content": x} for u, a in c[1] for r, x in (("user", u), ("assistant", a))])


@hsettings
@given(conversations)
@example(STRADDLE)
def test_mask_property_chatml(chatml, msgs):
    check_mask(chatml, msgs, "<|im_end|>")


@hsettings
@given(conversations)
def test_mask_property_llama3(llama3, msgs):
    check_mask(llama3, msgs, "<|eot_id|>", strip=True)


@pytest.fixture(scope="module")
def hf_chatml(chatml, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("chatml")
    chatml.save(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


@hsettings
@given(conversations)
@example(STRADDLE)
def test_mask_equals_transformers_assistant_mask(chatml, hf_chatml, msgs):
    ids, mask = render(chatml, msgs)
    out = hf_chatml.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == ids and list(out["assistant_masks"]) == mask


def test_llama3_folder_built_with_transformers(llama3, tmp_path):
    transformers = pytest.importorskip("transformers")
    built = transformers.PreTrainedTokenizerFast(tokenizer_object=llama3.tok, bos_token="<|begin_of_text|>",
                                                 eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)
    built.save_pretrained(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    ids, _ = check_mask(loaded, CHAT, "<|eot_id|>", strip=True)
    assert list(transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(CHAT)["input_ids"]) == ids


# ----------------------------------------------------------------------------- examples and batches
def test_example_shift_and_truncation(chatml):
    ids, mask = render(chatml, CHAT)
    ex = make_example(ids, mask)
    eot = chatml.token_to_id("<|im_end|>")
    assert ex.input_ids == ids[:len(ex)] and len(ex) == len(ids) - 2  # the final "\n" trains nothing: dropped
    assert all(y == (ids[t + 1] if mask[t + 1] else IGNORE) for t, y in enumerate(ex.labels))
    assert ex.labels[-1] == eot
    convs = [Conversation(CHAT)] * 3
    full, stats = encode_conversations(chatml, convs, max_len=len(ex))
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 0, 0) and full[0] == ex
    cut, stats = encode_conversations(chatml, convs, max_len=len(ex) - 3)
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 3, 0) and cut[0].input_ids == ex.input_ids[:-3]
    _, stats = encode_conversations(chatml, convs, max_len=len(ex) - 3, truncation="drop")
    assert (stats.examples, stats.dropped) == (0, 3)
    _, stats = encode_conversations(chatml, convs, max_len=10)  # only the prompt fits: nothing to train, dropped
    assert (stats.examples, stats.dropped) == (0, 3) and "3 dropped" in str(stats)


@pytest.fixture(scope="module")
def examples(chatml) -> list[Example]:
    rng = random.Random(1)
    words = "the dog cat sat on a mat patio and then slept 🙂".split()
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
    convs = [Conversation([{"role": r, "content": say()} for _ in range(rng.randint(1, 3))
                           for r in ("user", "assistant")]) for _ in range(12)]
    out, stats = encode_conversations(chatml, convs, max_len=128)
    assert (stats.examples, stats.truncated) == (12, 0)
    return out


def per_token_loss(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["position_ids"], batch["attn_mask"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view_as(batch["labels"])


def test_padding_never_masks_the_end_of_turn_token(chatml, examples):
    eot = chatml.token_to_id("<|im_end|>")
    batch = pad_batch(examples[:5], pad_id=eot)  # even with pad = the end-of-turn id itself
    for b, e in enumerate(examples[:5]):
        n = len(e)
        assert batch["labels"][b, n - 1] == eot and (batch["labels"][b, n:] == IGNORE).all()
        assert (batch["input_ids"][b, n:] == eot).all()
    assert batch["num_tokens"] == sum(sum(y != IGNORE for y in e.labels) for e in examples[:5])


@pytest.fixture
def tiny_model(chatml):
    """A tiny random model, run on one thread: OpenMP threads spinning on a busy 2-core machine make each tiny
    matmul take milliseconds instead of microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=chatml.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256)
    yield build_model(cfg, seed=0).eval()
    torch.set_num_threads(threads)


@torch.no_grad()
def test_packing_and_padding_do_not_change_per_token_loss(chatml, examples, tiny_model):
    alone = [per_token_loss(tiny_model, pad_batch([e], chatml.pad_id))[0] for e in examples]
    batches, eff = pack(examples, seq_len=128, pad_id=chatml.pad_id, rows_per_batch=2)
    assert sorted(i for b in batches for row in b["rows"] for i in row) == list(range(len(examples)))
    assert 0.5 < eff <= 1 and any(len(row) > 1 for b in batches for row in b["rows"])
    worst_without_mask = 0.0
    for b in batches:
        packed = per_token_loss(tiny_model, b)
        unmasked = per_token_loss(tiny_model, {**b, "attn_mask": None})  # plain causal across conversations
        for r, row in enumerate(b["rows"]):
            pos = 0
            for i in row:
                n = len(examples[i])
                torch.testing.assert_close(packed[r, pos:pos + n], alone[i], atol=1e-5, rtol=0)
                worst_without_mask = max(worst_without_mask, (unmasked[r, pos:pos + n] - alone[i]).abs().max().item())
                pos += n
            assert (b["labels"][r, pos:] == IGNORE).all() and (b["doc_ids"][r, pos:] == -1).all()
            assert b["position_ids"][r, :len(examples[row[0]])].tolist() == list(range(len(examples[row[0]])))
    assert worst_without_mask > 1e-3  # the document mask is what makes the test pass
    padded = pad_batch(examples, chatml.pad_id)
    loss = per_token_loss(tiny_model, padded)
    for b, e in enumerate(examples):
        torch.testing.assert_close(loss[b, :len(e)], alone[b], atol=1e-5, rtol=0)


def test_pack_bins_best_fit_decreasing():
    lengths = [9, 7, 5, 5, 3, 3, 2, 1, 1]
    bins = pack_bins(lengths, 10)
    assert bins == [[0, 7], [1, 4], [2, 3], [5, 6, 8]] and bins == pack_bins(lengths, 10)
    with pytest.raises(ValueError, match="seq_len 8"):
        pack_bins(lengths, 8)
    rng = random.Random(0)
    many = [rng.randint(20, 400) for _ in range(2000)]
    bins = pack_bins(many, 1024)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert all(sum(many[i] for i in b) <= 1024 for b in bins) and sum(many) / (len(bins) * 1024) > 0.97


def synthetic(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example([k] * (m := rng.randint(3, 30)), [k] * m) for k in range(n)]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_loader_epochs_budget_and_exact_resume(mode):
    data = synthetic(50)
    loader = ChatLoader(data, tokens_per_batch=96, pad_id=0, mode=mode, seq_len=32, seed=3)
    plans = [loader.plan(0), loader.plan(1)]
    epoch0 = [next(loader) for _ in plans[0]]
    assert (loader.epoch, loader.index) == (0, len(plans[0]))
    assert all(b["input_ids"].numel() <= 96 and b["input_ids"].shape[1] <= 32 for b in epoch0)
    seen = [int(x) for b in epoch0 for x in b["labels"][b["labels"] != IGNORE]]
    assert sorted(set(seen)) == list(range(50)) and len(seen) == sum(map(len, data))  # each example once per epoch
    assert plans[0] != plans[1] and ChatLoader(data, 96, 0, mode, 32, seed=3).plan(1) == plans[1]
    assert 0.5 < loader.efficiency() <= 1
    for _ in range(len(loader.plan(0)) - 2):  # run into epoch 1, save, and resume in a fresh loader
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(len(loader.plan(1)) + 3)]
    resumed = ChatLoader(data, 96, 0, mode, 32, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in expected)):
        assert torch.equal(want["input_ids"], got["input_ids"]) and torch.equal(want["labels"], got["labels"])
    with pytest.raises(ValueError, match="seed"):
        ChatLoader(data, 96, 0, mode, 32, seed=4).load_state_dict(state)
    ranks = [ChatLoader(data, 96, 0, mode, 32, seed=3, rank=r, world_size=2).plan(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


# ----------------------------------------------------------------------------- real data (skipped when absent)
@pytest.mark.parametrize("rel", ["sft/alpaca_libre_ok.jsonl", "sft/fastchat_dummy_conversation.json"])
def test_shared_sft_data(rel, chatml, llama3):
    convs, errors = load_conversations(shared_data(rel), on_error="skip")
    assert len(convs) > 5 and len(errors) <= len(convs) // 50, format_skipped(errors)
    assert all(e.reason == "empty content" for e in errors)  # alpaca-libre has 34 empty outputs: reported
    for conv in convs[:40]:
        check_mask(chatml, conv.messages, "<|im_end|>")
        check_mask(llama3, conv.messages, "<|eot_id|>", strip=True)


# ----------------------------------------------------------------------------- long records
def reference_encode(tok: Tokenizer, conv: Conversation, max_len: int, truncation: str) -> tuple[Example | None, str]:
    """What encode_conversations gives, from the whole conversation rendered and encoded: (example, outcome)."""
    ex = make_example(*render(tok, conv.messages))
    if ex is not None and len(ex) > max_len:
        ex = Example(ex.input_ids[:max_len], ex.labels[:max_len]) if truncation == "truncate" else None
        if ex is not None and any(y != IGNORE for y in ex.labels):
            return ex, "truncated"
        return None, "dropped"
    return ex, "kept" if ex is not None else "dropped"


def long_conversations(seed: int) -> list[Conversation]:
    """Conversations of 10k-60k characters: long replies, long prompts, many turns, a long system message."""
    rng = random.Random(seed)
    words = "the dog cat sat on a mat patio and then slept 🙂 é\n yes no".split(" ")
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    return [Conversation([{"role": "user", "content": say(5)}, {"role": "assistant", "content": say(8000)}]),
            Conversation([{"role": "user", "content": say(9000)}, {"role": "assistant", "content": say(5)}]),
            Conversation([{"role": "system", "content": say(3000)}]
                         + [{"role": r, "content": say(rng.randint(1, 400))} for _ in range(30)
                            for r in ("user", "assistant")]),
            Conversation([{"role": "user", "content": say(30)}, {"role": "assistant", "content": say(30)},
                          {"role": "user", "content": say(12000)}, {"role": "assistant", "content": say(10)}])]


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
@pytest.mark.parametrize("max_len", [16, 64, 300, 5000])
def test_long_conversations_encode_as_the_whole(chatml, llama3, max_len, truncation):
    """Long conversations are encoded from a prefix of their text: the same examples, counts and outcomes as from
    encoding the whole."""
    for tok in (chatml, llama3):
        convs = long_conversations(max_len)
        want = [reference_encode(tok, c, max_len, truncation) for c in convs]
        got, stats = encode_conversations(tok, convs, max_len, truncation)
        assert got == [ex for ex, _ in want if ex is not None]
        outcomes = [o for _, o in want]
        assert (stats.truncated, stats.dropped) == (outcomes.count("truncated"), outcomes.count("dropped"))


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_a_20mb_record_is_fitted_within_seconds(chatml, truncation):
    """Rendering is linear in the conversation's length, and a 20 MB reply is only encoded as far as max_len needs
    (it took minutes once: the tokens' offsets were re-read inside the per-token loop)."""
    reply = ("the dog sat on the mat 🙂 and then slept. " * 500_000)[:20_000_000]
    conv = Conversation([{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": reply}])
    t0 = time.perf_counter()
    out, stats = encode_conversations(chatml, [conv], max_len=512, truncation=truncation)
    assert time.perf_counter() - t0 < 5
    assert (stats.truncated, stats.dropped) == ((1, 0) if truncation == "truncate" else (0, 1))
    if out:
        ids, mask = render(chatml, conv.messages[:1] + [{"role": "assistant", "content": reply[:5000]}])
        assert out[0].input_ids == ids[:512] and out[0].labels == [i if m else IGNORE for i, m in
                                                                    zip(ids[1:513], mask[1:513])]
    t0 = time.perf_counter()  # the whole of a 200 kB reply, as reward scoring and preference pairs render it
    ids, mask = render(chatml, conv.messages[:1] + [{"role": "assistant", "content": reply[:200_000]}])
    assert time.perf_counter() - t0 < 5 and sum(mask) > 10_000
