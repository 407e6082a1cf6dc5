"""The tristage transformer: a Llama-family decoder in one file, read top to bottom.

config -> RMSNorm -> rotary embeddings -> attention (and its CPU precision rule) -> MLP -> block -> backbone
-> causal LM.

Choices, and why:
- Module and parameter names are those of Hugging Face's Llama (`model.layers.N.self_attn.q_proj`,
  `mlp.gate_proj`, `input_layernorm`, `lm_head`), and RoPE uses the same rotate-half convention, so a
  Hugging Face Llama / Qwen2 / Qwen3 / Mistral checkpoint maps onto this module by identity (hf.py).
- Family switches are plain config flags: `attention_bias` (q/k/v bias, Qwen2), `qk_norm` (per-head
  RMSNorm on q and k before RoPE, Qwen3), `tie_word_embeddings`, GQA through `num_key_value_heads`,
  Llama-3 RoPE frequency scaling through `rope_scaling`, `sliding_window` (Mistral).
- Tied embeddings have no `lm_head` module at all: the logits use `embed_tokens.weight` directly, so
  tying cannot come undone when the model is moved or materialised from the meta device.
- The backbone (embeddings, blocks, final norm, RoPE tables) is its own module and the heads hold it:
  `GPT` = backbone + language-model head, `ScoreModel` (score.py) = backbone + score head. A head is
  composition, never a subclass that deletes what it does not need, so the same backbone can be moved
  from one head to the other.
- Attention is `F.scaled_dot_product_attention`. The mask is a boolean `[B, 1, Tq, Tk]` (True = may
  attend) built by `make_attention_mask` from document ids, so several documents can share one packed
  row without attending across each other; positions are given separately and may restart per document.
  The precision it runs in is one named rule, `cpu_fp32_attention` (short CPU attention in fp32 under bf16).
- A KV cache is an object passed in (`KVCache`); the model only calls `cache.update(layer, k, v)`, so the
  generation engine decides how memory is laid out. Nothing in here knows about sampling.
- The model is built on the meta device and initialised explicitly (`init_weights`), so a large model
  costs no memory until it is placed, and a checkpoint load never pays for a random init first.
- Norm statistics and RoPE tables are computed in fp32 whatever the weight dtype, as Hugging Face does;
  that is what makes the logits match to 1e-5 in fp32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int | None = None  # None: about 8/3 of hidden, rounded up to a multiple of 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor", ...} or "linear"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    architecture: str = "llama"  # llama | qwen2 | qwen3 | mistral: the Hugging Face family it exports as
    extra: dict[str, Any] = field(default_factory=dict)  # token ids etc. carried through to config.json

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, **overrides: Any) -> ModelConfig:
        """One knob for quick configs: `depth` layers of width 64*depth, heads of 64 dims.

        depth 2 -> 0.3M non-embedding params, 4 -> 2.4M, 6 -> 8M, 8 -> 19M, 12 -> 64M.
        """
        hidden = 64 * depth
        kw: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=depth,
                                  num_attention_heads=max(1, hidden // 64))
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_params(self, include_embeddings: bool = True) -> int:
        h, d, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0) + (2 * d if self.qk_norm else 0)
        mlp = 3 * h * self.intermediate_size
        n = L * (attn + mlp + 2 * h) + h
        if include_embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n


# ----------------------------------------------------------------------------- norm
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [head_dim/2] in fp32, with Llama-3 or linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_len = sc["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind != "default":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (supported: default, llama3, linear)")
    return inv


def rope_tables(cfg: ModelConfig, length: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [length, head_dim] in fp32, rotate-half layout (Hugging Face convention)."""
    inv = rope_inv_freq(cfg).to(device)
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, D] (already gathered at each token's position)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- masks
def make_attention_mask(doc_ids: Tensor | None, q_len: int, k_len: int | None = None, *,
                        sliding_window: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Boolean attention mask [B or 1, 1, Tq, Tk], True where a query may attend a key.

    Queries are the last `q_len` of `k_len` key slots (a cache prefix before them). Causal always;
    `doc_ids` [B, Tk] restricts attention to the query's own document (packing); `sliding_window` keeps
    only the most recent keys (Mistral).
    """
    k_len = q_len if k_len is None else k_len
    if doc_ids is not None:
        device = doc_ids.device
    kpos = torch.arange(k_len, device=device)
    qpos = kpos[k_len - q_len:]
    mask = (kpos[None, :] <= qpos[:, None])[None, None]  # [1, 1, Tq, Tk]
    if sliding_window is not None:
        mask = mask & (kpos[None, :] > qpos[:, None] - sliding_window)[None, None]
    if doc_ids is not None:
        same = doc_ids[:, None, k_len - q_len:, None] == doc_ids[:, None, None, :]  # [B, 1, Tq, Tk]
        mask = mask & same
    return mask


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Positions that restart at 0 at every document boundary. doc_ids [B, T] -> [B, T]."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """A preallocated cache: k, v [layers, B, kv_heads, max_len, head_dim]; `length` slots are filled.

    All rows advance together (the engine left-pads prompts and masks the padding), so one integer
    says where the next keys go. `update` writes the new keys and returns everything cached so far.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]


# ----------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                at: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; with `at` = (rows [N], positions [N]): queries only there,
        keys and values everywhere -> [N, 1, hidden] (a model read at a few positions)."""
        B, T, _ = x.shape
        xq, cq, sq = x, cos, sin
        if at is not None:
            rows, pos = at
            xq, cq, sq = x[rows, pos][:, None], cos[rows, :, pos][:, :, None], sin[rows, :, pos][:, :, None]
            if mask is None:
                mask = torch.arange(T, device=x.device) <= pos[:, None]
            else:
                mask = mask.expand(B, -1, -1, -1)[rows, :, pos]
            mask = mask.view(len(rows), 1, 1, -1)
        Bq, Tq = xq.shape[:2]
        q = self.q_proj(xq).view(Bq, Tq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cq, sq)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if at is not None:  # index_select: its backward (index_add) is far cheaper than indexing's (index_put)
            k, v = k.index_select(0, at[0]), v.index_select(0, at[0])
        gqa = self.n_kv != self.n_heads
        if cpu_fp32_attention(q, k, cache):
            with torch.autocast("cpu", enabled=False):  # or autocast would cast the fp32 inputs back down
                y = self._sdpa(q.float(), k.float(), v.float(), mask, gqa).to(x.dtype)
        else:
            y = self._sdpa(q, k, v, mask, gqa)
        return self.o_proj(y.transpose(1, 2).reshape(Bq, Tq, -1))

    @staticmethod
    def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, gqa: bool) -> Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ----------------------------------------------------------------------------- attention backend choice
# Training on CPU in bf16/fp16: PyTorch's CPU flash-attention kernel is slower in reduced precision than in fp32
# when rows are short and heads small (measured with torch 2.13, forward + backward, head dim 32: 2.1x slower at
# 120-160 keys, 1.1x at 256; head dim 64-128: 1.2x at 160 keys, faster beyond), so attention whose keys x head
# dim stay within this bound is computed in fp32 (the projections and MLP stay in bf16).
CPU_FP32_ATTENTION_MAX = 256 * 32


def cpu_fp32_attention(q: Tensor, k: Tensor, cache: KVCache | None) -> bool:
    """Whether `Attention` computes this call's SDPA in fp32 (autocast off) instead of in q's own precision.

    q [B, H, Tq, D], k [B, Hkv, Tk, D]. True on the CPU, for a full-sequence pass (no KV cache) in reduced
    precision (bf16/fp16 tensors or CPU autocast), when Tk x D <= CPU_FP32_ATTENTION_MAX. The rule covers every
    full-sequence pass, so a training step, a reference or validation pass and a reward score use the same
    numerics (DPO's policy and reference agree exactly at step 0); cached generation is untouched.
    """
    return (q.device.type == "cpu" and cache is None and k.shape[-2] * q.shape[-1] <= CPU_FP32_ATTENTION_MAX
            and (q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")))


# ----------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- block
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                at: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """[B, T, hidden] -> [B, T, hidden], or [N, 1, hidden] at positions `at` = (rows, positions) only."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, at)
        x = (x if at is None else x[at[0], at[1]][:, None]) + a
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- model
class Backbone(nn.Module):
    """Embeddings, blocks, final norm and the rotary tables: Hugging Face's `LlamaModel` (the `model.` prefix).

    It computes hidden states; a head reads them: `GPT` turns them into logits, `ScoreModel` (score.py) into
    scores. The RoPE tables are derived, not learned: non-persistent buffers, rebuilt by `init_rope`, never saved,
    so parameter names are the same as without them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.register_buffer("rope_cos", torch.empty(cfg.max_position_embeddings, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_position_embeddings, cfg.head_dim), persistent=False)

    @torch.no_grad()
    def init_rope(self) -> None:
        cos, sin = rope_tables(self.config, self.config.max_position_embeddings, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, attn_mask: Tensor | None = None,
                cache: KVCache | None = None, at: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, hidden].

        position_ids [B, T] default to 0..T-1 (after the cache's filled length); attn_mask is a boolean
        [B|1, 1, T, Tk] (see make_attention_mask); None means plain causal.
        at = (rows [N], positions [N]): only the hidden states there, [N, hidden]; the last layer then computes
        queries, attention output and MLP at those positions alone (a reward model reads one token per sequence,
        so this skips most of a layer's work; the values are the same).
        """
        if at is not None and cache is not None:
            raise ValueError("hidden_states: `at` reads a full forward pass; it cannot be used with a KV cache")
        B, T = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if not torch.compiler.is_compiling() and T > 0:
            top = int(position_ids.max())
            if top >= self.config.max_position_embeddings:
                limit = self.config.max_position_embeddings
                raise ValueError(f"position {top} exceeds max_position_embeddings {limit}")
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[position_ids].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]
        sin = self.rope_sin[position_ids].unsqueeze(1).to(x.dtype)
        sw = self.config.sliding_window
        if attn_mask is None and cache is None and sw is not None and T > sw:
            attn_mask = make_attention_mask(None, T, sliding_window=sw, device=input_ids.device)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, attn_mask, cache, at if i == last else None)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if cache is not None:
            cache.advance(T)
        return self.norm(x if at is None else x[:, 0])


class GPT(nn.Module):
    """A causal language model: the backbone plus the language-model head (logits). Losses live elsewhere."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # The flag and the tables live on the backbone (a score model shares them); these read and set them there.
    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = on

    @property
    def rope_cos(self) -> Tensor:
        return self.model.rope_cos

    @property
    def rope_sin(self) -> Tensor:
        return self.model.rope_sin

    # -- construction
    def init_rope(self) -> None:
        self.model.init_rope()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices, with the residual projections scaled by
        1/sqrt(2*layers) (GPT-2), ones for norms, zeros for biases."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.rope_cos.device).manual_seed(seed)
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, resid_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
        self.init_rope()

    # -- forward
    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None, attn_mask: Tensor | None = None,
                      cache: KVCache | None = None, at: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The backbone's final-normed hidden states [B, T, hidden] ([N, hidden] with `at`); see Backbone.forward."""
        return self.model(input_ids, position_ids, attn_mask, cache, at)

    def logits(self, h: Tensor) -> Tensor:
        w = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, w)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, attn_mask: Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only)."""
        h = self.hidden_states(input_ids, position_ids, attn_mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0, init: bool = True) -> GPT:
    """Build on the meta device, then materialise on `device` and (unless loading weights next) initialise."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    if init:
        model.init_weights(seed)
    else:
        model.init_rope()
    return model
