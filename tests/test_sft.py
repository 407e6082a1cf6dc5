"""SFT stage: trains on assistant tokens, exports a model that stops, resumes exactly, reports bad data."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_config

from tristage.model.gpt import build_model
from tristage.model.hf import save_model
from tristage.stages import sft
from tristage.tokenizer import Tokenizer

ANIMALS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "owl": "hoot"}


@pytest.fixture(scope="module")
def base_and_data(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(build_model(tiny_config(tok, max_position_embeddings=256), seed=0), root / "base", tok)
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        a = rng.choice(list(ANIMALS))
        msgs = [{"role": "user", "content": f"what does the {a} say?"},
                {"role": "assistant", "content": f"the {a} says {ANIMALS[a]}."}]
        if rng.random() < 0.3:
            b = rng.choice(list(ANIMALS))
            msgs += [{"role": "user", "content": f"and the {b}?"}, {"role": "assistant", "content": f"{ANIMALS[b]}."}]
        rows.append({"messages": msgs})
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(root, out, **kw):
    base = dict(model=str(root / "base"), data=[str(root / "chats.jsonl")], out=str(out), max_len=64,
                tokens_per_batch=256, max_steps=8, lr=3e-3, warmup_steps=2, eval_every=4, save_every=4, log_every=1,
                dtype="float32", progress=False, device="cpu")
    base.update(kw)
    return sft.Config(**base)


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_sft_learns_and_exports_a_model_that_stops(base_and_data, tmp_path):
    m = sft.main(_cfg(base_and_data, tmp_path / "r", max_steps=60, eval_every=0, lr=1e-2))
    losses = _losses(tmp_path / "r")
    assert losses[60] < 0.5 * losses[1] and m["val_loss"] < losses[1]
    folder = tmp_path / "r" / "model"
    gen = json.loads((folder / "generation_config.json").read_text())
    tok = Tokenizer.load(folder)
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end in gen["eos_token_id"]
    assert tok.chat_template and json.loads((folder / "tristage.json").read_text())["stage"] == "sft"
    # greedy answers end with the end-of-turn token
    from tristage.model.hf import load_model
    from tristage.serve.engine import Engine, SamplingParams

    model = load_model(folder).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"what does the {a} say?"}],
                                       add_generation_prompt=True) for a in ANIMALS]
    outs = Engine(model).generate(prompts, SamplingParams(max_new_tokens=40, temperature=0.0, stop_ids=tok.stop_ids))
    assert sum(o.finish_reason == "stop" and o.tokens[-1] == im_end for o in outs) >= 4


def test_sft_resume_is_exact(base_and_data, tmp_path):
    sft.main(_cfg(base_and_data, tmp_path / "full"))
    sft.main(_cfg(base_and_data, tmp_path / "split", stop_at=4))
    sft.main(_cfg(base_and_data, tmp_path / "split", resume=True))
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    # the token count carries over the resume (training_state.pt), so tokens and MFU are logged alike
    tokens = [[r["tokens"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if "tokens" in r] for run in ("full", "split")]
    assert tokens[0] == tokens[1] and tokens[0] == sorted(set(tokens[0])) and tokens[0][0] > 0


def test_padded_and_packed_agree_on_validation_loss(base_and_data, tmp_path):
    # lr 1e-9, not 0 (a learning rate must be > 0): the one update moves no weight by more than about 1e-9
    a = sft.main(_cfg(base_and_data, tmp_path / "a", max_steps=1, lr=1e-9, warmup_steps=0))
    b = sft.main(_cfg(base_and_data, tmp_path / "b", max_steps=1, lr=1e-9, warmup_steps=0, mode="padded"))
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_bad_records_are_reported_or_skipped(base_and_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (base_and_data / "chats.jsonl").read_text()
    bad.write_text(good + json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:121"):
        sft.main(_cfg(base_and_data, tmp_path / "r", data=[str(bad)]))
    m = sft.main(_cfg(base_and_data, tmp_path / "r2", data=[str(bad)], on_error="skip", max_steps=1))
    assert "loss" in m


def test_lora_trains_only_adapters_and_exports_merged_and_peft(base_and_data, tmp_path):
    pytest.importorskip("tristage.model.lora")
    sft.main(_cfg(base_and_data, tmp_path / "r", lora_rank=4, lora_alpha=8, lr=1e-2, max_steps=6))
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").exists()
    from tristage.model.hf import load_model

    base = load_model(base_and_data / "base")
    merged = load_model(tmp_path / "r" / "model")
    changed = [n for (n, p), q in zip(base.named_parameters(), merged.parameters()) if not torch.equal(p, q)]
    assert changed and all(n.endswith("proj.weight") for n in changed)


def test_terminal_chat_streams_and_keeps_history(base_and_data, tmp_path):
    import io

    from tristage.model.hf import load_model
    from tristage.serve.chat import chat_loop
    from tristage.serve.engine import SamplingParams

    sft.main(_cfg(base_and_data, tmp_path / "r", max_steps=60, eval_every=0, lr=1e-2))
    folder = tmp_path / "r" / "model"
    tok = Tokenizer.load(folder)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop_ids=tok.stop_ids)
    out = io.StringIO()
    history = chat_loop(load_model(folder).eval(), tok, params, None,
                        io.StringIO("what does the dog say?\n/reset\nwhat does the cat say?\nand the cow?\n"), out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "what does the cat say?"
    assert "(history cleared)" in out.getvalue() and out.getvalue().count("model> ") == 3
    first = out.getvalue().split("(history cleared)")[0]
    assert "says" in first and "[cut" not in first  # streamed a whole answer that ended its turn
