"""`tristage tokenizer`: train a tokenizer (run by tristage/tokenizer.py:train_main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg


@dataclass
class TrainConfig:
    """Train a tokenizer on text files and write it as a Hugging Face tokenizer folder."""

    files: list[str] = arg([], help="text files to train on (.txt, or .gz compressed); .jsonl: each record's "
                                    "--text-field")
    out: str = arg("tokenizer", help="output folder (tokenizer.json, tokenizer_config.json)")
    vocab_size: int = arg(4096, check=">=1", help="vocabulary size for --kind bpe, special tokens included")
    kind: Literal["bpe", "char"] = arg("bpe", help="bpe: byte-level BPE; char: one token per character")
    text_field: str = arg("text", help="the field holding the text in .jsonl / .json files (as `prepare` reads it)")
