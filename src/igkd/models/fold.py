"""BatchNorm folded into the convolution that feeds it, on any architecture.

In eval mode a BatchNorm2d whose input is a Conv2d's output is a per-channel affine map
that the convolution's weights and bias can absorb (torch's ``fuse_conv_bn_eval``): one
pass over the activations less per layer, the same function up to float rounding.

* :func:`fold_batchnorm`: the fold, in place. Pairs are found by one forward pass with
  hooks and the autograd graph, never from names (a pre-activation network's ``bn1``
  comes before its ``conv1``). The attributions' fast copy uses it
  (:mod:`igkd.attribution.engine`).
* :func:`inference_copy`: a folded copy of a network loaded to infer only (``igkd
  evaluate``, its corruptions and ``--teacher-correct``, the experiments' corruption
  scores), checked to give the network's logits; the network itself where it is not.
  On 2 CPU cores (``python benchmarks/eval_throughput.py``) the CIFAR MobileNetV2 student
  scored 1.26x as many images per second, the teacher 1.23x, ResNet-18 1.07x, ResNet-20
  and WRN-16-2 1.02-1.03x; the published students' predictions on the 10,000 CIFAR-10
  test images are all the same (logits within 2e-5).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .preprocess import eval_mode


def fold_batchnorm(net: nn.Module, probe: torch.Tensor) -> int:
    """Fold every eval-mode BatchNorm2d whose input is the output of a Conv2d that nothing
    else uses into that convolution (in place); returns how many were folded.

    Pairs are found on any architecture by one forward pass of ``probe`` with hooks: the
    BatchNorm's input must be the very tensor the convolution returned (not modified in
    place since), each module must run once, and the autograd graph must show no other
    consumer of that tensor (a residual branch, say), or folding would change the function.
    """
    outputs, pairs, calls = {}, [], Counter()

    def on_conv(m, inputs, out):
        calls[m] += 1
        outputs[id(out)] = (m, out, out.grad_fn)

    def on_bn(m, inputs):
        calls[m] += 1
        x = inputs[0]
        hit = outputs.get(id(x))
        if hit is not None and hit[1] is x and x.grad_fn is hit[2]:
            pairs.append((hit[0], m, x.grad_fn))

    # a conv whose weight is made by a hook or a parametrization (weight_norm, spectral_norm)
    # has no fixed weight to fold into (and deep-copying it mid-graph fails); a module with
    # hooks of its own would lose them when replaced
    handles = [m.register_forward_hook(on_conv) for m in net.modules()
               if type(m) is nn.Conv2d and not _hooked(m) and not parametrize.is_parametrized(m)]
    handles += [m.register_forward_pre_hook(on_bn) for m in net.modules()
                if type(m) is nn.BatchNorm2d and not _hooked(m) and m.running_mean is not None
                and m.running_var is not None]
    try:
        out = net(probe.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    uses, stack, seen = Counter(), [out.grad_fn] if isinstance(out, torch.Tensor) else [], set()
    while stack:  # how many autograd nodes consume each node's output
        node = stack.pop()
        for nxt, _ in node.next_functions if node is not None else ():
            if nxt is not None:
                uses[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    names = {m: n for n, m in net.named_modules()}
    folded = 0
    for conv, bn, node in pairs:
        if calls[conv] == 1 and calls[bn] == 1 and uses[node] == 1 and conv.out_channels == bn.num_features:
            fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
            for module, new in ((conv, fused), (bn, nn.Identity())):
                parent, _, attr = names[module].rpartition(".")
                setattr(net.get_submodule(parent), attr, new)
            folded += 1
    return folded


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks)


def inference_copy(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` with its BatchNorm folded (:func:`fold_batchnorm`),
    for inference only; ``model`` itself (left as it was) where it cannot be copied, nothing
    folds, or the copy computes another function (:func:`logit_gap` on ``probe``, a few
    inputs of what the model takes)."""
    try:
        net = copy.deepcopy(model).eval()
        with torch.enable_grad():  # the autograd graph shows each convolution's other consumers
            if not fold_batchnorm(net, probe):
                return model
        gap = logit_gap(model, net, probe)
        if gap is not None and gap[0] <= gap[2]:
            return net
    except Exception:  # noqa: BLE001 - a module that cannot be copied or probed: the model itself is correct
        pass
    return model


def for_inference(net: nn.Module, images, device) -> nn.Module:
    """``net``, loaded only to infer on uint8 ``images`` (N x C x H x W, a tensor or a row
    view), on ``device`` and folded by :func:`inference_copy` with its first 4 images as the
    probe."""
    from .user import to_device
    net = to_device(net, device)
    return inference_copy(net, images[:4].to(device).float().div_(255)) if len(images) else net


def logit_gap(model: nn.Module, net: nn.Module, probe: torch.Tensor) -> tuple[float, float, float] | None:
    """How far ``net`` (a fast copy of ``model``: BatchNorm folded, activations changed)
    computes another function on ``probe``: ``(largest logit difference, largest logit,
    tolerance)``, or None where either output is not a tensor of one shape (the model itself
    then runs and reports what is wrong with its output).

    Tolerance: ``4 sqrt(eps)`` of the largest logit, ``eps`` that of the weights' dtype
    (1.4e-3 for float32): a fold only rounds the fused weights (2e-7 to 1.3e-6 of the logit
    scale on five families), while a copy that computes another function (a convolution's
    output used beyond its BatchNorm where the autograd graph does not show it, as a mask;
    an in-place activation whose result only aliasing applies) moved the logits by 0.07-1.2
    of their scale. Both run first as they are; where they differ by more, they run again on
    copies in float64 without autocast, which decides: in a coarser arithmetic (CUDA's TF32,
    an autocast) a right fold can differ by more, and a tolerance of that arithmetic's
    (0.125 of the scale under TF32, 0.35 under a bfloat16 autocast) let wrong copies through."""
    eps = max((torch.finfo(p.dtype).eps for p in net.parameters() if p.is_floating_point()),
              default=torch.finfo(torch.float32).eps)

    def gap(ref, got):
        if not (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.shape == got.shape):
            return None
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((ref - got).abs().max()) if ref.numel() else 0.0
        return diff, scale, 4 * eps ** 0.5 * scale

    x = probe.detach()
    with torch.no_grad(), eval_mode(model), eval_mode(net):
        found = gap(model(x), net(x))
    if found is None or found[0] <= found[2]:
        return found

    def in_float64(m: nn.Module):
        m64 = copy.deepcopy(m).eval().double()
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return m64(x.double())
    return gap(in_float64(model), in_float64(net))


__all__ = ["fold_batchnorm", "for_inference", "inference_copy", "logit_gap"]
