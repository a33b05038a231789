"""Integrated gradients (METHOD.md section 3), batched over images and steps.

    IG_i(x) = (x_i - x'_i) * integral_0^1 dF_y(x' + a (x - x')) / dx_i da

F_y is the model's logit for class ``target``, x' the baseline
(:mod:`.baselines`). The integral is a quadrature (:mod:`.quadrature`, captum's methods
and definitions); the interpolated images of several inputs times all their steps go
through the model as ONE batch, and one ``torch.autograd.grad`` call returns the
gradients w.r.t. that batch (never into the parameters). The model runs in eval mode
with its parameters' ``requires_grad`` off; both are restored afterwards. The engine
(fast copy, batching, gradient core, and the precision notes) is :mod:`.engine`.

Registry entry ``ig``: options ``ig_steps``, ``ig_method``, ``ig_baseline``; it has a
completeness delta. Importing this module does not import torch (see :mod:`.registry`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from .registry import Attribution

if TYPE_CHECKING:
    import torch
    from torch import nn


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    baseline: torch.Tensor | float | str | None = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    return_delta: bool = False,
    fast: bool = True,
    schedule: tuple[Sequence[float], Sequence[float]] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of ``model``'s logit ``target`` w.r.t. ``inputs``.

    Args:
        model: maps ``N x C x H x W`` to ``N x classes`` logits. Run in eval mode with
            parameter gradients off; its modes and ``requires_grad`` flags are restored
            and no parameter ``.grad`` is touched.
        inputs: ``N x C x H x W`` float images.
        target: class per image (int, or N ints / an int tensor of shape N).
        baseline: ``None`` = zeros like ``inputs`` (captum's default: zeros in the space
            the model receives, i.e. black pixels for an igkd model); a tensor or number
            broadcastable to ``inputs``; or a kind of :func:`make_baseline` ("zero" =
            zeros in the model's normalised space, using ``model.mean`` when the model is
            an :class:`igkd.models.Normalized`; "black"; "blur").
        n_steps: quadrature points per image.
        method: "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid" or
            "gausslegendre" (captum's definitions; see :mod:`igkd.attribution.quadrature`).
        batch_size: most interpolated samples per forward pass. Default: 64 samples of
            32x32x3 on CPU (256 on CUDA), scaled inversely with the image size. Whole
            images (all their steps) go into one pass when they fit, else an image's
            steps are split over several passes.
        return_delta: also return the completeness gap per image,
            ``sum_i IG_i - (F_y(x) - F_y(x'))`` (the quadrature error, shape N), with
            F evaluated by the same network as the gradients.
        fast: differentiate an eval-mode copy of the model with BatchNorm folded into the
            preceding convolutions, channels_last on CPU (2.2x captum's throughput for the
            CIFAR MobileNetV2 teacher on 2 CPU threads, against 1.2x without). The same
            function with different float32 rounding (see "Precision" in :mod:`.engine`).
            ``fast=False`` runs ``model`` itself with captum's operations and memory
            format, and agrees with captum to rounding (~1e-7 of max|IG|).
        schedule: ``(alphas, weights)``, explicit quadrature points in [0, 1] and their
            weights (a fitted schedule, :mod:`igkd.attribution.fitted`); replaces
            ``method`` and ``n_steps``.

    Returns:
        attributions shaped like ``inputs`` (its dtype), or ``(attributions, delta)``.
    """
    import torch

    from .baselines import _resolve_baseline
    from .engine import (_check_batch_size, _check_inputs, _eval_without_param_grads, _forward_selected,
                         _input_grads, _prepare, _span, _targets, check_model)
    from .quadrature import check_method, check_schedule, quadrature

    check_model(model)
    inputs = _check_inputs(inputs, model=model)
    if schedule is not None:
        alphas, weights = check_schedule(schedule)
    else:
        alphas, weights = quadrature(check_method(method), n_steps)
    batch_size = _check_batch_size(batch_size, inputs)
    n, steps = inputs.shape[0], alphas.numel()
    dtype, device, item = inputs.dtype, inputs.device, inputs.shape[1:]
    ones = (1,) * len(item)
    # all inside inference_mode(False): tensors made under torch.inference_mode (inputs,
    # a copied model) must not reach autograd
    with torch.inference_mode(False), torch.enable_grad():
        inputs = inputs.clone() if inputs.is_inference() else inputs
        rows = _targets(target, n, device)
        span = _span(rows)
        base = _resolve_baseline(model, inputs, baseline)
        alphas = alphas.to(device=device, dtype=dtype)
        weights = weights.to(device=device, dtype=dtype)
        diff = inputs - base
        total = torch.zeros_like(inputs, memory_format=torch.contiguous_format)
        net, fmt = _prepare(model, inputs, fast)
        with _eval_without_param_grads(net):
            if n and batch_size >= steps:
                # whole images per pass: k images x all their steps, image-major; chunks of
                # equal size (16 images at 5 per pass -> 4 x 4) so shapes repeat
                k = math.ceil(n / math.ceil(n / (batch_size // steps)))
                for s in range(0, n, k):
                    b, d = base[s:s + k], diff[s:s + k]
                    m = b.shape[0]
                    scaled = (b.unsqueeze(1) + alphas.view(1, steps, *ones) * d.unsqueeze(1)).reshape(m * steps, *item)
                    grads = _input_grads(net, scaled, rows[s:s + k].repeat_interleave(steps), fmt, span)
                    # weighted sum over steps: one contraction, no loop over steps; outside autocast,
                    # which would run it (a bmm) in 16 bits on top of the network's own precision
                    with torch.autocast(device.type, enabled=False):
                        total[s:s + k] = torch.einsum("s,ks...->k...", weights, grads.reshape(m, steps, *item))
            elif n:
                # more steps than fit in a pass: an image's steps are split over passes
                for i in range(n):
                    for s in range(0, steps, batch_size):
                        a, w = alphas[s:s + batch_size], weights[s:s + batch_size]
                        scaled = base[i:i + 1] + a.view(-1, *ones) * diff[i:i + 1]
                        grads = _input_grads(net, scaled, rows[i:i + 1].expand(a.numel()), fmt, span)
                        with torch.autocast(device.type, enabled=False):
                            total[i] += torch.einsum("s,s...->...", w, grads)
            attributions = total * diff
            if not return_delta:
                return attributions
            ends = _forward_selected(net, torch.cat([inputs, base]), torch.cat([rows, rows]), batch_size, fmt, span)
    delta = attributions.reshape(n, -1).sum(1, dtype=torch.float64) - (ends[:n].double() - ends[n:].double())
    return attributions, delta.to(dtype)


def _schedule(cfg):
    """The fitted schedule ``cfg`` names (``--ig-schedule``, filled in by :func:`_prepare`)."""
    from ..errors import UserError
    from .fitted import load
    if not cfg.ig_schedule:
        raise UserError("--ig-method fitted needs a schedule: run it through igkd precompute or distill (which fit "
                        "one), or give --ig-schedule FILE")
    return load(cfg.ig_schedule)


def _compute(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, first_index: int = 0,
             n_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    fitted = cfg.ig_method == "fitted" and not n_steps
    schedule = _schedule(cfg) if fitted else None
    # the kind, not a tensor made from it: a tensor baseline is a user's and is checked for
    # NaN over every value, a pass as long as the teacher's at 224 pixels with a small one
    return integrated_gradients(teacher, x, y, baseline=cfg.ig_baseline,
                                n_steps=n_steps or cfg.ig_steps,
                                method="gausslegendre" if cfg.ig_method == "fitted" else cfg.ig_method,
                                batch_size=cfg.ig_batch or None, return_delta=True,
                                schedule=(schedule.alphas, schedule.weights) if fitted else None)


def _settings(cfg) -> dict:
    s = {"ig_steps": cfg.ig_steps, "ig_method": cfg.ig_method, "ig_baseline": cfg.ig_baseline}
    if cfg.ig_method == "fitted":  # the points and weights decide the maps, not where they were read from
        schedule = _schedule(cfg)
        s.update(ig_steps=schedule.steps, ig_schedule=schedule.identity())
    return s


def _prepare(teacher: nn.Module, dataset, cfg, device, quiet: bool, key: dict):
    """With ``--ig-method fitted`` and no ``--ig-schedule``: the schedule fitted for this
    teacher, data and fit settings, from the cache or fitted now (printed, with its time)."""
    if cfg.ig_method == "riemann_trapezoid" and cfg.ig_steps < 2:
        from ..errors import UserError  # named by its option: the library's "n_steps=1" is not what was typed
        raise UserError(f"--ig-steps {cfg.ig_steps} is too small for --ig-method riemann_trapezoid (its two ends "
                        "are points); use at least 2 (50 is the usual choice)")
    if cfg.ig_method != "fitted":
        return cfg
    if cfg.ig_schedule:
        _schedule(cfg)  # a bad file is one line now, not after the store is planned
        return cfg
    from ..errors import UserError
    # the fit picks its points among the reference's candidates: found only after its 2 R passes per image
    if cfg.ig_steps > cfg.ig_fit_reference:
        raise UserError(f"--ig-method fitted picks its --ig-steps {cfg.ig_steps} points among --ig-fit-reference "
                        f"{cfg.ig_fit_reference} candidates; give --ig-fit-reference >= --ig-steps")
    from dataclasses import replace

    import torch

    from ..progress import log
    from ..runtime import cache_dir
    from ..store import store_key
    from .baselines import model_baseline
    from .fitted import VERSION, fit_images, fit_schedule, load, save

    train = dataset.train
    # the images precompute's error check uses (evenly spaced) stay out of the fit, so that
    # check is on held-out images
    held = torch.linspace(0, len(train) - 1, min(cfg.check_images, len(train))).round().long().numpy() \
        if cfg.check_images else torch.zeros(0, dtype=torch.long).numpy()
    settings = {"version": VERSION, "steps": cfg.ig_steps, "baseline": cfg.ig_baseline, "images": cfg.ig_fit_images,
                "seed": cfg.ig_fit_seed, "reference_steps": cfg.ig_fit_reference,
                "held_out": [int(i) for i in held]}
    path = cache_dir("schedules") / f"{store_key({**key, **settings})}.json"
    if path.exists():
        try:
            load(path)  # checked before it names the store
            log(f"precompute: reusing the fitted IG schedule {path}", quiet)
            return replace(cfg, ig_schedule=str(path))
        except Exception as e:  # a damaged cache entry is refitted, never used
            log(f"precompute: refitting the IG schedule: {path} is unusable ({e})", quiet)
    idx = torch.from_numpy(fit_images(len(train), cfg.ig_fit_images, cfg.ig_fit_seed, held))
    x = train.images[idx].to(device).float().div_(255)
    y = train.labels[idx].to(device)
    log(f"precompute: fitting a {cfg.ig_steps}-point IG schedule on {len(idx)} training images "
        f"({2 * cfg.ig_fit_reference * len(idx)} passes)", quiet)
    schedule = fit_schedule(teacher, x, y, model_baseline(teacher, x, cfg.ig_baseline), cfg.ig_steps,
                            cfg.ig_fit_reference, cfg.ig_batch or None)
    schedule.fit.update(seed=cfg.ig_fit_seed, baseline=cfg.ig_baseline, image_indices=[int(i) for i in idx])
    save(schedule, path)
    f = schedule.fit
    log(f"precompute: fitted in {f['seconds']:.0f} s -> {path} (relative L2 error on the fit images "
        f"{100 * f['relative_l2']:.1f}%, midpoint x {cfg.ig_steps}: {100 * f['midpoint_relative_l2']:.1f}%)", quiet)
    return replace(cfg, ig_schedule=str(path))


ATTRIBUTION = Attribution(
    name="ig",
    help="integrated gradients, the paper's: --ig-steps passes",
    options=("ig_steps", "ig_method", "ig_baseline", "ig_schedule", "ig_fit_images", "ig_fit_reference",
             "ig_fit_seed"),
    settings=_settings,
    compute=_compute,
    completeness=True,
    describe=lambda cfg: f"IG {cfg.ig_method} x {cfg.ig_steps} steps, baseline {cfg.ig_baseline}",
    prepare=_prepare,
)

_MOVED = {"BASELINES": ".baselines", "gaussian_blur": ".baselines", "make_baseline": ".baselines",
          "_resolve_baseline": ".baselines", "attribution_map": ".engine", "saliency": ".saliency",
          "input_x_gradient": ".input_x_gradient", "smoothgrad": ".smoothgrad"}


def __getattr__(name: str):
    """Names this module held before the split (``from igkd.attribution.ig import
    BASELINES, _prepare``): found where they live now."""
    import importlib
    source = _MOVED.get(name, ".engine" if name.startswith("_") and not name.startswith("__") else None)
    if source is not None:
        module = importlib.import_module(source, __package__)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
