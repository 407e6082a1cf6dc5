"""Hugging Face model folders in and out: every tristage checkpoint is one, and we load theirs.

A folder holds config.json, model.safetensors (or sharded model-0000N-of-0000M.safetensors with
model.safetensors.index.json), generation_config.json, tokenizer files and, for our own checkpoints,
tristage.json (stage, parent, config, metrics).

Choices, and why:
- Parameter names in gpt.py are Hugging Face's, so the conversion is the identity on the state dict;
  only config.json needs translating. Supported families: llama, qwen2, qwen3, mistral. Anything else
  fails up front with a message naming the model_type and the missing feature, never halfway through.
- Both rope spellings are read: the legacy `rope_theta` + `rope_scaling` and transformers 5's
  `rope_parameters`. We write the legacy spelling, which every transformers version reads.
- A save writes a sibling temp folder, fsyncs, then swaps it in with a rename (`tristage.io.atomic_folder`,
  shared with LoRA adapters), so an interrupted save never leaves a half-written checkpoint where a good one was.
- A folder that cannot be loaded is the user's to fix, so every way it can be wrong is one `UserError` naming the
  folder or file: no config.json or an unreadable one, a missing key, an unsupported architecture, a missing,
  empty or truncated weights file, a missing, unexpected or misshapen tensor, non-finite weights (a diverged run
  must not pass for a model), and a reward model where a language model is expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tristage.io import UserError, atomic_folder
from tristage.model.gpt import GPT, ModelConfig, build_model

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(UserError):
    """A model folder tristage cannot load exactly (an architecture, a feature, weights that do not fit)."""


# ----------------------------------------------------------------------------- config translation
def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig, refusing what we cannot run exactly."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        archs = ", ".join(hf.get("architectures") or []) or "?"
        raise UnsupportedModelError(
            f"{source}: model_type {mt!r} ({archs}) is not supported; tristage loads {', '.join(FAMILIES)}")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={hf['pretraining_tp']}")
    rp = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {k: v for k, v in rp.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", "llama3", "linear"):
        problems.append(f"rope type {kind!r} (supported: default, llama3, linear)")
    sliding = None
    if mt == "mistral":
        sliding = hf.get("sliding_window")
    elif hf.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        problems.append("layer_types other than full_attention")
    if problems:
        raise UnsupportedModelError(f"{source}: {mt} features not supported: " + "; ".join(problems))
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
    if missing:
        raise UnsupportedModelError(f"{source}: {', '.join(missing)} missing or not an integer")
    theta = hf.get("rope_theta", rp.get("rope_theta", 10000.0))
    extra = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    try:
        return _model_config(hf, mt, theta, kind, scaling, sliding, extra)
    except (ValueError, TypeError, ZeroDivisionError) as e:  # values of the wrong type or that do not fit together
        raise UnsupportedModelError(f"{source}: {e}") from None


def _model_config(hf: dict[str, Any], mt: str, theta: Any, kind: str, scaling: dict[str, Any],
                  sliding: int | None, extra: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=None if kind == "default" else {**scaling, "rope_type": kind},
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=mt == "qwen3",
        sliding_window=sliding,
        initializer_range=hf.get("initializer_range", 0.02),
        architecture=mt,
        extra=extra,
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    mt = cfg.architecture
    if mt not in FAMILIES:
        raise UnsupportedModelError(f"cannot export architecture {mt!r}; choose one of {', '.join(FAMILIES)}")
    if mt == "qwen2" and not cfg.attention_bias:
        raise UnsupportedModelError("qwen2 always has q/k/v bias; export as llama with attention_bias instead")
    if cfg.qk_norm and mt != "qwen3":
        raise UnsupportedModelError("q/k norm exists only in qwen3; set architecture='qwen3'")
    hf: dict[str, Any] = {
        "architectures": [FAMILIES[mt]],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if mt == "llama":
        hf["mlp_bias"] = False
    if mt == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if mt in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers)
    hf.update(cfg.extra)
    return hf


# ----------------------------------------------------------------------------- loading
def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); the file is damaged "
                            "or incomplete") from None
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("*.bin")):
        raise UnsupportedModelError(f"{folder}: only PyTorch .bin weights found; tristage reads safetensors "
                                    "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise UserError(f"{folder}: no weights (no model.safetensors or model.safetensors.index.json)")


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A model folder's config.json as a dict; a missing folder or file, or one that is not a JSON object, is a
    UserError naming it."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder" if not folder.exists() else f"{folder}: not a folder")
    if not path.is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not readable JSON ({e}); the file is damaged or incomplete") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def is_score_config(hf: dict[str, Any]) -> bool:
    """Whether a config.json dict is a score (reward) model's: *ForSequenceClassification."""
    archs = hf.get("architectures") or []
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                           for a in archs)


def read_config(folder: str | os.PathLike) -> ModelConfig:
    return config_from_hf(read_hf_config(folder), source=str(Path(folder) / "config.json"))


def read_tensors(folder: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors file(s), by name; a missing, empty or damaged file is a
    UserError naming it."""
    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(folder)):
        if not f.is_file():
            raise UserError(f"{f}: missing (listed in {f.parent / 'model.safetensors.index.json'})")
        if f.stat().st_size == 0:
            raise UserError(f"{f}: empty (0 bytes); the weights were never written in full")
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensors[k] = sf.get_tensor(k)
        except Exception as e:  # safetensors raises its own SafetensorError (header, truncated data) or OSError
            raise UserError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e}); the file is damaged "
                            "or incomplete (a truncated copy?)") from None
    return tensors


def copy_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], folder: str | os.PathLike,
                 dtype: torch.dtype) -> None:
    """Copy `tensors` into `model`, refusing missing, unexpected or misshapen weights (naming them)."""
    expected = set(model.state_dict())
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise UnsupportedModelError(
            f"{folder}: weights do not match a {model.config.architecture} {type(model).__name__} of this config; "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    with torch.no_grad():
        for k, p in model.state_dict().items():
            t = tensors[k]
            if t.shape != p.shape:
                raise UnsupportedModelError(
                    f"{folder}: {k} has shape {tuple(t.shape)}, config implies {tuple(p.shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"{folder}: weight {k} holds non-finite values (NaN or inf); the model is unusable "
                                "(saved from a diverged run?)")
            p.copy_(t.to(dtype))


def load_model(folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a Hugging Face (or tristage) model folder. dtype None keeps the checkpoint's dtype."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    if is_score_config(hf):
        raise UserError(f"{folder}: a reward model ({', '.join(hf['architectures'])}), not a language model; this "
                        "needs a causal LM folder (a base, SFT or DPO model)")
    cfg = config_from_hf(hf, source=str(folder / "config.json"))
    tensors = read_tensors(folder, device)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    if dtype is None:
        dtype = next((t.dtype for k, t in tensors.items() if k.endswith("embed_tokens.weight")), torch.float32)
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    copy_weights(model, tensors, folder, dtype)
    return model


# ----------------------------------------------------------------------------- saving
def save_model(model: torch.nn.Module, folder: str | os.PathLike, tokenizer: Any = None, *,
               meta: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
               training_state: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None,
               config_overrides: dict[str, Any] | None = None) -> Path:
    """Write `model` (a GPT or a ScoreModel: anything with `config` and Hugging Face parameter names) as a Hugging
    Face folder, atomically replacing `folder` (tristage.io.atomic_folder).

    tokenizer: anything with `save(folder)` (tristage.tokenizer.Tokenizer); its eos/stop ids go into
    generation_config.json. meta: written as tristage.json.
    training_state: torch-saved as training_state.pt in the same folder, so weights and the state to
    resume them (optimizer, data position, RNG) are replaced together or not at all.
    state_dict: the weights to write, when `model` is sharded (FSDP) and its own state dict is not full.
    config_overrides: keys set in config.json after translation (e.g. a sequence-classification head).
    """
    folder = Path(folder)
    cfg = model.config
    state = {k: v.detach() for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    dtype = dtype or next(iter(state.values())).dtype
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    hf = config_to_hf(cfg, dtype)
    hf.update(config_overrides or {})
    gen: dict[str, Any] = {}
    if tokenizer is not None:
        for key, attr in (("bos_token_id", "bos_id"), ("pad_token_id", "pad_id")):
            v = getattr(tokenizer, attr, None)
            if v is not None:
                hf.setdefault(key, v)
                gen.setdefault(key, v)
        stops = list(getattr(tokenizer, "stop_ids", []) or [])
        eos = getattr(tokenizer, "eos_id", None)
        if eos is not None:
            hf.setdefault("eos_token_id", eos)
            if eos not in stops:
                stops.insert(0, eos)
        if stops:
            gen.setdefault("eos_token_id", stops if len(stops) > 1 else stops[0])
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in hf:
            gen.setdefault(k, hf[k])
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if meta is not None:
            (tmp / "tristage.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
    return folder
