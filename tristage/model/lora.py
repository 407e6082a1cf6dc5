"""LoRA: a frozen base model plus trainable low-rank updates, exported in PEFT's adapter format.

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear`:  y = x W^T + b + s * B(A(dropout(x))),
with A [r, in], B [out, r] and s = alpha / r (alpha / sqrt(r) with rsLoRA). `merge_lora` folds s * B @ A
into W and turns the layers back into plain `nn.Linear`; `save_adapter` / `load_adapter` read and write the
folder that `peft.PeftModel.from_pretrained` loads (tests check both directions against PEFT).

Choices, and why:
- Names are PEFT's. A `LoRALinear` has `lora_A` / `lora_B` submodules (`nn.Linear`s, A Kaiming-uniform with
  a=sqrt(5) and B zero, as PEFT initialises them) and `lora_dropout`, so our key `{module}.lora_A.weight`
  is PEFT's saved key minus the `base_model.model.` prefix: the adapter file is a rename, nothing more.
- The base weight keeps its own name. `LoRALinear` subclasses `nn.Linear` and takes over the very same
  `weight` / `bias` Parameter objects (PEFT instead nests them under `base_layer.`), so `...q_proj.weight`
  still names the base weight: the base part of the state dict, `save_model`, weight tying and anything
  that does `isinstance(m, nn.Linear)` are unchanged, and merging needs no renaming.
- The zero-initialised B makes a freshly adapted model compute exactly the base model's logits.
- Everything that is not LoRA is frozen (embeddings and norms included) unless `trainable_extra` names its
  module; those modules are exported as PEFT `modules_to_save` (full copies), listed by their full path
  so that PEFT's looser suffix matching selects exactly the same modules.
- Default targets are all seven linear projections of a block, not just attention: that is what QLoRA
  found to match full fine-tuning best, and it costs little more. `lm_head` cannot be a target because
  the model computes logits from its weight directly (tied or not), never calling the module.
- Adapters of half-precision bases are kept in fp32 (PEFT's `autocast_adapter_dtype` does the same).
- Loading refuses PEFT features we would compute differently (DoRA, rank/alpha patterns, LoRA bias,
  layer selection) instead of silently producing a different model.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tristage.io import atomic_folder, write_json

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the input of the LoRA path only
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))  # str: a regex
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank
    trainable_extra: list[str] = field(default_factory=list)  # modules trained in full, e.g. ["norm"]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Linear):
    """An `nn.Linear` (same `weight`, `bias`) plus a scaled low-rank update on a dropped-out input."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        wd = base.weight.dtype
        dtype = torch.float32 if wd in (torch.float16, torch.bfloat16) else wd
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.scaling = rank, scaling
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        d = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (d * self.scaling).to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex on the full module path; a list matches a name or a path suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = r".*\.(q|k|v|o|gate|up|down)_proj"
    names = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
    if not names:
        raise ValueError(f"LoRA target_modules {targets!r} match no module of this model")
    for n in names:
        m = model.get_submodule(n)
        if n == "lm_head" or n.endswith(".lm_head"):
            raise ValueError("lm_head cannot be a LoRA target: logits use its weight directly")
        if not isinstance(m, nn.Linear) or isinstance(m, LoRALinear):
            raise ValueError(f"LoRA target {n} is a {type(m).__name__}, not a plain nn.Linear")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> dict[str, int]:
    ps = list(model.parameters())  # each shared (tied) Parameter once
    return {"trainable": sum(p.numel() for p in ps if p.requires_grad), "total": sum(p.numel() for p in ps)}


def _extra_modules(model: nn.Module, names: list[str]) -> list[str]:
    found = [n for n, m in model.named_modules() if n and _matches(n, names) and any(True for _ in m.parameters())]
    if names and not found:
        raise ValueError(f"trainable_extra {names!r} match no module of this model")
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Add LoRA to `model` in place; only LoRA (and `trainable_extra`) parameters stay trainable."""
    if cfg.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {cfg.rank}")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; merge_lora it first or start from the base model")
    names = _targets(model, cfg.target_modules)
    extra = _extra_modules(model, list(cfg.trainable_extra))
    clash = [e for e in extra if any(n == e or n.startswith(e + ".") for n in names)]
    if clash:
        raise ValueError(f"trainable_extra module(s) {clash} contain LoRA targets; name smaller modules")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _replace(model, n, LoRALinear(model.get_submodule(n), cfg.rank, cfg.scaling, cfg.dropout))
    for n in extra:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    model.lora_config = cfg
    model.lora_extra_modules = extra
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and restore plain `nn.Linear`s (all params trainable)."""
    for name, m in lora_layers(model).items():
        m.weight.add_(m.delta_weight().to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _replace(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    for attr in ("lora_config", "lora_extra_modules"):
        model.__dict__.pop(attr, None)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's saved key names: LoRA A/B plus `trainable_extra` modules."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    for name in getattr(model, "lora_extra_modules", []):
        for pn, p in model.get_submodule(name).named_parameters():
            out[f"{PEFT_PREFIX}{name}.{pn}"] = p
    if _tied_extra(model):  # PEFT's ensure_weight_tying expects the tied lm_head copy as well
        out[f"{PEFT_PREFIX}lm_head.weight"] = model.model.embed_tokens.weight.clone()
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _tied_extra(model: nn.Module) -> bool:
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return bool(tied and "model.embed_tokens" in getattr(model, "lora_extra_modules", []))


def adapter_config(model: nn.Module, base_model_path: str | os.PathLike | None = None) -> dict[str, Any]:
    cfg: LoRAConfig = model.lora_config
    extra = list(getattr(model, "lora_extra_modules", []))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules),
        "modules_to_save": extra or None, "ensure_weight_tying": _tied_extra(model),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, "revision": None,
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
    }


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_path: str | os.PathLike | None = None,
                 training_state: dict[str, Any] | None = None) -> Path:
    """Write a PEFT adapter folder (adapter_config.json, adapter_model.safetensors), atomically replacing it
    (tristage.io.atomic_folder).

    training_state: torch-saved alongside as training_state.pt, so adapter and resume state move together.
    """
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers to save")
    with atomic_folder(folder) as tmp:
        save_file(lora_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", adapter_config(model, base_model_path))
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
    return Path(folder)


_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None, "target_parameters": None,
                "trainable_token_indices": None, "use_qalora": False}


def load_adapter(model: nn.Module, folder: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Apply a PEFT LoRA adapter folder to a base `model` in place (frozen unless `trainable`)."""
    folder = Path(folder)
    pc = json.loads((folder / "adapter_config.json").read_text())
    if pc.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type {pc.get('peft_type')!r} is not LORA")
    bad = [f"{k}={pc[k]!r}" for k, ok in _UNSUPPORTED.items() if pc.get(k) not in (ok, None)]
    if pc.get("bias", "none") != "none":
        bad.append(f"bias={pc['bias']!r}")
    if bad:
        raise ValueError(f"{folder}: unsupported LoRA features: {', '.join(bad)}")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (tristage does not read .bin adapters)")
    targets = pc["target_modules"]
    cfg = LoRAConfig(rank=pc["r"], alpha=pc["lora_alpha"], dropout=pc.get("lora_dropout", 0.0),
                     target_modules=targets if isinstance(targets, str) else list(targets),
                     use_rslora=bool(pc.get("use_rslora", False)))
    apply_lora(model, cfg)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    own = dict(model.named_parameters(remove_duplicate=False))
    if "lm_head.weight" in tensors and "lm_head.weight" not in own and "model.embed_tokens.weight" in tensors:
        tensors.pop("lm_head.weight")  # the tied copy PEFT writes with ensure_weight_tying
    elif "model.embed_tokens.weight" in tensors and "lm_head.weight" not in own:
        raise ValueError(f"{folder}: the adapter replaces embed_tokens of a tied model without ensure_weight_tying, "
                         "so PEFT would untie lm_head; tristage keeps them tied and cannot reproduce that")
    lora_keys = {k for k in own if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = lora_keys - tensors.keys(), tensors.keys() - own.keys()
    if missing or unexpected:
        raise ValueError(f"{folder}: adapter does not fit this model; missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    extra = sorted({k.rpartition(".")[0] for k in tensors.keys() - lora_keys})
    with torch.no_grad():
        for k, t in tensors.items():
            if t.shape != own[k].shape:
                raise ValueError(f"{folder}: {k} has shape {tuple(t.shape)}, the model has {tuple(own[k].shape)}")
            own[k].copy_(t)
    model.lora_extra_modules = extra
    cfg.trainable_extra = extra
    for k, p in own.items():
        p.requires_grad_(trainable and (k in lora_keys or k.rpartition(".")[0] in extra))
    return model
