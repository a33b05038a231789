"""Defects found in the review of the distillation methods and the training step, each with
the check that failed before its fix: DIST's Pearson distance as its reference code writes
it, and method options that cannot work refused with one line before any training (not a
traceback at the first step, nor a term that silently trains nothing)."""

import pytest
import torch
import torch.nn.functional as F

from igkd.config import DistillConfig, build
from igkd.data import Dataset, Split
from igkd.distill.attention import choose_layers
from igkd.distill.losses import at_loss, dist_terms
from igkd.distill.parts import get_part
from igkd.distill.trainer import Trainer
from igkd.errors import UserError
from igkd.models import Normalized, build_model
from igkd.precompute import precompute

STUDENT, TEACHER = "mobilenetv2:width=0.25,drop=14", "mobilenetv2:width=0.25,drop=12"


def tiny_data(n=32) -> Dataset:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 12, 12), generator=g, dtype=torch.uint8), torch.arange(n) % 4)
    return Dataset("tiny", list("abcd"), 3, (12, 12), split, split)


def tiny_teacher():
    torch.manual_seed(0)
    return Normalized(build_model(TEACHER, 4, 3), [0.5] * 3, [0.25] * 3).eval()


# ---------------------------------------------------------------- DIST against its reference code
def reference_dist(s, t, T):
    """Huang et al.'s DIST code (hunto/DIST_KD, losses/dist_kd.py), unscaled terms."""
    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    ys, yt = (s / T).softmax(1), (t / T).softmax(1)
    return 1 - pearson(ys, yt).mean(), 1 - pearson(ys.t(), yt.t()).mean()


def test_dist_pearson_divides_by_the_norms_plus_eps_as_its_code():
    g = torch.Generator().manual_seed(0)
    # a near-uniform student (an untrained network's tiny logits) and a teacher of the same
    # pattern: centred rows and columns of norm ~1e-6, below DIST's eps
    s = torch.randn(16, 10, generator=g, dtype=torch.float64) * 1e-4
    t = s * 1.01
    inter, intra = dist_terms(s, t, 4.0)
    want_inter, want_intra = reference_dist(s, t, 4.0)
    assert inter.item() == pytest.approx(want_inter.item(), rel=1e-6)
    assert intra.item() == pytest.approx(want_intra.item(), rel=1e-6)
    assert inter.item() > 0.9  # F.cosine_similarity called these rows perfectly correlated: about 0
    # ordinary logits: the eps changes nothing
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    for got, want in zip(dist_terms(s, t, 4.0), reference_dist(s, t, 4.0)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------- explain and torch.compile
def test_explain_with_compile_is_refused_in_one_line_before_training(tmp_path):
    # the compiled forward gives the hooked activations as outputs beside the logits, not their
    # ancestors: Grad-CAM's autograd.grad failed at the first step ("appears to not have been
    # used in the graph"), and input x gradient's double backward is not supported either
    part, student = get_part("explain"), build_model(STUDENT, 4, 3)
    for how in ("gradcam", "input_x_gradient"):
        cfg = DistillConfig(method="explain", explain_method=how, compile=True)
        with pytest.raises(UserError, match="--compile") as e:
            part.check(cfg, None, student, (3, 12, 12))
        assert "\n" not in str(e.value)
        part.check(DistillConfig(method="explain", explain_method=how), None, student, (3, 12, 12))  # no compile: fine
    # the trainer refuses any part that differentiates the student's gradients (plug-ins too)
    data, teacher = tiny_data(), tiny_teacher()
    cfg = build(DistillConfig, dict(model=STUDENT, normalize="none", method="kd+explain", compile=True, epochs=1,
                                    batch_size=16, val_fraction=0.25, ig_steps=2, chunk_size=32, warmup_epochs=0))
    store = precompute(teacher, data, cfg, tmp_path / "store", quiet=True)
    with pytest.raises(UserError, match="explain.*--compile"):
        Trainer(cfg, build_model(STUDENT, 4, 3), data, tmp_path / "run", torch.device("cpu"), teacher=teacher,
                store=store, quiet=True)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- layers that give no usable map
def test_explain_layer_must_give_a_spatial_feature_map():
    part, student = get_part("explain"), build_model(STUDENT, 4, 3)
    # a linear layer's N x K output failed the first step with gradcam_map's ValueError; a
    # pooling layer's 1x1 map made the cosine of two scalars (0 or 1, no gradient)
    for layer, shape in (("classifier", "shape 4"), ("pool", "x 1 x 1")):
        with pytest.raises(UserError, match=f"--explain-layer {layer} gives .*{shape}.*larger than 1x1"):
            part.check(DistillConfig(method="explain", explain_layer=layer), None, student, (3, 12, 12))
    part.check(DistillConfig(method="explain", explain_layer="features.3"), None, student, (3, 12, 12))
    # input x gradient has no layer: the option is not its concern
    part.check(DistillConfig(method="explain", explain_method="input_x_gradient", explain_layer="classifier"),
               None, student, (3, 12, 12))


def test_attention_transfer_refuses_a_1x1_layer():
    teacher, student = tiny_teacher(), build_model(STUDENT, 4, 3)
    # what such a layer gave: A = normalise of one value = 1 on both sides, a term of 0 whatever
    # the networks do
    f_t, f_s = torch.rand(5, 8, 1, 1) + 0.1, torch.rand(5, 6, 1, 1) + 0.1
    assert at_loss(f_s, f_t).item() == 0.0
    for t_layer, s_layer, who in (("pool", "auto", "teacher"), ("auto", "pool", "student")):
        with pytest.raises(UserError, match=f"{who} layer pool gives shape .*larger than 1x1"):
            choose_layers(teacher, student, t_layer, s_layer, (3, 12, 12))
    assert choose_layers(teacher, student, "auto", "auto", (3, 12, 12))[:2] == ("features.6", "features.4")


def test_dist_reference_matches_the_softmax_pearson_written_out():
    # the reference above is itself the paper's formula where the norms are not tiny
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    ps, pt = F.softmax(s / 2, 1), F.softmax(t / 2, 1)
    inter = sum(1 - torch.corrcoef(torch.stack([ps[i], pt[i]]))[0, 1] for i in range(6)) / 6
    assert reference_dist(s, t, 2.0)[0].item() == pytest.approx(inter.item(), rel=1e-6)
