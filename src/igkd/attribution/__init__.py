"""Attributions of a classifier's logit to its input pixels: integrated gradients
(METHOD.md section 3), their overlay map, baselines, and cheap gradient alternatives."""

from .ig import (BASELINES, attribution_map, gaussian_blur, input_x_gradient, integrated_gradients, make_baseline,
                 saliency, smoothgrad)
from .quadrature import METHODS, quadrature

__all__ = [
    "BASELINES", "METHODS", "attribution_map", "gaussian_blur", "input_x_gradient", "integrated_gradients",
    "make_baseline", "quadrature", "saliency", "smoothgrad",
]
