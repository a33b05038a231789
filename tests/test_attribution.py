"""Attributions by name (igkd.attribution.registry) and Grad-CAM: the registry and the
config agree, store identities keep their keys, Grad-CAM equals a hand computation and
is differentiable, ``auto`` picks the documented layer, precompute writes Grad-CAM
stores. Tiny models on CPU."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igkd
from igkd.attribution import attribution_map, gradcam, registry
from igkd.attribution.gradcam import auto_layer, gradcam_map
from igkd.config import PrecomputeConfig
from igkd.deploy import audit_table
from igkd.errors import UserError
from igkd.models import Normalized, build_model
from igkd.precompute import attribution_settings, attributions, precompute, store_identity
from igkd.store import store_key

from test_store import tiny_dataset, tiny_teacher

DEMO_TEACHER = igkd.__file__.rsplit("/", 1)[0] + "/assets/demo_teacher.safetensors"


# --------------------------------------------------------------------------- registry
def test_registry_lists_every_attribution_and_the_config_offers_them():
    names = ("ig", "saliency", "input_x_gradient", "smoothgrad", "gradcam")
    assert registry.NAMES == names
    field = {f.name: f for f in dataclasses.fields(PrecomputeConfig)}
    assert field["attribution"].metadata["choices"] == list(names)
    assert field["attribution"].default == registry.DEFAULT
    for name in names:
        entry = registry.get(name)
        assert entry.name == name and entry.help and name in field["attribution"].metadata["help"]
        assert set(entry.options) <= set(field), entry.options  # options are PrecomputeConfig fields
        assert isinstance(entry.settings(PrecomputeConfig(attribution=name)), dict)
    assert [e.name for e in registry.entries() if e.completeness] == ["ig"]
    with pytest.raises(UserError, match="known attributions: ig, saliency"):
        registry.get("occlusion")
    with pytest.raises(UserError, match="--attribution 'occlusion' is not one of"):
        PrecomputeConfig(attribution="occlusion")


def test_config_and_registry_import_without_torch():
    code = ("import sys, igkd.config, igkd.attribution.registry as r; r.help_text(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_store_settings_of_the_older_attributions_are_unchanged():
    """Existing stores keep their keys: the exact settings dicts before the registry."""
    tail = {"target": "label", "map": "sum_c|IG| / max, float16"}
    assert attribution_settings(PrecomputeConfig()) == {
        "ig_steps": 50, "ig_method": "riemann_middle", "ig_baseline": "zero", **tail}
    # smoothgrad's noise is now drawn per image index (it followed the chunk): its stores changed once
    assert attribution_settings(PrecomputeConfig(attribution="smoothgrad")) == {
        "attribution": "smoothgrad", "samples": 16, "sigma": 0.15, "noise": "seeded by each image's index", **tail}
    for name in ("saliency", "input_x_gradient"):
        assert attribution_settings(PrecomputeConfig(attribution=name)) == {"attribution": name, **tail}


def test_another_attribution_or_gradcam_layer_is_another_store():
    data, teacher = tiny_dataset(), tiny_teacher()

    def key(**kw):
        return store_key(store_identity(teacher, data, PrecomputeConfig(**kw)))

    keys = [key(), key(attribution="saliency"), key(attribution="smoothgrad"), key(attribution="gradcam"),
            key(attribution="gradcam", gradcam_layer="features.5")]
    assert len(set(keys)) == len(keys)
    # only what an attribution reads is its identity
    assert key(attribution="gradcam", ig_steps=4) == key(attribution="gradcam")
    assert key(gradcam_layer="features.5") == key()


# --------------------------------------------------------------------------- Grad-CAM
def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def _hand_gradcam(net: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Grad-CAM written out: one image at a time, a hook for A, autograd for dF_y/dA,
    a loop over channels."""
    cams = []
    for i in range(len(x)):
        kept = {}
        handle = layer.register_forward_hook(lambda m, inp, out: kept.update(a=out))
        xi = x[i:i + 1].clone().requires_grad_(True)
        logit = net(xi)[0, int(y[i])]
        handle.remove()
        a = kept["a"]
        (g,) = torch.autograd.grad(logit, a)
        cam = torch.zeros(a.shape[-2:])
        for k in range(a.shape[1]):
            cam = cam + g[0, k].mean() * a[0, k]
        cam = cam.clamp(min=0)
        cams.append(F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(cams)


def test_gradcam_equals_a_hand_computation():
    net = _tiny_cnn().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4])
    expected = _hand_gradcam(net, x, y, net[3]).detach()
    assert expected.amax() > 0
    ours = gradcam(net, x, y, layer="3", batch_size=2)
    assert ours.shape == (5, 8, 8)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradcam(net, x, y), ours)  # auto: the last block of the 4x4 stage, "3"
    assert auto_layer(net, (3, 8, 8)) == "3"
    assert all(not p.requires_grad or p.grad is None for p in net.parameters())  # no parameter grads touched
    # the registry entry gives cams that attribution_map turns into the map unchanged
    attr, delta = attributions(net, x, y, PrecomputeConfig(attribution="gradcam", gradcam_layer="3"))
    assert attr.shape == (5, 1, 8, 8) and torch.isnan(delta).all()
    assert torch.equal(attribution_map(attr), gradcam(net, x, y, layer="3"))


def test_gradcam_map_is_differentiable_for_a_student_loss():
    student = _tiny_cnn(seed=2)
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([1, 0, 4])
    kept = {}
    handle = student[2].register_forward_hook(lambda m, inp, out: kept.update(a=out))
    logits = student(x)
    handle.remove()
    (grads,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), kept["a"], create_graph=True)
    cam = gradcam_map(kept["a"], grads, size=(8, 8))
    assert cam.shape == (3, 8, 8) and cam.requires_grad
    cam.pow(2).sum().backward()
    assert student[0].weight.grad is not None and student[0].weight.grad.abs().sum() > 0
    # against finite differences, in float64, in both arguments
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g: gradcam_map(a, g, (7, 9)), (a, g))
    a_before, g_before = a.detach().clone(), g.detach().clone()
    gradcam_map(a, g)
    assert torch.equal(a, a_before) and torch.equal(g, g_before)  # inputs untouched


@pytest.mark.parametrize("spec,layer", [("mobilenetv2", "features.18"), ("resnet:depth=20", "layer3.2"),
                                        ("resnet:depth=32", "layer3.4")])
def test_auto_layer_is_the_last_block_of_the_smallest_stage(spec, layer):
    net = Normalized(build_model(spec, 10, 3), [0.5] * 3, [0.25] * 3)  # named through the wrapper
    assert auto_layer(net, (3, 32, 32)) == layer


def test_gradcam_layer_errors_are_one_line():
    net = _tiny_cnn().eval()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(UserError, match="unknown model layer 'nope' for Grad-CAM"):
        gradcam(net, x, 0, layer="nope")
    with pytest.raises(UserError, match="not an N x C x H x W feature map"):
        gradcam(net, x, 0, layer="6")
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 2))
    with pytest.raises(UserError, match="modified in place"):
        gradcam(inplace.eval(), x, 0, layer="0")


def test_a_target_class_out_of_range_is_one_line_for_every_attribution():
    from igkd.attribution import integrated_gradients
    from igkd.attribution.saliency import saliency
    net = _tiny_cnn().eval()  # 5 classes
    x = torch.rand(3, 3, 8, 8)
    runs = {"ig": lambda t: integrated_gradients(net, x, t, n_steps=4),
            "ig, steps over passes": lambda t: integrated_gradients(net, x, t, n_steps=4, batch_size=2),
            "ig with delta": lambda t: integrated_gradients(net, x, t, n_steps=4, return_delta=True),
            "saliency": lambda t: saliency(net, x, t),
            "gradcam": lambda t: gradcam(net, x, t, layer="0")}
    for what, run in runs.items():
        for target, got in (([0, 5, 1], "0..5"), (-1, "-1..-1")):
            with pytest.raises(UserError, match=rf"target classes must be in \[0, 4\], got {got}$"):
                run(target)
        assert run([1, 0, 1]) is not None, what


def test_a_bad_gradcam_layer_leaves_no_store_behind(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    bad = PrecomputeConfig(attribution="gradcam", gradcam_layer="nope", chunk_size=10, check_images=0)
    with pytest.raises(UserError, match="unknown model layer 'nope'"):
        precompute(teacher, data, bad, tmp_path / "store", quiet=True)
    assert not (tmp_path / "store" / "chunks").exists()  # no plan to refuse the corrected command with
    good = dataclasses.replace(bad, gradcam_layer="auto")
    assert precompute(teacher, data, good, tmp_path / "store", quiet=True).maps.shape == (24, 12, 12)


def test_precompute_gradcam_writes_maps_per_image(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    cfg = PrecomputeConfig(attribution="gradcam", chunk_size=10, check_images=0)
    store = precompute(teacher, data, cfg, tmp_path / "gradcam", quiet=True)
    assert store.maps.shape == (24, 12, 12)
    maps = store.maps.astype(np.float32)
    assert np.isfinite(maps).all() and maps.min() >= 0
    peaks = maps.max(axis=(1, 2))
    assert set(np.unique(peaks)) <= {0.0, 1.0} and (peaks == 1).sum() > 12  # each map / its maximum
    assert store.manifest["completeness_delta"] is None and np.isnan(store.delta).all()
    assert np.isfinite(store.gap).all()
    assert store.manifest["identity"]["settings"]["attribution"] == "gradcam"
    assert store.manifest["identity"]["settings"]["layer"] == "auto"
    # the stored maps are the Grad-CAM maps of the auto layer, divided by their maxima
    x, y = data.train.images.float() / 255, data.train.labels
    cams = gradcam(teacher, x, y, layer=auto_layer(teacher, (3, 12, 12)))
    want = cams / cams.flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]
    np.testing.assert_allclose(maps, want.numpy(), atol=1e-3)  # float16 storage; other batches


def test_audit_takes_an_attribution_by_name(tmp_path):
    r = igkd.audit(DEMO_TEACHER, DEMO_TEACHER, "demo", images=6, gallery=0, quiet=True,
                   attribution="gradcam")
    assert r["attribution"] == "gradcam" and r["description"].startswith("Grad-CAM")
    assert r["students"][0]["spearman_mean"] == pytest.approx(1.0)
    assert "Grad-CAM of layer auto, of the label class" in audit_table(r)


def test_audit_passes_each_attributions_own_options_to_every_model(tmp_path, capsys):
    """audit takes an attribution's own options as precompute does (they come from the
    registry), applies them to every model and records them; they change the comparison."""
    from igkd.cli import main
    torch.manual_seed(0)
    other = igkd.models.save_checkpoint(tmp_path / "random", build_model("mobilenetv2:width=0.25,drop=14", 10, 1),
                                        {"model": "mobilenetv2:width=0.25,drop=14", "num_classes": 10,
                                         "in_channels": 1})
    with pytest.raises(SystemExit) as e:
        main(["audit", "--teacher", DEMO_TEACHER, "--student", str(other), "--data", "demo", "--images", "4",
              "--gallery", "0", "--attribution", "smoothgrad", "--smoothgrad-samples", "1", "--smoothgrad-sigma",
              "0.3", "--json", "--quiet"])
    assert e.value.code == 0
    one = __import__("json").loads(capsys.readouterr().out)
    assert one["settings"] == {"attribution": "smoothgrad", "samples": 1, "sigma": 0.3,
                               "noise": "seeded by each image's index"}
    six = igkd.audit(DEMO_TEACHER, other, "demo", images=4, gallery=0, quiet=True, attribution="smoothgrad",
                     smoothgrad_samples=6, smoothgrad_sigma=0.3)
    assert six["description"] == "smoothgrad x 6 samples, sigma 0.3"
    assert six["students"][0]["per_image"]["spearman"] != one["students"][0]["per_image"]["spearman"]
    r = igkd.audit(DEMO_TEACHER, DEMO_TEACHER, "demo", images=2, gallery=0, quiet=True, attribution="gradcam",
                   gradcam_layer="features.10")
    assert r["settings"]["layer"] == "features.10" and r["description"] == "Grad-CAM of layer features.10"
    with pytest.raises(UserError, match="unknown model layer 'features.10'"):  # named for every model: the student
        igkd.audit(DEMO_TEACHER, other, "demo", images=2, gallery=0, quiet=True, attribution="gradcam",
                   gradcam_layer="features.10")
