"""Rollout pieces: stop ids, loading, k samples per prompt, log-probs of completions (equal to the versions they
replace, bit for bit), reward scores."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pair_world, tiny_config

from tristage import rollout
from tristage.model.gpt import build_model
from tristage.model.hf import load_model
from tristage.serve.engine import Engine, SamplingParams
from tristage.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tiny_shards, tmp_path_factory):
    root = pair_world(tiny_shards, tmp_path_factory.mktemp("rollout"))
    tok = Tokenizer.load(root / "base")
    return root, tok, load_model(root / "base").eval()


def _lists(tok):
    prompts = [tok.encode("the dog"), tok.encode("a cat sat on"), tok.encode("x"), tok.encode("the fish sat")]
    completions = [tok.encode(" sat on the mat."), tok.encode(" the porch"), [], tok.encode(".")]
    return prompts, completions


# ----------------------------------------------------------------------------- stop ids and loading
def test_stop_ids_add_generation_config_eos(setup, tmp_path):
    root, tok, _ = setup
    # a folder tristage saved: generation_config.json lists the tokenizer's own stop ids, so both ways agree
    assert json.loads((root / "base" / "generation_config.json").read_text())["eos_token_id"]
    assert rollout.stop_ids(tok, root / "base") == tok.stop_ids == rollout.stop_ids(tok)
    # a folder whose generation_config.json names more: they are added after the tokenizer's, without repeats
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.stop_ids[0], 7, 7]}))
    assert rollout.stop_ids(tok, tmp_path) == [*tok.stop_ids, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert rollout.stop_ids(tok, tmp_path) == [*tok.stop_ids, 9]


def test_load_chat_model(setup):
    root, tok, model = setup
    chat = rollout.load_chat_model(root / "base")
    assert not chat.model.training and chat.stop_ids == rollout.stop_ids(tok, root / "base")
    assert all(torch.equal(a, b) for a, b in zip(chat.model.state_dict().values(), model.state_dict().values()))


# ----------------------------------------------------------------------------- sampling
def test_sample_answers_k_per_prompt_as_one_engine_batch(setup):
    root, tok, model = setup
    msgs = [[{"role": "user", "content": "the dog?"}], [{"role": "user", "content": "a cat"}]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_ids=tok.stop_ids, logprobs=True)
    got = rollout.sample_answers(Engine(model), tok, msgs, 3, params, torch.Generator().manual_seed(5))
    ids = [list(tok.apply_chat_template(m, add_generation_prompt=True)) for m in msgs]
    rows = [x for x in ids for _ in range(3)]
    want = Engine(model).generate(rows, params, generator=torch.Generator().manual_seed(5))
    assert [len(g) for g in got] == [3, 3]
    for r, w in zip([r for g in got for r in g], want):
        assert r.tokens == w.tokens and r.finish_reason == w.finish_reason and r.logprobs == w.logprobs
        assert r.prompt == ids[0 if r in got[0] else 1]
        stop = w.finish_reason == "stop"
        assert r.text == tok.decode(w.tokens[:-1] if stop else w.tokens, skip_special_tokens=True)
    assert len({tuple(r.tokens) for r in got[0]}) > 1  # the k rows draw different numbers


# ----------------------------------------------------------------------------- log-probs
@torch.no_grad()
def _answer_logprobs(model, prompt_ids, answer_ids, batch_size=32):
    """tristage.eval.world.answer_logprobs as it was before completion_logprobs replaced it (verbatim)."""
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        rows = [p + a for p, a in zip(prompt_ids[i:i + batch_size], answer_ids[i:i + batch_size])]
        T = max(len(r) for r in rows)
        x = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        logp = torch.log_softmax(model(x).float(), -1)
        for b, (p, a) in enumerate(zip(prompt_ids[i:i + batch_size], answer_ids[i:i + batch_size])):
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)
            out.append(logp[b, pos, torch.tensor(a, dtype=torch.long)].sum().item() if a else 0.0)
    return out


def test_completion_logprobs_equal_eval_answer_logprobs_bit_for_bit(setup):
    _, tok, model = setup
    prompts, completions = _lists(tok)
    for batch_size in (3, 32):  # the demo's KL figure depends on these sums: same bits, same figure
        with torch.no_grad():
            ours = rollout.completion_logprobs(model, prompts, completions, batch_size=batch_size)
        assert ours.tolist() == _answer_logprobs(model, prompts, completions, batch_size=batch_size)
    assert ours[2].item() == 0.0


def test_completion_logprobs_equal_the_engines_and_take_a_temperature(setup):
    _, tok, model = setup
    prompts = [tok.encode("the dog"), tok.encode("a cat sat on")]
    for temperature in (1.0, 0.7):
        outs = Engine(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=temperature, seed=3,
                                                              logprobs=True, sampling_logprobs=True))
        lp, mask = rollout.completion_logprobs(model, prompts, [c.tokens for c in outs], per_token=True,
                                               temperature=temperature)
        assert lp.shape == mask.shape == (2, max(len(c.tokens) for c in outs))
        for row, m, c in zip(lp, mask, outs):  # with top-k / top-p off, the sampled distribution is logits / T
            want = c.logprobs if temperature == 1.0 else c.sampling_logprobs
            assert row[m].tolist() == pytest.approx(want, abs=1e-4)
            assert (row[~m] == 0).all()


def test_completion_logprobs_have_gradients_and_sum_per_token(setup):
    _, tok, model = setup
    prompts, completions = _lists(tok)
    sums = rollout.completion_logprobs(model, prompts, completions)
    lp, mask = rollout.completion_logprobs(model, prompts, completions, per_token=True)
    assert mask.sum(1).tolist() == [len(c) for c in completions]
    torch.testing.assert_close(sums, (lp * mask).sum(1))
    sums.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="at least one token"):
        rollout.completion_logprobs(model, [[]], [[1]])


def _old_sequence_logprobs(logits, labels, ignore_index=-100):
    """tristage.train.losses.sequence_logprobs before rollout.sequence_logprobs replaced it (verbatim)."""
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1).float()


def _old_pair_logprobs(model, batch):
    """tristage.stages.dpo.pair_logprobs before rollout.batch_logprobs replaced it (verbatim)."""
    if "lp_seq" not in batch:
        return _old_sequence_logprobs(model(batch["input_ids"]), batch["labels"])
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"])
    picked = logits[batch["lp_row"], batch["lp_pos"]].float()
    lp = picked.log_softmax(-1).gather(-1, batch["lp_tok"][:, None])[:, 0]
    n2 = 2 * batch["num_pairs"]
    zeros = torch.zeros(n2, device=lp.device, dtype=lp.dtype)
    return zeros.index_add(0, batch["lp_seq"], lp), zeros.index_add(0, batch["lp_seq"], torch.ones_like(lp))


def test_sequence_logprobs_equal_the_losses_version():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g).bfloat16()
    labels = torch.randint(0, 11, (3, 7), generator=g).masked_fill(torch.rand(3, 7, generator=g) < 0.4, -100)
    for ours, old in zip(rollout.sequence_logprobs(logits, labels), _old_sequence_logprobs(logits, labels)):
        assert torch.equal(ours, old)


@pytest.mark.parametrize("layout", ["rows", "shared", "packed"])
def test_batch_logprobs_equal_dpo_pair_logprobs_bit_for_bit(setup, layout):
    from tristage.data.preference import Preference, encode_preferences, pair_collator

    _, tok, model = setup
    prefs = [Preference([{"role": "user", "content": "what does the dog say?"}], "the dog says woof.", "moo."),
             Preference([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
                         {"role": "user", "content": "and the owl?"}], "hoot hoot.", "the owl says quack."),
             Preference([{"role": "user", "content": "x"}], "a", "ab")]
    batch = pair_collator(layout)(encode_preferences(tok, prefs, 128)[0], tok.pad_id)
    ours, old = rollout.batch_logprobs(model, batch), _old_pair_logprobs(model, batch)
    assert torch.equal(ours[0], old[0]) and torch.equal(ours[1], old[1])
    ours[0].sum().backward()  # with gradients
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- reward
def test_reward_scores_are_the_combined_score_texts(setup, tmp_path):
    from tristage.model.score import from_causal_lm

    _, tok, _ = setup
    rm = from_causal_lm(build_model(tiny_config(tok), seed=3), 2, seed=4, weights=[1.0, 0.5]).eval()
    prompts, responses = ["where did the dog sit?", "the cat?"], ["on the mat.", "it sat."]
    want = rm.combine(rollout.score_texts(rm, tok, prompts, responses))
    stats: dict[str, int] = {}
    got = rollout.reward_scores(rm, tok, prompts, responses, max_len=8, stats=stats)
    assert stats["truncated"] == 2
    assert torch.equal(rollout.reward_scores(rm, tok, prompts, responses), want)
    assert got.shape == (2,)
