"""The fast step's switches: optimizer kernels, mixed precision, torch.compile.

* ``--optimizer-impl``: ``auto`` takes torch's fused kernel (one kernel for all
  parameters) for SGD and Adam where this torch has one for the device (CUDA; the CPU
  since torch 2.4), else ``foreach``; ``foreach`` a few multi-tensor ops, ``loop`` one
  parameter at a time (torch's CPU default). On 2 CPU cores with the 4.12x student, fused
  was at least as fast as the others (benchmarks/README.md).
* ``--amp``: autocast of the forward passes on CUDA: ``auto`` = bf16 on CUDA (fp16 if
  the GPU has no bf16), off on CPU; ``fp16`` adds loss scaling (GradScaler). Losses are
  computed in float32 (:mod:`igkd.distill.losses` casts). CPU runs refuse bf16/fp16.
* cuDNN's autotuner (``torch.backends.cudnn.benchmark``) is on while a CUDA run trains
  (:func:`cudnn_autotune`): a batch's shape is the same at every step, so each convolution's
  fastest algorithm is measured once; not where the process asked torch for determinism.
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


_FUSED: dict = {}  # (optimizer class, device type) -> whether fused=True is taken


def has_fused(cls: type, device: torch.device) -> bool:
    """Whether this torch's optimizer ``cls`` takes ``fused=True`` for parameters on ``device``
    (tried once per class and device type on a one-element parameter). Fused kernels came
    per optimizer and device (the CPU's for Adam and SGD in torch 2.4); a torch without one
    refuses the keyword (TypeError) or the device (RuntimeError) when the optimizer is built."""
    key = (cls, device.type)
    if key not in _FUSED:
        try:
            cls([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
            _FUSED[key] = True
        except (TypeError, RuntimeError, ValueError):
            _FUSED[key] = False
    return _FUSED[key]


def impl_kwargs(impl: str, cls: type, device: torch.device) -> dict:
    """The keyword ``--optimizer-impl impl`` gives ``cls`` on ``device``: ``auto`` is fused where
    :func:`has_fused`, else foreach; ``fused`` where there is none is a UserError."""
    if impl in ("auto", "fused") and has_fused(cls, device):
        return {"fused": True}
    if impl == "fused":
        raise UserError(f"--optimizer-impl fused: torch {torch.__version__} has no fused {cls.__name__} for "
                        f"{device.type}; use auto, foreach or loop")
    return {"foreach": impl != "loop"}


def make_optimizer(cfg, params: list, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam with the kernel ``cfg.optimizer_impl`` asks for."""
    impl = getattr(cfg, "optimizer_impl", "auto")
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    kw = impl_kwargs(impl, cls, device)
    if cfg.optimizer == "adam":
        return cls(params, lr=lr, weight_decay=cfg.weight_decay, **kw)
    return cls(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
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
            native = native_bf16()
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def native_bf16() -> bool:
    """Whether the current CUDA device has bf16 in hardware (ROCm, or an Ampere or newer GPU).
    ``including_emulation`` came in torch 2.4 (before it, is_bf16_supported() said yes
    wherever a bf16 tensor could be made): older torch gets the test it stands for."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return bool(torch.version.hip) or torch.cuda.get_device_capability()[0] >= 8


@contextlib.contextmanager
def cudnn_autotune(device: torch.device):
    """``torch.backends.cudnn.benchmark`` on for the block on CUDA, as it was after it: the
    fastest convolution algorithm for each shape is measured at its first call (fixed
    batches: once). Left as it is where the process asked for determinism
    (``torch.use_deterministic_algorithms(True)`` or ``cudnn.deterministic``): the autotuner
    may pick another algorithm each run."""
    cudnn = torch.backends.cudnn
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled() or cudnn.deterministic:
        yield
        return
    before = cudnn.benchmark
    cudnn.benchmark = True
    try:
        yield
    finally:
        cudnn.benchmark = before


def autocast(dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def maybe_compile(model: nn.Module, on: bool) -> nn.Module:
    return torch.compile(model) if on else model


__all__ = ["amp_dtype", "autocast", "cudnn_autotune", "has_fused", "impl_kwargs", "lr_lambda", "make_optimizer",
           "maybe_compile", "native_bf16"]
