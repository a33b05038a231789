"""Many processes: DistributedDataParallel under torchrun, CPU (gloo) or GPU (nccl).

``torchrun --nproc_per_node=N -m igkd.cli distill ...`` (or ``torchrun ... $(which igkd)
distill ...``) starts N processes; :func:`init` reads torchrun's RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE, picks nccl and ``cuda:LOCAL_RANK`` on CUDA, gloo on CPU.

Batch semantics: ``--batch-size`` is per process, the global batch is batch_size x N.
Every rank draws the same seeded permutation and the same augmentation random numbers
for the global batch and takes its own contiguous slice, so the union of the ranks'
batches is exactly the single-process batch of size batch_size x N. DDP averages the
gradients, which equals the single-process mean over the global batch; with
``--sync-bn`` (default) BatchNorm uses statistics of the global batch (nn.SyncBatchNorm
on CUDA; :class:`GlobalBatchNorm2d` on CPU, where torch's SyncBatchNorm refuses to run).
So N processes with ``--batch-size B`` train like one process with ``--batch-size B*N``
(up to float rounding). Layers that draw their own random numbers (dropout) draw them per
rank from a seed of their own (:func:`rank_seed`): independent masks, as one process draws
for its whole batch, but not the same numbers, so such a model trains alike only in
distribution. ``--scale-lr`` multiplies the learning rate by N (linear scaling).

Multi-node: run the same torchrun on every node, e.g. 2 nodes x 4 GPUs::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST0:29500 --rdzv-id=kdig1 -m igkd.cli distill \\
        --config cifar10_strong --teacher T.safetensors --method kd+ig \\
        --out /shared/runs/kdig --store /shared/stores/c10

Rank 0 writes the run directory and builds the precompute store while the other ranks
wait; they then read it, so on several nodes ``--store`` (and ``--out`` for --resume)
must be on a filesystem all nodes see, or run ``igkd precompute`` on each node first.

Lifecycle: the first call that needs the group creates it and keeps it for the life of
the process (destroyed at exit), so a script may call ``igkd.distill`` or
``igkd.precompute`` many times: destroying it after each call and creating it again
through torchrun's store met the previous group's addresses there ("Gloo connectFullMesh
... Connection refused", or a hang). A group the caller created is used as it is and
never destroyed. Each call has its own long-timeout gloo group (:meth:`Dist.barrier`),
freed by :func:`shutdown`.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..runtime import resolve_device


@dataclass
class Dist:
    """Where this process stands: rank of world, its device and the backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""
    _wait_group: object = None

    @property
    def active(self) -> bool:
        """True when collectives run (a process group with more than one process)."""
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self, long: bool = False) -> None:
        """Wait for all ranks; ``long``: a gloo group with a 2-day timeout (rank 0 precomputing)."""
        if self.active:
            dist.barrier(group=self._wait_group if long else None)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (no-op in a single process)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, in place."""
        if self.active:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    @contextmanager
    def rank0_first(self):
        """Rank 0 runs the block first, the others after it is done (and only read what it wrote)."""
        if self.rank != 0:
            self.barrier(long=True)
        try:
            yield
        finally:
            if self.rank == 0:
                self.barrier(long=True)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global random numbers (dropout): ``seed`` itself on rank 0,
    so a single process draws as before; another per rank, where the same seed everywhere
    gave every rank the same dropout mask."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 104_729 + 1) % (2**63 - 1)


def default_threads(local_world: int, cores: int | None = None) -> int:
    """max(1, cores // processes on this machine): oversubscribed OpenMP threads are ~10x slower."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, local_world))


_created: list = []  # [the default group igkd created, its backend], kept until exit


def init(device: str = "auto") -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (creating it on the first call, or
    using the caller's); a single-process Dist otherwise. Pair each call with :func:`shutdown`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise UserError(f"distributed training supports cpu and cuda devices, not '{device}'")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
        if not _created:
            atexit.register(_destroy_created)
        _created[:] = [dist.group.WORLD, backend]
    elif _created and _created[0] is dist.group.WORLD and _created[1] != backend:
        raise UserError(f"this process joined torchrun's group with {_created[1]} in an earlier call, which "
                        f"cannot serve device '{dev}'; run every igkd call of one torchrun script on the same "
                        f"kind of device")
    wait = dist.new_group(backend="gloo", timeout=timedelta(days=2))
    return Dist(rank, world, local, local_world, dev, backend, wait)


def shutdown(env: Dist) -> None:
    """Free the call's own group; the default group stays for the next call (see the module doc)."""
    if env._wait_group is not None and dist.is_initialized():
        dist.destroy_process_group(env._wait_group)
    env._wait_group = None


def _destroy_created() -> None:
    """At exit: the default group igkd created, if it is still the one in use (not a caller's)."""
    if _created and dist.is_initialized() and _created[0] is dist.group.WORLD:
        dist.destroy_process_group()
    _created.clear()


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum) over the default group, looked up at each call; its
    backward sums the gradient over the ranks by the same function, so it differentiates
    again (double backward).

    torch.distributed.nn.functional.all_reduce does the same, but its ``group=group.WORLD``
    default is evaluated when that module is first imported: imported after the group was
    made, as here, the default kept the group for the life of the process, so
    ``destroy_process_group`` left its gloo threads running; at exit a thread still releasing
    its last collective's tensors waited for the GIL while the interpreter finalized, and the
    process aborted ("terminate called without an active exception", SIGABRT) after all its
    work was done, about 1 run in 10 of 2 processes (torch 2.11, 2.13) after a collective in a
    backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(grad)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the batches of all processes, on any device.

    Two differentiable all-reduces (sum of x, then sum of (x - mean)^2), whose backward
    all-reduces the gradients of the statistics, as nn.SyncBatchNorm does on GPUs.
    Outside DDP training it is a plain BatchNorm2d (same parameters and buffers).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        return self.normalize(x, _sum_over_ranks)

    def normalize(self, x: torch.Tensor, all_reduce) -> torch.Tensor:
        """Training-mode BatchNorm of ``x`` with the statistics of ``all_reduce`` (a
        differentiable sum over the processes) of this process's sums; updates the running
        statistics.

        The statistics are computed in float32 (or x's dtype if wider) and the result has
        x's dtype, as nn.BatchNorm2d and nn.SyncBatchNorm do: under fp16 autocast x is
        float16, where the count of 64 images of 32x32 per process (65,536) and the sums of
        squares overflow to inf, and every output of the layer became NaN."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(dtype)
        c = x.shape[1]
        count = torch.tensor([float(x.numel() // c)], dtype=dtype, device=x.device)
        s = all_reduce(torch.cat([xs.sum((0, 2, 3)), count]))
        n = s[c]
        mean = s[:c] / n
        centered = xs - mean[None, :, None, None]
        var = all_reduce(centered.pow(2).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        out = centered * scale[None, :, None, None]
        return (out + self.bias[None, :, None, None] if self.affine else out).to(x.dtype)


def gather_batch(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` (equal shapes: its slice of the global batch), concatenated in
    rank order along dim 0, differentiable (``t`` itself in a single process): for a loss
    that relates the samples of a batch (DIST's per-class correlations), which on each
    slice alone differs from one process's loss on the whole batch. Every rank computes the
    same loss; the backward sums its gradient over the ranks and DDP averages them, which is
    one process's gradient."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    rank = dist.get_rank()
    return _sum_over_ranks(torch.cat([t if r == rank else torch.zeros_like(t) for r in range(dist.get_world_size())]))


def sync_batchnorm(model: nn.Module, device: torch.device, double_backward: bool = False) -> nn.Module:
    """Replace every BatchNorm2d by a synchronised one (same names, weights and buffers):
    on CUDA torch's SyncBatchNorm (fused kernels), elsewhere, or where the loss
    differentiates a gradient of the model (``double_backward``: SyncBatchNorm's backward
    kernels have no derivative, "derivative for aten::batch_norm_backward_elemt is not
    implemented"), :class:`GlobalBatchNorm2d`, built of differentiable operations."""
    if device.type == "cuda" and not double_backward:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device, double_backward)
    return model


__all__ = ["Dist", "GlobalBatchNorm2d", "default_threads", "gather_batch", "init", "shutdown", "sync_batchnorm"]
