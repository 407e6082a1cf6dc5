"""Data parallelism applied from outside to a plain nn.Module: DDP or FSDP2, under torchrun.

Choices, and why:
- The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...),
  so one node and many nodes are the same code; a plain `python`/`tristage` call is world size 1 and
  touches no process group at all.
- NCCL on CUDA, gloo on CPU (what the tests use: two processes on this machine).
- FSDP2 (`fully_shard`) shards each block, then the root; DDP replicates. Both keep the module's
  parameter names, so checkpoints gather to the same Hugging Face folder either way.
- Gradient accumulation skips the gradient all-reduce on all but the last micro-batch (`no_sync` for
  DDP, `set_requires_gradient_sync` for FSDP2).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tristage.flags.base import Parallel


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def wrap(model: nn.Module, d: Dist, parallel: Parallel) -> nn.Module:
    if not d.enabled:
        return model
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # see _dcp: only multi-process runs pay for the import

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel mode {parallel!r} (ddp, fsdp)")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def no_sync(model: nn.Module, sync: bool):
    """Context in which backward does (sync=True) or does not all-reduce gradients."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def _restore():
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _restore()
    return contextlib.nullcontext()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _dcp():
    """torch.distributed.checkpoint.state_dict, imported on first use: it pulls in DTensor and sympy (about 1.2 s),
    which single-process runs and every command's --help would otherwise pay for."""
    import torch.distributed.checkpoint.state_dict as dcp

    return dcp


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (collective under FSDP: every rank must call it)."""
    if d.enabled:
        dcp = _dcp()
        return dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optim_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict:
    if d.enabled:
        dcp = _dcp()
        return dcp.get_optimizer_state_dict(model, opt,
                                            options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    if d.enabled:
        dcp = _dcp()
        dcp.set_optimizer_state_dict(model, opt, state,
                                     options=dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        opt.load_state_dict(state)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still has a collective in flight
        dist.destroy_process_group()
