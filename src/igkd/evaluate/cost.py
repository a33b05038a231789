"""Inference cost of a model: multiply-accumulates, weight size, measured latency.

Latency is measured, not sampled once (METHOD.md section 7, defect 3): a fixed thread
count, warm-up calls, then repetitions until both a time and a count budget are met;
median and spread (p10, p90) of the per-call times are reported.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import UserError


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of ONE image of shape (C, H, W).

    Counted by torch's FlopCounterMode at the operator level (a convolution: kernel volume
    x input channels per group x output elements, so depthwise convolutions count once per
    channel; a matrix product: m x n x k), halving its FLOPs. Working below the modules, it
    also counts functional convolutions and matmuls in users' own models, which module hooks
    miss. Normalisation, activations, pooling, biases and additions are not counted (they are
    not multiply-accumulates and cost little). Attention counts its projections and its two
    matrix products: PyTorch's fused inference paths (nn.MultiheadAttention's "fast path",
    the CPU flash kernel of scaled_dot_product_attention) have no formula in the counter
    and counted 0, so the fast path is off while counting and the CPU kernel is mapped to
    the attention formula.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    was_training = getattr(model, "training", False)  # a frozen TorchScript module has no such attribute
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return counter.get_total_flops() // 2


def weights_bytes(model_or_path: nn.Module | str | os.PathLike) -> int:
    """Size on disk of the weights: of the file given, or of the model's state dict as a
    float32 .safetensors file without header metadata (``save_checkpoint`` adds igkd's
    metadata to the header: a few hundred bytes more)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return Path(model_or_path).stat().st_size
    # as save_checkpoint writes it: tied weights (a module used twice) made this a traceback
    from ..models.checkpoint import storable_state
    return len(safetensors_bytes(storable_state(model_or_path)))


@contextmanager
def fixed_threads(threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)`` (unchanged when None)."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads <= 0:
            raise UserError(f"threads must be a positive number, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def check_budget(batch: int, warmup: int, min_time: float, min_reps: int, max_reps: int) -> None:
    if batch <= 0:
        raise UserError(f"batch size must be a positive number, got {batch}")
    if warmup < 0 or min_reps < 1 or max_reps < min_reps or min_time < 0:
        raise UserError(f"bad timing budget: --warmup {warmup}, --min-reps {min_reps}, --max-reps {max_reps}, "
                        f"--min-time {min_time}; use --warmup >= 0, 1 <= --min-reps <= --max-reps, --min-time >= 0")


def time_calls(call: Callable[[], object], batch: int, warmup: int = 10, min_time: float = 1.0, min_reps: int = 10,
               max_reps: int = 10000) -> dict:
    """Time ``call()``: ``warmup`` untimed calls, then repetitions until at least
    ``min_reps`` calls and ``min_time`` seconds (or ``max_reps`` calls)."""
    check_budget(batch, warmup, min_time, min_reps, max_reps)
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    median = statistics.median(times)
    return {"median_ms": 1e3 * median, "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1],
            "mean_ms": 1e3 * statistics.fmean(times), "images_per_s": batch / median, "reps": len(times),
            "warmup": warmup, "batch": batch}


RUNTIMES = ("eager", "compiled", "onnxruntime")


def _runner(model, input_shape: tuple[int, int, int], runtime: str, threads: int) -> Callable[[torch.Tensor], object]:
    if runtime == "eager":
        return model
    if runtime == "compiled":
        torch._dynamo.reset()  # fresh caches: no recompile limit reached across models and batch sizes
        return torch.compile(model, dynamic=False)
    if runtime == "onnxruntime":
        from ..export import onnx_bytes, ort_runner, ort_session
        src = model if isinstance(model, (bytes, str, os.PathLike)) else onnx_bytes(model, input_shape)
        return ort_runner(ort_session(src, threads))
    raise ValueError(runtime)


def measure_latency(model: nn.Module | bytes | str | os.PathLike, input_shape: tuple[int, int, int], batch: int = 1,
                    threads: int | None = None, warmup: int = 10, min_time: float = 1.0, min_reps: int = 10,
                    max_reps: int = 10000, runtime: str = "eager") -> dict:
    """Latency of CPU inference on a batch of ``batch`` random images of shape
    ``input_shape`` (C, H, W), float32 in [0, 1].

    ``runtime``: "eager" (PyTorch, ``inference_mode``, channels-last input, as
    :func:`igkd.evaluate.predict` runs), "compiled" (``torch.compile``, compiled during
    the warm-up, which must then be >= 1) or "onnxruntime" (the model exported to ONNX,
    or ``model`` given as an ONNX file or its bytes; ``threads`` intra-op threads).
    ``threads`` None keeps PyTorch's current thread count (and gives ORT the same).

    Returns median_ms, p10_ms, p90_ms, mean_ms (per call), images_per_s (batch /
    median), reps, warmup, batch, threads, runtime.
    """
    check_budget(batch, warmup, min_time, min_reps, max_reps)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}'; use one of {', '.join(RUNTIMES)}")
    if runtime == "compiled":
        warmup = max(warmup, 1)
    x = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    if runtime != "onnxruntime":
        x = x.contiguous(memory_format=torch.channels_last)
    module = model if isinstance(model, nn.Module) else None
    if module is None and runtime != "onnxruntime":
        raise UserError(f"an ONNX model runs only with runtime onnxruntime, not '{runtime}'")
    was_training = getattr(module, "training", False)  # None, or a frozen TorchScript module: no such attribute
    if module is not None:
        module.eval()
    try:
        with fixed_threads(threads) as n:
            run = _runner(model, input_shape, runtime, n)  # ONNX export needs autograd on: outside inference_mode
            with torch.inference_mode():
                result = time_calls(lambda: run(x), batch, warmup, min_time, min_reps, max_reps)
    finally:
        if module is not None:
            module.train(was_training)
    return {**result, "threads": n, "runtime": runtime}


__all__ = ["RUNTIMES", "check_budget", "count_macs", "fixed_threads", "measure_latency", "time_calls", "weights_bytes"]
