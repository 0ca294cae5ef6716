"""torchrun-launched data parallelism: process groups from the environment, gathers that keep gradients.

Every rank's loss sees the whole global batch's negatives: embeddings are
all-gathered by `_GatherWithGrad`, whose backward sums the gathered gradient over
ranks and returns each rank the part for its own slice. Every rank computes the
same global loss; DDP then averages parameter gradients, which yields exactly
the single-process gradient of that loss. (torch's own differentiable
all_gather routes its backward through all_to_all on gloo, which gave wrong
gradients for non-contiguous gradients in our two-rank test.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launched_rank() -> int:
    """The global rank torchrun gave this process (0 without torchrun), known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.contiguous()
        ctx.rank, ctx.size = dist.get_rank(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate `t` from all ranks along dim 0, differentiably (rank order; equal sizes)."""
    if not info.enabled:
        return t
    if not t.requires_grad:
        parts = [torch.empty_like(t.contiguous()) for _ in range(info.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)
    return _GatherWithGrad.apply(t)


def gather_padded(t: torch.Tensor, info: DistInfo, dim: int = 1) -> torch.Tensor:
    """Like `gather`, for tensors whose size along `dim` differs per rank (text units): zero-padded."""
    if not info.enabled:
        return t
    size = torch.tensor([t.shape[dim]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world)]
    dist.all_gather(sizes, size)
    target = int(max(s.item() for s in sizes))
    if t.shape[dim] < target:
        pad_shape = list(t.shape)
        pad_shape[dim] = target - t.shape[dim]
        t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
    return gather(t, info)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
