"""Grad-CAM (Selvaraju et al. 2017): where a convolutional layer looks for the target class.

For each image, with A (K x h x w) the output of a chosen layer and g = dF_y/dA the
gradient of the target logit w.r.t. it::

    cam = relu( sum_k mean_hw(g_k) * A_k )        (h x w)

upsampled bilinearly (``align_corners=False``) to the image size H x W. One forward and
one backward per image (to the layer only); no completeness property (delta NaN).

Layer: a name of the bare network's ``named_modules()`` (through the
:class:`~igkd.models.Normalized` wrapper, as attention transfer names layers), e.g.
``features.18`` or ``layer3.2``; or ``auto`` (:func:`auto_layer`): of the candidate blocks
of attention transfer (:func:`igkd.distill.attention.candidate_blocks`: top-level modules
and the children of top-level containers), those whose output is a C x H x W map larger
than 1x1, the last block of the stage with the smallest spatial size (fewest pixels):
the last convolutional block, Grad-CAM's classic choice. The CIFAR MobileNetV2 at 32x32
gives ``features.18`` (4x4), a CIFAR ResNet ``layer3.<last>`` (8x8), an ImageNet ResNet
``layer4.<last>`` (7x7 at 224), a WRN its final BN-ReLU ``relu`` (8x8). The layer must
run once per forward pass and its output must not be modified in place by later layers
(both are checked).

:func:`gradcam_map` is the formula alone, differentiable (no in-place operation, no
detach), for a student's Grad-CAM inside a training loss.

Registry entry ``gradcam``: option ``gradcam_layer``. Its attributions are the cams as
``N x 1 x H x W``, so :func:`~igkd.attribution.attribution_map` gives them back as the
``N x H x W`` map. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..options import opt
from .registry import Attribution

if TYPE_CHECKING:
    import torch
    from torch import nn

_PURPOSE, _INSTEAD = "Grad-CAM (--gradcam-layer)", "use another --attribution"


def gradcam_map(activations: torch.Tensor, grads: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
    """``relu(sum_k mean_hw(grads_k) * activations_k)`` per image: ``N x h x w`` from
    ``N x K x h x w`` activations and the gradients of the target logits w.r.t. them;
    with ``size`` (H, W), upsampled bilinearly to it (``N x H x W``).

    Differentiable in both arguments (no in-place operation, nothing detached): a
    student's Grad-CAM in a loss takes ``grads`` from
    ``torch.autograd.grad(logits.gather(1, y[:, None]).sum(), activations, create_graph=True)``.
    """
    import torch
    import torch.nn.functional as F

    if activations.dim() != 4 or grads.shape != activations.shape:
        raise ValueError(f"activations and grads must both be N x K x h x w, got {tuple(activations.shape)} and "
                         f"{tuple(grads.shape)}")
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(1))
    if size is not None and tuple(size) != tuple(cam.shape[-2:]):
        cam = F.interpolate(cam.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    return cam


def auto_layer(model: nn.Module, input_shape: tuple[int, int, int], device="cpu") -> str:
    """The layer ``auto`` stands for (rule in the module docstring), found by one probe
    forward pass of a zero image of ``input_shape`` (C, H, W) in eval mode."""
    from ..distill.attention import candidate_blocks, last_with_size, probe_shapes, spatial_only, stem_only
    from ..errors import UserError

    _refuse_script(model)
    hw = tuple(input_shape[-2:])
    probed = probe_shapes(model, candidate_blocks(model), tuple(input_shape), device, "model")
    shapes = spatial_only(probed, hw)
    if not shapes:
        raise UserError("no block of the network gives a C x H x W feature map larger than 1x1 for Grad-CAM; name "
                        "a convolutional layer with --gradcam-layer")
    smallest = min((s[-2:] for s in shapes.values()), key=lambda hw: hw[0] * hw[1])
    chosen = last_with_size(shapes, smallest)
    tokens = stem_only(probed, chosen, hw)
    if tokens:
        raise UserError(f"auto found the network's only C x H x W feature map at its first layer {chosen}, before "
                        f"blocks giving {tokens} (tokens, as in a ViT): a Grad-CAM there would explain the patch "
                        f"embedding alone; name a layer with --gradcam-layer ({chosen} to use it anyway)")
    return chosen


def _refuse_script(model: nn.Module) -> None:
    import torch

    from ..distill.attention import resolve_layer
    from ..models import bare
    if isinstance(bare(model), torch.jit.ScriptModule):
        resolve_layer(model, "", "model", _PURPOSE, _INSTEAD)  # raises the one-line UserError


def gradcam(model: nn.Module, inputs: torch.Tensor, target, layer: str = "auto",
            batch_size: int | None = None) -> torch.Tensor:
    """Grad-CAM maps ``N x H x W`` of ``model``'s logit ``target`` at ``layer`` (a name of
    the bare network's ``named_modules()``, or ``auto``), for ``N x C x H x W`` images.

    The model runs in eval mode with parameter gradients off (both restored); hooks on
    the layer are removed afterwards. ``batch_size`` images per pass (default as
    :func:`~igkd.attribution.saliency`)."""
    import torch

    from ..distill.attention import resolve_layer, warn_unlike_input
    from ..errors import UserError
    from .engine import (_check_batch_size, _check_inputs, _check_logits, _eval_without_param_grads, _span, _targets,
                         check_model)

    check_model(model)
    inputs = _check_inputs(inputs, model=model)
    batch_size = _check_batch_size(batch_size, inputs)
    if not isinstance(layer, str) or not layer:
        raise UserError(f"layer must be a layer name or 'auto', got {layer!r}")
    _refuse_script(model)
    n, size = inputs.shape[0], tuple(inputs.shape[-2:])
    with torch.inference_mode(False), torch.enable_grad():
        inputs = inputs.clone() if inputs.is_inference() else inputs
        rows = _targets(target, n, inputs.device)
        span = _span(rows)
        out = torch.zeros((n, *size), dtype=inputs.dtype, device=inputs.device)
        with _eval_without_param_grads(model):
            name = auto_layer(model, tuple(inputs.shape[1:]), inputs.device) if layer == "auto" else layer
            module = resolve_layer(model, name, "model", _PURPOSE, _INSTEAD)
            seen: list = []
            handle = module.register_forward_hook(lambda m, i, o: seen.append((o, getattr(o, "_version", None))))
            try:
                for s in range(0, n, batch_size):
                    seen.clear()
                    x = inputs[s:s + batch_size].detach().requires_grad_(True)
                    logits = model(x)
                    _check_logits(logits, rows, span)
                    if len(seen) != 1:
                        raise UserError(f"layer {name} ran {len(seen)} times in one forward pass; Grad-CAM needs a "
                                        "layer that runs once (--gradcam-layer)")
                    a, version = seen[0]
                    if not isinstance(a, torch.Tensor) or a.dim() != 4:
                        shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                        raise UserError(f"layer {name} gives {shape}, not an N x C x H x W feature map; pick a "
                                        "convolutional block for --gradcam-layer")
                    if layer != "auto":  # auto passed such outputs over; a named one may be channels-last
                        warn_unlike_input(name, tuple(a.shape[1:]), size, "--gradcam-layer")
                    if a._version != version:
                        raise UserError(f"the output of layer {name} is modified in place by a later layer; pick "
                                        "another --gradcam-layer (e.g. the enclosing block)")
                    selected = logits.gather(1, rows[s:s + batch_size].view(-1, 1))
                    (g,) = torch.autograd.grad(selected.sum(), a)
                    out[s:s + batch_size] = gradcam_map(a.detach(), g, size)
            finally:
                handle.remove()
    return out


def _compute(teacher, x, y, cfg, first_index: int = 0, n_steps: int | None = None):
    from .engine import no_delta
    cams = gradcam(teacher, x, y, layer=cfg.gradcam_layer, batch_size=cfg.ig_batch or None)
    return cams.unsqueeze(1), no_delta(len(x))


ATTRIBUTION = Attribution(
    name="gradcam",
    help="Grad-CAM of --gradcam-layer, 1 pass",
    fields={"gradcam_layer": opt("auto", "teacher layer for gradcam, a name of the bare network's named_modules() "
                                 "(e.g. features.18, layer3.2); auto: the last block of the smallest spatial stage "
                                 "larger than 1x1, i.e. the last convolutional block (any architecture)")},
    settings=lambda cfg: {"attribution": "gradcam", "layer": cfg.gradcam_layer},
    compute=_compute,
    describe=lambda cfg: f"Grad-CAM of layer {cfg.gradcam_layer}",
)

__all__ = ["ATTRIBUTION", "auto_layer", "gradcam", "gradcam_map"]
