"""Pre-training data: shards round-trip every input format, located errors, a deterministic split, and a loader
whose rank sharding and resumption are exact."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import torch

from tristage.config import parse
from tristage.data.pretrain import (
    PrepareConfig,
    TokenLoader,
    check_tokenizer,
    expand_inputs,
    load_meta,
    prepare,
    prepare_main,
    token_dtype,
)
from tristage.io import DataError, UserError

tokenizer_mod = pytest.importorskip("tristage.tokenizer", reason="tristage.tokenizer (train_bpe) is not importable")
EOT = "<|endoftext|>"
WORDS = "the dog sat on a patio while cat ran to market with bread and milk über café 北京 🙂 1984 don't".split()


def _doc(rng: random.Random, lines: int) -> str:
    return "".join(" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) + rng.choice([".\n", "!\n", "\n\n"])
                   for _ in range(lines))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text(_doc(random.Random(0), 400), encoding="utf-8")
    tokenizer_mod.train_bpe([str(corpus)], vocab_size=400).save(d)
    return str(d)


def _decode_split(out, split) -> list[str]:
    """The split's documents, decoded from its shards and cut at eos."""
    meta = load_meta(out)
    tok = tokenizer_mod.Tokenizer.load(out / "tokenizer")
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"])
                          for s in meta["splits"][split]["shards"]] or [np.array([], int)])
    docs, start = [], 0
    for end in np.flatnonzero(ids == meta["eos_id"]):
        docs.append(tok.decode(ids[start:end].tolist()))
        start = end + 1
    assert start == len(ids), "the stream must end with eos"
    return docs


def _cfg(tmp_path, tok_dir, inputs, **kw) -> PrepareConfig:
    return PrepareConfig(inputs=[str(i) for i in inputs], tokenizer=tok_dir, out=str(tmp_path / "out"), **kw)


def test_roundtrip_text_jsonl_gz(tmp_path, tok_dir):
    rng = random.Random(1)
    docs = [_doc(rng, rng.randint(1, 6)) for _ in range(12)] + ["  leading spaces, no final newline"]
    docs[3] = "one document: the whole file, verbatim\n\n" + EOT + " inline is just eos\n"
    # a line that is exactly the separator ends a document; its own line break is not document text
    (tmp_path / "a.txt").write_text("".join(f"{d}{EOT}\n" for d in docs[:3]) + EOT + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as fh:  # no separator line: one document
        fh.write(docs[3])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in
                                              enumerate(docs[4:9])) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"body": d}) + "\n" for d in docs[9:])
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": ""}) + "\n", encoding="utf-8")  # empty: skipped, counted
    cfg = _cfg(tmp_path, tok_dir, [tmp_path / "a.txt", tmp_path / "*.txt.gz"], val_fraction=0.0, shard_tokens=97)
    meta = prepare(cfg, progress=False)
    inline = docs[3].split(EOT)  # a literal separator inside a text encodes as eos too
    assert _decode_split(tmp_path / "out", "train") == docs[:3] + inline
    assert meta["empty_docs_skipped"] == 2  # the empty documents around a.txt's last separator line
    cfg2 = _cfg(tmp_path, tok_dir, [tmp_path / "c.jsonl", tmp_path / "d.jsonl.gz", tmp_path / "e.jsonl"],
                val_fraction=0.0, text_field="body")
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'body': missing"):
        prepare(cfg2, progress=False)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[4:9]), encoding="utf-8")
    meta = prepare(cfg2, progress=False)
    assert _decode_split(tmp_path / "out", "train") == docs[4:]
    train = meta["splits"]["train"]
    assert meta["empty_docs_skipped"] == 1 and train["docs"] == len(docs) - 4
    assert train["bytes"] == sum(len(d.encode()) for d in docs[4:])
    assert train["tokens"] == sum(s["tokens"] for s in train["shards"]) and meta["dtype"] == "uint16"
    assert meta["splits"]["val"]["tokens"] == 0 and (tmp_path / "out/tokenizer/tokenizer.json").exists()


def test_parquet_roundtrip(tmp_path, tok_dir):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    import pyarrow.parquet as pq

    docs = [_doc(random.Random(i), 3) for i in range(20)]
    pq.write_table(pa.table({"text": docs, "n": list(range(20))}), tmp_path / "a.parquet", row_group_size=7)
    prepare(_cfg(tmp_path, tok_dir, [tmp_path / "*.parquet"], val_fraction=0.0), progress=False)
    assert _decode_split(tmp_path / "out", "train") == docs
    with pytest.raises(DataError, match=r"a\.parquet: field 'body': no such column"):
        prepare(_cfg(tmp_path, tok_dir, [tmp_path / "a.parquet"], text_field="body"), progress=False)
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: field 'text': row 2: expected a string, got NoneType"):
        prepare(_cfg(tmp_path, tok_dir, [tmp_path / "a.parquet"]), progress=False)


@pytest.mark.parametrize("line2, reason", [('{"id": 2}', r"field 'text': missing"),
                                           ('{"text": 7}', r"field 'text': expected a string, got int"),
                                           ('{"text": "a"', r"invalid JSON")])
def test_malformed_jsonl_names_file_and_line(tmp_path, tok_dir, line2, reason):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line2 + "\n", encoding="utf-8")
    cfg = _cfg(tmp_path, tok_dir, [tmp_path / "bad.jsonl"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: " + reason):
        prepare(cfg, progress=False)
    with pytest.raises(SystemExit, match=r"tristage prepare: .*bad\.jsonl:2:"):
        prepare_main(cfg)


def test_empty_glob_names_the_pattern(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"'.*/nothing/\*\.txt': no files match"):
        expand_inputs([str(tmp_path / "a.txt"), str(tmp_path / "nothing/*.txt")])
    with pytest.raises(SystemExit, match="no files match"):
        prepare_main(_cfg(tmp_path, tok_dir, [tmp_path / "*.jsonl"]))


def test_split_is_deterministic_and_by_document(tmp_path, tok_dir):
    docs = [f"document {i}: " + _doc(random.Random(i), 2) for i in range(300)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    splits = []
    for run in range(2):
        cfg = _cfg(tmp_path, tok_dir, [tmp_path / "c.jsonl"], val_fraction=0.1)
        cfg.out = str(tmp_path / f"out{run}")
        prepare(cfg, progress=False)
        splits.append((_decode_split(tmp_path / f"out{run}", "train"), _decode_split(tmp_path / f"out{run}", "val")))
    (train, val), again = splits
    assert again == (train, val)  # same input, same split, same order
    assert 10 <= len(val) <= 50 and sorted(train + val) == sorted(docs)
    assert [d for d in docs if d in set(val)] == val  # whole documents, in input order
    cfg = _cfg(tmp_path, tok_dir, [tmp_path / "c.jsonl"], val_docs=7)
    prepare(cfg, progress=False)
    val7 = _decode_split(tmp_path / "out", "val")
    assert len(val7) == 7 and set(val7) <= set(val)  # the 7 lowest hashes are among those below 0.1
    assert sorted(val7 + _decode_split(tmp_path / "out", "train")) == sorted(docs)
    cfg = _cfg(tmp_path, tok_dir, [tmp_path / "c.jsonl"], val_fraction=0.1, seed=1)
    prepare(cfg, progress=False)
    assert _decode_split(tmp_path / "out", "val") != val  # the seed salts the hash


def test_tail_split_and_long_documents_encode_exactly(tmp_path, tok_dir):
    text = _doc(random.Random(5), 12000)  # ~300 KB: encoded in pieces
    assert len(text) > 4 * (1 << 16)
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    meta = prepare(_cfg(tmp_path, tok_dir, [tmp_path / "long.txt"], split="tail", val_fraction=0.1), progress=False)
    cut = int(len(text) * 0.9)  # nanoGPT's shakespeare_char split
    assert _decode_split(tmp_path / "out", "train") == [text[:cut]]
    assert _decode_split(tmp_path / "out", "val") == [text[cut:]]
    tok = tokenizer_mod.Tokenizer.load(tok_dir)
    ids = np.fromfile(tmp_path / "out/train/000000.bin", dtype=np.uint16)
    assert meta["split_piecewise_encoding"] and ids[:-1].tolist() == tok.encode(text[:cut])  # pieces == whole


def test_token_dtype_by_vocab_size(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    assert token_dtype(4096) is np.uint16 and token_dtype(1 << 16) is np.uint16
    assert token_dtype((1 << 16) + 1) is np.uint32 and token_dtype(151_936) is np.uint32
    vocab = {EOT: 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer_mod.Tokenizer(rust, eos_token=EOT).save(tmp_path / "big")
    (tmp_path / "a.txt").write_text("w1 w65535 w65536 w69999\n", encoding="utf-8")
    meta = prepare(_cfg(tmp_path, str(tmp_path / "big"), [tmp_path / "a.txt"], val_fraction=0), progress=False)
    assert meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "out/train/000000.bin", np.uint32).tolist() == [3, 65537, 65538, 70001, 0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("shards")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": _doc(random.Random(i), 4)}) + "\n" for i in range(60)),
                               encoding="utf-8")
    prepare(PrepareConfig(inputs=[str(d / "c.jsonl")], tokenizer=tok_dir, out=str(d / "out"), val_fraction=0.2,
                          shard_tokens=500), progress=False)
    return d / "out"


def _stream(out, split="train"):
    meta = load_meta(out)
    return np.concatenate([np.fromfile(out / s["file"], meta["dtype"]) for s in meta["splits"][split]["shards"]])


def test_sequential_loader_walks_the_stream_across_shards(shards):
    stream = torch.from_numpy(_stream(shards).astype(np.int64))
    assert len(load_meta(shards)["splits"]["train"]["shards"]) > 2
    loader = TokenLoader(shards, "train", batch_size=3, seq_len=16, mode="sequential")
    for step in range(loader.per_epoch + 2):  # past the end: wraps to the start
        x, y = next(loader)
        assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
        base = (step % loader.per_epoch) * 48
        rows = torch.stack([stream[base + 16 * r: base + 16 * r + 17] for r in range(3)])
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    assert loader.epoch == 1


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_two_ranks_equal_one_process_with_the_global_batch(shards, mode):
    single = TokenLoader(shards, "train", batch_size=8, seq_len=12, mode=mode, seed=3)
    ranks = [TokenLoader(shards, "train", batch_size=4, seq_len=12, rank=r, world_size=2, mode=mode, seed=3)
             for r in range(2)]
    for _ in range(30):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_resume_reads_the_same_next_batches(shards, mode):
    a = TokenLoader(shards, "train", batch_size=4, seq_len=8, mode=mode, seed=7)
    for _ in range(13):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    expected = [next(a) for _ in range(40)]
    b = TokenLoader(shards, "train", batch_size=4, seq_len=8, mode=mode, seed=7)
    next(b)
    b.load_state_dict(state)
    for want, got in zip(expected, (next(b) for _ in range(40))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # the same global batch on two ranks resumes from a single-process state
    r1 = TokenLoader(shards, "train", batch_size=2, seq_len=8, rank=1, world_size=2, mode=mode, seed=7)
    r1.load_state_dict(state)
    assert torch.equal(next(r1)[0], expected[0][0][2:])
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(shards, "train", batch_size=4, seq_len=9, mode=mode, seed=7).load_state_dict(state)


def test_random_loader_and_val_batches(shards):
    stream = _stream(shards, "val")
    loader = TokenLoader(shards, "val", batch_size=4, seq_len=8, mode="random", seed=1)
    fixed = loader.val_batches(3)
    for _ in range(5):
        next(loader)
    again = loader.val_batches(3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fixed, again))
    x, y = fixed[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:  # every row is a window of the val stream
        hits = np.flatnonzero(stream[:-8] == int(row[0]))
        assert any(np.array_equal(stream[h:h + 8], row.numpy()) for h in hits)
    assert loader.bytes_per_token == load_meta(shards)["splits"]["val"]["bytes_per_token"] > 1
    assert not torch.equal(fixed[0][0], TokenLoader(shards, "val", 4, 8, seed=2).val_batches(1)[0][0])
    with pytest.raises(ValueError, match="need at least"):
        TokenLoader(shards, "val", batch_size=10_000, seq_len=8, mode="sequential")


def test_cli_flags_parse():
    cfg = parse(PrepareConfig, ["--inputs", "data/*.txt", "more/*.jsonl.gz", "--tokenizer", "tok", "--out", "s",
                                "--val-docs", "5", "--shard-tokens", "100_000_000", "--split", "tail"])
    assert cfg.inputs == ["data/*.txt", "more/*.jsonl.gz"] and cfg.shard_tokens == 100_000_000
    assert (cfg.val_docs, cfg.split, cfg.doc_separator, cfg.workers) == (5, "tail", EOT, 2)


# ----------------------------------------------------------------------------- bad inputs: one located error each
def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


BAD_FILES = [  # name, bytes, message (after the file's name)
    ("empty.txt", b"", r"empty\.txt: no text \(the file is empty\)"),
    ("empty.jsonl", b"\n \n", r"empty\.jsonl: no records \(the file is empty\)"),
    ("latin1.txt", "ok\ncafé\n".encode("latin-1"), r"latin1\.txt:2: not UTF-8 text \(byte 0xe9"),
    ("latin1.jsonl", b'{"text": "ok"}\n' + '{"text": "café"}\n'.encode("latin-1"), r"latin1\.jsonl:2: not UTF-8"),
    ("trunc.txt.gz", _gz(b"some text\n" * 2000)[:-30], r"trunc\.txt\.gz: not a valid gzip file, or a truncated"),
    ("notgz.jsonl.gz", b'{"text": "plain"}\n', r"notgz\.jsonl\.gz: not a valid gzip file"),
    ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", r"deep\.jsonl:1: invalid JSON \(nested too deeply\)"),
    ("surrogate.jsonl", b'{"text": "a\\ud800b"}\n', r"surrogate\.jsonl:1: invalid JSON \(a lone surrogate"),
    ("bigint.jsonl", b'{"text": ' + b"1" * 5000 + b"}\n", r"bigint\.jsonl:1: invalid JSON \(Exceeds the limit"),
]


@pytest.mark.parametrize("name, data, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_files_are_located_errors(tmp_path, tok_dir, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=message):
        prepare(_cfg(tmp_path, tok_dir, [tmp_path / name]), progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bom_is_accepted_and_folders_and_empty_corpora_refused(tmp_path, tok_dir):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello there\n".encode())
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"text": "hello there"}\n')
    for name in ("bom.txt", "bom.jsonl"):
        out = tmp_path / name.replace(".", "_")
        prepare(PrepareConfig(inputs=[str(tmp_path / name)], tokenizer=tok_dir, out=str(out)), progress=False)
        assert _decode_split(out, "train") == ["hello there\n" if name.endswith("txt") else "hello there"]
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match=r"'.*sub': is a folder"):
        expand_inputs([str(tmp_path / "sub")])
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n', encoding="utf-8")  # read, but no text: 0 tokens
    with pytest.raises(ValueError, match=r"no training text: 1 documents read, 0 not empty"):
        prepare(_cfg(tmp_path, tok_dir, [tmp_path / "blank.jsonl"]), progress=False)
    with pytest.raises(SystemExit, match=r"tristage prepare: --inputs: no training text"):
        prepare_main(_cfg(tmp_path, tok_dir, [tmp_path / "blank.jsonl"]))
    assert not (tmp_path / "out" / "meta.json").exists()


def test_inputs_of_whitespace_only_are_refused_and_whitespace_documents_kept(tmp_path, tok_dir):
    (tmp_path / "blank.txt").write_text("\n   \n\t\n", encoding="utf-8")  # a plain-text file: named
    (tmp_path / "seps.txt").write_text(f"\n{EOT}\n  \n{EOT}\n", encoding="utf-8")
    for name in ("blank.txt", "seps.txt"):
        with pytest.raises(DataError, match=rf"{name}: no text \(only whitespace\)"):
            prepare(_cfg(tmp_path, tok_dir, [tmp_path / name]), progress=False)
    (tmp_path / "ws.jsonl").write_text('{"text": "  "}\n{"text": "\\n"}\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"no training text: 3 documents read, 2 not empty, none with more than "
                                        r"whitespace"):
        prepare(_cfg(tmp_path, tok_dir, [tmp_path / "ws.jsonl"]), progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()
    # a document of whitespace beside real text is kept, as before (the demo's shards depend on it)
    (tmp_path / "mixed.txt").write_text(f"hello there\n{EOT}\n  \n{EOT}\nthe dog\n", encoding="utf-8")
    meta = prepare(_cfg(tmp_path, tok_dir, [tmp_path / "mixed.txt"], val_fraction=0.0), progress=False)
    assert meta["docs_read"] == 3 and meta["splits"]["train"]["docs"] == 3
    assert _decode_split(tmp_path / "out", "train") == ["hello there\n", "  \n", "the dog\n"]


def test_shards_and_their_tokenizer_are_checked(tmp_path, tok_dir):
    (tmp_path / "c.txt").write_text(_doc(random.Random(3), 300), encoding="utf-8")
    out = tmp_path / "out"
    prepare(_cfg(tmp_path, tok_dir, [tmp_path / "c.txt"]), progress=False)
    for where in (out / "tokenizer", tok_dir):  # the shards' copy and the original are the same tokenizer
        check_tokenizer(out, tokenizer_mod.Tokenizer.load(where), where)
    n = load_meta(out)["vocab_size"]
    other = tokenizer_mod.train_char([str(tmp_path / "c.txt")])
    with pytest.raises(UserError, match=rf"has {other.vocab_size} tokens, but the shards in .* of {n}: use theirs"):
        check_tokenizer(out, other, "x")
    spec = json.loads(tokenizer_mod.Tokenizer.load(tok_dir).tok.to_str())  # two tokens' ids swapped: same size
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    same_size = tokenizer_mod.Tokenizer(tokenizer_mod.tokenizers.Tokenizer.from_str(json.dumps(spec)))
    assert same_size.vocab_size == n
    with pytest.raises(ValueError, match=r"is not the one the shards .* were made with \(same size, other tokens\)"):
        check_tokenizer(out, same_size, "y")
    shard = out / load_meta(out)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])  # cut short by one uint16 token
    with pytest.raises(DataError, match=r"000000\.bin: .* bytes, but meta.json says .* tokens"):
        TokenLoader(out, "train", batch_size=1, seq_len=8)
    (out / "meta.json").write_text('{"format": "tristage-tok')  # truncated
    with pytest.raises(DataError, match=r"meta\.json: unreadable"):
        load_meta(out)
