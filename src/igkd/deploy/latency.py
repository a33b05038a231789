"""``igkd bench latency``: latency, throughput, parameters, MACs and weight size of
models side by side, measured in one run at the same runtime, batch and threads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..command_options import LatencyConfig, api_config
from ..errors import UserError, cause
from ..evaluate.cost import RUNTIMES, check_budget, count_macs, measure_latency, weights_bytes
from ..export import require_onnxruntime
from ..fileio import writable_dir, write_json
from ..models import build_model, count_parameters, holds_own_weights, load_model, read_metadata
from ..progress import Progress
from ..spec import parse_spec
from .common import environment, existing, parse_ints, parse_shape, split_files, split_list, split_specs


def bench_latency(model=None, weights=None, *, config: LatencyConfig | None = None,
                  out: str | Path | None = None, quiet: bool = False, **options) -> dict:
    """Latency, throughput, parameters, MACs and weight size of models side by side.

    ``model``: specs (the first is the reference, normally the teacher); ``weights``:
    checkpoint files, one per model (their metadata gives the spec when ``model`` is
    empty; weights do not change the latency but give the size on disk). Every (model,
    runtime, batch size) is measured in this run with ``threads`` threads; ``speedup`` is
    the reference's median latency over the model's, at the same runtime and batch size.
    Writes ``out/latency.json`` when ``out`` is given.

    The options are the fields of :class:`igkd.command_options.LatencyConfig`, given as
    keywords (``batch_size="1,32"``, ``runtime="eager,onnxruntime"``) or as ``config``:
    one dataclass gives the command line, the YAML section ``bench:`` and these defaults,
    so they cannot disagree. Comma lists may also be Python lists. The keywords this
    function took before (``batches``, ``runtimes``, ``input_shape``, ``num_classes``,
    ``models``) still work, with a DeprecationWarning.
    """
    cfg = api_config(LatencyConfig, config, {"model": model, "weights": weights, **options}, "bench_latency")
    if out:
        writable_dir(out, "--out")
    specs, files = split_specs(cfg.model), split_files(cfg.weights, "--weights")
    if not specs and not files:
        raise UserError("no model to measure; pass --model SPEC[,SPEC...] and/or --weights FILE[,FILE...]")
    if files and specs and len(files) != len(specs):
        raise UserError(f"{len(specs)} --model specs but {len(files)} --weights files; give one file per model "
                        "or leave --model out (checkpoints with metadata name their architecture)")
    # each once: a value given twice was measured twice, and the second measurement of the
    # reference became the speed-up base of both (the reference's own row then read 1.02x)
    batch_sizes = list(dict.fromkeys(parse_ints(cfg.batch_size, "--batch-size")))
    runtime_list = list(dict.fromkeys(split_list(cfg.runtime)))
    for r in runtime_list:
        if r not in RUNTIMES:
            raise UserError(f"unknown runtime '{r}'; use one of {', '.join(RUNTIMES)}")
    if "onnxruntime" in runtime_list:
        require_onnxruntime()
    check_budget(1, cfg.warmup, cfg.min_time, cfg.min_reps, cfg.max_reps)
    shape = parse_shape(cfg.input)
    for f in files:  # every missing file named before any model is built
        existing(f, "weights file")
    entries: list[tuple[str, nn.Module, tuple[int, int, int], int, str]] = []
    for i in range(max(len(specs), len(files))):
        spec = specs[i] if specs else None
        if files:
            own = read_metadata(files[i])  # foreign files: --classes and --input
            net, meta = load_model(files[i], spec, None if own else cfg.classes, None if own else shape[0],
                                   io_flags=("--classes", "--input"))
            in_shape = (meta["in_channels"], *meta.get("image_size", shape[1:]))
            entries.append((meta["model"], net, in_shape, weights_bytes(files[i]), files[i]))
        else:
            net = build_model(spec, cfg.classes, shape[0]).eval()
            # a spec holding its weights (torchscript:FILE) is as large as its file: a frozen module
            # has its weights as constants, and its state dict is empty (16 bytes)
            size = weights_bytes(parse_spec(spec).arg) if holds_own_weights(spec) else weights_bytes(net)
            entries.append((spec, net, shape, size, ""))
    shapes = {e[2] for e in entries}
    if len(shapes) > 1:  # the ratios would mix the models' cost with their inputs' size
        raise UserError("the models take different inputs (" + ", ".join(f"{e[0]}: {'x'.join(map(str, e[2]))}"
                        for e in entries) + "); compare models of one input size, or measure them apart")
    # one image through each model before any timing (counting its MACs): a model that cannot
    # take its input (a torchscript: or py: model for 1-channel images against --input 3x32x32)
    # was a traceback from inside the timing loop
    macs = [_macs(spec, net, in_shape) for spec, net, in_shape, _, _ in entries]
    rows = []
    total = len(entries) * len(runtime_list) * len(batch_sizes)
    with Progress(total, "latency", "config", quiet) as progress:
        for runtime in runtime_list:
            for batch in batch_sizes:
                for (spec, net, in_shape, size, file), mac in zip(entries, macs):
                    r = _measure(spec, net, in_shape, batch, runtime, cfg)
                    params = count_parameters(net) or None  # a frozen TorchScript module: not countable
                    rows.append({"model": spec, "weights": file, "params": params,
                                 "macs": mac, "weights_bytes": size, **r})
                    progress.update(1, f"{spec} {runtime} batch {batch}")
    # the reference is the first entry by position: two checkpoints of one architecture share
    # a spec, and keying by it took the last of them as the reference
    n = len(entries)
    reference = {(r["runtime"], r["batch"]): r for r in rows[::n]}
    for r in rows:
        ref = reference[(r["runtime"], r["batch"])]
        r.update(speedup=ref["median_ms"] / r["median_ms"], param_ratio=_ratio(ref["params"], r["params"]),
                 mac_ratio=_ratio(ref["macs"], r["macs"]))
    # the --warmup asked for; each row's "warmup" is the number that ran (compiled makes at least
    # one, the compilation): a top-level "warmup" of 0 sat above rows that had each made one
    result = {"reference": entries[0][0], "threads": cfg.threads, "input_shape": list(entries[0][2]),
              "warmup_requested": cfg.warmup, "min_time": cfg.min_time, "min_reps": cfg.min_reps, "rows": rows,
              "environment": environment("onnxruntime" in runtime_list)}
    if out:
        write_json(Path(out) / "latency.json", result)
    return result


def _measure(spec: str, net: nn.Module, in_shape: tuple[int, int, int], batch: int, runtime: str,
             cfg: LatencyConfig) -> dict:
    """measure_latency, or a one-line UserError when the model fails at this batch size or
    runtime (an ONNX graph whose code made the batch size a constant runs at batch 1 alone:
    batch 32 in ONNX Runtime was a traceback)."""
    try:
        return measure_latency(net, in_shape, batch, cfg.threads, cfg.warmup, cfg.min_time, cfg.min_reps,
                               cfg.max_reps, runtime)
    except (UserError, OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the model or the runtime raises
        raise UserError(f"model {spec} fails in runtime {runtime} at batch size {batch} ({cause(e)}); measure it "
                        "with another --runtime or --batch-size") from None


def _macs(spec: str, net: nn.Module, in_shape: tuple[int, int, int]) -> int:
    """MACs of one image, or a one-line UserError when the model fails on that input."""
    try:  # a plain call first: under the MAC counter a TorchScript error loses its message
        with torch.no_grad():
            net(torch.zeros(1, *in_shape))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on an input it cannot take
        raise UserError(f"model {spec} fails on a {'x'.join(map(str, in_shape))} input ({cause(e)}); pass the "
                        "--input CxHxW it takes (checkpoints with igkd metadata give their own)") from None
    return count_macs(net, in_shape)  # outside the try: a fault of the counter is igkd's, not the model's


def _ratio(a, b) -> float | None:
    """a / b, or None (a '?' in the table) where either is unknown or 0."""
    return a / b if a and b else None


def latency_table(result: dict) -> str:
    from ..report import markdown_table

    def times(x) -> str:
        return f"{x:.2f}x" if x is not None else "?"
    rows = [[r["model"], r["runtime"], r["batch"], r["params"] if r["params"] is not None else "?",
             f"{r['macs'] / 1e6:.1f}M", f"{r['weights_bytes'] / 2**20:.2f} MiB", f"{r['median_ms']:.3f}",
             f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{r['images_per_s']:.1f}", times(r["param_ratio"]),
             times(r["mac_ratio"]), f"{r['speedup']:.2f}x"] for r in result["rows"]]
    return (markdown_table(["model", "runtime", "batch", "params", "MACs/img", "weights", "median ms", "p10-p90 ms",
                            "img/s", "fewer params", "fewer MACs", "speed-up"], rows)
            + f"\n\nratios against {result['reference']}, same runtime and batch; {result['threads']} thread(s), "
            f"input {'x'.join(map(str, result['input_shape']))}")
