"""Pre-training data: `tristage prepare` tokenizes corpora into memory-mapped token shards; `TokenLoader` streams them.

`tristage prepare --inputs 'data/*.txt' 'more/*.jsonl.gz' --tokenizer TOKDIR --out SHARDDIR [--val-fraction 0.005]`

Choices:
- Inputs by suffix (after an optional .gz): .jsonl/.json hold one JSON object per line with the text in --text-field;
  .parquet the --text-field column (needs pyarrow); anything else is plain text. A plain-text file is one document
  unless it holds lines that are exactly --doc-separator, which then cut it into documents, verbatim (line breaks
  kept). Empty documents are skipped and counted; a bad record raises DataError with its file, line (parquet: row)
  and field. Nothing else is dropped (a document of whitespace is kept as it is). An input file that is empty, a
  folder, not UTF-8, a damaged gzip or parquet, or a plain-text file of blank lines only is a DataError naming it
  (`tristage.io.read_lines`, `read_documents`), and inputs with no training text at all (no document with more
  than whitespace) are an error (no meta.json is written), not an empty dataset.
- Every document is followed by the tokenizer's eos (`<|endoftext|>`), as GPT-2 and nanoGPT's openwebtext do: the
  split becomes one token stream the loader may cut anywhere, and the model sees the boundaries. A literal
  "<|endoftext|>" inside a text also encodes as eos.
- Shards are raw arrays (`train/000000.bin`, ...; np.uint16 when every id fits, else uint32), memmappable without a
  header like nanoGPT's train.bin; meta.json beside them holds dtype, vocab size, tokenizer hash, tokens per shard,
  docs, UTF-8 bytes and bytes/token per split (bits per byte = loss in nats / ln 2 / bytes_per_token; the eos tokens
  count as tokens with no bytes). meta.json is written last: no meta.json, no finished dataset. The tokenizer is
  copied to SHARDDIR/tokenizer so the folder is self-contained. `check_tokenizer` refuses another tokenizer for the
  shards (another size, or another tokenizer.json hash), and the loader refuses shards whose sizes differ from
  meta.json's counts (a copy cut short), so the wrong ids never train silently.
- The split is by document and deterministic: `hash` puts a document in val when blake2b(seed, text) falls below
  --val-fraction (same input, same split; exact duplicates land on the same side); --val-docs N instead keeps the N
  documents with the lowest hashes (held in memory). `tail` sends the last --val-fraction of every document's
  characters to val: nanoGPT's shakespeare_char split (`data[int(n * 0.9):]`) for a corpus that is one long text.
- Speed: the Rust tokenizer's encode_batch encodes chunks of ~4M characters on --workers threads (it releases the
  GIL) while the main thread reads the next chunk. Long documents are cut into ~64 KB pieces at a newline between
  two non-space characters, where GPT-2 / Llama-3 style pre-tokenizers always end a token, so the ids equal those of
  encoding the whole; a probe checks this per tokenizer and falls back to whole documents where it does not hold.
- Loader: a global batch has world_size x batch_size rows and rank r takes rows r*B:(r+1)*B, so DDP on W ranks with
  batch B reads exactly what one process with batch W*B reads, row for row. `sequential` walks the split in
  consecutive windows of seq_len (y is x shifted by one token), dropping the tail that cannot fill a global batch at
  the end of each epoch; `random` draws window starts uniformly as nanoGPT's get_batch does, from a generator seeded
  by (seed, step). Either way batch k is a pure function of k, so the position is a step counter: state_dict() is a
  small JSON-able dict, and a resumed run (even on another world size with the same global batch) reads the same
  batches.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from tristage.config import to_dict
from tristage.flags.prepare import PrepareConfig
from tristage.io import DataError, UserError, read_jsonl, read_lines, write_json
from tristage.tokenizer import EOT, Tokenizer

CHUNK_CHARS = 1 << 22  # characters per encode_batch call
PIECE_CHARS = 1 << 16  # documents longer than 2x this are encoded in pieces
_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_PROBE = "First Citizen:\nBefore we proceed, hear me.\n\nAll:\n  Speak, speak.\n'Tis 42 €\n日本語 text\nend.\n"


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id (0..vocab_size-1) fits, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files matching each glob, sorted per pattern, in pattern order; a pattern matching nothing is an error."""
    files: list[str] = []
    for pat in patterns:
        if os.path.isdir(os.path.expanduser(pat)):
            raise UserError(f"--inputs {pat!r}: is a folder; give its files, e.g. '{pat.rstrip('/')}/*.txt'")
        hits = sorted(h for h in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(h))
        if not hits:
            raise FileNotFoundError(f"--inputs {pat!r}: no files match")
        files += hits
    return list(dict.fromkeys(files))


def read_documents(path: str, text_field: str = "text", separator: str = EOT) -> Iterator[str]:
    """The documents of one input file (see the module notes for the formats)."""
    kind = path.lower().removesuffix(".gz").rsplit(".", 1)[-1]
    if kind in ("jsonl", "json"):
        for line, obj in read_jsonl(path):
            text = obj.get(text_field)
            if not isinstance(text, str):
                raise DataError(path, line, "missing" if text_field not in obj else
                                f"expected a string, got {type(text).__name__}", text_field)
            yield text
    elif kind == "parquet":
        try:
            import pyarrow as pa  # optional: only parquet corpora need it
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        row = 0
        try:
            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise DataError(path, None, f"no such column (columns: {', '.join(pf.schema_arrow.names)})",
                                text_field)
            for batch in pf.iter_batches(columns=[text_field], batch_size=8192):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if not isinstance(text, str):
                        raise DataError(path, None, f"row {row}: expected a string, got {type(text).__name__}",
                                        text_field)
                    yield text
        except (OSError, pa.ArrowException) as e:  # truncated, not parquet at all, a bad page
            raise DataError(path, None, f"not a readable parquet file (after row {row}: {e})") from None
        if not row:
            raise DataError(path, None, "no rows (the file is empty)")
    else:
        buf: list[str] = []
        empty = blank = True
        for _, line in read_lines(path):
            empty = False
            if line.rstrip("\r\n") == separator:
                yield "".join(buf)
                buf = []
            else:
                blank = blank and line.isspace()
                buf.append(line)
        if empty:
            raise DataError(path, None, "no text (the file is empty)")
        if blank:
            raise DataError(path, None, "no text (only whitespace)")
        yield "".join(buf)


def _cut(text: str, size: int = PIECE_CHARS) -> list[str]:
    out, start = [], 0
    while len(text) - start > 2 * size and (m := _CUT.search(text, start + size)):
        out.append(text[start:m.end()])
        start = m.end()
    return out + [text[start:]]


def _encode(tok: Tokenizer, texts: list[str], cut: bool) -> list[list[int]]:
    pieces, owner = [], []
    for i, text in enumerate(texts):
        ps = _cut(text) if cut else [text]
        pieces += ps
        owner += [i] * len(ps)
    ids: list[list[int]] = [[] for _ in texts]
    for i, e in zip(owner, tok.encode_batch(pieces)):
        ids[i] += e
    return ids


class _Writer:
    """Appends tokens to SPLIT/000000.bin, 000001.bin, ... of at most `cap` tokens each."""

    def __init__(self, out: Path, split: str, dtype: type, cap: int):
        self.out, self.split, self.dtype, self.cap = out, split, dtype, cap
        self.counts: list[int] = []
        self.fh = None
        self.docs = self.bytes = 0

    def write(self, seqs: list[list[int]]) -> None:
        ids = np.fromiter(itertools.chain.from_iterable(seqs), self.dtype, count=sum(map(len, seqs)))
        while len(ids):
            if self.fh is None or self.counts[-1] == self.cap:
                self.close()
                (self.out / self.split).mkdir(parents=True, exist_ok=True)
                self.fh = open(self.out / self.split / f"{len(self.counts):06d}.bin", "wb")
                self.counts.append(0)
            n = min(len(ids), self.cap - self.counts[-1])
            ids[:n].tofile(self.fh)
            self.counts[-1] += n
            ids = ids[n:]

    def close(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None

    def summary(self) -> dict:
        tokens = sum(self.counts)
        return {"shards": [{"file": f"{self.split}/{i:06d}.bin", "tokens": n} for i, n in enumerate(self.counts)],
                "docs": self.docs, "tokens": tokens, "bytes": self.bytes,
                "bytes_per_token": self.bytes / tokens if tokens else None}


Item = tuple[str | None, str, int, float]  # (split, None = by --val-docs later; text; its UTF-8 bytes; its hash)


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Write the shards and meta.json under cfg.out; returns the meta dict.

    The steps: check the settings and open the tokenizer (`_start`); read the inputs as chunks of documents, each
    assigned to a split (`_Reader`); encode each chunk on a worker thread while the next one is read (`_encode_all`)
    and append every document's tokens to its split's shards (`_Router`); then refuse inputs with no training text,
    or write meta.json last."""
    files, tok, eos, cut = _start(cfg)
    out = Path(cfg.out)
    (out / "meta.json").unlink(missing_ok=True)
    for old in itertools.chain((out / "train").glob("*.bin"), (out / "val").glob("*.bin")):
        old.unlink()
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _Writer(out, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    reader, router = _Reader(cfg, files), _Router(writers, eos, cfg.val_docs)
    _encode_all(reader, router, tok, cut, progress)
    router.finish()
    reader.check_training_text(writers["train"].docs)  # no meta.json: the folder is not a dataset
    tok.save(out / "tokenizer")
    meta = {"format": "tristage-tokens-v1", "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
            "eos_id": eos, "tokenizer": {"source": str(Path(cfg.tokenizer).resolve()), "copy": "tokenizer",
                                         "sha256": hashlib.sha256(tok.tok.to_str().encode()).hexdigest()},
            "inputs": files, "config": to_dict(cfg), **reader.stats(), "split_piecewise_encoding": cut,
            "splits": {s: w.summary() for s, w in writers.items()}}
    write_json(out / "meta.json", meta)
    return meta


def _start(cfg: PrepareConfig) -> tuple[list[str], Tokenizer, int, bool]:
    """Check the settings (a Config built in code skips the CLI's checks), expand the inputs, open the tokenizer:
    (files, tokenizer, eos id, whether long documents may be encoded in pieces, as the probe shows)."""
    if not 0 <= cfg.val_fraction < 1 or cfg.val_docs < 0 or cfg.shard_tokens < 1:
        raise UserError("need 0 <= --val-fraction < 1, --val-docs >= 0 and --shard-tokens >= 1")
    if cfg.split == "tail" and cfg.val_docs:
        raise UserError("--val-docs needs --split hash")
    files = expand_inputs(cfg.inputs)
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(max(cfg.workers, 1)))  # read when the Rust pool first starts
    tok = Tokenizer.load(cfg.tokenizer)
    eos = tok.eos_id if tok.eos_id is not None else tok.token_to_id(cfg.doc_separator)
    if eos is None:
        raise UserError(f"{cfg.tokenizer}: the tokenizer has no eos token and no {cfg.doc_separator!r} token")
    cut = _encode(tok, [_PROBE], False) == [sum(tok.encode_batch(_cut(_PROBE, 1)), [])]
    return files, tok, eos, cut


class _Reader:
    """The input files as chunks of about CHUNK_CHARS characters of documents, each document assigned to a split
    (see the module notes); counts the documents read, the empty ones skipped, and whether any holds real text."""

    def __init__(self, cfg: PrepareConfig, files: list[str]):
        self.cfg, self.files, self.key = cfg, files, str(cfg.seed).encode()
        self.total = sum(os.path.getsize(f) for f in files)  # bytes, for the progress bar
        self.docs_read = self.empty_docs_skipped = 0
        self.blank_only = True  # no document so far holds more than whitespace

    def stats(self) -> dict[str, int]:
        """What meta.json records of the reading."""
        return {"docs_read": self.docs_read, "empty_docs_skipped": self.empty_docs_skipped}

    def chunks(self, advance: Callable[[int, int], None]) -> Iterator[list[Item]]:
        """Lists of items of about CHUNK_CHARS characters; `advance(bytes read, documents read)` follows along."""
        items: list[Item] = []
        size = done = 0
        for path in self.files:
            fsize, read = os.path.getsize(path), 0
            for text in read_documents(path, self.cfg.text_field, self.cfg.doc_separator):
                raw = text.encode("utf-8")
                read += len(raw)
                self.docs_read += 1
                if not text:
                    self.empty_docs_skipped += 1
                    continue
                self.blank_only = self.blank_only and text.isspace()
                items += self._split(text, raw)
                size += len(text)
                if size >= CHUNK_CHARS:
                    advance(done + min(read, fsize), self.docs_read)
                    yield items
                    items, size = [], 0
            done += fsize
            advance(done, self.docs_read)
        if items:
            yield items

    def _split(self, text: str, raw: bytes) -> list[Item]:
        """The items of one document: its head and tail (`tail`), or the whole with its split by hash (`hash`; the
        split is None with --val-docs, which the router decides on the hashes)."""
        cfg = self.cfg
        if cfg.split == "tail":
            at = int(len(text) * (1 - cfg.val_fraction))
            return [(s, t, len(t.encode("utf-8")), 0.0) for s, t in (("train", text[:at]), ("val", text[at:])) if t]
        h = int.from_bytes(hashlib.blake2b(raw, key=self.key, digest_size=8).digest(), "big") / 2.0**64
        return [(None if cfg.val_docs else "val" if h < cfg.val_fraction else "train", text, len(raw), h)]

    def check_training_text(self, train_docs: int) -> None:
        """UserError when the inputs hold no training text: no document in train, or none with more than whitespace."""
        if train_docs and not self.blank_only:
            return
        docs = self.docs_read - self.empty_docs_skipped
        raise UserError(f"--inputs: no training text: {self.docs_read} documents read, {docs} not empty"
                        + (", none with more than whitespace" if docs and self.blank_only else
                           f", all of them in val (--val-docs {self.cfg.val_docs})" if docs and self.cfg.val_docs
                           else ""))


class _Router:
    """Appends each encoded document, followed by eos, to its split's shards. With --val-docs N a heap keeps the N
    documents of lowest hash (an evicted one goes to train) until `finish` writes them to val in input order."""

    def __init__(self, writers: dict[str, _Writer], eos: int, val_docs: int):
        self.writers, self.eos, self.val_docs = writers, eos, val_docs
        self.heap: list[tuple[float, int, list[int], int]] = []  # (-hash, input order, ids, bytes)
        self.order = itertools.count()

    def route(self, items: list[Item], ids: list[list[int]]) -> None:
        batch: dict[str, list[list[int]]] = {"train": [], "val": []}
        for (split, _, nbytes, h), seq in zip(items, ids):
            seq.append(self.eos)
            if split is None:  # --val-docs: keep the N lowest hashes; evicted documents go to train
                entry = (-h, next(self.order), seq, nbytes)
                entry = (heapq.heappushpop(self.heap, entry) if len(self.heap) >= self.val_docs
                         else heapq.heappush(self.heap, entry))
                if entry is None:
                    continue
                split, seq, nbytes = "train", entry[2], entry[3]
            batch[split].append(seq)
            self.writers[split].docs += 1
            self.writers[split].bytes += nbytes
        for s, seqs in batch.items():
            if seqs:
                self.writers[s].write(seqs)

    def finish(self) -> None:
        """Write the documents --val-docs kept, in input order, and close every shard file."""
        val = self.writers["val"]
        for _, _, seq, nbytes in sorted(self.heap, key=lambda e: e[1]):
            val.write([seq])
            val.docs += 1
            val.bytes += nbytes
        for w in self.writers.values():
            w.close()


def _encode_all(reader: _Reader, router: _Router, tok: Tokenizer, cut: bool, progress: bool) -> None:
    """Encode the reader's chunks on a worker thread (the Rust tokenizer releases the GIL) while the main thread
    reads the next chunk, and route each chunk's ids in input order; a progress bar follows the bytes read."""
    columns = [TextColumn("prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("{task.fields[docs]:,} docs"), TimeRemainingColumn()]
    with ThreadPoolExecutor(1) as pool, Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("prepare", total=reader.total, docs=0)
        pending = None
        for items in reader.chunks(lambda done, docs: bar.update(task, completed=done, docs=docs)):
            job = (items, pool.submit(_encode, tok, [t for _, t, _, _ in items], cut))
            if pending:
                router.route(pending[0], pending[1].result())
            pending = job
        if pending:
            router.route(pending[0], pending[1].result())


def prepare_main(cfg: PrepareConfig) -> int:

    t0 = time.perf_counter()
    try:
        meta = prepare(cfg)
    except (UserError, FileNotFoundError) as e:  # a user's mistake (DataError is one); anything else is internal
        raise SystemExit(f"tristage prepare: {e}") from None
    dt = time.perf_counter() - t0
    for name, s in meta["splits"].items():
        bpt = f"{s['bytes_per_token']:.3f}" if s["tokens"] else "-"
        print(f"{name:>5}: {s['docs']:,} docs, {s['tokens']:,} tokens, {s['bytes']:,} bytes, {bpt} bytes/token, "
              f"{len(s['shards'])} shard(s)")
        if not s["tokens"]:
            print(f"warning: the {name} split is empty" + (" (one long document? try --split tail)"
                                                             if cfg.split == "hash" else ""))
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    print(f"{tokens:,} tokens ({meta['dtype']}) in {dt:.1f}s = {tokens / dt:,.0f} tokens/s; "
          f"{meta['empty_docs_skipped']} empty docs skipped; wrote {cfg.out}/meta.json")
    return 0


def load_meta(shard_dir: str | os.PathLike) -> dict:
    """SHARD_DIR/meta.json; a missing, damaged or foreign one is an error naming it."""
    path = Path(shard_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{shard_dir}: no meta.json (not a finished `tristage prepare` output)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(path, None, f"unreadable ({e}): run `tristage prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != "tristage-tokens-v1" or not isinstance(
            meta.get("splits"), dict) or not isinstance(meta.get("vocab_size"), int):
        raise DataError(path, None, "not the meta.json of a `tristage prepare` output (format tristage-tokens-v1)")
    return meta


def check_tokenizer(shard_dir: str | os.PathLike, tokenizer: Tokenizer, where: str | os.PathLike) -> None:
    """UserError unless `tokenizer` (loaded from `where`) is the one the shards were made with: the same vocabulary
    size and tokenizer.json (the sha256 `prepare` recorded). Another tokenizer's ids would train on the wrong
    tokens without any error, or index past the embeddings."""
    meta = load_meta(shard_dir)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise UserError(f"tokenizer {where} has {tokenizer.vocab_size} tokens, but the shards in {shard_dir} were "
                        f"made with one of {meta['vocab_size']}: use theirs ({Path(shard_dir) / 'tokenizer'})")
    sha = (meta.get("tokenizer") or {}).get("sha256")
    if sha and sha != hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest():
        raise UserError(f"tokenizer {where} is not the one the shards in {shard_dir} were made with (same size, "
                        f"other tokens): use theirs ({Path(shard_dir) / 'tokenizer'})")


class TokenLoader:
    """Batches (x, y) of int64 [batch_size, seq_len] from a prepared split; y is x shifted by one token.

    Rank r of world_size gets rows r*B:(r+1)*B of a global batch of world_size*B rows (see the module notes).
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 mode: Literal["sequential", "random"] = "random"):
        if mode not in ("sequential", "random") or not 0 <= rank < world_size or seed < 0:
            raise ValueError(f"bad loader arguments: mode={mode!r} rank={rank} world_size={world_size} seed={seed}")
        self.meta = load_meta(shard_dir)
        if split not in self.meta["splits"]:
            raise DataError(Path(shard_dir) / "meta.json", None, f"no {split!r} split")
        info = self.meta["splits"][split]
        for s in info["shards"]:  # a shard cut short (a full disk, a copy stopped) would be read as fewer tokens
            f, want = Path(shard_dir) / s["file"], s["tokens"] * np.dtype(self.meta["dtype"]).itemsize
            size = f.stat().st_size if f.is_file() else None
            if size != want:
                raise DataError(f, None, f"{'missing' if size is None else f'{size:,} bytes'}, but meta.json says "
                                         f"{s['tokens']:,} tokens ({want:,} bytes): run `tristage prepare` again")
        self.shards = [np.memmap(Path(shard_dir) / s["file"], dtype=self.meta["dtype"], mode="r")
                       for s in info["shards"] if s["tokens"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.offsets[-1])
        self.split, self.B, self.T, self.rank, self.seed, self.mode = split, batch_size, seq_len, rank, seed, mode
        self.rows = world_size * batch_size
        self.bytes_per_token = info["bytes_per_token"]
        self.per_epoch = (self.n_tokens - 1) // (self.rows * seq_len)  # sequential batches per pass
        need = self.rows * seq_len + 1 if mode == "sequential" else seq_len + 1
        if self.n_tokens < need:
            raise UserError(f"{shard_dir}: the {split} split has {self.n_tokens} tokens; {mode} batches of "
                            f"{self.rows} x {seq_len} need at least {need} (more text, a larger --val-fraction when "
                            "preparing, or a shorter --seq-len)")
        self.step = 0

    def _window(self, start: int, n: int) -> np.ndarray:
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts, start = [], start - int(self.offsets[i])
        while n > 0:
            part = self.shards[i][start:start + n]
            parts.append(part)
            n, i, start = n - len(part), i + 1, 0
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of global batch number `step` (a pure function of step)."""
        T = self.T
        if self.mode == "random":
            starts = np.random.default_rng([self.seed, step]).integers(0, self.n_tokens - T, size=self.rows)
        else:
            starts = (step % self.per_epoch) * self.rows * T + T * np.arange(self.rows)
        mine = starts[self.rank * self.B:(self.rank + 1) * self.B]
        buf = torch.from_numpy(np.stack([self._window(int(s), T + 1) for s in mine]).astype(np.int64))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.step += 1
        return self.batch(self.step - 1)

    @property
    def epoch(self) -> float:
        """Passes over the split so far (sequential: whole passes; random: tokens drawn / split size)."""
        if self.mode == "sequential":
            return self.step // self.per_epoch
        return self.step * self.rows * self.T / self.n_tokens

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n batches of this loader's sequence: the same fixed list on every call, whatever the position."""
        return [self.batch(i) for i in range(n)]

    def state_dict(self) -> dict:
        return {"step": self.step, "split": self.split, "mode": self.mode, "seed": self.seed,
                "global_batch": self.rows, "seq_len": self.T, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = [k for k in mine if k != "step" and state.get(k) != mine[k]]
        if diff:
            raise ValueError("loader state does not match this loader: " +
                             ", ".join(f"{k} {state.get(k)!r} != {mine[k]!r}" for k in diff))
        self.step = int(state["step"])
