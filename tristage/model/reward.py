"""Reward models: the decoder with a linear score head read at the last real token.

Choices, and why:
- A reward model is a `GPT` whose language-model head is replaced by `score`, a bias-free Linear from the
  hidden size to `num_labels` outputs, exactly Hugging Face's `LlamaForSequenceClassification` (and the
  Qwen2 / Qwen3 / Mistral ones): the same parameter names, so a saved folder loads in transformers with
  `AutoModelForSequenceClassification` and gives the same scores (tested).
- Only the read positions go through the last layer's queries and MLP (`GPT.hidden_states(at=...)`): keys and
  values are needed everywhere, the rest only where the score is read, which skips most of that layer's work.
- The score is read at the last real token of prompt + response (the end-of-turn token). Batches are
  right-padded with the tokenizer's pad token, which is what transformers uses to find that token too
  (the last position that is not `pad_token_id`), so the pad token must differ from the end-of-turn token.
- Output 0 is the Bradley-Terry reward. Optional outputs 1..A regress per-attribute ratings
  (fine-grained feedback), each rating mapped linearly from its observed range [lo, hi] to [-1, 1]. One
  scalar comes out of them with documented weights: score = out[0] + sum_a w_a * out[a]. The labels,
  weights and rating ranges are stored in config.json under `tristage_reward`, so anyone holding the
  folder computes the same combined score from transformers' logits: `logits @ weights`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tristage.model.gpt import GPT, ModelConfig
from tristage.model.hf import FAMILIES, copy_weights, read_config, read_tensors, save_model


class RewardModel(GPT):
    """GPT backbone + `score` head: input_ids [B, T], last_index [B] -> scores [B, num_labels] (fp32)."""

    def __init__(self, cfg: ModelConfig, num_labels: int = 1, labels: list[str] | None = None,
                 weights: list[float] | None = None, rating_range: dict[str, list[float]] | None = None):
        super().__init__(cfg)
        if hasattr(self, "lm_head"):
            del self.lm_head
        self.score = nn.Linear(cfg.hidden_size, num_labels, bias=False)
        self.labels = labels or ["reward"] + [f"attribute_{i}" for i in range(1, num_labels)]
        self.weights = weights or [1.0] + [0.0] * (num_labels - 1)
        self.rating_range = rating_range or {}
        if len(self.labels) != num_labels or len(self.weights) != num_labels:
            raise ValueError(f"labels {self.labels} / weights {self.weights} must have {num_labels} entries")

    def forward(self, input_ids: Tensor, last_index: Tensor | None = None, position_ids: Tensor | None = None,
                attn_mask: Tensor | None = None, pad_id: int | None = None, rows: Tensor | None = None) -> Tensor:
        """Scores [B, num_labels] at `last_index` [B] (default: the last token that is not `pad_id`). With `rows`
        [N], scores [N, num_labels] at positions (rows[i], last_index[i]): several sequences packed in a row."""
        if last_index is None:
            if pad_id is None:
                last_index = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
            else:
                t = torch.arange(input_ids.shape[1], device=input_ids.device)
                last_index = (t * (input_ids != pad_id)).argmax(-1)
        if rows is None:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(self.hidden_states(input_ids, position_ids, attn_mask, at=(rows, last_index))).float()

    def combine(self, scores: Tensor) -> Tensor:
        """scores [B, num_labels] -> the one documented scalar [B]: out[0] + sum_a w_a * out[a]."""
        return scores @ torch.tensor(self.weights, dtype=scores.dtype, device=scores.device)

    def hf_config(self) -> dict[str, Any]:
        arch = FAMILIES[self.config.architecture].replace("ForCausalLM", "ForSequenceClassification")
        return {"architectures": [arch], "num_labels": len(self.labels),
                "id2label": {str(i): n for i, n in enumerate(self.labels)},
                "label2id": {n: i for i, n in enumerate(self.labels)},
                "tristage_reward": {"labels": self.labels, "weights": self.weights,
                                    "rating_range": self.rating_range}}


def from_causal_lm(lm: GPT, num_labels: int = 1, seed: int = 0, **head: Any) -> RewardModel:
    """A reward model sharing `lm`'s backbone (moved, not copied) with a freshly initialised score head."""
    with torch.device("meta"):
        rm = RewardModel(lm.config, num_labels, **head)
    rm.model = lm.model
    rm.register_buffer("rope_cos", lm.rope_cos, persistent=False)
    rm.register_buffer("rope_sin", lm.rope_sin, persistent=False)
    w = lm.model.embed_tokens.weight
    rm.score = nn.Linear(lm.config.hidden_size, num_labels, bias=False, device=w.device, dtype=w.dtype)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 1.0 / (lm.config.hidden_size + 1) ** 0.5, generator=gen)
    rm.gradient_checkpointing = lm.gradient_checkpointing
    return rm


def is_reward_folder(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    return path.exists() and any(a.endswith("ForSequenceClassification")
                                 for a in json.loads(path.read_text()).get("architectures") or [])


def load_reward_model(folder: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> RewardModel:
    """Load a reward-model folder (ours, or a Hugging Face *ForSequenceClassification of a supported family)."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    if not is_reward_folder(folder):
        raise ValueError(f"{folder}: not a reward model (architectures {hf.get('architectures')}; "
                         "expected *ForSequenceClassification); start one with `tristage reward`")
    cfg = read_config(folder)
    meta = hf.get("tristage_reward") or {}
    n = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 1)
    labels = meta.get("labels") or [hf.get("id2label", {}).get(str(i), f"label_{i}") for i in range(n)]
    tensors = read_tensors(folder, device)
    n = tensors["score.weight"].shape[0] if "score.weight" in tensors else n
    tensors.pop("lm_head.weight", None)
    dtype = dtype or tensors["score.weight"].dtype
    with torch.device("meta"):
        rm = RewardModel(cfg, n, labels=labels[:n] if len(labels) >= n else None,
                         weights=meta.get("weights"), rating_range=meta.get("rating_range"))
    rm.to_empty(device=device)
    rm.to(dtype)
    rm.init_rope()
    copy_weights(rm, tensors, folder, dtype)
    return rm


def save_reward_model(rm: RewardModel, folder: str | os.PathLike, tokenizer: Any = None, **kw: Any) -> Path:
    """Write a Hugging Face *ForSequenceClassification folder (atomically, as save_model)."""
    if tokenizer is not None and (tokenizer.pad_id is None or tokenizer.pad_id in set(tokenizer.stop_ids)):
        raise ValueError("the tokenizer's pad token must exist and differ from its end-of-turn tokens, or "
                         "transformers would read the reward before the end of the response")
    return save_model(rm, folder, tokenizer, config_overrides=rm.hf_config(), **kw)
