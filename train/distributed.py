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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from afloc_cli.errors import AflocError

# How long the other ranks wait for rank 0's one-off work (decoding a whole corpus can take hours, past the
# process group's default 30-minute timeout; training's own collectives keep that default).
MAIN_FIRST_TIMEOUT = timedelta(hours=24)


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


def on_main_rank(work: Callable[[], object], info: DistInfo, what: str) -> None:
    """Run `work` on global rank 0 only, while the other ranks wait for it; if it fails there, they stop too.

    For work on the shared run folder (preparing OUT/cache) that every rank would otherwise do at once, racing on
    the same files. Rank 0 tells the others whether it succeeded, so a failure ends every rank with one line
    instead of leaving them waiting."""
    if not info.enabled:
        work()
        return
    # A CPU (gloo) group of its own, made before the work (making it is collective too): its long timeout is only
    # for this wait, and it works beside NCCL.
    group = dist.new_group(backend="gloo", timeout=MAIN_FIRST_TIMEOUT)
    error: BaseException | None = None
    if info.is_main:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - told to the other ranks, then raised here as it was
            error = exc
    try:
        outcome = [None if error is None else (str(error) or type(error).__name__)]
        dist.broadcast_object_list(outcome, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise AflocError(f"rank 0 failed {what}: {outcome[0]}")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
