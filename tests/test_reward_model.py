"""Reward model head: Hugging Face *ForSequenceClassification export, parity with transformers, reload."""

from __future__ import annotations

import json

import pytest
import torch

from tristage.model.gpt import ModelConfig, build_model
from tristage.model.reward import from_causal_lm, is_reward_folder, load_reward_model, save_reward_model
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
        ours = rm(x, last)
        assert torch.equal(ours, rm(x, pad_id=tok.pad_id))  # default pooling = last non-pad token
    save_reward_model(rm, tmp_path / "rm", tok)
    assert is_reward_folder(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = hf(input_ids=x, attention_mask=(x != tok.pad_id).long()).logits
    assert ours.shape == theirs.shape == (2, 1)
    assert (ours - theirs).abs().max().item() < 1e-5
    back = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(back(x, last), ours)


def test_attribute_heads_combine_with_stored_weights(tiny_shards, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = Tokenizer.load(tiny_shards / "tokenizer")
    rm = _rm(tok, labels=["reward", "fluency", "ending"], weights=[1.0, 0.25, 0.5])
    x, last = _batch(tok)
    with torch.no_grad():
        s = rm(x, last)
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
