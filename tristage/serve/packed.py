"""The serving engine's linear layers as oneDNN calls on weights packed once, on a CPU.

    fast = packed(model)     # a model whose nn.Linear layers and logits head run on packed weights (or `model`)
    logits = fast(ids, positions, mask, cache)

Choices, and why:
- On a CPU, torch's nn.Linear calls MKL's GEMM, which on AMD processors takes its AVX2 code path; oneDNN's
  `_linear_pointwise` on a weight reordered once (what torch.compile does with frozen weights) takes AVX-512. On the
  bench machine (AMD EPYC Zen 5, one thread, fp32), nn.Linear vs packed, in us: 256 -> 768 at 16 rows 84 vs 45, at
  64 rows 363 vs 119; the 4096-token head at 16 rows 406 vs 307, at 4 rows 195 vs 75. A decode step at 16 rows and
  a prompt's prefill are mostly these products.
- A oneDNN call has a fixed cost of ~10 us, which loses to MKL's at a few rows of a small matrix (256 -> 128 at one
  row: 3 vs 11 us), so a layer keeps the plain call below `min_rows` rows: 2^20 / (in x out) (1 row for the head,
  5 for 256 -> 768, 16 for 256 x 256, 32 for 256 -> 128; where the two meet on that machine).
- A structural copy: the modules are copied, their tensors are not (deepcopy with every tensor in the memo), so the
  model the caller holds is unchanged (`Engine` and training keep nn.Linear), and memory grows by the packed
  weights only. The head is the copy's `logits` (an instance attribute over `GPT.logits`).
- Outputs equal nn.Linear's up to float rounding (another summation order, ~1e-7 relative in fp32), as two batch
  sizes through MKL already differ; greedy answers equal the request alone through `Engine` (tested).
- Only where it can work: a CPU model in fp32 or bf16 with oneDNN in this torch build; anything else gets the
  model back unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tristage.model.gpt import GPT


def min_rows(weight: Tensor) -> int:
    """Rows from which the packed call beats the plain one for this weight: 2^20 / (in x out), at least 1."""
    return max(1, round(2 ** 20 / weight.numel()))


class PackedLinear(nn.Module):
    """y = x W^T + b, through oneDNN on W packed once (from `min_rows` rows; the plain call below)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias  # the original tensors (shared, not copied)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        self.min_rows = min_rows(weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() < self.min_rows * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class _Fused:
    """Linear layers that read the same input (q, k, v; gate, up) as one packed product of their weights stacked."""

    def __init__(self, layers: list[nn.Linear]):
        w = torch.cat([m.weight.detach() for m in layers])
        b = torch.cat([m.bias.detach() for m in layers]) if layers[0].bias is not None else None
        self.packed, self.bias = torch.ops.mkldnn._reorder_linear_weight(w, 16), b
        self.sizes = [m.out_features for m in layers]
        self.min_rows = min_rows(w)
        self.stash: tuple[Tensor, tuple[Tensor, ...]] | None = None  # (the input, every layer's output)


class FusedPart(nn.Module):
    """Layer `index` of a `_Fused` group. The first layer's call computes the whole group's product on its input and
    keeps the other layers' slices; a later layer called with that same tensor takes its slice. Any other input
    (another tensor, or fewer rows than pay for the packed call) gets this layer's own plain product."""

    def __init__(self, group: _Fused, index: int, layer: nn.Linear):
        super().__init__()
        self.group, self.index = group, index
        self.weight, self.bias = layer.weight, layer.bias  # the original tensors (shared, not copied)

    def forward(self, x: Tensor) -> Tensor:
        g = self.group
        if self.index == 0:
            g.stash = None
            if x.numel() < g.min_rows * x.shape[-1]:
                return F.linear(x, self.weight, self.bias)
            out = torch.ops.mkldnn._linear_pointwise(x, g.packed, g.bias, "none", [], "").split(g.sizes, -1)
            g.stash = (x, out)
            return out[0]
        if g.stash is not None and g.stash[0] is x:
            out = g.stash[1][self.index]
            if self.index == len(g.sizes) - 1:
                g.stash = None
            return out
        return F.linear(x, self.weight, self.bias)


def _fuse(module: nn.Module, names: list[str]) -> bool:
    """Replace module's linear layers `names` (read in that order, from one input) by the parts of one group."""
    layers = [getattr(module, n, None) for n in names]
    if not all(type(m) is nn.Linear for m in layers) or len({m.bias is None for m in layers}) > 1:  # type: ignore
        return False
    group = _Fused(layers)  # type: ignore[arg-type]
    for i, (n, m) in enumerate(zip(names, layers)):
        setattr(module, n, FusedPart(group, i, m))  # type: ignore[arg-type]
    return True


def packed(model: GPT) -> GPT:
    """A copy of `model` (its tensors shared) whose nn.Linear layers and logits are `PackedLinear`; `model` itself
    where oneDNN cannot be used (not a CPU, not fp32 / bf16, no oneDNN)."""
    w = model.model.embed_tokens.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.enabled:
        return model
    try:
        PackedLinear(w[:8], None)
    except (RuntimeError, AttributeError):  # a build without the op
        return model
    fast = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
    for layer in fast.model.layers:  # the order Attention and MLP call them in
        _fuse(layer.self_attn, ["q_proj", "k_proj", "v_proj"])
        _fuse(layer.mlp, ["gate_proj", "up_proj"])
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child.weight, child.bias))
    head = fast.model.embed_tokens.weight if fast.config.tie_word_embeddings else fast.lm_head.weight
    object.__setattr__(fast, "logits", PackedLinear(head, None))  # over GPT.logits, for this copy only
    return fast
