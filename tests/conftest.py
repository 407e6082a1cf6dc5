"""Shared fixtures: a tiny corpus, its tokenizer and token shards, built once per test session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(rel: str) -> Path:
    """A file under ../shared/data, or skip the test when it is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A char-level tokenizer and token shards over ~60 KB of generated sentences."""
    from tristage.data.pretrain import PrepareConfig, prepare
    from tristage.tokenizer import train_char

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    animals, places = ["dog", "cat", "bird", "fish"], ["mat", "porch", "patio", "pond"]
    docs = [" ".join(f"the {rng.choice(animals)} sat on the {rng.choice(places)}." for _ in range(rng.randint(3, 9)))
            for _ in range(400)]
    (root / "c.txt").write_text("\n<|endoftext|>\n".join(docs))
    tok = train_char([str(root / "c.txt")])
    tok.save(root / "tok")
    prepare(PrepareConfig(inputs=[str(root / "c.txt")], tokenizer=str(root / "tok"), out=str(root / "shards"),
                          val_fraction=0.1), progress=False)
    return root / "shards"


SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "owl": "hoot"}


def animal_pairs(n: int, seed: int, ratings: bool = False) -> list[dict]:
    """Preference pairs: the true animal sound is chosen, another animal's is rejected."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.choice(list(SOUNDS))
        wrong = rng.choice([s for k, s in SOUNDS.items() if k != a])
        row = {"prompt": f"what does the {a} say?", "chosen": f"the {a} says {SOUNDS[a]}.",
               "rejected": f"the {a} says {wrong}."}
        if ratings:
            fluency = 5 if a in ("dog", "cat") else 4  # learnable from the text, unrelated to the preference
            row["ratings"] = {"chosen": {"truth": 5, "fluency": fluency}, "rejected": {"truth": 1, "fluency": fluency}}
        rows.append(row)
    return rows


def tiny_config(tok, **overrides):
    """The tests' tiny model shape (hidden 32, 2 layers, 2 heads) for tokenizer `tok`."""
    from tristage.model.gpt import ModelConfig

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128)
    return ModelConfig(vocab_size=tok.vocab_size, **{**shape, **overrides})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_world(tiny_shards: Path, root: Path, **splits: tuple[int, int] | tuple[int, int, bool]) -> Path:
    """root/base (a tiny random model with the shards' tokenizer) and root/<split>.jsonl of animal_pairs(*args)."""
    from tristage.model.gpt import build_model
    from tristage.model.hf import save_model
    from tristage.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(build_model(tiny_config(tok), seed=0), root / "base", tok)
    for name, args in splits.items():
        write_jsonl(root / f"{name}.jsonl", animal_pairs(*args))
    return root
