"""Quadrature rules for the integrated-gradients path integral over alpha in [0, 1].

The names and definitions are captum's (``captum/attr/_utils/approximation_methods.py``),
re-implemented here so the package does not need captum at run time:

``riemann_left``       alphas k/n,            k = 0..n-1, weights 1/n
``riemann_right``      alphas (k+1)/n,        k = 0..n-1, weights 1/n
``riemann_middle``     alphas (k+1/2)/n,      k = 0..n-1, weights 1/n
``riemann_trapezoid``  alphas k/(n-1),        k = 0..n-1, weights 1/n with the first and
                       last halved (captum's weights; they sum to 1 - 1/n, not 1: the rule
                       is a trapezoid rule on n points scaled by (n-1)/n, exactly as captum)
``gausslegendre``      Gauss-Legendre nodes and weights of ``numpy.polynomial.legendre.leggauss(n)``
                       mapped from [-1, 1] to [0, 1] (alphas (1 + x)/2, weights w/2)

Riemann positions are captum's float32 ``torch.linspace`` values (within one float32 ulp
of the exact k/n); Gauss-Legendre ones are float64. The caller casts them to the input's
dtype, as captum's multiplication of float32 inputs by these numbers does, so float32
results agree with captum to rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown integration method {method!r}; use one of: {', '.join(METHODS)}")
    return method


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    return torch.linspace(start, end, n, dtype=torch.float32).double().numpy()


def quadrature(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas, weights)``, float64 tensors of length ``n_steps``, for ``method``."""
    check_method(method)
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise UserError(f"n_steps must be an integer, got {n_steps!r}")
    n = int(n_steps)
    least = 2 if method == "riemann_trapezoid" else 1
    if n < least:
        raise UserError(f"n_steps={n} is too small for {method}; use at least {least} (50 is the usual choice)")
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = 0.5 * (1.0 + nodes), 0.5 * w
    else:
        # positions from float32 torch.linspace, exactly as captum makes them: IG of a
        # piecewise-linear (ReLU) network is a sum of gradients that jump at kinks, so an
        # alpha one float32 ulp away can move a step across a kink and change the sum by
        # ~1e-3 relative; identical positions make results agree to rounding.
        if method == "riemann_left":
            alphas = _linspace32(0.0, 1.0 - 1.0 / n, n)
        elif method == "riemann_right":
            alphas = _linspace32(1.0 / n, 1.0, n)
        elif method == "riemann_middle":
            alphas = _linspace32(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n)
        else:  # riemann_trapezoid
            alphas = _linspace32(0.0, 1.0, n)
        weights = np.full(n, 1.0 / n)
        if method == "riemann_trapezoid":
            weights[0] /= 2
            weights[-1] /= 2
    return torch.from_numpy(np.ascontiguousarray(alphas)), torch.from_numpy(np.ascontiguousarray(weights))


def check_schedule(schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas, weights)`` of an explicit schedule as float64 tensors, checked: equal
    lengths, at least one point, alphas in [0, 1], all finite."""
    try:
        alphas, weights = (torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(-1) for v in schedule)
    except (TypeError, ValueError) as e:
        raise UserError(f"a quadrature schedule is (alphas, weights), two lists of numbers: {e}") from None
    if alphas.numel() == 0 or alphas.numel() != weights.numel():
        raise UserError(f"a quadrature schedule needs as many weights as alphas (at least one); got "
                        f"{alphas.numel()} alphas and {weights.numel()} weights")
    if not (torch.isfinite(alphas).all() and torch.isfinite(weights).all()) or alphas.min() < 0 or alphas.max() > 1:
        raise UserError("a quadrature schedule's alphas must lie in [0, 1] and its weights be finite")
    return alphas, weights
