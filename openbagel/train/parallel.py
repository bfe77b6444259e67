"""Distributed setup and the one place parallelism is applied to a (single-device) `Bagel`.

Order, as torchtitan: activation checkpointing, then FSDP2 `fully_shard` per decoder layer and per
ViT layer, then the root. Under `torchrun` the process group is gloo on CPU and NCCL on GPU; a plain
`python` run is a world of one and nothing here wraps the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.bagel import Bagel


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_distributed(device: str = "auto") -> World:
    """Join the torchrun process group if there is one; pick the device (cuda:LOCAL_RANK or cpu)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: this machine has no CUDA GPU (torch {torch.__version__}); use cpu")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, torch.device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned); the identity in a world of one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def apply_activation_checkpointing(model: Bagel) -> None:
    """Recompute each decoder / ViT layer in backward (non-reentrant checkpoint inside the model)."""
    model.language_model.model.gradient_checkpointing = True
    model.vit_model.gradient_checkpointing = True


def apply_compile(model: Bagel) -> None:
    """torch.compile each decoder and ViT layer in place (regional: the layers of a stack share one graph;
    dynamic shapes, since packed batches change length every step). Parameter names do not change."""
    for layer in [*model.language_model.model.layers, *model.vit_model.vision_model.encoder.layers]:
        layer.compile(dynamic=True)


def apply_fsdp(model: Bagel, world: World, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """FSDP2: shard each decoder layer and ViT layer as a unit, then the root (embeddings, heads, glue)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in [*model.language_model.model.layers, *model.vit_model.vision_model.encoder.layers]:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The trainer calls forward_train, not forward: it must run the root's unshard/reshard hooks too.
    register_fsdp_forward_method(model, "forward_train")


def parallelize(model: Bagel, world: World, *, activation_checkpointing: bool, compile_layers: bool,
                param_dtype: torch.dtype | None) -> None:
    """torchtitan's order: activation checkpointing, then compile, then FSDP2."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_layers:
        apply_compile(model)
    if world.distributed:
        apply_fsdp(model, world, param_dtype)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Skip FSDP's reduce-scatter on all but the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
