"""Continuous batching (engine.ContinuousBatch): requests that join a running batch at different steps, with
different prompt lengths and max_new_tokens, get exactly what they get alone; sampled rows depend on their own seed
only; cancelled rows leave and their rows are reused; holes are compacted; the cache grows on demand; linear layers
packed for oneDNN (serve/packed.py) give the same answers."""

from __future__ import annotations

import math

import pytest
import torch

from tristage.model.gpt import ModelConfig, build_model
from tristage.serve.engine import (
    ContinuousBatch,
    Engine,
    Request,
    SamplingParams,
    filter_logits,
    prefill,
    sample_rows,
)
from tristage.serve.packed import FusedPart, PackedLinear, packed

V = 67


@pytest.fixture(scope="module", params=[None, 6], ids=["full", "sliding-window"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=96, sliding_window=request.param,
                      initializer_range=0.5)  # varied greedy outputs (a small init repeats one token)
    return build_model(cfg, seed=0, init=True).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def run(batch: ContinuousBatch, arrivals: dict[int, list[Request]], steps: int = 10_000) -> dict:
    """Drive the batch; arrivals[s] join before step s. -> {key: (tokens, finish_reason, logprobs)}."""
    out: dict = {}
    for s in range(steps):
        for q in arrivals.get(s, []):
            batch.add(q)
        if not batch.busy and s > max(arrivals):
            break
        for t in batch.step():
            toks, _, lps = out.setdefault(t.key, ([], None, []))
            toks.append(t.token)
            lps.append(t.logprob)
            out[t.key] = (toks, t.finish_reason, lps)
    return out


def test_greedy_requests_joining_at_different_steps_equal_each_alone(model):
    prompts = prompts_of([5, 12, 1, 30, 7, 3])
    max_new = [20, 9, 33, 4, 15, 60]
    stop = [13]
    alone = [Engine(model).generate([p], SamplingParams(max_new_tokens=m, temperature=0, stop_ids=stop,
                                                        logprobs=True))[0] for p, m in zip(prompts, max_new)]
    reqs = [Request(i, p, SamplingParams(max_new_tokens=m, temperature=0, stop_ids=stop, logprobs=True))
            for i, (p, m) in enumerate(zip(prompts, max_new))]
    batch = ContinuousBatch(model, max_rows=4)  # six requests, four rows: two wait for a row to free
    got = run(batch, {0: reqs[:2], 3: reqs[2:3], 4: reqs[3:5], 11: reqs[5:]})
    assert any(a.finish_reason == "stop" for a in alone) and any(a.finish_reason == "length" for a in alone)
    for i, a in enumerate(alone):
        toks, reason, lps = got[i]
        assert toks == a.tokens and reason == a.finish_reason, i
        assert lps == pytest.approx(a.logprobs, abs=1e-4)
    assert not batch.busy and len(batch.rows) <= 4


def test_requests_prefilled_elsewhere_equal_each_alone(model):
    """add_prefilled (a prefill process's rows) mixed with plain add, more requests than rows: every request gets
    what it gets alone, and a prefilled request can be cancelled before it has a row."""
    prompts, max_new = prompts_of([5, 12, 1, 30, 7], seed=4), [20, 9, 33, 14, 6]
    alone = [Engine(model).generate([p], SamplingParams(max_new_tokens=m, temperature=0))[0].tokens
             for p, m in zip(prompts, max_new)]
    reqs = [Request(i, p, SamplingParams(max_new_tokens=m, temperature=0)) for i, (p, m) in
            enumerate(zip(prompts, max_new))]
    batch = ContinuousBatch(model, max_rows=2)
    batch.add(reqs[0])
    for q in reqs[1:4]:
        batch.add_prefilled(prefill(batch.model, [q])[0])  # two of them wait for a row, prefilled
    batch.add_prefilled(prefill(batch.model, [Request("gone", prompts[0], SamplingParams(max_new_tokens=5))])[0])
    assert batch.cancel("gone")
    got = run(batch, {3: [reqs[4]]})
    assert "gone" not in got and [got[i][0] for i in range(5)] == alone


def test_sampled_rows_depend_on_their_own_seed_only(model):
    p = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8, top_k=20)

    def one(prompt, seed, others):
        batch = ContinuousBatch(model)
        reqs = [Request("me", prompt, p, torch.Generator().manual_seed(seed))]
        reqs += [Request(i, q, p, torch.Generator().manual_seed(100 + i)) for i, q in enumerate(others)]
        return run(batch, {0: reqs[:1], 2: reqs[1:]})["me"][0]

    prompt = prompts_of([6])[0]
    a = one(prompt, 7, [])
    assert a == one(prompt, 7, prompts_of([3, 9, 2], seed=1))
    assert any(a != one(prompt, seed, []) for seed in range(8, 14))  # other seeds, other draws


def test_cancel_frees_the_row_and_a_joiner_reuses_it(model):
    batch = ContinuousBatch(model, max_rows=2)
    g = SamplingParams(max_new_tokens=50, temperature=0)
    a, b, c = prompts_of([4, 6, 9])
    batch.add(Request("a", a, g))
    batch.add(Request("b", b, g))
    batch.step()
    batch.step()
    assert batch.running == 2
    assert batch.cancel("a") and not batch.cancel("a")
    assert batch.running == 1
    batch.add(Request("c", c, g))
    batch.step()
    assert batch.running == 2 and len(batch.rows) == 2  # c took a's row
    ref = Engine(model).generate([c], SamplingParams(max_new_tokens=50, temperature=0))[0].tokens
    got = [c_tok for _ in range(60) for t in batch.step() if t.key == "c" for c_tok in [t.token]]
    assert not batch.busy
    assert got == ref[1:]  # its first token came with the join


def test_holes_are_compacted_and_the_cache_grows_on_demand(model):
    batch = ContinuousBatch(model, max_rows=8)
    for i, (pr, m) in enumerate(zip(prompts_of([3, 30, 5, 6]), [2, 60, 2, 2])):
        batch.add(Request(i, pr, SamplingParams(max_new_tokens=m, temperature=0)))
    batch.step()
    assert len(batch.rows) == 4 and batch.ks[0].shape[2] == 64  # the first allocation
    for _ in range(3):
        batch.step()
    assert len(batch.rows) == 1 and batch.running == 1  # three holes of four: compacted
    assert batch.kb[0].shape[0] == 4 and batch.ks[0].shape[0] == 1  # a view of the buffers' first row
    kb = batch.kb[0]
    for _ in range(2):
        batch.add(Request(10 + _, prompts_of([4])[0], SamplingParams(max_new_tokens=2, temperature=0)))
    batch.step()
    assert len(batch.rows) == 3 and batch.kb[0] is kb  # rows within the buffers' room: no new buffers
    while batch.ks[0].shape[2] < 96:
        batch.step()
    assert batch.busy and batch.kb[0].shape[0] == 8  # past 64 slots, up to the context; room for 2x the rows
    for _ in range(60):
        batch.step()
    assert not batch.busy and batch.kb[0].numel() == 0  # idle: no cache held


def test_add_refuses_a_prompt_without_room(model):
    batch = ContinuousBatch(model)
    with pytest.raises(ValueError, match="no room"):
        batch.add(Request(0, [1] * 96, SamplingParams()))
    with pytest.raises(ValueError, match="at least one"):
        batch.add(Request(0, [], SamplingParams()))


def test_sample_rows_filters_like_filter_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3])
    top_k, top_p = torch.tensor([0, 5, 0, 10]), torch.tensor([1.0, 1.0, 0.5, 0.9])
    seen: list[set] = [set() for _ in range(4)]
    for _ in range(200):
        u = torch.rand(4, generator=g)
        tok = sample_rows(logits, temp, top_k, top_p, u)
        assert tok[0] == logits[0].argmax()
        for r in range(1, 4):
            ref = filter_logits(logits[r:r + 1] / temp[r], int(top_k[r]), float(top_p[r]))[0]
            cdf = ref.softmax(-1).cumsum(-1)
            assert tok[r] == int((cdf <= u[r] * cdf[-1]).sum())  # the inverse CDF of the filtered distribution
            assert ref[tok[r]] > -math.inf  # never a token top-k / top-p removed
            seen[r].add(int(tok[r]))
    assert len(seen[2]) > 1 and len(seen[3]) > 1  # it does sample


def packed_everywhere(model):
    """`packed(model)` with every layer on the packed path (a tiny model would keep the plain call at few rows)."""
    fast = packed(model)
    if fast is model:
        pytest.skip("no oneDNN in this torch build")
    for m in [*fast.modules(), fast.logits]:
        if isinstance(m, PackedLinear):
            m.min_rows = 1
        if isinstance(m, FusedPart):
            m.group.min_rows = 1
    return fast


def test_packed_linears_equal_the_model_and_leave_it_unchanged(model):
    fast = packed_everywhere(model)
    assert fast is not model and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert fast.model.layers[0].mlp.up_proj.weight is model.model.layers[0].mlp.up_proj.weight  # shared, not copied
    ids = torch.tensor(prompts_of([7, 7], seed=3))
    with torch.inference_mode():
        assert torch.allclose(fast(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_fused_projections_are_one_product_and_equal_the_layers(model):
    """q, k, v (and gate, up) of the packed copy are one product on their shared input; a layer called with another
    input (a model read at a few positions) gets its own product; both equal the model."""
    fast = packed_everywhere(model)
    attn, mlp = fast.model.layers[0].self_attn, fast.model.layers[0].mlp
    assert {type(attn.q_proj), type(attn.k_proj), type(attn.v_proj), type(mlp.gate_proj)} == {FusedPart}
    assert attn.q_proj.group is attn.v_proj.group and mlp.gate_proj.group is mlp.up_proj.group
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    x = torch.randn(3, 4, model.config.hidden_size)
    with torch.inference_mode():
        torch.ops.mkldnn._linear_pointwise = lambda *a: calls.append(a[1].shape) or real(*a)
        try:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            other = attn.k_proj(x.clone())  # not the input the group's product was computed on
        finally:
            torch.ops.mkldnn._linear_pointwise = real
        ref = model.model.layers[0].self_attn
        for got, lin in [(q, ref.q_proj), (k, ref.k_proj), (v, ref.v_proj), (other, ref.k_proj)]:
            assert torch.allclose(got, lin(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1  # one product for the three


def test_greedy_rows_on_packed_linears_equal_each_alone(model):
    prompts, max_new = prompts_of([5, 12, 1, 30]), [20, 9, 33, 14]
    alone = [Engine(model).generate([p], SamplingParams(max_new_tokens=m, temperature=0))[0].tokens
             for p, m in zip(prompts, max_new)]
    batch = ContinuousBatch(model)
    batch.model = packed_everywhere(model)
    got = run(batch, {0: [Request(i, p, SamplingParams(max_new_tokens=m, temperature=0))
                          for i, (p, m) in enumerate(zip(prompts[:2], max_new[:2]))],
                      5: [Request(i + 2, p, SamplingParams(max_new_tokens=m, temperature=0))
                          for i, (p, m) in enumerate(zip(prompts[2:], max_new[2:]))]})
    assert [got[i][0] for i in range(4)] == alone
