"""``at``: attention transfer (Zagoruyko and Komodakis 2017), METHOD.md section 5.

The teacher's and the student's feature maps at one layer each (forward hooks,
:mod:`igkd.distill.attention`, which also chooses the layers for any architecture):
A = l2-normalise(flatten(mean_c(F^2))), L_AT = gamma mean((A_t - A_s)^2).
"""

from __future__ import annotations

from ...options import opt
from .base import Part


class AT(Part):
    name = "at"
    help = "attention transfer on one hooked feature map of each network (gamma 0.8)"
    formula = "gamma mean((A_t − A_s)^2), A = l2-normalise(flatten(mean_c F^2))"
    reference = "Zagoruyko and Komodakis, ICLR 2017"
    order = 40
    fields = {
        "gamma": opt(0.8, "weight of the attention-transfer term gamma * mean((A_t - A_s)^2) (methods with at)",
                     low=0.0, high=1e6),
        "at_teacher_layer": opt("auto", "teacher layer whose output gives the attention map, a name of the bare "
                                "network's named_modules() (e.g. features.6, layer2.8); auto: the last block with "
                                "the student's feature-map size (any architecture)"),
        "at_student_layer": opt("auto", "student layer for attention transfer; auto: its last block in the "
                                "second-largest spatial stage (16x16 for 32x32 inputs; any architecture)"),
    }
    search = {"gamma": [0.1, 0.8, 10, 100]}
    log_scale = ("gamma",)
    needs_teacher = True

    def check(self, cfg, teacher, student, input_shape) -> None:
        from ..attention import choose_layers
        choose_layers(teacher, student, cfg.at_teacher_layer, cfg.at_student_layer, input_shape)

    def setup(self, run):
        from ..attention import choose_layers
        cfg = run.cfg
        shape = (run.dataset.channels, *run.dataset.image_size)
        t_name, s_name, t_shape, s_shape = choose_layers(run.teacher, run.model, cfg.at_teacher_layer,
                                                         cfg.at_student_layer, shape, run.device)
        run.meta["at"] = {"gamma": cfg.gamma, "teacher_layer": t_name, "student_layer": s_name,
                          "teacher_shape": list(t_shape), "student_shape": list(s_shape)}
        return {"teacher": run.hook_teacher(t_name), "student": run.hook_student(s_name), "meta": run.meta["at"]}

    def loss(self, state, step):
        from ..losses import at_loss
        return {"at": (step.cfg.gamma, at_loss(state["student"].pop(), state["teacher"].pop()))}

    def describe(self, state) -> str:
        at = state["meta"]
        return (f"AT teacher {at['teacher_layer']} / student {at['student_layer']} "
                f"({at['student_shape'][1]}x{at['student_shape'][2]}), gamma {at['gamma']}")


PARTS = [AT()]
