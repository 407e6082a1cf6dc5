"""The demo: the pipeline on the demo world, on a laptop CPU, with no downloads.

    make demo            # = tristage demo --out runs/demo

What it runs today, each step a real stage writing its own folder under --out:
  1. world      generate the demo world's data (stories, instructions, preference pairs, eval prompts)
  2. tokenizer  train a byte-level BPE tokenizer on the world's pre-training stories
  3. prepare    tokenize the stories into token shards
  4. pretrain   pre-train a small Llama-family model from scratch
  5. sample     continue held-out story openings with the base model; score them with the gold scorer
  6. sft        instruction-tune the base model on the world's conversations
  7. evaluate   base and SFT models answer held-out prompts; gold scores and the share that end their turn
  8. reward     a reward model on the world's preference pairs (from the SFT model); its agreement with the
                gold scorer on held-out pairs, next to the simulated annotator's own
  9. dpo        conservative DPO (the annotator's labels are noisy) of the SFT model on the same pairs; gold
                score, win rate and KL against the SFT model
 10. label      AI feedback: the DPO policy answers training prompts 4 times, the simulated annotator picks,
                and a second DPO round trains on those pairs: does a round on the policy's own samples help?
Steps whose output already exists are skipped, so an interrupted demo continues where it stopped; a step that
runs (its output missing, or --fresh) starts its training run over (`overwrite=True`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tristage.data.pretrain import PrepareConfig, prepare_main, read_documents
from tristage.eval.world import compare_to_reference, evaluate_chat_model, reward_gold_agreement
from tristage.flags.demo import Config
from tristage.io import write_json
from tristage.rollout import load_chat_model
from tristage.serve.engine import Engine, SamplingParams
from tristage.stages import dpo, label, pretrain, reward, sft
from tristage.tokenizer import TrainConfig, train_main
from tristage.world import score
from tristage.world.cli import GenerateConfig, generate_main


def score_base_model(model_dir: Path, val_txt: Path, seed: int, n: int = 64) -> dict:
    """Continue the first words of held-out stories with the base model and score the stories with the
    gold scorer, next to the same stories as written: how much of the world has pre-training learned?"""
    docs = [d for d in read_documents(str(val_txt)) if d.strip()][:n]
    openings = [" ".join(d.split()[:4]) for d in docs]
    base = load_chat_model(model_dir, require_template=False)  # a base model: plain text in, stories out
    tok = base.tokenizer
    outs = Engine(base.model).generate([tok.encode(o) for o in openings],
                                       SamplingParams(max_new_tokens=160, temperature=0.7, top_k=50, seed=seed,
                                                      stop_ids=base.stop_ids))
    made = [o + tok.decode(c.tokens, skip_special_tokens=True) for o, c in zip(openings, outs)]
    ours = [score("", t) for t in made]
    data = [score("", d) for d in docs]

    def mean(xs):
        return sum(xs) / len(xs)

    return {"n": len(docs), "model_overall": mean([s.overall for s in ours]),
            "model_plausibility": mean([s.attributes["plausibility"] for s in ours]),
            "data_overall": mean([s.overall for s in data]),
            "data_plausibility": mean([s.attributes["plausibility"] for s in data]),
            "stopped": mean([c.finish_reason == "stop" for c in outs]), "examples": made[:4]}


def preference_steps(cfg: Config, out: Path, world: Path, chat: Path, prompts: Path) -> dict:
    """Stage 3a on the demo world: reward model, DPO, and one round of AI feedback + DPO."""
    report: dict = {}
    pairs, val_pairs = world / "preference" / "train.jsonl", world / "preference" / "val.jsonl"
    rm = out / "reward"
    if _step("reward", rm / "model" / "tristage.json", cfg.fresh):
        reward.main(reward.Config(model=str(chat / "model"), data=[str(pairs)], val_data=[str(val_pairs)], out=str(rm),
                                  epochs=cfg.rm_epochs, lr=cfg.rm_lr, max_len=cfg.seq_len, seed=cfg.seed,
                                  eval_every=0, save_every=0, overwrite=True))
    r = report["reward"] = reward_gold_agreement(rm / "model", val_pairs)
    print(f"[demo] reward model on {r['n']} held-out pairs: agrees with the gold scorer {r['reward']:.1%} "
          f"(Bradley-Terry output alone {r['reward_bt']:.1%}); the annotator's own labels {r['annotator']:.1%}")

    def dpo_round(name: str, start: Path, data: Path) -> dict:
        run = out / name
        if _step(name, run / "model" / "tristage.json", cfg.fresh):
            dpo.main(dpo.Config(model=str(start), data=[str(data)], val_data=[str(val_pairs)], out=str(run),
                                epochs=cfg.dpo_epochs, lr=cfg.dpo_lr, beta=cfg.dpo_beta, max_len=cfg.seq_len,
                                label_smoothing=cfg.dpo_label_smoothing,
                                seed=cfg.seed, eval_every=0, save_every=0, overwrite=True))
        c = compare_to_reference(run / "model", chat / "model", prompts, limit=cfg.eval_prompts, seed=cfg.seed)
        print(f"[demo] {name} vs SFT on {c['n']} held-out prompts: gold {c['gold_reference']:.3f} -> {c['gold']:.3f}, "
              f"win rate {c['win_rate']:.1%} (gold scorer), KL to SFT {c['kl']:.2f} nats/answer, "
              f"ends its turn {c['stop_rate']:.0%}")
        return c

    report["dpo"] = dpo_round("dpo", chat / "model", pairs)
    fed = out / "label" / "pairs.jsonl"
    if _step("label", fed, cfg.fresh):
        label.main(label.Config(model=str(out / "dpo" / "model"), prompts=str(pairs), out=str(fed), judge="world",
                                num_samples=cfg.label_samples, limit=cfg.label_prompts, seed=cfg.seed))
    report["dpo_round2"] = dpo_round("dpo_round2", out / "dpo" / "model", fed)
    return report


def _step(name: str, done: Path, fresh: bool) -> bool:
    if done.exists() and not fresh:
        print(f"[demo] {name}: already done ({done}), skipping")
        return False
    print(f"[demo] {name} ...")
    return True


def main(cfg: Config) -> int:
    out = Path(cfg.out)
    t0 = time.perf_counter()
    world = out / "world"
    if _step("world", world / "summary.json", cfg.fresh):
        generate_main(GenerateConfig(out=world, seed=cfg.seed, n_stories=cfg.n_stories))
    tok = out / "tokenizer"
    if _step("tokenizer", tok / "tokenizer.json", cfg.fresh):
        train_main(TrainConfig(files=[str(world / "pretrain" / "train.txt")], out=str(tok), vocab_size=cfg.vocab_size))
    shards = out / "shards"
    if _step("prepare", shards / "meta.json", cfg.fresh):
        prepare_main(PrepareConfig(inputs=[str(world / "pretrain" / "train.txt"), str(world / "pretrain" / "val.txt")],
                                   tokenizer=str(tok), out=str(shards), val_fraction=0.05))
    base = out / "base"
    if _step("pretrain", base / "model" / "tristage.json", cfg.fresh):
        pretrain.main(pretrain.Config(data=str(shards), out=str(base), depth=cfg.depth, seq_len=cfg.seq_len,
                                      batch_size=cfg.batch_size, max_steps=cfg.pretrain_steps, seed=cfg.seed,
                                      eval_every=max(1, cfg.pretrain_steps // 4), save_every=cfg.pretrain_steps,
                                      sample_prompts=["The dog sat on the", "Once upon a time, a cat"],
                                      overwrite=True))
    print(f"[demo] samples from the base model ({base / 'samples.jsonl'}):")
    for line in (base / "samples.jsonl").read_text().splitlines()[-2:]:
        rec = json.loads(line)
        print(f"  {rec['prompt']!r} -> {rec['completion'][:200]!r}")
    report = {"base": score_base_model(base / "model", world / "pretrain" / "val.txt", cfg.seed)}
    b = report["base"]
    print(f"[demo] base model: {b['n']} stories continued from held-out openings; gold score {b['model_overall']:.3f} "
          f"(plausibility {b['model_plausibility']:.3f}) vs the corpus itself {b['data_overall']:.3f} "
          f"({b['data_plausibility']:.3f})")

    chat = out / "sft"
    if _step("sft", chat / "model" / "tristage.json", cfg.fresh):
        sft.main(sft.Config(model=str(base / "model"), data=[str(world / "sft" / "train.jsonl")],
                            val_data=[str(world / "sft" / "val.jsonl")], out=str(chat), epochs=cfg.sft_epochs,
                            lr=cfg.sft_lr, max_len=cfg.seq_len, seed=cfg.seed, eval_every=0, save_every=0,
                            overwrite=True))
    prompts = world / "eval" / "prompts.jsonl"
    for name, folder in (("base", base), ("sft", chat)):
        r = evaluate_chat_model(folder / "model", prompts, limit=cfg.eval_prompts)
        report[f"{name}_chat"] = r
        print(f"[demo] {name} model on {r['n']} held-out prompts: gold overall {r['overall']:.3f}, "
              f"instruction following {r['attributes']['instruction_following']:.3f}, "
              f"ends its turn {r['stop_rate']:.0%}")
    ex = report["sft_chat"]["examples"][0]
    print(f"[demo] e.g. {ex['prompt']!r}\n       -> {ex['answer'][:300]!r} (gold {ex['score']:.2f})")
    write_json(out / "report.json", report)
    report.update(preference_steps(cfg, out, world, chat, prompts))
    write_json(out / "report.json", report)
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s; everything is under {out}/")
    return 0
