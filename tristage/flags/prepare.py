"""`tristage prepare`: tokenize corpora into token shards (run by tristage/data/pretrain.py:prepare_main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.tokenizer import EOT


@dataclass
class PrepareConfig:
    """Tokenize text / JSONL / parquet corpora into memory-mapped token shards with a train/val split."""

    inputs: list[str] = arg(help="input files or globs (quote them): .txt, .jsonl, .parquet; .gz accepted")
    tokenizer: str = arg(help="tokenizer folder (tokenizer.json)")
    out: str = arg(help="output folder: train/*.bin, val/*.bin, meta.json, tokenizer/")
    text_field: str = arg("text", help="JSONL field / parquet column holding the text")
    split: Literal["hash", "tail"] = arg("hash", help="hash: whole documents by hash; tail: the end of each document")
    val_fraction: float = arg(0.005, check="[0, 1)",
                              help="fraction of documents (hash) or of each document's characters (tail)")
    val_docs: int = arg(0, check=">=0",
                        help="if > 0 (hash split): exactly this many documents in val, overriding --val-fraction")
    seed: int = arg(0, help="salt of the split hash")
    shard_tokens: int = arg(100_000_000, check=">=1", help="tokens per shard file")
    workers: int = arg(2, check=">=1",
                       help="tokenizer threads (takes effect if the tokenizer has not run yet in this process)")
    doc_separator: str = arg(EOT, help="a line exactly equal to this separates documents in plain-text files")
