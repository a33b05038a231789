"""Evaluation: metrics (accuracy, balanced accuracy, Cohen's kappa, per class, confusion) of a model on a split,
and accuracy under common corruptions (:mod:`igkd.evaluate.corruptions`).

Names are imported on first use (:mod:`igkd._lazy`): the command line reads the corruption
names from :mod:`.corruptions` for ``--help`` without importing torch."""

from .._lazy import lazy_package

_NAMES = {"classification_metrics": ".metrics", "cohen_kappa": ".metrics", "predict": ".metrics"}
lazy_package(__name__, _NAMES)
__all__ = sorted(_NAMES)
