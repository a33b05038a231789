"""Attributions of a classifier's logit to its input pixels: integrated gradients
(METHOD.md section 3), their overlay map, baselines, cheap gradient alternatives and
Grad-CAM.

Layout: :mod:`.engine` (fast differentiable copy, batching, gradient core, checks),
:mod:`.baselines`, :mod:`.quadrature`, then one module per attribution (:mod:`.ig`,
:mod:`.saliency`, :mod:`.input_x_gradient`, :mod:`.smoothgrad`, :mod:`.gradcam`), each
declaring its entry of :mod:`.registry`, which the rest of igkd asks by name.

Names are imported on first use, so ``igkd.attribution.registry`` (and the command
line's ``--attribution`` choices) come without torch. Package attributes named like a
module (``saliency``, ``smoothgrad``, ``input_x_gradient``, ``gradcam``, ``quadrature``)
are the functions; import the modules' other names from the modules
(``from igkd.attribution.gradcam import gradcam_map``).
"""

from .._lazy import lazy_package

_NAMES = {
    "BASELINES": ".baselines", "gaussian_blur": ".baselines", "make_baseline": ".baselines",
    "METHODS": ".quadrature", "quadrature": ".quadrature",
    "attribution_map": ".engine",
    "integrated_gradients": ".ig", "saliency": ".saliency", "input_x_gradient": ".input_x_gradient",
    "smoothgrad": ".smoothgrad", "gradcam": ".gradcam", "gradcam_map": ".gradcam",
    "Attribution": ".registry",
}
lazy_package(__name__, _NAMES)
__all__ = sorted(_NAMES)
