"""``explain``: explanation matching (e2KD, Parchami-Araghi et al., "Good teachers
explain", ECCV 2024), the overlay's closest competitor.

Instead of blending the teacher's map into the image, the student is trained so that its
own explanation of the label agrees with the teacher's precomputed map of the same
sample index (which follows the batch's crop, flip and mixing):
L = CE + lambda (1 - cos(E_s, M_t)) per sample, batch mean.

The student's explanation is differentiable (a second-order gradient flows into its
weights):

* ``gradcam`` (default): ReLU(sum_k mean_hw(dy/dA_k) A_k) at a hooked layer A
  (``--explain-layer``; auto: the attribution registry's Grad-CAM choice), the
  teacher's map average-pooled to that layer's size;
* ``input_x_gradient``: sum_c |x dy/dx| at full resolution.

Under ``--amp fp16`` both gradients are taken through float16 layers, where a gradient
below 6e-8 is 0: as in PyTorch's AMP gradient-penalty recipe, they are taken of the
label logits times a scale and divided by it in float32 (:func:`score_grad`).
"""

from __future__ import annotations

from ...options import opt
from .base import Part

# the largest scale of the explanation's gradient under fp16. Its backward starts at 1 per
# sample (the label logit of a summed score), where the GradScaler's scale (65536 at first,
# growing while the mean loss's gradients, N times smaller, fit) is itself past fp16's
# largest value, 65504: inf at the first step. 2^10 is what the GradScaler's first scale
# gives a batch of 64's mean loss, and lifts gradients down to 6e-11 out of underflow
SCORE_SCALE_MAX = 2.0 ** 10


def score_grad(score, inputs, scaler=None, state=None):
    """``d score / d inputs`` with ``create_graph`` (a loss of it trains the student). With a
    GradScaler (``--amp fp16``): the gradient of ``score * s``, ``s`` the scaler's scale
    capped at :data:`SCORE_SCALE_MAX`, divided by ``s`` in float32, so that gradients below
    fp16's smallest subnormal survive its float16 backward. Without one: the plain gradient.

    A scaled gradient that overflowed (gradients growing over 64 times from the logits to
    ``inputs``) gives 0 for that step, not inf: the loss stays finite and the GradScaler
    skips the step if its gradients are not, as for any fp16 overflow. The cap, kept in
    ``state`` (the part's), is halved for the next steps, down to 1."""
    import torch
    if scaler is None or not scaler.is_enabled():
        return torch.autograd.grad(score, inputs, create_graph=True)[0]
    holder = {} if state is None else state
    cap = holder.get("score_cap")
    if cap is None:
        cap = holder["score_cap"] = torch.full((), SCORE_SCALE_MAX, device=score.device)
    elif cap.device != score.device:  # a resumed run's, loaded on the CPU
        cap = holder["score_cap"] = cap.to(score.device)
    # the scale as a tensor on the device (scaler.scale of a one): get_scale() would sync each step
    s = torch.minimum(scaler.scale(torch.ones((), device=score.device)), cap)
    grads, = torch.autograd.grad(score * s, inputs, create_graph=True)
    ok = torch.isfinite(grads).all()
    cap.copy_(torch.where(ok, cap, (cap / 2).clamp(min=1.0)))  # on the device: no sync per step
    return torch.where(ok, grads.float() / s, torch.zeros((), device=grads.device))


def _gradcam_layer(cfg, student, input_shape, device="cpu") -> str:
    from ...errors import UserError
    if cfg.explain_layer != "auto":
        from ..attention import is_feature_map, probe_shapes, resolve_layer, warn_unlike_input
        resolve_layer(student, cfg.explain_layer, "student", "explanation matching", "use a method without 'explain'")
        # a named layer must give what auto guarantees: a linear layer's N x K output failed the
        # first step with a ValueError, and a 1x1 map (a pooling layer) made the cosine of two
        # scalars, a term that is 0 or 1 with no gradient
        shape = probe_shapes(student, [cfg.explain_layer], input_shape, device, "student").get(cfg.explain_layer, ())
        if not is_feature_map(shape):
            got = "no output" if not shape else "shape " + " x ".join(map(str, shape))
            raise UserError(f"--explain-layer {cfg.explain_layer} gives {got}, not the C x H x W feature map larger "
                            "than 1x1 that Grad-CAM needs; pick a convolutional block, or auto")
        warn_unlike_input(cfg.explain_layer, shape, tuple(input_shape[-2:]), "--explain-layer")
        return cfg.explain_layer
    from ...attribution.gradcam import auto_layer
    try:
        return auto_layer(student, input_shape, device)
    except UserError as e:
        text = str(e).replace("--gradcam-layer", "--explain-layer").replace("the network's", "the student's")
        if "tokens, as in a ViT" in text:
            text += ", or use --explain-method input_x_gradient"
        raise UserError(text) from None


class GradCAM:
    """The student's Grad-CAM of the label logit at a hooked layer; the teacher's map
    average-pooled to that layer's size."""

    def check(self, cfg, student, input_shape) -> None:
        _gradcam_layer(cfg, student, input_shape)

    def setup(self, run) -> dict:
        shape = (run.dataset.channels, *run.dataset.image_size)
        layer = _gradcam_layer(run.cfg, run.model, shape, run.device)
        run.meta["explain"] = {"method": run.cfg.explain_method, "student_layer": layer}
        return {"layer": layer, "hook": run.hook_student(layer)}

    def pair(self, state, step, score, maps, scaler=None):
        import torch.nn.functional as F
        from ...attribution.gradcam import gradcam_map
        acts = state["hook"].pop()
        mine = gradcam_map(acts, score_grad(score, acts, scaler, state))
        return mine, F.adaptive_avg_pool2d(maps[:, None], mine.shape[-2:])[:, 0]

    def describe(self, state) -> str:
        return f"explain: student Grad-CAM at {state['layer']}"


class InputXGradient:
    """sum_c |x dy/dx| of the student at full resolution (the input requires grad)."""

    def check(self, cfg, student, input_shape) -> None:
        pass

    def setup(self, run) -> dict:
        run.input_grad = True
        run.meta["explain"] = {"method": run.cfg.explain_method}
        return {}

    def pair(self, state, step, score, maps, scaler=None):
        x = step.batch.x
        return (x * score_grad(score, x, scaler, state)).abs().sum(1), maps

    def describe(self, state) -> str:
        return "explain: student input x gradient"


# the student's explanation, by --explain-method (differentiable, one backward: not the
# precompute's attribution registry, whose IG would need 50 passes per step)
STUDENT_EXPLANATIONS = {"gradcam": GradCAM(), "input_x_gradient": InputXGradient()}


class Explain(Part):
    name = "explain"
    help = "e2KD explanation matching, CE + lambda (1 - cos(student Grad-CAM, teacher map)) (lambda 1)"
    formula = "CE(s, y) + lambda (1 − cos(E_s(x), M_t)), E_s: Grad-CAM or input × gradient of the label logit"
    reference = "Parchami-Araghi et al., Good Teachers Explain, ECCV 2024"
    order = 30
    fields = {
        "explain_lambda": opt(1.0, "explain: weight of the explanation distance", low=0.0, high=1e6),
        "explain_method": opt("gradcam", "explain: the student's explanation, Grad-CAM at --explain-layer or "
                              "input x gradient", choices=list(STUDENT_EXPLANATIONS)),
        "explain_layer": opt("auto", "explain: student layer of its Grad-CAM, a name of the bare network's "
                             "named_modules(); auto: the last block of its smallest spatial stage"),
    }
    search = {"explain_lambda": [0.1, 1, 10]}
    log_scale = ("explain_lambda",)
    needs_teacher = aligned_maps = True
    double_backward = True  # the explanation is a gradient of the student, and the loss is of it

    def check(self, cfg, teacher, student, input_shape) -> None:
        from ...errors import UserError
        if getattr(cfg, "compile", False):
            # a compiled forward hands out the hooked activations as outputs of one graph node, not
            # ancestors of the logits (Grad-CAM's autograd.grad failed: "not used in the graph"), and
            # aot_autograd has no double backward (input x gradient failed): both only at the first step
            raise UserError("method part 'explain' trains on gradients of the student, which a torch.compile'd "
                            "forward cannot give; drop --compile or use a method without 'explain'")
        STUDENT_EXPLANATIONS[cfg.explain_method].check(cfg, student, input_shape)

    def setup(self, run):
        how = STUDENT_EXPLANATIONS[run.cfg.explain_method]
        # the trainer's GradScaler (--amp fp16), made after the parts' setup: looked up per step
        return {"how": how, "scaler": lambda: getattr(run, "scaler", None), **how.setup(run)}

    def loss(self, state, step):
        from ..losses import cosine_distance
        score = step.logits.float().gather(1, step.batch.y[:, None]).sum()
        scaler = state["scaler"]() if "scaler" in state else None
        mine, maps = state["how"].pair(state, step, score, step.batch.maps.float(), scaler)
        return {"explain": (step.cfg.explain_lambda, cosine_distance(mine, maps))}

    def describe(self, state) -> str:
        return state["how"].describe(state)

    def state_dict(self, state) -> dict:
        # the fp16 explanation's cap, halved where its gradient overflowed: a resumed run at 2^10
        # again would overflow (and lose the explanation of) the same steps over
        return {"score_cap": state["score_cap"].detach().cpu()} if "score_cap" in state else {}

    def load_state_dict(self, state, saved: dict) -> None:
        if "score_cap" in saved:
            state["score_cap"] = saved["score_cap"].clone()


PARTS = [Explain()]
