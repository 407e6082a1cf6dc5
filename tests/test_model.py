"""The model: Hugging Face parity for every supported family, masks, packing, caching, construction."""

from __future__ import annotations

import json

import pytest
import torch

from tristage.model.gpt import (
    KVCache,
    ModelConfig,
    build_model,
    make_attention_mask,
    positions_from_doc_ids,
    rope_inv_freq,
)
from tristage.model.hf import UnsupportedModelError, load_model, read_config, save_model

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _hf_cases():
    t = transformers
    return {
        "llama-tied": (t.LlamaConfig(**COMMON, tie_word_embeddings=True), t.LlamaForCausalLM),
        "llama3-rope": (t.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), t.LlamaForCausalLM),
        "qwen2-bias": (t.Qwen2Config(**COMMON), t.Qwen2ForCausalLM),
        "qwen3-qknorm": (t.Qwen3Config(**COMMON, head_dim=32), t.Qwen3ForCausalLM),
        "mistral-window": (t.MistralConfig(**COMMON, sliding_window=8), t.MistralForCausalLM),
    }


def _randomize(model: torch.nn.Module) -> None:
    # norms and biases start at 1 / 0 in HF: perturb them so the test would see a missed mapping
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("case", list(_hf_cases()))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_import_logits_match(case, dtype, tmp_path):
    hf_cfg, cls = _hf_cases()[case]
    torch.manual_seed(0)
    ref = cls(hf_cfg).eval()
    _randomize(ref)
    ref.to(getattr(torch, dtype)).save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32).eval()
    ref = cls.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()  # the same rounded weights
    x = torch.randint(0, COMMON["vocab_size"], (2, 24))
    with torch.no_grad():
        a, b = ref(x).logits, ours(x)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(_hf_cases()))
def test_export_loads_in_transformers(case, tmp_path):
    hf_cfg, cls = _hf_cases()[case]
    torch.manual_seed(1)
    src = cls(hf_cfg)
    _randomize(src)
    src.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    save_model(ours, tmp_path / "ours", meta={"stage": "test"})
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, COMMON["vocab_size"], (3, 17))
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max().item() < 1e-5
    assert json.loads((tmp_path / "ours" / "tristage.json").read_text())["stage"] == "test"


def test_our_own_model_round_trips_through_transformers(tmp_path):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      tie_word_embeddings=False, max_position_embeddings=64)
    m = build_model(cfg, seed=3).eval()
    save_model(m, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert (hf(x).logits - m(x)).abs().max().item() < 1e-5
    again = load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path / "hf").eval()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max().item() < 1e-5


def test_unsupported_architecture_is_named(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(tmp_path / "gpt2")
    hf = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    hf.update(model_type="llama", hidden_act="gelu", vocab_size=50, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=64)
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        read_config(tmp_path / "gpt2")


def test_llama3_rope_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(ModelConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                                     rope_scaling=LLAMA3_ROPE))
    assert torch.allclose(ref.float(), ours, rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inv_freq(ModelConfig(hidden_size=64, num_attention_heads=4,
                                                              rope_theta=500000.0)))


# ----------------------------------------------------------------------------- our own invariants
def _tiny(**kw) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **kw)
    return build_model(cfg, seed=0).eval()


def test_packed_documents_do_not_attend_across_boundaries():
    m = _tiny()
    a, b = torch.randint(0, 61, (1, 7)), torch.randint(0, 61, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    pos = positions_from_doc_ids(doc_ids)
    assert pos.tolist() == [list(range(7)) + list(range(5))]
    mask = make_attention_mask(doc_ids, 12)
    with torch.no_grad():
        out = m(packed, position_ids=pos, attn_mask=mask)
        la, lb = m(a), m(b)
    assert torch.allclose(out[:, :7], la, atol=1e-5)
    assert torch.allclose(out[:, 7:], lb, atol=1e-5)
    # without the mask the second document does see the first: the test can fail
    with torch.no_grad():
        leaky = m(packed, position_ids=pos)
    assert not torch.allclose(leaky[:, 7:], lb, atol=1e-3)


def test_kv_cache_prefill_then_decode_equals_full_forward():
    m = _tiny()
    x = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.config, batch=2, max_len=16, device="cpu", dtype=torch.float32)
        pre = m(x[:, :6], cache=cache)
        steps = [m(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
    assert cache.length == 10
    assert torch.allclose(pre, full[:, :6], atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full[:, 6:], atol=1e-5)


def test_meta_build_is_deterministic_and_initialised():
    a, b = _tiny(), _tiny()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        assert torch.isfinite(p).all()
    assert torch.equal(a.model.layers[0].input_layernorm.weight, torch.ones(32))
    std = a.model.layers[0].mlp.gate_proj.weight.std().item()
    assert 0.015 < std < 0.025
    assert a.model.layers[0].self_attn.o_proj.weight.std().item() < std  # residual projections scaled down


def test_tied_embeddings_stay_tied_and_param_count():
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    m = build_model(cfg)
    assert not hasattr(m, "lm_head")
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params()
    cfg2 = ModelConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       tie_word_embeddings=False, attention_bias=True, architecture="llama")
    assert sum(p.numel() for p in build_model(cfg2).parameters()) == cfg2.num_params()


def test_from_depth_derives_dimensions():
    cfg = ModelConfig.from_depth(4, vocab_size=1000)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (256, 4, 4, 64)
    assert cfg.intermediate_size % 64 == 0 and cfg.intermediate_size >= 256 * 8 / 3


def test_gradient_checkpointing_gives_same_gradients():
    m = _tiny()
    m.train()
    x = torch.randint(0, 61, (2, 9))
    loss = m(x).logsumexp(-1).mean()
    g1 = torch.autograd.grad(loss, list(m.parameters()))
    m.gradient_checkpointing = True
    loss2 = m(x).logsumexp(-1).mean()
    g2 = torch.autograd.grad(loss2, list(m.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_position_beyond_context_is_an_error():
    m = _tiny()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.zeros(1, 129, dtype=torch.long))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import tristage.model.hf as hf

    m = _tiny()
    save_model(m, tmp_path / "ckpt", meta={"step": 1})
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(hf, "save_file", crash)
    with torch.no_grad():
        m.model.norm.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_model(m, tmp_path / "ckpt", meta={"step": 2})
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "ckpt" / "tristage.json").read_text())["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


def test_atomic_folder_replaces_on_success_only(tmp_path):
    from tristage.io import atomic_folder

    with atomic_folder(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name != "out"
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("failed halfway")
    assert (tmp_path / "out" / "a.txt").read_text() == "one"
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "b.txt").write_text("three")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folder left behind


def test_cpu_fp32_attention_rule():
    from tristage.model.gpt import CPU_FP32_ATTENTION_MAX, cpu_fp32_attention

    D = 32
    q = torch.zeros(1, 2, 4, D, dtype=torch.bfloat16)
    short, long = (torch.zeros(1, 2, n, D, dtype=torch.bfloat16) for n in (CPU_FP32_ATTENTION_MAX // D, 257))
    cache = KVCache(ModelConfig(vocab_size=8, hidden_size=64, num_attention_heads=2), 1, 8, "cpu", torch.bfloat16)
    assert cpu_fp32_attention(q, short, None)
    assert not cpu_fp32_attention(q, long, None)  # long rows: bf16 attention is the faster kernel
    assert not cpu_fp32_attention(q, short, cache)  # cached generation keeps its precision
    assert not cpu_fp32_attention(q.float(), short.float(), None)  # already fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_fp32_attention(q.float(), short.float(), None)  # autocast would compute it in bf16


def test_cpu_bf16_full_passes_run_short_attention_in_fp32(monkeypatch):
    import tristage.model.gpt as gpt

    seen = []  # the precision each attention call computes in (autocast casts inside the call)
    sdpa = gpt.F.scaled_dot_product_attention
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(
        torch.bfloat16 if torch.is_autocast_enabled("cpu") else q.dtype) or sdpa(q, k, v, **kw))
    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=1024), seed=0)
    short, long = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (1, gpt.CPU_FP32_ATTENTION_MAX // 16 + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(short)
        model(long)
        with torch.no_grad():
            model(short)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]  # short full passes only, with or without grad
    cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(short, cache=cache)  # cached generation keeps bf16 attention
    assert seen == [torch.bfloat16]
    out.float().sum().backward()  # gradients flow through the fp32 attention
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        ref = model(short)
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True, "head_dim": 32}, {"sliding_window": 4}, "checkpointing"])
def test_hidden_states_at_a_few_positions_equal_the_full_pass(extra):
    model = build_model(ModelConfig(**(COMMON if extra == "checkpointing" else {**COMMON, **extra})), seed=0)
    model.gradient_checkpointing = extra == "checkpointing"
    x = torch.randint(0, 97, (3, 11))
    rows, pos = torch.tensor([0, 2, 2, 1]), torch.tensor([10, 3, 9, 0])
    doc_ids = torch.tensor([[0] * 11, [0] * 5 + [1] * 6, [0] * 11])
    for kw in ({}, {"position_ids": positions_from_doc_ids(doc_ids), "attn_mask": make_attention_mask(doc_ids, 11)}):
        full = model.hidden_states(x, **kw)[rows, pos]
        at = model.hidden_states(x, **kw, at=(rows, pos))
        torch.testing.assert_close(at, full, atol=1e-5, rtol=1e-5)
        # gradients agree too (the last layer's skipped positions contribute nothing to these outputs)
        w = model.model.layers[0].mlp.up_proj.weight
        g_full, = torch.autograd.grad(model.hidden_states(x, **kw)[rows, pos].square().sum(), w)
        g_at, = torch.autograd.grad(model.hidden_states(x, **kw, at=(rows, pos)).square().sum(), w)
        torch.testing.assert_close(g_at, g_full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache"):
        model.hidden_states(x, cache=KVCache(model.config, 3, 16, "cpu", torch.float32), at=(rows, pos))
