"""Tokenizers: train a byte-level BPE (or a char-level one), load any Hugging Face tokenizer, chat templates.

`tristage tokenizer --files corpus.txt --out tok/ [--vocab-size 4096] [--kind bpe|char]`

Choices:
- The Rust `tokenizers` library does the work (training, encoding, batch encoding in parallel); this module
  is a thin `Tokenizer` wrapper holding a `tokenizers.Tokenizer` plus the tokenizer_config.json fields
  (bos/eos/pad/unk tokens, chat template, model_max_length).
- Byte-level BPE as in GPT-2: ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), no normalizer, the
  256 byte symbols always in the vocab, so every Unicode string encodes and decodes back exactly.
- Reserved specials at ids 0..7: `<|endoftext|>` (eos, and bos for base models, the document separator),
  `<|pad|>`, `<|im_start|>`, `<|im_end|>`, `<|reserved_0..3|>`. `<|endoftext|>` separators inside the
  training text are cut out before counting, so no merge ever learns a piece of a special token.
- Chat format: ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n`), optional system message; eos stays
  `<|endoftext|>` and `stop_ids` adds the end-of-turn token (`<|im_end|>`, or `<|eot_id|>` /
  `<end_of_turn>` in imported Llama-3 / Gemma tokenizers). Assistant replies sit in `{% generation %}`
  blocks, so transformers' `return_assistant_tokens_mask` (and TRL's assistant-only loss) work on ours.
- Templates render exactly as transformers renders them: jinja2 `ImmutableSandboxedEnvironment(trim_blocks,
  lstrip_blocks)`, `raise_exception`, a non-escaping `tojson`, `strftime_now`, the special tokens as
  variables, then the text is encoded without adding special tokens.
- Char level (`train_char`, tiny Shakespeare): a BPE model with no merges whose vocab is the specials, the
  characters seen, and the 256 `<0xNN>` byte tokens as fallback, so a character never seen in training still
  round-trips exactly (as UTF-8 bytes) instead of collapsing to `<unk>`. The byte rows cost 256 embeddings.
- `save` writes tokenizer.json + tokenizer_config.json (`PreTrainedTokenizerFast`, chat template inline)
  that `transformers.AutoTokenizer` (v4 and v5) loads to identical ids; `load` also reads v5's
  chat_template.jinja, special_tokens_map.json, `AddedToken` dicts and `added_tokens_decoder`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from tristage.flags.tokenizer import TrainConfig
from tristage.io import DataError, UserError, atomic_write_text, read_jsonl, read_lines, write_json

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT, "<|pad|>", "<|im_start|>", "<|im_end|>", *(f"<|reserved_{i}|>" for i in range(4)))
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
NO_MAX_LENGTH = int(1e30)  # what transformers writes when a tokenizer has no length limit

CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}\n"
    "{%- if message['role'] == 'assistant' %}\n"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}\n"
    "{{- '\\n' }}\n"
    "{%- else %}\n"
    "{{- message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant mask; render as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _content(tok: Any) -> str | None:
    """A token field as a string: tokenizer configs write either "<s>" or {"content": "<s>", ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    """A tokenizer folder's JSON file ({} when absent); a damaged one is a DataError naming it."""
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(path, None, f"unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(path, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(eq=False)
class Tokenizer:
    tok: tokenizers.Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | dict[str, str] | None = None  # a dict maps names ("default", "tool_use") to templates
    model_max_length: int = NO_MAX_LENGTH

    # ---- loading and saving -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder, or a tokenizer.json (its folder's config files are read too)."""
        path = Path(path)
        folder, tok_file = (path.parent, path) if path.is_file() else (path, path / "tokenizer.json")
        if not tok_file.exists():
            raise FileNotFoundError(f"{tok_file}: no tokenizer.json (only the fast tokenizer format is supported)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library's own error type: truncated JSON, an unknown model, ...
            raise DataError(tok_file, None, f"not a readable tokenizer ({e})") from None
        cfg = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        for entry in cfg.get("added_tokens_decoder", {}).values():  # tokens the config knows but tokenizer.json lacks
            if tok.token_to_id(entry["content"]) is None:
                added = AddedToken(entry["content"], **{k: entry[k] for k in
                                   ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry})
                (tok.add_special_tokens if entry.get("special") else tok.add_tokens)([added])
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").exists():  # transformers v5 saves the template beside the config
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").exists():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        max_len = cfg.get("model_max_length")
        return cls(tok, bos_token=_content(cfg.get("bos_token")), eos_token=_content(cfg.get("eos_token")),
                   pad_token=_content(cfg.get("pad_token")), unk_token=_content(cfg.get("unk_token")),
                   chat_template=template, model_max_length=int(max_len) if max_len else NO_MAX_LENGTH)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable by `transformers.AutoTokenizer`."""
        folder = Path(folder)
        atomic_write_text(folder / "tokenizer.json", self.tok.to_str(pretty=True))
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "pad_token": self.pad_token, "unk_token": self.unk_token}
        template: Any = self.chat_template
        if isinstance(template, dict):
            template = [{"name": k, "template": v} for k, v in template.items()]
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{k: v for k, v in named.items() if v is not None},
            "additional_special_tokens": [t for t in self.special_tokens if t not in named.values()],
            "chat_template": template,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                              "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                                     for i, t in sorted(self.tok.get_added_tokens_decoder().items())},
        }
        write_json(folder / "tokenizer_config.json", {k: v for k, v in cfg.items() if v is not None})
        if (folder / "chat_template.jinja").exists() and isinstance(self.chat_template, str):
            atomic_write_text(folder / "chat_template.jinja", self.chat_template)  # v5 prefers it: keep it in sync

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets: faster (>= 0.21)
        return [e.ids for e in fast(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.tok.id_to_token(id)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def special_tokens(self) -> list[str]:
        """The added tokens marked special, by id."""
        return [t.content for _, t in sorted(self.tok.get_added_tokens_decoder().items()) if t.special]

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn: eos and the chat format's end-of-turn token, where present."""
        ids = [self.eos_id] + [self.token_to_id(t) for t in END_OF_TURN]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---- chat -----------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            tools: list[dict] | None = None, chat_template: str | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render `messages` with the stored jinja2 template as transformers does; ids, or the text if not tokenize.

        `tools` are JSON schemas (dicts); extra kwargs become template variables (e.g. `enable_thinking`).
        """
        template = chat_template or self.chat_template
        if isinstance(template, dict):
            template = template.get("tool_use") if tools and "tool_use" in template else template.get("default")
        if not template:
            raise ValueError("this tokenizer has no chat template")
        chat = []
        for m in messages:  # as transformers: drop None values, alias reasoning under the name templates read
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}
        variables = {**{k: v for k, v in names.items() if v is not None}, "documents": None, **kwargs}
        text = _compile(template).render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **variables)
        return self.encode(text) if tokenize else text


# ---- training -------------------------------------------------------------------------------------------------
def is_jsonl(path: str) -> bool:
    """Whether a training file is JSONL (.jsonl or .json, .gz too), read as `tristage prepare` reads it."""
    return path.lower().removesuffix(".gz").endswith((".jsonl", ".json"))


def _pieces(files: list[str], specials: Sequence[str], chunk_chars: int = 1 << 20,
            text_field: str = "text") -> Iterator[str]:
    """The files' text in ~1 MB chunks (split at line ends), with special tokens cut out so no merge spans them. A
    JSONL file gives the `text_field` string of each record, one piece per record (its documents, as `tristage
    prepare` reads them: training on the raw JSON would learn its quotes and escapes). Reading errors are
    DataErrors naming the file (and line)."""
    cut = re.compile("|".join(map(re.escape, specials)) or "(?!)")  # (?!) never matches
    for f in files:
        if is_jsonl(f):
            for line, obj in read_jsonl(f):
                text = obj.get(text_field)
                if not isinstance(text, str):
                    raise DataError(f, line, "missing" if text_field not in obj else
                                    f"expected a string, got {type(text).__name__}", text_field)
                yield from (p for p in cut.split(text) if p)
            continue
        buf: list[str] = []
        size = 0
        for _, line in read_lines(f):
            buf.append(line)
            size += len(line)
            if size >= chunk_chars:
                yield from (p for p in cut.split("".join(buf)) if p)
                buf, size = [], 0
        yield from (p for p in cut.split("".join(buf)) if p)


def _wrap(tok: tokenizers.Tokenizer) -> Tokenizer:
    return Tokenizer(tok, bos_token=EOT, eos_token=EOT, pad_token="<|pad|>", chat_template=CHATML_TEMPLATE)


def train_bpe(files: list[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              min_frequency: int = 2, text_field: str = "text") -> Tokenizer:
    """Train a byte-level BPE on text files (.txt or .gz; JSONL: each record's `text_field`); `special_tokens` take
    ids 0.. in order."""
    if vocab_size < 256 + len(special_tokens):
        raise UserError(f"vocab_size {vocab_size} (--vocab-size) < 256 bytes + {len(special_tokens)} special tokens")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=True,
                                  special_tokens=[AddedToken(s, special=True, normalized=False)
                                                  for s in special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_pieces(files, special_tokens, text_field=text_field), trainer)
    return _wrap(tok)


def train_char(files: list[str], special_tokens: Sequence[str] = SPECIAL_TOKENS, text_field: str = "text") -> Tokenizer:
    """A character-level tokenizer: specials, then every character seen (sorted), then 256 byte-fallback tokens."""
    chars: set[str] = set()
    for piece in _pieces(files, special_tokens, text_field=text_field):
        chars.update(piece)
    vocab = {s: i for i, s in enumerate(special_tokens)}
    for token in sorted(chars) + [f"<0x{b:02X}>" for b in range(256)]:
        vocab.setdefault(token, len(vocab))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return _wrap(tok)


def train_main(cfg: TrainConfig) -> int:
    if not cfg.files:
        raise SystemExit("tristage tokenizer: give the text files to train on with --files a.txt b.txt.gz")
    for f in cfg.files:  # each file is readable and holds some text besides whitespace, before training (a file
        # with text is read only up to its first chunk; a blank one to its end)
        if all(p.isspace() for p in _pieces([f], SPECIAL_TOKENS, text_field=cfg.text_field)):
            raise DataError(f, None, "no text to train on (the file is empty or holds only whitespace)")
    tok = (train_bpe(cfg.files, cfg.vocab_size, text_field=cfg.text_field) if cfg.kind == "bpe"
           else train_char(cfg.files, text_field=cfg.text_field))
    tok.save(cfg.out)
    sample, n = [], 0  # measure compression on (up to) the first 16M characters of the training text
    for piece in _pieces(cfg.files, [], text_field=cfg.text_field):
        sample.append(piece)
        n += len(piece)
        if n >= 1 << 24:
            break
    n_tokens = sum(map(len, tok.encode_batch(sample)))
    print(f"vocab size {tok.vocab_size}; {n / max(n_tokens, 1):.2f} chars/token on {n:,} training characters; "
          f"saved to {cfg.out}")
    return 0
