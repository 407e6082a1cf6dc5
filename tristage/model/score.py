"""Score models: the decoder's backbone with a linear head read at chosen tokens (reward) or at every token (value).

Choices, and why:
- A score model is composition: `ScoreModel` = `Backbone` (gpt.py, the `model.` prefix) + `score`, a bias-free
  Linear from the hidden size to `num_labels` outputs, exactly Hugging Face's `LlamaForSequenceClassification`
  (and the Qwen2 / Qwen3 / Mistral ones): the same parameter names, so a saved folder loads in transformers with
  `AutoModelForSequenceClassification` and gives the same scores (tested). No language-model head is ever built.
- One forward, two reads. `at=(rows [N], positions [N])` gives scores [N, num_labels] there: a reward model reads
  the last real token of each sequence (`per_row(last_index)`), or several sequences packed in one row. Only the
  read positions go through the last layer's queries and MLP (`Backbone.forward(at=...)`): keys and values are
  needed everywhere, the rest only where the score is read, which skips most of that layer's work. `at=None`
  gives scores [B, T, num_labels] at every token: a value model (PPO's critic) reads them all.
- The reward is read at the last real token of prompt + response (the end-of-turn token). Batches are
  right-padded with the tokenizer's pad token, which is what transformers uses to find that token too
  (the last position that is not `pad_token_id`, `last_real_index`), so the pad token must differ from the
  end-of-turn token.
- Output 0 is the Bradley-Terry reward. Optional outputs 1..A regress per-attribute ratings
  (fine-grained feedback), each rating mapped linearly from its observed range [lo, hi] to [-1, 1]. One
  scalar comes out of them with documented weights: score = out[0] + sum_a w_a * out[a]. The labels,
  weights and rating ranges are stored in config.json under `tristage_reward`, so anyone holding the
  folder computes the same combined score from transformers' logits: `logits @ weights`.
- A head on an existing backbone moves it, never copies it (`from_causal_lm`, `value_model_from`): memory stays
  that of one model, and a caller that wants two models (a frozen reward model and a trained value model) loads
  or deep-copies twice, visibly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tristage.io import UserError
from tristage.model.gpt import GPT, Backbone
from tristage.model.hf import (
    FAMILIES,
    config_from_hf,
    copy_weights,
    is_score_config,
    read_hf_config,
    read_tensors,
    save_model,
)


class ScoreModel(nn.Module):
    """A backbone and a `score` head of `num_labels` outputs; scores come out in fp32."""

    def __init__(self, backbone: Backbone, num_labels: int = 1, labels: list[str] | None = None,
                 weights: list[float] | None = None, rating_range: dict[str, list[float]] | None = None):
        super().__init__()
        self.config = backbone.config
        self.model = backbone
        w = backbone.embed_tokens.weight
        self.score = nn.Linear(self.config.hidden_size, num_labels, bias=False, device=w.device, dtype=w.dtype)
        self.labels = labels or ["reward"] + [f"attribute_{i}" for i in range(1, num_labels)]
        self.weights = weights or [1.0] + [0.0] * (num_labels - 1)
        self.rating_range = rating_range or {}
        if len(self.labels) != num_labels or len(self.weights) != num_labels:
            raise ValueError(f"labels {self.labels} / weights {self.weights} must have {num_labels} entries")

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = on

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, attn_mask: Tensor | None = None,
                at: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """input_ids [B, T] -> scores [N, num_labels] at `at` = (rows [N], positions [N]), or [B, T, num_labels]
        at every token with at=None. position_ids [B, T] and attn_mask as in `Backbone.forward` (packed rows)."""
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}; read positions go in `at`")
        return self.score(self.model(input_ids, position_ids, attn_mask, at=at)).float()

    def combine(self, scores: Tensor) -> Tensor:
        """scores [..., num_labels] -> the one documented scalar [...]: out[0] + sum_a w_a * out[a]."""
        return scores @ torch.tensor(self.weights, dtype=scores.dtype, device=scores.device)

    def hf_config(self) -> dict[str, Any]:
        arch = FAMILIES[self.config.architecture].replace("ForCausalLM", "ForSequenceClassification")
        return {"architectures": [arch], "num_labels": len(self.labels),
                "id2label": {str(i): n for i, n in enumerate(self.labels)},
                "label2id": {n: i for i, n in enumerate(self.labels)},
                "tristage_reward": {"labels": self.labels, "weights": self.weights,
                                    "rating_range": self.rating_range}}


# ----------------------------------------------------------------------------- read positions
def per_row(positions: Tensor) -> tuple[Tensor, Tensor]:
    """`at` for one read per row: positions [B] -> (rows 0..B-1, positions)."""
    return torch.arange(positions.shape[0], device=positions.device), positions


def last_real_index(input_ids: Tensor, pad_id: int) -> Tensor:
    """input_ids [B, T] (right-padded) -> [B], the last position that is not `pad_id` (transformers' rule)."""
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (t * (input_ids != pad_id)).argmax(-1)


# ----------------------------------------------------------------------------- heads on an existing backbone
def from_causal_lm(lm: GPT, num_labels: int = 1, seed: int = 0, **head: Any) -> ScoreModel:
    """A score model holding `lm`'s backbone (moved, not copied) with a freshly initialised score head:
    Normal(0, 1/sqrt(hidden + 1)) drawn from a generator seeded with `seed`. head: labels, weights, rating_range."""
    sm = ScoreModel(lm.model, num_labels, **head)
    gen = torch.Generator(device=sm.score.weight.device).manual_seed(seed)
    with torch.no_grad():
        sm.score.weight.normal_(0.0, 1.0 / (lm.config.hidden_size + 1) ** 0.5, generator=gen)
    return sm


def value_model_from(model: GPT | ScoreModel, seed: int = 0) -> ScoreModel:
    """A value model (one output, read at every token) holding `model`'s backbone (moved, not copied).

    From a score model its head starts as the reward output (row 0 of `score`), so at the last real token the
    value equals the reward; from a causal LM the head is drawn as `from_causal_lm`'s with `seed`.
    """
    if isinstance(model, GPT):
        return from_causal_lm(model, 1, seed, labels=["value"])
    vm = ScoreModel(model.model, 1, labels=["value"])
    with torch.no_grad():
        vm.score.weight.copy_(model.score.weight[:1])
    return vm


# ----------------------------------------------------------------------------- folders
def is_reward_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a reward model (*ForSequenceClassification); a damaged config.json is a UserError."""
    return (Path(folder) / "config.json").exists() and is_score_config(read_hf_config(folder))


def load_reward_model(folder: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> ScoreModel:
    """Load a reward-model folder (ours, or a Hugging Face *ForSequenceClassification of a supported family)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    if not is_score_config(hf):
        raise UserError(f"{folder}: not a reward model (architectures {hf.get('architectures')}; "
                        "expected *ForSequenceClassification); start one with `tristage reward`")
    cfg = config_from_hf(hf, source=str(folder / "config.json"))
    meta = hf.get("tristage_reward") or {}
    n = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 1)
    labels = meta.get("labels") or [hf.get("id2label", {}).get(str(i), f"label_{i}") for i in range(n)]
    tensors = read_tensors(folder, device)
    if "score.weight" not in tensors:
        raise UserError(f"{folder}: no score.weight tensor (the reward head) in its weights")
    n = tensors["score.weight"].shape[0]
    tensors.pop("lm_head.weight", None)
    dtype = dtype or tensors["score.weight"].dtype
    with torch.device("meta"):
        sm = ScoreModel(Backbone(cfg), n, labels=labels[:n] if len(labels) >= n else None,
                        weights=meta.get("weights"), rating_range=meta.get("rating_range"))
    sm.to_empty(device=device)
    sm.to(dtype)
    sm.model.init_rope()
    copy_weights(sm, tensors, folder, dtype)
    return sm


def save_reward_model(sm: ScoreModel, folder: str | os.PathLike, tokenizer: Any = None, **kw: Any) -> Path:
    """Write a Hugging Face *ForSequenceClassification folder (atomically, as save_model)."""
    if tokenizer is not None and (tokenizer.pad_id is None or tokenizer.pad_id in set(tokenizer.stop_ids)):
        raise ValueError("the tokenizer's pad token must exist and differ from its end-of-turn tokens, or "
                         "transformers would read the reward before the end of the response")
    return save_model(sm, folder, tokenizer, config_overrides=sm.hf_config(), **kw)
