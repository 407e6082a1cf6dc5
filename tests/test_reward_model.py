"""Score models: the reward head's Hugging Face *ForSequenceClassification export, parity with transformers,
reload; the value model's per-token scores."""

from __future__ import annotations

import json

import pytest
import torch

from tristage.model.gpt import ModelConfig, build_model
from tristage.model.score import (
    from_causal_lm,
    is_reward_folder,
    last_real_index,
    load_reward_model,
    per_row,
    save_reward_model,
    value_model_from,
)
from tristage.tokenizer import Tokenizer


def _rm(tok, tied=True, arch="llama", labels=None, weights=None):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, architecture=arch,
                      qk_norm=arch == "qwen3")
    n = len(labels) if labels else 1
    return from_causal_lm(build_model(cfg, seed=0), n, seed=1, labels=labels, weights=weights).eval()


def _batch(tok):
    texts = ["the dog sat on the mat.", "a cat!"]
    ids = [tok.encode(t) + [tok.stop_ids[0]] for t in texts]
    T = max(map(len, ids))
    x = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in ids])
    return x, torch.tensor([len(r) - 1 for r in ids])


@pytest.mark.parametrize("tied,arch", [(True, "llama"), (False, "llama"), (True, "qwen3")])
def test_transformers_reproduces_our_scores(tiny_shards, tmp_path, tied, arch):
    from transformers import AutoModelForSequenceClassification

    tok = Tokenizer.load(tiny_shards / "tokenizer")
    rm = _rm(tok, tied, arch)
    x, last = _batch(tok)
    with torch.no_grad():
        ours = rm(x, at=per_row(last))
        assert torch.equal(ours, rm(x, at=per_row(last_real_index(x, tok.pad_id))))  # transformers' pooling
    save_reward_model(rm, tmp_path / "rm", tok)
    assert is_reward_folder(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = hf(input_ids=x, attention_mask=(x != tok.pad_id).long()).logits
    assert ours.shape == theirs.shape == (2, 1)
    assert (ours - theirs).abs().max().item() < 1e-5
    back = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(back(x, at=per_row(last)), ours)


def test_attribute_heads_combine_with_stored_weights(tiny_shards, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = Tokenizer.load(tiny_shards / "tokenizer")
    rm = _rm(tok, labels=["reward", "fluency", "ending"], weights=[1.0, 0.25, 0.5])
    x, last = _batch(tok)
    with torch.no_grad():
        s = rm(x, at=per_row(last))
    assert torch.allclose(rm.combine(s), s[:, 0] + 0.25 * s[:, 1] + 0.5 * s[:, 2])
    save_reward_model(rm, tmp_path / "rm", tok)
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "reward", "1": "fluency", "2": "ending"}
    assert cfg["tristage_reward"]["weights"] == [1.0, 0.25, 0.5]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        logits = hf(input_ids=x, attention_mask=(x != tok.pad_id).long()).logits
    w = torch.tensor(cfg["tristage_reward"]["weights"])
    assert (logits @ w - rm.combine(s)).abs().max().item() < 1e-5
    back = load_reward_model(tmp_path / "rm")
    assert back.labels == ["reward", "fluency", "ending"] and back.weights == [1.0, 0.25, 0.5]


def test_causal_lm_folder_is_not_a_reward_model(tiny_shards, tmp_path):
    from tristage.model.hf import save_model

    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2), seed=0), tmp_path / "lm", tok)
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")


def test_from_causal_lm_moves_the_backbone_and_draws_the_head_from_its_seed(tiny_shards):
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    lm = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, tie_word_embeddings=False), seed=0)
    rm = from_causal_lm(lm, 2, seed=5)
    assert rm.model is lm.model and not hasattr(rm, "lm_head")
    assert set(rm.state_dict()) == {k for k in lm.state_dict() if k != "lm_head.weight"} | {"score.weight"}
    want = torch.empty(2, 32).normal_(0.0, 1.0 / 33 ** 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(rm.score.weight, want)
    lm.gradient_checkpointing = True  # the flag lives on the shared backbone
    assert rm.gradient_checkpointing


def test_value_model_reads_every_token_and_equals_the_reward_at_the_last(tiny_shards):
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    rm = _rm(tok, labels=["reward", "fluency"], weights=[1.0, 0.5])
    x, last = _batch(tok)
    with torch.no_grad():
        reward = rm(x, at=per_row(last))
        vm = value_model_from(rm)
        values = vm(x)
    assert vm.model is rm.model and vm.labels == ["value"]
    assert values.shape == (*x.shape, 1) and values.dtype == torch.float32
    torch.testing.assert_close(values[torch.arange(len(x)), last, 0], reward[:, 0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # every token: the same as reading each position on its own
        rows, pos = torch.arange(len(x)).repeat_interleave(x.shape[1]), torch.arange(x.shape[1]).repeat(len(x))
        torch.testing.assert_close(vm(x, at=(rows, pos)), values.flatten(0, 1), atol=1e-5, rtol=1e-5)
    lm = build_model(rm.config, seed=0)
    from_lm = value_model_from(lm, seed=3)
    assert from_lm.model is lm.model and torch.equal(from_lm.score.weight, from_causal_lm(lm, 1, seed=3).score.weight)
