"""The generation engine: cached decoding equals a full forward, left padding changes nothing, greedy equals
transformers' `generate`, sampling is seeded and filtered as specified, log-probs are the raw model's, stops stop;
and `tristage generate` end to end on a tiny saved model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config

import tristage.serve.engine as engine_mod
from tristage.model.gpt import ModelConfig, build_model
from tristage.serve.engine import Engine, SamplingParams, filter_logits, first_stops

V = 67


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=128)
    return build_model(cfg, seed=0, init=True).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def record_logits(monkeypatch):
    """Wrap the engine's sampler to keep the raw logits it is given at every step."""
    seen: list[torch.Tensor] = []
    orig = engine_mod.sample

    def spy(logits, p, *noise):
        seen.append(logits.clone())
        return orig(logits, p, *noise)

    monkeypatch.setattr(engine_mod, "sample", spy)
    return seen


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]))[0, -1]


def test_cached_decoding_equals_full_forward_with_left_padding(model, monkeypatch):
    prompts = prompts_of([3, 9, 1, 6])
    seen = record_logits(monkeypatch)
    outs = Engine(model).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    assert len(seen) == 8
    for r, (pr, out) in enumerate(zip(prompts, outs)):
        assert out.finish_reason == "length" and len(out.tokens) == 8 and out.prompt_tokens == len(pr)
        for s in range(8):  # step s sampled from the logits after prompt + s generated tokens
            ref = full_logits(model, pr + out.tokens[:s])
            torch.testing.assert_close(seen[s][r], ref, atol=1e-5, rtol=1e-5)
    # each row alone (no padding at all) gives the same tokens and logits as inside the padded batch
    batch_logits = torch.stack(seen, 1)  # [B, steps, V]
    for r, pr in enumerate(prompts):
        seen.clear()
        alone = Engine(model).generate([pr], SamplingParams(max_new_tokens=8, temperature=0))[0]
        assert alone.tokens == outs[r].tokens
        torch.testing.assert_close(torch.stack(seen, 1)[0], batch_logits[r], atol=1e-5, rtol=1e-5)


def test_sliding_window_cache_equals_full_forward(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=64, sliding_window=5)
    m = build_model(cfg, seed=1).eval()
    prompts = prompts_of([4, 8])
    seen = record_logits(monkeypatch)
    outs = Engine(m).generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    for r, (pr, out) in enumerate(zip(prompts, outs)):
        for s in range(6):
            torch.testing.assert_close(seen[s][r], full_logits(m, pr + out.tokens[:s]), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tristage.model.hf import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, load_model(folder).eval()


def hf_greedy(hf, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    x = torch.tensor([prompt])
    kw = dict(eos_token_id=eos) if eos is not None else dict(min_new_tokens=n)
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate(hf_pair):
    hf, ours = hf_pair
    prompts = prompts_of([5, 11, 2], seed=1)
    outs = Engine(ours).generate(prompts, SamplingParams(max_new_tokens=16, temperature=0))
    for pr, out in zip(prompts, outs):
        assert out.tokens == hf_greedy(hf, pr, 16)
    # an eos token that greedy decoding reaches mid-way stops both at the same place, the eos included
    ref = outs[0].tokens
    k = next(i for i in range(3, 16) if ref[i] not in ref[:i])
    stopped = Engine(ours).generate(prompts[:1], SamplingParams(max_new_tokens=16, temperature=0,
                                                                stop_ids=[ref[k]]))[0]
    assert stopped.tokens == hf_greedy(hf, prompts[0], 16, eos=ref[k]) == ref[: k + 1]
    assert stopped.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    eng, prompts = Engine(model), prompts_of([4, 7, 2])
    p = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.95, seed=123)
    a, b = eng.generate(prompts, p), eng.generate(prompts, p)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    c = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.95, seed=124))
    assert [o.tokens for o in a] != [o.tokens for o in c]
    greedy = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    top1 = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=5))
    assert [o.tokens for o in greedy] == [o.tokens for o in top1]


def test_both_samplers_draw_from_the_processed_distribution():
    """The exponential race (one generator for the batch) and the inverse CDF (one generator per row: one uniform per
    row and step) each give the tempered, top-p filtered distribution; neither draws a filtered-out token."""
    from tristage.serve.engine import sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g) * 0.7
    p = SamplingParams(temperature=0.8, top_p=0.9)
    want = filter_logits(logits / 0.8, 0, 0.9).softmax(-1)[0]
    N = 100_000
    race, _ = sample(logits.expand(N, -1), p, torch.empty(N, 40).exponential_(1, generator=g))
    inverse, _ = sample(logits.expand(N, -1), p, None, torch.rand(N, generator=g))
    for tok in (race, inverse):
        freq = torch.bincount(tok, minlength=40).double() / N
        assert freq[want == 0].sum() == 0 and (want == 0).any()
        assert ((freq - want) ** 2 / want.clamp(min=1e-12))[want > 0].sum() * N < 80  # chi-square, 3+ sigma at df ~30
    edges = sample(logits.expand(2, -1), p, None, torch.tensor([0.0, 1.0 - 1e-7]))[0]
    assert edges[0] == want.nonzero()[0] and edges[1] == want.nonzero()[-1]  # the ends of the CDF, inside the support


def test_filter_logits_hand_computed():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # ranked: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    logits = probs.log()
    kept = lambda x: torch.isfinite(x).nonzero().flatten().tolist()
    # mass ranked above each token: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95; kept while < top_p
    assert kept(filter_logits(logits, top_p=0.4)) == [1]
    assert kept(filter_logits(logits, top_p=0.7)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.85)) == [0, 1, 3]
    assert kept(filter_logits(logits, top_p=0.99)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_k=3, top_p=0.7)) == [1, 3]
    out = filter_logits(logits, top_p=0.85)
    torch.testing.assert_close(out[[0, 1, 3]], logits[[0, 1, 3]])  # kept logits are untouched
    torch.testing.assert_close(out.softmax(-1), torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95)


def test_filter_logits_matches_transformers_warpers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    x = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 3
    for k, p in ((5, 1.0), (0, 0.9), (10, 0.7), (0, 0.3)):
        ref = x.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isfinite(filter_logits(x, k, p)), torch.isfinite(ref))


def test_logprobs_are_the_unmodified_model_distribution(model):
    prompts = prompts_of([3, 8])
    p = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.8, seed=0, logprobs=True,
                       sampling_logprobs=True)
    outs = Engine(model).generate(prompts, p)
    for pr, out in zip(prompts, outs):
        for s, t in enumerate(out.tokens):
            logits = full_logits(model, pr + out.tokens[:s])
            assert math.isclose(out.logprobs[s], logits.log_softmax(-1)[t].item(), abs_tol=1e-5)
            processed = filter_logits(logits / 0.7, 20, 0.8).log_softmax(-1)[t].item()
            assert math.isclose(out.sampling_logprobs[s], processed, abs_tol=1e-4)


@pytest.mark.parametrize("compact_at", [0.01, 2.0])  # rows leave the batch at once / are only masked
def test_stop_tokens_end_rows(model, compact_at):
    prompts = prompts_of([2, 6, 4, 9, 3])
    free = Engine(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=7))
    stop = free[1].tokens[4]  # a token row 1 samples at step 4 (others may sample it too, or not)
    eng = Engine(model, check_every=1, compact_at=compact_at)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, stop_ids=[stop, V + 5]))
    # a row's random draws do not depend on the other rows leaving: each output is the free run cut at its stop
    for ref, out in zip(free, outs):
        if stop in ref.tokens:
            assert out.finish_reason == "stop" and out.tokens == ref.tokens[: ref.tokens.index(stop) + 1]
        else:
            assert out.finish_reason == "length" and out.tokens == ref.tokens
    assert outs[1].finish_reason == "stop" and len(outs[1].tokens) <= 5


def test_check_every_and_compaction_do_not_change_results(model):
    prompts = prompts_of([2, 6, 4, 9, 3, 5])
    for temperature in (0.0, 1.0):
        free = Engine(model).generate(prompts, SamplingParams(max_new_tokens=10, temperature=temperature, seed=2))
        stops = [free[0].tokens[2], free[3].tokens[5]]
        p = SamplingParams(max_new_tokens=10, temperature=temperature, stop_ids=stops, logprobs=True, seed=2)
        variants = [Engine(model, check_every=c, compact_at=a).generate(prompts, p)
                    for c, a in ((1, 0.01), (1, 2.0), (4, 0.25), (100, 0.25))]
        for v in variants[1:]:
            assert [(o.tokens, o.finish_reason) for o in v] == [(o.tokens, o.finish_reason) for o in variants[0]]
            for o, ref in zip(v, variants[0]):
                assert o.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert variants[0][0].finish_reason == "stop" and variants[0][0].tokens[-1] in stops


def test_first_stops_hand_computed():
    tokens = torch.tensor([[1, 2, 3, 3], [4, 5, 6, 7], [0, 3, 0, 1]])
    assert first_stops(tokens, torch.tensor([3, 0])) == [2, -1, 0]
    assert first_stops(tokens[:, 3:], torch.tensor([3, 0])) == [0, -1, -1]


@pytest.mark.parametrize("compact_at", [0.01, 2.0])
def test_finished_rows_leave_the_batch(model, monkeypatch, compact_at):
    sizes: list[int] = []
    step = Engine._decode_step

    def spy(self, batch, i):
        sizes.append(len(batch.rows))
        assert batch.last.shape[0] == batch.tokens.shape[0] == batch.valid.shape[0] == len(batch.rows)
        return step(self, batch, i)

    monkeypatch.setattr(Engine, "_decode_step", spy)
    prompts = prompts_of([2, 6, 4, 9, 3])
    free = Engine(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=7))
    stop = free[1].tokens[4]
    outs = Engine(model, check_every=1, compact_at=compact_at).generate(
        prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, stop_ids=[stop]))
    left = [len(o.tokens) for o in outs if o.finish_reason == "stop"]  # the step at which each stopped row ended
    sizes = sizes[len(free[0].tokens) - 1:]  # the stopped call's steps (the free run took max_new - 1)
    if compact_at > 1:  # finished rows stay, masked
        assert sizes == [5] * len(sizes)
    else:  # each row leaves right after the step that sampled its stop token
        assert sizes == [5 - sum(n <= i + 1 for n in left) for i in range(len(sizes))]
        assert min(sizes) < 5


def test_stream_yields_the_generated_tokens(model):
    eng, prompt = Engine(model), prompts_of([5])[0]
    ref = eng.generate([prompt], SamplingParams(max_new_tokens=9, temperature=0))[0]
    events = list(eng.stream(prompt, SamplingParams(max_new_tokens=9, temperature=0)))
    assert [t for t, _ in events] == ref.tokens
    assert [r for _, r in events] == [None] * 8 + ["length"]
    stop = ref.tokens[3]
    events = list(eng.stream(prompt, SamplingParams(max_new_tokens=9, temperature=0, stop_ids=[stop])))
    assert [t for t, _ in events] == ref.tokens[: ref.tokens.index(stop) + 1] and events[-1][1] == "stop"
    rows_seen = []
    eng.generate(prompts_of([3, 5]), SamplingParams(max_new_tokens=3, temperature=0),
                 on_token=lambda rows, toks: rows_seen.append(rows))
    assert rows_seen == [[0, 1]] * 3
    model.train()  # generating between training steps leaves the model's mode alone
    eng.generate([prompt], SamplingParams(max_new_tokens=2))
    assert model.training
    model.eval()


def test_max_new_tokens_is_clamped_to_the_context(model):
    out = Engine(model).generate([[1] * 120], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert len(out.tokens) == 8 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(model).generate([[1] * 128], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="at least one token"):
        Engine(model).generate([[]], SamplingParams(max_new_tokens=5))


@pytest.mark.slow
def test_compiled_decoding_equals_eager(model):
    prompts = prompts_of([3, 9, 5])
    compiled_engine = Engine(model, compile=True)
    for p in (SamplingParams(max_new_tokens=10, temperature=0, logprobs=True),
              SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, stop_ids=[5, 9, 11], logprobs=True)):
        eager = Engine(model).generate(prompts, p)
        compiled = compiled_engine.generate(prompts, p)  # the second call: rows leave, one graph for every batch size
        for a, b in zip(eager, compiled):
            assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


# ---------------------------------------------------------------------------------------------- tristage generate
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from tristage.model.hf import save_model
    from tristage.tokenizer import train_char

    root = tmp_path_factory.mktemp("gen")
    (root / "c.txt").write_text("the dog sat on the mat. the cat sat on the porch.\n" * 20)
    tok = train_char([str(root / "c.txt")])
    save_model(build_model(tiny_config(tok, max_position_embeddings=256), seed=0), root / "model", tok)
    return root / "model"


def test_generate_cli_prompt_and_jsonl(saved_model, tmp_path, capsys):
    from tristage.serve.generate import Config, main

    assert main(Config(model=str(saved_model), prompt="the dog", max_new_tokens=5, seed=1)) == 0
    capsys.readouterr()
    assert main(Config(model=str(saved_model), prompt="hi", chat=True, max_new_tokens=5, temperature=0)) == 0
    streamed = capsys.readouterr().out  # (a random model: the text itself is noise)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "hi"}) + "\n")
    main(Config(model=str(saved_model), input=str(src), output=str(dst), chat=True, max_new_tokens=5, temperature=0))
    assert json.loads(dst.read_text())["response"] + "\n" == streamed  # the terminal shows what JSONL mode writes
    rows = [{"prompt": "the cat", "id": 1}, {"messages": [{"role": "user", "content": "hello"}], "id": 2},
            {"prompt": "the dog sat on the", "id": 3}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(model=str(saved_model), input=str(src), output=str(dst), max_new_tokens=6, batch_size=2, seed=0)
    assert main(cfg) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == [1, 2, 3] and out[1]["messages"] == rows[1]["messages"]
    for o in out:
        assert isinstance(o["response"], str) and o["finish_reason"] in ("stop", "length")
        assert 1 <= o["num_tokens"] <= 6
    main(cfg)
    assert [json.loads(line) for line in dst.read_text().splitlines()] == out  # seeded: the same answers again


def test_generate_cli_reports_bad_lines(saved_model, tmp_path):
    from tristage.io import DataError
    from tristage.serve.generate import Config, main

    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        main(Config(model=str(saved_model), input=str(src), output=str(tmp_path / "o.jsonl")))
    src.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        main(Config(model=str(saved_model), input=str(src), output=str(tmp_path / "o.jsonl")))
