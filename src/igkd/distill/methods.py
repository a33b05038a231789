"""Method names: a ``+``-joined set of registered parts (:mod:`igkd.distill.parts`).

``student`` is cross-entropy alone. Names are canonicalised to the parts' order, so
``at+kd`` is ``kd+at``. ``METHODS``: the paper's eight combinations and the shuffled-map
controls; ``MODERN_METHODS``: the modern baselines and controls added since.
"""

from __future__ import annotations

from .parts import MODERN_METHODS, PAPER_METHODS, Method, parse_method

METHODS = PAPER_METHODS

__all__ = ["METHODS", "MODERN_METHODS", "Method", "parse_method"]
