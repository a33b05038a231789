"""The fast step's switches: optimizer kernels, mixed precision, torch.compile.

* ``--optimizer-impl``: ``auto`` takes torch's fused kernel (one kernel for all
  parameters) for SGD and Adam on CPU and CUDA, ``foreach`` a few multi-tensor ops,
  ``loop`` one parameter at a time (torch's CPU default). On 2 CPU cores with the 4.12x
  student, fused was at least as fast as the others (benchmarks/README.md).
* ``--amp``: autocast of the forward passes on CUDA: ``auto`` = bf16 on CUDA (fp16 if
  the GPU has no bf16), off on CPU; ``fp16`` adds loss scaling (GradScaler). Losses are
  computed in float32 (:mod:`igkd.distill.losses` casts). CPU runs refuse bf16/fp16.
* ``--compile``: torch.compile of the student's training forward. Off by default: on 2
  CPU cores (torch 2.13, inductor) the 4.12x student's step was about 10% slower
  compiled and compiling took about 70 s, so it never pays off there; try it on GPUs.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..errors import UserError


def make_optimizer(cfg, params: list, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam with the kernel ``cfg.optimizer_impl`` asks for."""
    impl = getattr(cfg, "optimizer_impl", "auto")
    kw: dict = {}
    if impl in ("auto", "fused") and device.type in ("cpu", "cuda"):
        kw = {"fused": True}
    elif impl == "fused":
        raise UserError(f"--optimizer-impl fused is not available on {device.type}; use foreach or loop")
    elif impl in ("foreach", "loop"):
        kw = {"foreach": impl == "foreach"}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, **kw)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, **kw)


def lr_lambda(cfg, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to 0 or constant; per optimisation step."""
    total = cfg.epochs * steps_per_epoch
    # whole steps: a fractional warm-up (0.5 epochs of 29 steps) gave its last step a factor
    # (step + 1) / warm above 1, a learning rate over its peak
    warm = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None: full float32)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise UserError(f"--amp {amp} needs a CUDA device (mixed precision is GPU-only here); "
                        "use --amp auto or off on CPU")
    if amp == "auto":
        # native bf16 only (Ampere and newer): is_bf16_supported() also says yes where bf16 is
        # emulated, which is slower than fp16 with loss scaling; and of this run's GPU
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def maybe_compile(model: nn.Module, on: bool) -> nn.Module:
    return torch.compile(model) if on else model


__all__ = ["amp_dtype", "autocast", "lr_lambda", "make_optimizer", "maybe_compile"]
