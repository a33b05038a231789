"""Export a model for deployment: ONNX or TorchScript, optionally int8 (ONNX Runtime).

The exported graph is the model as ``load_model`` returns it, preprocessing included
(a checkpoint's :class:`igkd.models.Normalized` wrapper becomes two element-wise ops in
the graph), so a deployed model takes float32 NCHW pixels in [0, 1], like every igkd
model. The batch dimension is dynamic.

* ONNX: PyTorch's TorchScript-based exporter (``dynamo=False``): no extra dependency
  (the dynamo exporter needs onnxscript), BatchNorm folded into the convolutions.
* TorchScript: ``torch.jit.trace`` then ``torch.jit.freeze`` (weights become
  constants, BatchNorm folded); runs with PyTorch alone.
* int8: ONNX Runtime post-training static quantisation (QDQ format, per-channel int8
  weights, uint8 activations, MinMax calibration on training images), from the fp32 ONNX
  graph after ``quant_pre_process``. uint8 activations with int8 weights ("U8S8") use
  ORT's fast x86 kernels: on the development machine (AVX-512 VNNI) int8 activations
  ("S8S8") ran the CIFAR student slower than fp32, U8S8 faster than fp32.

The export's metadata (spec, classes, input, preprocessing, parity, source checkpoint)
is written beside the file (``FILE.json``) and also inside it (:func:`embed_metadata`):
ONNX ``metadata_props`` (key ``igkd``: the JSON; plus ``classes`` and ``model`` as plain
entries for tools that show them), TorchScript an extra file ``igkd.json`` in the archive.
:func:`read_export_metadata` reads it from the file alone.

onnx/onnxruntime are the optional extra ``igkd[export]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import UserError, cause

INSTALL_HINT = 'pip install "igkd[export]"'


def require_onnxruntime():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise UserError(f"ONNX export and the onnxruntime runtime need onnx and onnxruntime; {INSTALL_HINT}") from None
    return onnxruntime


@contextlib.contextmanager
def _stdout_dropped_on_error():
    """Hold what is written to file descriptor 1 meanwhile; give it back unless an exception
    leaves. torch's TorchScript exporter turns its C++ log on for good (``setup_onnx_logging``
    tests the function ``_jit_is_onnx_log_enabled``, not its value) and, when a model fails,
    dumps the whole Torch IR graph on standard output: above the one-line error, and into
    the JSON that ``--json`` promises on stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (a closed stdout): nothing to hold
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            if not failed:  # back where it was going: descriptor 1, whatever sys.stdout is now
                held.seek(0)
                data = held.read()
                while data:
                    data = data[os.write(1, data):]


@contextlib.contextmanager
def _on_cpu_in_eval(model: nn.Module):
    """``model`` in eval mode with its parameters and buffers on the CPU for the export, then
    as the caller had it: each submodule's training flag, and each parameter, gradient and
    buffer back on its own device as the very tensor it was (its storage kept meanwhile, so
    nothing is copied back, and an optimizer's or a CUDA graph's hold on it stays valid).
    (``model.cpu().eval()`` alone would leave a notebook's CUDA model on the CPU, in eval mode.)
    Only the tensors off the CPU are copied (once, to the CPU); a CPU model is not copied."""
    flags = [(m, m.training) for m in model.modules()]
    params = [(m, name, p, p.data, None if p.grad is None else p.grad.data)
              for m in model.modules() for name, p in m._parameters.items()
              if p is not None and p.device.type != "cpu"]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()
               if b is not None and b.device.type != "cpu"]
    try:
        yield model.cpu().eval()
    finally:
        for m, name, p, data, grad in params:
            if m._parameters.get(name) is not p:  # torch's overwrite_module_params_on_conversion replaced it
                m._parameters[name] = p
            p.data = data
            if grad is not None and p.grad is not None:
                p.grad.data = grad
        for m, name, b in buffers:
            m._buffers[name] = b
        for m, training in flags:
            m.training = training


def onnx_bytes(model: nn.Module, input_shape: tuple[int, int, int], opset: int = 17) -> bytes:
    """The model (in eval mode, on CPU) as a serialised ONNX graph: input ``images``
    (N x C x H x W float32, N dynamic), output ``logits``. The caller's module comes back on
    its device with its training flags (:func:`_on_cpu_in_eval`)."""
    require_onnxruntime()
    buf = io.BytesIO()
    with _on_cpu_in_eval(model) as model, warnings.catch_warnings(), _stdout_dropped_on_error():
        warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript-based exporter
        try:
            torch.onnx.export(model, (torch.rand(1, *input_shape),), buf, dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        except (OSError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - an operator ONNX has no form for (aten::fft_rfft2) was a traceback
            raise UserError(f"the model cannot be exported to ONNX ({cause(e)}); export it with "
                            "--format torchscript, or measure it with --runtime eager") from None
    return buf.getvalue()


def torchscript_module(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.jit.ScriptModule:
    """Traced and frozen TorchScript module of the model (eval mode, CPU); the caller's module
    comes back on its device with its training flags (:func:`_on_cpu_in_eval`)."""
    with _on_cpu_in_eval(model) as model, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.rand(2, *input_shape), check_trace=False)  # parity is checked on data
        return torch.jit.freeze(traced)


def ort_session(model: bytes | str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (None: ORT's default)."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4  # fatal only: an error is raised to Python anyway, and was printed twice
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Callable[[torch.Tensor], torch.Tensor]:
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.numpy(), np.float32)})[0])


def load_runner(path: str | Path, threads: int | None = None,
                format: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function float32 images -> logits running an exported file: ONNX (by ONNX
    Runtime) or TorchScript; ``format`` None: ONNX when the name ends in .onnx."""
    path = Path(path)
    if (format or ("onnx" if path.suffix == ".onnx" else "torchscript")) == "onnx":
        return ort_runner(ort_session(path, threads))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)
    return run


@torch.inference_mode()
def logits_of(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of uint8 images N x C x H x W through ``run`` (float32 [0, 1] inputs)."""
    from .evaluate.metrics import fill_rows
    return fill_rows(len(images), batch_size, lambda i: run(images[i:i + batch_size].float().div_(255)))


def quantize_int8(fp32: bytes, out: str | Path, calibration_images: torch.Tensor, batch_size: int = 32) -> None:
    """Static int8 quantisation of an fp32 ONNX graph into ``out`` (QDQ, per-channel
    symmetric int8 weights, asymmetric uint8 activations, MinMax calibration on
    ``calibration_images``, uint8 N x C x H x W)."""
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = (calibration_images[i:i + batch_size].float().div(255).numpy()
                            for i in range(0, len(calibration_images), batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory(prefix="igkd-int8-") as work:
        src, pre = Path(work) / "fp32.onnx", Path(work) / "pre.onnx"
        src.write_bytes(fp32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                quant_pre_process(str(src), str(pre))
            except (OSError, MemoryError):
                raise
            except Exception:  # noqa: BLE001
                # ORT's symbolic shape inference asserts on graphs it cannot follow (e.g. the
                # Reshape of nn.MultiheadAttention); it only adds shape hints, ONNX's own shape
                # inference and the graph optimisation still run without it
                _quantisation_step(lambda: quant_pre_process(str(src), str(pre), skip_symbolic_shape=True),
                                   "preparing the graph (quant_pre_process)")
            _quantisation_step(lambda: quantize_static(
                str(pre), str(out), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8), "quantising (quantize_static)")


def _quantisation_step(step: Callable[[], object], what: str) -> None:
    """Run one step of ONNX Runtime's quantisation; a failure (ORT raises bare assertions and
    the like on graphs it does not support) becomes one UserError naming the step and cause.
    A full disk or exhausted memory is not the model's fault and is raised as it is."""
    try:
        step()
    except (OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any other failure is ORT's refusal of this graph
        raise UserError(f"int8 quantisation failed while {what}: {cause(e, 160)}; ONNX Runtime "
                        "cannot quantise this model's graph: export it without --int8") from None


META_KEY = "igkd"


def embed_metadata(path: str | Path, meta: dict, format: str | None = None) -> None:
    """Write ``meta`` into the exported file at ``path`` (in place; see the module docstring)."""
    import json
    path = Path(path)
    text = json.dumps(meta, allow_nan=False)
    if _format(path, format) == "onnx":
        require_onnxruntime()
        import onnx
        model = onnx.load(str(path))
        props = {META_KEY: text, "model": str(meta.get("model", "")), "classes": json.dumps(meta.get("classes", []))}
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        path.write_bytes(model.SerializeToString())
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")
        torch.jit.save(module, str(path), _extra_files={f"{META_KEY}.json": text})


def read_export_metadata(path: str | Path, format: str | None = None) -> dict | None:
    """The metadata :func:`embed_metadata` put in an exported file, or None (a file
    exported before igkd embedded it, or by another tool)."""
    import json
    path = Path(path)
    if not path.is_file():
        raise UserError(f"exported model {path} does not exist; check the path")
    if _format(path, format) == "onnx":
        text = ort_session(path).get_modelmeta().custom_metadata_map.get(META_KEY)
    else:
        extra = {f"{META_KEY}.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra[f"{META_KEY}.json"] or None
    return json.loads(text) if text else None


def _format(path: Path, format: str | None) -> str:
    return format or ("onnx" if path.suffix == ".onnx" else "torchscript")


def parity(reference: torch.Tensor, exported: torch.Tensor) -> dict:
    """Max |difference| of logits and top-1 agreement (percent) of two models."""
    return {"max_abs_diff": float((reference - exported).abs().max()) if len(reference) else 0.0,
            "top1_agreement": 100.0 * float((reference.argmax(1) == exported.argmax(1)).float().mean()),
            "images": int(len(reference))}


__all__ = ["INSTALL_HINT", "embed_metadata", "load_runner", "read_export_metadata", "logits_of", "onnx_bytes", "ort_runner", "ort_session", "parity",
           "quantize_int8", "require_onnxruntime", "torchscript_module"]
