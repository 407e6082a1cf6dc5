"""`tristage label`: k samples per prompt, a judge picks (chosen, rejected); python, gold, world, rm and llm judges."""

from __future__ import annotations

import json

import pytest
import torch

from tristage.eval.judges import make_judge, round_robin
from tristage.model.gpt import ModelConfig, build_model
from tristage.model.hf import save_model
from tristage.stages import label
from tristage.tokenizer import Tokenizer

K = 4


def by_length(prompt: str, responses: list[str]) -> list[float]:
    """The python judge of these tests: longer is better."""
    assert isinstance(prompt, str) and prompt
    return [float(len(r)) for r in responses]


def _policy(tok):
    """A random model writing the corpus' characters and ending its turn at random lengths: hidden dim 0 is held at a
    constant (embeddings 1 there, no layer writes to it), so the untied head's column 0 is a per-token logit bias:
    up for the end-of-turn token, far down for the byte-fallback and other special tokens."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        for i in range(tok.vocab_size):
            piece = tok.id_to_token(i)
            if piece.startswith("<0x") or piece.startswith("<|"):
                model.lm_head.weight[i, 0] = -5.0
        model.lm_head.weight[tok.token_to_id("<|im_end|>"), 0] = 0.2
    return model


@pytest.fixture(scope="module")
def setup(tiny_shards, tmp_path_factory):
    from tristage.world import generate

    root = tmp_path_factory.mktemp("label")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(_policy(tok), root / "policy", tok)
    generate(root / "world", seed=0, n_stories=10, n_sft=4, n_pref=4, n_eval=6)
    prompts = [{"prompt": "where did the dog sit?"},
               {"prompt": [{"role": "system", "content": "be kind."}, {"role": "user", "content": "the cat?"}]},
               {"messages": [{"role": "user", "content": "a fish?"}, {"role": "assistant", "content": "pond."},
                             {"role": "user", "content": "and a bird?"}, {"role": "assistant", "content": "x"}]},
               {"prompt": "tell me about the mat."}, {"prompt": "the porch"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def _cfg(root, out, **kw):
    base = dict(model=str(root / "policy"), prompts=str(root / "prompts.jsonl"), out=str(out),
                judge=f"python:{__file__}:by_length", num_samples=K, max_new_tokens=32, batch_size=2,
                save_samples=True, progress=False)
    base.update(kw)
    return label.Config(**base)


def _read(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_python_judge_picks_longest_and_shortest_reproducibly(setup, tmp_path):
    s = label.main(_cfg(setup, tmp_path / "a.jsonl"))
    rows = _read(tmp_path / "a.jsonl")
    assert s["prompts"] == 5 and s["pairs"] == len(rows) == 5 - s["skipped"]["identical"] - s["skipped"]["tied"]
    assert len(rows) >= 3
    for r in rows:
        samples = [x for x in r["samples"] if x]
        assert len(r["samples"]) == K and len(set(r["samples"])) > 1  # k samples, and they differ
        assert len(r["chosen"]) == max(map(len, samples)) > len(r["rejected"]) == min(map(len, samples))
        assert r["chosen"] in samples and r["rejected"] in samples
        assert r["scores"] == {"chosen": len(r["chosen"]), "rejected": len(r["rejected"])}
        assert r["judge"].startswith("python:")
    assert s["judge_chosen"] > s["judge_rejected"]
    # prompts are kept as given; a messages record is cut after its last user turn
    assert rows[0]["prompt"] == "where did the dog sit?"
    assert rows[2]["prompt"][-1] == {"role": "user", "content": "and a bird?"} and len(rows[2]["prompt"]) == 3
    # same seed, same file; another seed, other samples
    label.main(_cfg(setup, tmp_path / "b.jsonl"))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    label.main(_cfg(setup, tmp_path / "c.jsonl", seed=1))
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    # the preference reader takes the file as it is
    preference = pytest.importorskip("tristage.data.preference")
    prefs, errors = preference.load_preferences(tmp_path / "a.jsonl")
    assert not errors and len(prefs) == len(rows)
    assert prefs[0].chosen == rows[0]["chosen"] and prefs[0].meta["judge"] == rows[0]["judge"]
    assert prefs[1].prompt[0]["role"] == "system"


def test_identical_samples_are_skipped_and_counted(setup, tmp_path):
    s = label.main(_cfg(setup, tmp_path / "g.jsonl", temperature=0.0))  # greedy: all k samples the same
    assert s["pairs"] == 0 and s["skipped"]["identical"] == 5 and _read(tmp_path / "g.jsonl") == []


def test_gold_judge_picks_the_higher_gold_score(setup, tmp_path):
    from tristage.world import score

    prompts = str(setup / "world" / "eval" / "prompts.jsonl")
    s = label.main(_cfg(setup, tmp_path / "g.jsonl", judge="gold", prompts=prompts, num_samples=8))
    rows = _read(tmp_path / "g.jsonl")
    assert rows and s["pairs"] == len(rows) and s["gold_agreement"] == 1.0
    for r in rows:
        gold = {x: score(r["prompt"], x).overall for x in r["samples"] if x}
        assert r["scores"] == {"chosen": gold[r["chosen"]], "rejected": gold[r["rejected"]]}
        assert gold[r["chosen"]] == max(gold.values()) > gold[r["rejected"]] == min(gold.values())


def test_world_judge_records_ratings_and_rationale(setup, tmp_path):
    from tristage.world import ATTRIBUTES, score

    prompts = str(setup / "world" / "eval" / "prompts.jsonl")
    s = label.main(_cfg(setup, tmp_path / "w.jsonl", judge="world", prompts=prompts, annotator_temperature=0.0))
    rows = _read(tmp_path / "w.jsonl")
    assert rows and s["pairs"] == len(rows) and "gold_agreement" in s
    for r in rows:
        assert set(r["ratings"]) == {"chosen", "rejected"} and set(r["ratings"]["chosen"]) == set(ATTRIBUTES)
        assert all(1 <= v <= 5 for side in r["ratings"].values() for v in side.values())
        assert isinstance(r["rationale"], str) and r["rationale"]
        assert r["chosen"] != r["rejected"] and {r["chosen"], r["rejected"]} <= set(r["samples"])
        gc, gr = score(r["prompt"], r["chosen"]).overall, score(r["prompt"], r["rejected"]).overall
        assert r["scores"] == {"chosen": gc, "rejected": gr}
        assert gc >= gr  # a perfect annotator (temperature 0) never prefers the worse answer
    preference = pytest.importorskip("tristage.data.preference")
    prefs, _ = preference.load_preferences(tmp_path / "w.jsonl")
    assert prefs[0].ratings["chosen"] == {k: float(v) for k, v in rows[0]["ratings"]["chosen"].items()}
    assert prefs[0].rationale == rows[0]["rationale"]


def test_rm_judge_uses_score_texts(setup, tmp_path):
    from tristage.model.score import from_causal_lm, load_reward_model, save_reward_model
    from tristage.serve.score import score_texts

    tok = Tokenizer.load(setup / "policy")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=512)
    save_reward_model(from_causal_lm(build_model(cfg, seed=3), 1, seed=4), tmp_path / "rm", tok)
    s = label.main(_cfg(setup, tmp_path / "r.jsonl", judge=f"rm:{tmp_path / 'rm'}"))
    rows = _read(tmp_path / "r.jsonl")
    assert rows and s["pairs"] == len(rows)
    rm = load_reward_model(tmp_path / "rm").eval()
    for r in rows:
        got = rm.combine(score_texts(rm, tok, [r["prompt"]] * 2, [r["chosen"], r["rejected"]]))
        assert got.tolist() == pytest.approx([r["scores"]["chosen"], r["scores"]["rejected"]], abs=1e-5)
        assert r["scores"]["chosen"] == pytest.approx(max(r["sample_scores"].values()))


def test_llm_judge_averages_both_orders(setup, tmp_path):
    judge_cfg = _cfg(setup, tmp_path / "l.jsonl", judge=f"llm:{setup / 'policy'}")
    judge = make_judge(judge_cfg.judge, device=torch.device("cpu"), dtype=torch.float32)
    messages = [{"role": "user", "content": "where?"}]
    cands = ["the dog sat.", "on the mat", "pond"]
    ((_, scores),) = label.best_vs_worst(judge, [messages], [cands])
    (beats,) = round_robin(judge, [messages], [cands])
    # by hand: P_A(i, j) from one forward of the judge prompt, then both orders averaged
    with torch.no_grad():
        def p_a(a, b):
            ids = judge.prompt_ids(messages, a, b)
            logits = judge.model(torch.tensor([ids]))[0, -1]
            return logits[judge.ab].softmax(-1)[0].item()
        want = (p_a(cands[0], cands[2]) + 1 - p_a(cands[2], cands[0])) / 2
    assert beats[0, 2].item() == pytest.approx(want, abs=1e-5)
    assert (beats + beats.T - 1).fill_diagonal_(0).abs().max() < 1e-6  # P(i beats j) + P(j beats i) = 1
    assert sum(scores) / len(scores) == pytest.approx(0.5)
    s = label.main(judge_cfg)
    rows = _read(tmp_path / "l.jsonl")
    assert rows and s["pairs"] == len(rows)
    assert all(0 <= r["p_chosen"] <= 1 and r["scores"]["chosen"] > r["scores"]["rejected"] for r in rows)


def test_bad_prompt_record_names_file_line_and_field(setup, tmp_path):
    from tristage.io import DataError, UserError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(DataError) as e:
        label.main(_cfg(setup, tmp_path / "x.jsonl", prompts=str(bad)))
    assert str(e.value).startswith(f"{bad}:2:") and e.value.field == "prompt"
    with pytest.raises(UserError, match="--judge"):  # a user's mistake: exit 2 through the CLI (was SystemExit)
        label.main(_cfg(setup, tmp_path / "x.jsonl", judge="oracle"))
