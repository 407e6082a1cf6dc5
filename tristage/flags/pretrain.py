"""`tristage pretrain`: stage 1 (run by tristage/stages/pretrain.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.flags.base import TrainConfig
from tristage.io import UserError


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Pre-train a Llama-family model on token shards (from `tristage prepare`)."""

    data: str = arg("runs/demo/shards", help="token shard folder written by `tristage prepare`")
    out: str = arg("runs/pretrain", help="run folder: config.yaml, metrics.jsonl, samples.jsonl, model/")
    init_from: str | None = arg(None, help="continue from this Hugging Face / tristage model folder")
    tokenizer: str | None = arg(None, help="tokenizer folder (default: the one the shards were made with)")
    depth: int = arg(4, check=">=1",
                     help="model size knob: depth layers of width 64*depth (see ModelConfig.from_depth)")
    hidden_size: int | None = arg(None, check=">=1", help="override the width derived from --depth")
    num_layers: int | None = arg(None, check=">=1", help="override the layer count derived from --depth")
    num_heads: int | None = arg(None, check=">=1", help="override the head count (head dim = width / heads)")
    num_kv_heads: int | None = arg(None, check=">=1",
                                   help="key/value heads for grouped-query attention (default: = heads)")
    intermediate_size: int | None = arg(None, check=">=1", help="MLP width (default: about 8/3 of the model width)")
    rope_theta: float = arg(10000.0, check=">0", help="RoPE base")
    tie_embeddings: bool = arg(True, help="share the input embedding with the output layer")
    seq_len: int = arg(256, check=">=1", help="tokens per training sequence (the context length)")
    batch_size: int = arg(16, check=">=1", help="sequences per micro-batch per process")
    loader: Literal["random", "sequential"] = arg("random", help="random windows (nanoGPT) or one pass in order")
    eval_batches: int = arg(20, check=">=1", help="validation batches per evaluation")
    sample_every: int = arg(0, check=">=0", help="write sample generations every N steps (0: only at the end)")
    sample_prompts: list[str] = arg(["Once upon a time"], help="prompts for the sample generations")
    max_steps: int = arg(1000, help="optimizer steps")
    lr: float = arg(3e-3)
    warmup_steps: int = arg(50)
    weight_decay: float = arg(0.1)
    eval_every: int = arg(250)

    def check_flags(self) -> None:
        """The shape flags fit together (what `model_config` builds from them): the heads divide the width into an
        even head dim (rotary embeddings turn pairs of dimensions), the key/value heads divide the heads."""
        if self.init_from is not None:  # the shape comes from that folder; the flags are not used
            return
        width = self.hidden_size or 64 * self.depth
        heads = self.num_heads or max(1, width // 64)
        kv = self.num_kv_heads or heads
        named = "--hidden-size" if self.hidden_size else "64 x --depth"
        if width % heads:
            raise UserError(f"--num-heads {heads} does not divide the width {width} ({named})")
        if (width // heads) % 2:
            raise UserError(f"the head dim {width} / {heads} = {width // heads} must be even (rotary embeddings); "
                            "change --num-heads or the width")
        if heads % kv:
            raise UserError(f"--num-kv-heads {kv} does not divide the {heads} attention heads")
