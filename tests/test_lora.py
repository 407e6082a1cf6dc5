"""LoRA: exact at init, trains only adapters, merges exactly, and round-trips with PEFT in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tristage.model.gpt import ModelConfig, build_model
from tristage.model.hf import load_model, save_model
from tristage.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

CFG = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=64)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))


def _perturb_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def _lora_model(**kw) -> nn.Module:
    model = build_model(CFG, seed=0)
    return apply_lora(model, LoRAConfig(**{"rank": 4, "alpha": 8.0, **kw}))


def test_zero_b_equals_base_and_names_are_kept():
    base = build_model(CFG, seed=0).eval()
    model = _lora_model().eval()
    with torch.no_grad():
        assert torch.equal(base(_x()), model(_x()))
    layers = lora_layers(model)
    assert len(layers) == 7 * CFG.num_hidden_layers
    q = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, nn.Linear) and q.lora_A.weight.shape == (4, 64) and q.lora_B.weight.shape == (64, 4)
    assert q.scaling == 2.0 and q.lora_A.weight.abs().sum() > 0 and q.lora_B.weight.abs().sum() == 0
    sd = model.state_dict()
    assert set(base.state_dict()) <= set(sd)  # base keys unchanged, LoRA keys added beside them
    assert {k for k in sd if k not in base.state_dict()} == {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}


def test_only_lora_params_train_and_only_they_change():
    model = _lora_model(dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    c = count_parameters(model)
    assert c["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable) < c["total"] / 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(3):
        logits = model(_x(i))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), _x(i)[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_trainable_extra_unfreezes_named_modules_only():
    model = _lora_model(target_modules=["q_proj", "v_proj"], trainable_extra=["norm"])
    extra = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert extra == {"model.norm.weight"}  # a list entry matches a name or a path suffix, as in PEFT
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(build_model(ModelConfig(**{**CFG.to_dict(), "tie_word_embeddings": False})),
                   LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(build_model(CFG), LoRAConfig(target_modules=["nope"]))


def test_merge_equals_unmerged_and_exports_a_plain_hf_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _lora_model(use_rslora=True).eval()
    _perturb_lora(model)
    with torch.no_grad():
        unmerged = model(_x())
        assert (unmerged - build_model(CFG, seed=0).eval()(_x())).abs().max() > 1e-3  # the adapter matters
        merged = merge_lora(model)
        assert not lora_layers(merged) and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        assert (merged(_x()) - unmerged).abs().max().item() < 1e-5
    save_model(merged, tmp_path / "m")
    assert set(load_model(tmp_path / "m").state_dict()) == set(build_model(CFG).state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (hf(_x()).logits - unmerged).abs().max().item() < 1e-5


def test_dropout_drops_in_train_and_is_deterministic_in_eval():
    base = nn.Linear(256, 256, bias=False)
    nn.init.zeros_(base.weight)
    layer = LoRALinear(base, rank=256, scaling=1.0, dropout=0.3)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(256))
        layer.lora_B.weight.copy_(torch.eye(256))
    x = torch.rand(64, 256) + 0.5  # never zero
    layer.train()
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    assert 0.27 < dropped < 0.33  # 16k draws: sd ~ 0.004
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.7)  # inverted dropout on the LoRA input
    assert not torch.equal(layer(x), y)
    layer.eval()
    assert torch.equal(layer(x), layer(x)) and torch.allclose(layer(x), x)


def test_adapter_files_have_peft_names_and_reload(tmp_path):
    model = _lora_model(target_modules=["q_proj", "down_proj"]).eval()
    _perturb_lora(model)
    save_adapter(model, tmp_path / "a", base_model_path="some/base", training_state={"step": 3})
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["down_proj", "q_proj"]
    assert cfg["base_model_name_or_path"] == "some/base"
    keys = set(lora_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 2
    assert torch.load(tmp_path / "a" / "training_state.pt")["step"] == 3
    save_adapter(model, tmp_path / "a")  # replaces the folder as a whole
    assert not (tmp_path / "a" / "training_state.pt").exists()
    back = load_adapter(build_model(CFG, seed=0), tmp_path / "a").eval()
    assert not any(p.requires_grad for p in back.parameters())
    with torch.no_grad():
        assert torch.equal(back(_x()), model(_x()))
    again = load_adapter(build_model(CFG, seed=0), tmp_path / "a", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(build_model(ModelConfig(**{**CFG.to_dict(), "num_hidden_layers": 3})), tmp_path / "a")


# ----------------------------------------------------------------------------- PEFT interop
def _hf_base(tmp_path, tied: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "base")
    return transformers, tmp_path / "base"


@pytest.mark.parametrize("tied", [True, False])
def test_our_adapter_loads_in_peft(tmp_path, tied):
    peft = pytest.importorskip("peft")
    transformers, base = _hf_base(tmp_path, tied)
    extra = ["embed_tokens", "norm"] if tied else ["lm_head", "norm"]
    ours = apply_lora(load_model(base), LoRAConfig(rank=4, alpha=16, target_modules=ALL, trainable_extra=extra))
    _perturb_lora(ours, seed=1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(ours, tmp_path / "adapter", base_model_path=str(base))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        plain = hf(_x()).logits
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours.eval()
    with torch.no_grad():
        a, b = pm(_x()).logits, ours(_x())
    assert (a - b).abs().max().item() < 1e-5
    assert (a - plain).abs().max().item() > 1e-3  # the adapter (LoRA and the extra modules) took effect


@pytest.mark.parametrize("tied", [True, False])
def test_peft_adapter_loads_in_tristage(tmp_path, tied):
    peft = pytest.importorskip("peft")
    transformers, base = _hf_base(tmp_path, tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.05, use_rslora=True, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "v_proj", "down_proj"], ensure_weight_tying=tied,
                           modules_to_save=["embed_tokens"] if tied else ["lm_head"])
    pm = peft.get_peft_model(hf, pcfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    ours = load_adapter(load_model(base), tmp_path / "peft").eval()
    assert len(lora_layers(ours)) == 3 * 2
    assert ours.lora_extra_modules == (["model.embed_tokens"] if tied else ["lm_head"])
    with torch.no_grad():
        assert (pm(_x()).logits - ours(_x())).abs().max().item() < 1e-5
        merged = merge_lora(ours)
        assert (pm(_x()).logits - merged(_x())).abs().max().item() < 1e-5


def test_unsupported_peft_features_are_refused(tmp_path):
    model = _lora_model()
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(build_model(CFG), tmp_path / "a")


def test_untied_embedding_copy_is_refused_for_a_tied_model(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _lora_model(trainable_extra=["embed_tokens"])
    save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    assert torch.equal(tensors.pop("base_model.model.lm_head.weight"), model.model.embed_tokens.weight)
    save_file(tensors, str(f))  # what PEFT writes without ensure_weight_tying: embed_tokens alone, lm_head untied
    with pytest.raises(ValueError, match="ensure_weight_tying"):
        load_adapter(build_model(CFG), tmp_path / "a")


def test_half_precision_base_keeps_fp32_adapters():
    model = apply_lora(build_model(CFG, dtype=torch.bfloat16), LoRAConfig(rank=4))
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    _perturb_lora(model)
    with torch.no_grad():
        out = model(_x())
        assert out.dtype == torch.bfloat16
        merged = merge_lora(model)
        assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert (merged(_x()).float() - out.float()).abs().max().item() < 0.05  # bf16 rounding; LoRA moves them ~1.5
