"""Tokenizer: exact round trips, special tokens, save/load, and parity with transformers' AutoTokenizer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors

from tristage.tokenizer import SPECIAL_TOKENS, Tokenizer, TrainConfig, train_bpe, train_char, train_main

transformers = pytest.importorskip("transformers")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/pretrain/tinyshakespeare.txt"
hsettings = settings(max_examples=150, deadline=None)

DOCS = [
    "The dog sat on the patio. The cat sat on the mat, and the bird sang in the tree.",
    "Once upon a time there was a little fox who lived near the river.\n\nIt liked apples.",
    "Numbers: 1, 22, 333, 4444. Code: def f(x):\n    return x * 2\n",
    "Ünïcödé tëxt, 日本語のテキスト, emoji 🙂🚀 and tabs\tand   spaces.",
]
STRINGS = ["", "hello world", "  leading and trailing  ", "line\n\nbreaks\r\n", "emoji 🙂👍🏽 e\u0301",
           "\x00 nul", "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b<|pad|>", "日本語", "x" * 300]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where did the dog sit?"},
        {"role": "assistant", "content": "On the patio."}, {"role": "user", "content": "And the cat 🙂?"}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("<|endoftext|>".join(DOCS * 20), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return train_bpe([str(corpus)], vocab_size=400)


@pytest.fixture(scope="module")
def char(corpus) -> Tokenizer:
    return train_char([str(corpus)])


def hf_ids(hf, messages, **kw) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


@hsettings
@given(st.text())
def test_bpe_round_trip(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


@hsettings
@given(st.text())
def test_char_round_trip(char, s):
    assert char.decode(char.encode(s)) == s


def test_specials_reserved_in_order(bpe, char):
    for tok in (bpe, char):
        assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
        for i, s in enumerate(SPECIAL_TOKENS):
            assert tok.encode(s) == [i] and tok.id_to_token(i) == s
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)
        assert tok.stop_ids == [0, tok.token_to_id("<|im_end|>")]
        assert tok.decode(tok.encode("a<|pad|>b"), skip_special_tokens=True) == "ab"


def test_separators_are_not_learned_as_merges(bpe):
    assert bpe.vocab_size == 400
    specials = set(SPECIAL_TOKENS)
    learned = [bpe.decode([i]) for i in range(bpe.vocab_size) if bpe.id_to_token(i) not in specials]
    assert not [t for t in learned if "endoftext" in t or "<|" in t or "|>" in t]


@hsettings
@given(st.text())
def test_plain_text_never_yields_special_ids(bpe, char, s):
    s = s.replace("<|", "")
    for tok in (bpe, char):
        assert not set(tok.encode(s)) & set(range(len(SPECIAL_TOKENS)))


def test_encode_batch_and_gz(bpe, corpus, tmp_path):
    assert bpe.encode_batch(STRINGS) == [bpe.encode(s) for s in STRINGS]
    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(gzip.compress(corpus.read_bytes()))
    assert train_bpe([str(gz)], vocab_size=400).tok.get_vocab() == bpe.tok.get_vocab()


def test_char_vocab(char):
    chars = set("".join(DOCS))
    assert char.vocab_size == len(SPECIAL_TOKENS) + len(chars) + 256
    assert len(char.encode(DOCS[3])) == len(DOCS[3])  # one token per character seen in training
    assert char.decode(char.encode("Ω unseen")) == "Ω unseen"  # byte fallback: 2 tokens for the unseen Ω


def test_save_load_round_trip(bpe, char, tmp_path):
    for tok in (bpe, char):
        tok.save(tmp_path / "tok")
        for loaded in (Tokenizer.load(tmp_path / "tok"), Tokenizer.load(tmp_path / "tok" / "tokenizer.json")):
            assert loaded.encode_batch(STRINGS) == tok.encode_batch(STRINGS)
            assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == \
                (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
            assert loaded.chat_template == tok.chat_template and loaded.stop_ids == tok.stop_ids
            assert loaded.special_tokens == list(SPECIAL_TOKENS)


def test_chatml_template(bpe):
    text = bpe.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere did the dog sit?<|im_end|>\n"
                    "<|im_start|>assistant\nOn the patio.<|im_end|>\n<|im_start|>user\nAnd the cat 🙂?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert bpe.apply_chat_template(CHAT, add_generation_prompt=True) == bpe.encode(text)
    with pytest.raises(jinja2.TemplateError, match="unknown role"):
        bpe.apply_chat_template([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_auto_tokenizer_loads_ours(bpe, char, tmp_path, kind):
    tok = bpe if kind == "bpe" else char
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    for s in STRINGS:
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids
        assert hf.encode(s) == tok.encode(s, add_special_tokens=True)
        assert hf.decode(ids) == tok.decode(ids) == s
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    for msgs in (CHAT, CHAT[1:3], CHAT[:2]):
        for gen in (False, True):
            assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
                tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            ids = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert hf_ids(hf, msgs, add_generation_prompt=gen) == ids
    # the {% generation %} blocks give transformers (and TRL) the assistant mask: the reply and its <|im_end|>
    out = hf.apply_chat_template(CHAT[:3], return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "On the patio.<|im_end|>"


LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Today Date: " + date_string | default("26 Jul 2024") + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + message.role) }}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are helpful.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
{%- if message.role != 'system' %}
{%- set ns.turns = ns.turns + 1 %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.reasoning_content is defined and enable_thinking | default(true) %}
{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
{%- endif %}
{{- message.content }}
{%- if message.tool_calls is defined %}
{%- for call in message.tool_calls %}{{- '\\n<tool_call>\\n' + call | tojson + '\\n</tool_call>' }}{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": CITY}}]
TOOL_CHAT = CHAT[:2] + [{"role": "assistant", "content": "", "thinking": "Look it up.", "tool_calls": [
    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]}]


def assert_same_chat(ours: Tokenizer, hf, chats, **kw):
    for msgs in chats:
        for gen in (False, True):
            text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
            assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen, **kw) == \
                hf_ids(hf, msgs, add_generation_prompt=gen, **kw)


def test_load_llama3_like_folder_built_with_transformers(corpus, tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raw = train_bpe([str(corpus)], vocab_size=320, special_tokens=specials).tok
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    built = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>",
                                                 eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)
    built.save_pretrained(tmp_path)
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.load(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, None) and ours.stop_ids == [1, 4]
    for s in STRINGS:
        assert ours.encode(s, add_special_tokens=True) == hf.encode(s) and hf.encode(s)[0] == 0
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False)
    assert_same_chat(ours, hf, [CHAT, CHAT[1:], CHAT[1:3]])
    assert_same_chat(ours, hf, [CHAT[1:]], tools=TOOLS, date_string="1 Jan 2025")
    ours.save(tmp_path / "resaved")  # and ours writes it back in a form transformers reads the same way
    hf2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "resaved")
    assert [hf2.encode(s) for s in STRINGS] == [hf.encode(s) for s in STRINGS]
    assert_same_chat(ours, hf2, [CHAT])


def test_load_qwen_like_v4_folder(bpe, tmp_path):
    """A folder in the transformers v4 layout: AddedToken dicts, added_tokens_decoder, a named-template list."""
    (tmp_path / "tokenizer.json").write_text(bpe.tok.to_str(), encoding="utf-8")
    tok = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False, "special": True}
    decoder = {str(i): {k: v for k, v in tok(s).items() if k != "__type"} for i, s in enumerate(SPECIAL_TOKENS)}
    decoder[str(bpe.vocab_size)] = {**tok("<tool_call>"), "special": False}  # not in tokenizer.json
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": tok("<|im_end|>"),
              "pad_token": tok("<|endoftext|>"), "added_tokens_decoder": decoder, "model_max_length": 4096,
              "clean_up_tokenization_spaces": False,
              "chat_template": [{"name": "default", "template": QWEN_TEMPLATE.replace("# Tools", "unused")},
                                {"name": "tool_use", "template": QWEN_TEMPLATE}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.load(tmp_path)
    assert ours.model_max_length == 4096 and ours.bos_token is None and ours.eos_token == "<|im_end|>"
    assert ours.stop_ids == [3] and ours.pad_id == 0
    assert ours.encode("a<tool_call>b") == hf.encode("a<tool_call>b") and len(ours.encode("<tool_call>")) == 1
    assert_same_chat(ours, hf, [CHAT, CHAT[1:], TOOL_CHAT])
    assert_same_chat(ours, hf, [TOOL_CHAT], tools=TOOLS, enable_thinking=False)
    assert "# Tools" in ours.apply_chat_template(CHAT, tools=TOOLS, tokenize=False)


def test_errors(bpe, corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe([str(corpus)], vocab_size=100)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(bpe.tok).apply_chat_template(CHAT)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(corpus.parent / "missing")


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_cli(corpus, tmp_path, capsys, kind):
    from tristage.cli import main

    assert main(["tokenizer", "--files", str(corpus), "--out", str(tmp_path), "--vocab-size", "300",
                 "--kind", kind]) == 0
    tok = Tokenizer.load(tmp_path)
    assert "chars/token" in capsys.readouterr().out
    assert tok.decode(tok.encode(DOCS[3])) == DOCS[3]
    with pytest.raises(SystemExit):
        train_main(TrainConfig(files=[], out=str(tmp_path)))


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data is absent")
def test_tiny_shakespeare_char():
    tok = train_char([str(SHAKESPEARE)])
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 65 + 256 and len(ids) == len(text)
    assert tok.decode(ids) == text


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data is absent")
def test_tiny_shakespeare_bpe(tmp_path):
    tok = train_bpe([str(SHAKESPEARE)], vocab_size=1024)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(text) / len(ids) > 2
    tok.save(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode(text[:100_000]) == tok.encode(text[:100_000])


def test_cli_reads_jsonl_text_and_names_bad_files(corpus, tmp_path, capsys):
    """`--files x.jsonl` trains on each record's text field (not the JSON around it); every bad file is one line
    naming it (and the line), exit 2."""
    from tristage.cli import main

    docs = corpus.read_text(encoding="utf-8").split("\n\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert main(["tokenizer", "--files", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "j"),
                 "--kind", "char"]) == 0
    assert not {'"', "{", "}"} & set(Tokenizer.load(tmp_path / "j").tok.get_vocab())  # no JSON syntax learned
    bad = {"empty.txt": b"", "blank.jsonl": b"\n", "latin1.txt": "a\nb\ncaf\xe9\n".encode("latin-1"),
           "trunc.txt.gz": gzip.compress(b"some words\n" * 5000)[:-40], "nofield.jsonl": b'{"body": "x"}\n',
           "notext.jsonl": b'{"text": ""}\n', "bom.txt": b"\xef\xbb\xbf", "blank.txt": b"\n  \n\t\n",
           "wsonly.jsonl": b'{"text": " "}\n{"text": "\\n"}\n'}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder").mkdir()
    cases = [("empty.txt", "empty.txt: no text to train on"), ("blank.jsonl", "blank.jsonl: no records"),
             ("latin1.txt", "latin1.txt:3: not UTF-8 text (byte 0xe9"), ("trunc.txt.gz", "trunc.txt.gz: not a valid "
             "gzip file, or a truncated one"), ("nofield.jsonl", "nofield.jsonl:1: field 'text': missing"),
             ("notext.jsonl", "notext.jsonl: no text to train on"), ("bom.txt", "bom.txt: no text to train on"),
             ("blank.txt", "blank.txt: no text to train on"), ("wsonly.jsonl", "wsonly.jsonl: no text to train on"),
             ("folder", "folder: is a folder"), ("missing.txt", "missing.txt: no such file")]
    for name, message in cases:
        assert main(["tokenizer", "--files", str(tmp_path / name), "--out", str(tmp_path / "t")]) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)
    (tmp_path / "damaged").mkdir()
    Tokenizer.load(tmp_path / "j").save(tmp_path / "damaged")
    (tmp_path / "damaged/tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ValueError, match=r"damaged/tokenizer\.json: not a readable tokenizer"):
        Tokenizer.load(tmp_path / "damaged")
