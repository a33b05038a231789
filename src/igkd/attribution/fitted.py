"""Fitted IG quadrature: integration points and weights learned once per teacher.

``--ig-method fitted`` with ``--ig-steps n`` replaces a fixed rule by ``n`` points
``alphas`` and weights fitted to the teacher on a few training images
(``--ig-fit-images``, a seeded sample that excludes the images precompute's error check
uses, so that check is held out), then used for the whole dataset.

How it is fitted, and why this way:

* **Candidates and target are different point sets.** The points are chosen from the
  ``R = --ig-fit-reference`` midpoints ``(j + 1/2) / R``; the target is the ``R``-point
  Gauss-Legendre integral, whose nodes are none of those. A fit against an integral over
  its own candidate points (the first design tried) looks 1.5x better on the images it
  was fitted on than on held-out ones: the chosen points are exact samples of that
  integral. Against an independent reference the fit error is honest.
* **Weights by least squares, points by exchange.** For fixed points the IG estimate is
  linear in the weights, so the best weights solve an ``n x n`` system built from the
  Gram matrix ``K`` of the candidates' contributions ``g(alpha_j) * (x - x')`` over the
  fit images (each image scaled to unit reference norm, so every image counts alike) and
  their products ``b`` with the reference. The points start at the midpoint rule (snapped
  to the candidates) and are improved by coordinate exchange: each point in turn moves to
  the candidate that lowers the least-squares error most, until a sweep moves none. Every
  trial is a small solve on ``K`` and ``b``; no trial costs a network pass. An optimiser
  over continuous alphas would need second derivatives of a ReLU network's
  piecewise-constant path gradient, which are zero almost everywhere.
* **Memory stays at one image's candidates:** ``K`` and ``b`` are accumulated image by
  image (``R x C x H x W`` floats at a time: 6 MB at 32x32, 300 MB at 224x224 for R=512).
* **Cost:** ``2 R`` passes per fit image (candidates and reference): 32 images x 1024
  passes, about 2% of a 50,000-image precompute at 25 passes per image.

The fit is deterministic for a seed on one machine and thread count. A schedule is a small
JSON file (:func:`save`, :func:`load`, loaded with ``json``, never pickle); precompute
caches it by teacher, dataset and fit settings, puts it in the store's identity, and
``--ig-schedule FILE`` reuses one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "igkd-ig-schedule"
VERSION = 1
RIDGE = 1e-9  # relative to the mean diagonal of K: keeps near-duplicate points solvable, changes nothing else


@dataclass
class Schedule:
    """``n`` integration points in [0, 1] and their weights, and how they were fitted."""

    alphas: list[float]
    weights: list[float]
    fit: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def identity(self) -> dict:
        """What decides the maps (part of a store's identity): the points and weights,
        rounded to 12 significant digits so a JSON round trip gives the same key."""
        return {"alphas": [float(f"{a:.12g}") for a in self.alphas],
                "weights": [float(f"{w:.12g}") for w in self.weights]}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **self.identity(), "fit": self.fit}


def save(schedule: Schedule, path: str | Path) -> Path:
    from ..fileio import write_json
    path = Path(path)
    write_json(path, schedule.to_dict())
    return path


def load(path: str | Path) -> Schedule:
    """A schedule file; one-line UserError when it is missing or not a schedule."""
    from .quadrature import check_schedule
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"IG schedule {path} does not exist; give a file written by igkd precompute "
                        f"--ig-method fitted (printed when it is fitted), or leave --ig-schedule empty to fit one") from None
    except (OSError, ValueError) as e:
        raise UserError(f"IG schedule {path} cannot be read as JSON ({e}); it may be damaged: delete it and fit "
                        f"again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path} is not an igkd IG schedule (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise UserError(f"IG schedule {path} has version {doc.get('version')!r}; this igkd reads version {VERSION}")
    alphas, weights = check_schedule((doc.get("alphas"), doc.get("weights")))
    return Schedule(alphas.tolist(), weights.tolist(), doc.get("fit") or {})


def fit_images(num_train: int, count: int, seed: int, held_out: np.ndarray) -> np.ndarray:
    """``count`` sorted training indices drawn with ``seed``, none of them in ``held_out``."""
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(num_train), held_out)
    if len(pool) == 0:
        raise UserError("no training images are left to fit an IG schedule on (all are held out for the error check)")
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))


def gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor, baseline: torch.Tensor, reference_steps: int,
         batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(candidates, K, b)``: the ``R`` candidate points and, summed over the images of
    ``x``, the Gram matrix of their contributions ``g(alpha_j) * (x - x')`` and their
    products with the Gauss-Legendre ``R``-point IG, each image scaled by 1 / |IG_ref|^2."""
    import torch

    from .engine import _check_batch_size, _eval_without_param_grads, _input_grads, _prepare, _span, _targets
    from .quadrature import quadrature

    R = int(reference_steps)
    cand, _ = quadrature("riemann_middle", R)
    ref_a, ref_w = quadrature("gausslegendre", R)
    batch = _check_batch_size(batch_size, x)
    with torch.inference_mode(False), torch.enable_grad():
        K = torch.zeros(R, R, dtype=torch.float64)  # made here, so updated in place here
        b = torch.zeros(R, dtype=torch.float64)
        # images, labels and baselines made under the caller's torch.inference_mode cannot be saved
        # for backward; labels read into rows out here were still inference tensors ("Inference
        # tensors cannot be saved for backward" from the first gather)
        x = x.clone() if x.is_inference() else x
        baseline = baseline.clone() if baseline.is_inference() else baseline
        rows = _targets(y, x.shape[0], x.device)
        span = _span(rows)
        net, fmt = _prepare(model, x, True)
        ones = (1,) * (x.dim() - 1)
        with _eval_without_param_grads(net):
            for i in range(x.shape[0]):
                d = x[i:i + 1] - baseline[i:i + 1]

                def contributions(alphas: torch.Tensor) -> torch.Tensor:
                    out = torch.empty(alphas.numel(), *x.shape[1:], dtype=x.dtype, device=x.device)
                    for s in range(0, alphas.numel(), batch):
                        a = alphas[s:s + batch].to(device=x.device, dtype=x.dtype)
                        pts = baseline[i:i + 1] + a.view(-1, *ones) * d
                        out[s:s + a.numel()] = _input_grads(net, pts, rows[i:i + 1].expand(a.numel()), fmt, span) * d
                    return out.reshape(alphas.numel(), -1).double().cpu()

                ref = ref_w @ contributions(ref_a)
                c = contributions(cand)
                scale = 1.0 / max(float(ref @ ref), 1e-300)
                K += scale * (c @ c.T)
                b += scale * (c @ ref)
    return cand.numpy(), K.numpy(), b.numpy()


def _error(K: np.ndarray, b: np.ndarray, total: float, sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares weights with ``sum(w) = 1`` and their squared error, for each row of
    ``sets`` (index sets of size n). Weights summing to 1 integrate a constant exactly, as
    every fixed rule does: unconstrained weights shrink the estimate (they summed to
    0.83-0.95 in our fits), which trades IG's completeness for a smaller L2 error."""
    KS = K[sets[:, :, None], sets[:, None, :]]
    bS = b[sets]
    n = sets.shape[1]
    A = KS + (RIDGE * np.trace(K) / K.shape[0]) * np.eye(n)
    sol = np.linalg.solve(A, np.stack([bS, np.ones_like(bS)], -1))  # K^-1 b and K^-1 1
    kb, k1 = sol[..., 0], sol[..., 1]
    lam = (kb.sum(1) - 1) / k1.sum(1)
    w = kb - lam[:, None] * k1
    return w, _squared_error(KS, bS, w, total)


def _squared_error(KS: np.ndarray, bS: np.ndarray, w: np.ndarray, total: float) -> np.ndarray:
    """``|sum_k w_k c_k - r|^2`` summed over the images, per row: ``total - 2 w.b + w K w``."""
    return total - 2 * np.einsum("sk,sk->s", w, bS) + np.einsum("sk,skl,sl->s", w, KS, w)


def _midpoints(n: int, R: int) -> np.ndarray:
    """The candidates (of ``R`` midpoints) nearest the ``n``-point midpoint rule's points."""
    return np.minimum(R - 1, np.floor((np.arange(n) + 0.5) / n * R)).astype(np.int64)


def exchange(K: np.ndarray, b: np.ndarray, total: float, n: int, max_sweeps: int = 50) -> tuple[np.ndarray, np.ndarray, float]:
    """Indices of ``n`` candidates and their weights minimising the least-squares error,
    by coordinate exchange from the midpoint rule; and that error (relative: divided by
    ``total``, the summed squared reference norms)."""
    R = K.shape[0]
    if not 1 <= n <= R:
        raise UserError(f"a fitted schedule needs 1 to {R} points (--ig-fit-reference); got {n}")
    # midpoint rule snapped to the candidates: the best fixed rule on ReLU networks (README)
    chosen = np.unique(_midpoints(n, R))
    others = np.setdiff1d(np.arange(R), chosen)
    chosen = np.concatenate([chosen, others[:n - len(chosen)]])  # only when n is close to R
    _, err = _error(K, b, total, chosen[None])
    best = float(err[0])
    # n == R: every candidate is chosen and none is free to swap in (argmin of no trials raised)
    for _ in range(max_sweeps if n < R else 0):
        moved = False
        for k in range(n):
            free = np.setdiff1d(np.arange(R), chosen)
            trials = np.repeat(chosen[None], len(free), 0)
            trials[:, k] = free
            _, errs = _error(K, b, total, trials)
            j = int(np.argmin(errs))
            if errs[j] < best * (1 - 1e-12):
                chosen, best, moved = trials[j], float(errs[j]), True
        if not moved:
            break
    order = np.argsort(chosen)
    chosen = chosen[order]
    w, err = _error(K, b, total, chosen[None])
    return chosen, w[0], float(err[0]) / total


def fit_schedule(model: nn.Module, x: torch.Tensor, y: torch.Tensor, baseline: torch.Tensor, n_steps: int,
                 reference_steps: int = 512, batch_size: int | None = None) -> Schedule:
    """Fit an ``n_steps``-point IG schedule to ``model`` on images ``x`` (labels ``y``,
    baselines ``baseline``). ``fit`` records the settings, the relative L2 error on these
    images of the fit and of the midpoint rule at equal steps, and the seconds taken."""
    t0 = time.perf_counter()
    cand, K, b = gram(model, x, y, baseline, reference_steps, batch_size)
    total = float(x.shape[0])  # every image is scaled to unit reference norm
    idx, w, err = exchange(K, b, total, int(n_steps))
    mid = _midpoints(n_steps, reference_steps)
    mid_err = float(_squared_error(K[np.ix_(mid, mid)][None], b[mid][None], np.full((1, n_steps), 1.0 / n_steps),
                                   total)[0]) / total
    fit = {"images": int(x.shape[0]), "reference_steps": int(reference_steps),
           "candidates": f"riemann_middle x {reference_steps}", "target": f"gausslegendre x {reference_steps}",
           "relative_l2": math.sqrt(max(err, 0.0)), "midpoint_relative_l2": math.sqrt(max(mid_err, 0.0)),
           "seconds": round(time.perf_counter() - t0, 2)}
    return Schedule(cand[idx].tolist(), w.tolist(), fit)


__all__ = ["Schedule", "exchange", "fit_images", "fit_schedule", "gram", "load", "save"]
