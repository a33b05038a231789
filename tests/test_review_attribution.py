"""Review of igkd.attribution: agreement with captum 0.9 where tests/test_ig.py does not
look (1-channel non-square inputs, batch sizes that do not divide the steps, a training
model with BatchNorm and dropout, frozen parameters, SmoothGrad and Grad-CAM), and the
defects the review found: bad arguments that were tracebacks or silent NaN maps, tensors
made under torch.inference_mode, and the fitted schedule's step count."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Saliency
from torch import nn

import igkd
from igkd.attribution import (METHODS, gradcam, input_x_gradient, integrated_gradients, make_baseline, saliency,
                              smoothgrad)
from igkd.attribution.fitted import fit_schedule
from igkd.config import PrecomputeConfig
from igkd.errors import UserError
from igkd.models import Normalized
from igkd.precompute import precompute

from test_store import tiny_dataset, tiny_teacher


class _Net(nn.Module):
    """Conv-BN-ReLU twice, dropout, linear: BatchNorm statistics and dropout that a training
    model would use and update."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn(self.conv(x))))))
        return self.fc(self.drop(x.mean((2, 3))))


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for bn in (net.bn, net.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    x = torch.rand(3, 1, 7, 11)  # one channel, not square
    return net.eval(), x, torch.tensor([0, 3, 4])


def _close(ours, theirs, rel=1e-5):
    torch.testing.assert_close(ours, theirs, rtol=rel, atol=rel * theirs.abs().max().item())


# ------------------------------------------------------------------ agreement with captum
def test_ig_matches_captum_on_one_channel_non_square_for_every_rule_and_target_form(case):
    net, x, y = case
    ig = IntegratedGradients(net)
    # 7 steps in passes of 5 or 3 (an image's steps split unevenly); 4 steps in passes of 9 (two images each)
    settings = ((7, 5, y), (4, 9, 2), (4, 9, torch.tensor(2)), (7, 5, y.tolist()), (7, 3, y))
    for method, (steps, batch, target) in zip(METHODS, settings, strict=True):
        ours, delta = integrated_gradients(net, x, target, n_steps=steps, method=method, batch_size=batch,
                                           fast=False, return_delta=True)
        theirs, their_delta = ig.attribute(x, target=target, n_steps=steps, method=method,
                                           internal_batch_size=batch, return_convergence_delta=True)
        _close(ours, theirs)
        torch.testing.assert_close(delta, their_delta, rtol=0, atol=1e-5 * theirs.abs().sum().item())


def test_every_baseline_kind_matches_captum_given_the_same_baseline(case):
    net, x, y = case
    wrapped = Normalized(net, [0.3], [0.2]).eval()
    for kind in ("zero", "black", "blur"):
        base = make_baseline(kind, x, mean=[0.3])
        _close(integrated_gradients(wrapped, x, y, baseline=kind, n_steps=9, fast=False),
               IntegratedGradients(wrapped).attribute(x, baselines=base, target=y, n_steps=9))


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_a_training_model_with_frozen_parameters_is_attributed_in_eval_and_left_untouched(case):
    net, x, y = case
    model = copy.deepcopy(net).train()
    for p in model.conv.parameters():
        p.requires_grad_(False)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = [p.requires_grad for p in model.parameters()]
    expected = IntegratedGradients(net).attribute(x, target=y, n_steps=9)
    for fast in (False, True):
        # dropout off and the running statistics used: what captum gives on the model in eval mode
        _close(integrated_gradients(model, x, y, n_steps=9, fast=fast), expected, rel=1e-4 if fast else 1e-5)
        saliency(model, x, y, fast=fast)
        smoothgrad(model, x, y, samples=2, fast=fast)
    gradcam(model, x, y, layer="conv2")
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # num_batches_tracked too
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_smoothgrad_is_captums_noise_tunnel_with_the_same_seed(case):
    net, x, y = case
    torch.manual_seed(5)
    theirs = NoiseTunnel(Saliency(net)).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.3, target=y)
    ours = smoothgrad(net, x, y, samples=4, sigma=0.3, generator=torch.Generator().manual_seed(5), fast=False)
    _close(ours, theirs)


def test_gradcam_is_captums_layer_gradcam_upsampled_bilinearly(case):
    net, x, y = case
    for layer in ("conv2", "bn2"):
        cam = LayerGradCam(net, getattr(net, layer)).attribute(x, target=y, relu_attributions=True)
        theirs = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")[:, 0]
        _close(gradcam(net, x, y, layer=layer, batch_size=2), theirs)


# ------------------------------------------------------------------ one-line errors
def _one_line(call, words):
    with pytest.raises(UserError, match=words) as e:
        call()
    assert "\n" not in str(e.value)


def test_nan_or_infinite_inputs_are_one_line_for_every_attribution(case):
    # IG and input x gradient gave all-NaN maps, saliency and SmoothGrad finite meaningless ones,
    # and the fast path printed that its copy "changes its logits by nan"
    net, x, y = case
    for bad in (float("nan"), float("inf")):
        z = x.clone()
        z[1, 0, 2, 3] = bad
        for call in (lambda: integrated_gradients(net, z, y, n_steps=3), lambda: saliency(net, z, y),
                     lambda: input_x_gradient(net, z, y), lambda: smoothgrad(net, z, y, samples=2),
                     lambda: gradcam(net, z, y, layer="conv2"), lambda: make_baseline("blur", z)):
            _one_line(call, "NaN or infinite values")


def test_a_model_that_returns_a_tuple_is_one_line(case):
    # it failed with AttributeError: 'tuple' object has no attribute 'dim'
    net, x, y = case

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z):
            return self.net(z), z

    for call in (lambda: integrated_gradients(Pair(), x, y, n_steps=3), lambda: saliency(Pair(), x, y, fast=False),
                 lambda: gradcam(Pair(), x, y, layer="net.conv2")):
        _one_line(call, "must return one tensor of N x classes logits, got a tuple")


def test_a_target_that_is_no_class_index_is_one_line(case):
    # None and a class name failed inside torch.as_tensor (RuntimeError, TypeError)
    net, x, _ = case
    for target in (None, "cat", ["cat", "dog", "cow"]):
        _one_line(lambda: integrated_gradients(net, x, target, n_steps=3), "target must be a class index")


def test_a_bad_noise_or_blur_sigma_is_one_line(case):
    # an infinite sigma gave finite maps of nothing, a string a TypeError
    net, x, y = case
    for sigma in (float("inf"), "0.1", float("nan"), -1.0):
        _one_line(lambda: smoothgrad(net, x, y, samples=2, sigma=sigma), "smoothgrad sigma must be a finite number")
        _one_line(lambda: make_baseline("blur", x, sigma=sigma), "blur sigma must be a finite number")


def test_smoothgrad_takes_float64_noise_for_a_float32_model(case):
    # numpy's float64 draws made float64 noisy images: "Input type (double) and bias type (float)";
    # an array failed with AttributeError
    net, x, y = case
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 2, *x.shape[1:])))
    torch.testing.assert_close(smoothgrad(net, x, y, samples=2, noise=noise),
                               smoothgrad(net, x, y, samples=2, noise=noise.float()))
    _one_line(lambda: smoothgrad(net, x, y, samples=2, noise=noise.numpy()), "smoothgrad noise must be a tensor")


def test_images_of_another_dtype_than_the_model_are_one_line_and_a_float64_model_takes_them(case):
    # float64 images (numpy's default) failed in the first convolution: "expected scalar type
    # Double but found Float", a torch traceback from the API
    net, x, y = case
    z = x.double()
    for call in (lambda: integrated_gradients(net, z, y, n_steps=3), lambda: saliency(net, z, y),
                 lambda: input_x_gradient(net, z, y), lambda: smoothgrad(net, z, y, samples=2),
                 lambda: gradcam(net, z, y, layer="conv2")):
        _one_line(call, r"inputs are torch.float64 but the model's parameters are torch.float32; convert one")
    wide = copy.deepcopy(net).double()
    _close(integrated_gradients(wide, z, y, n_steps=3).float(), integrated_gradients(net, x, y, n_steps=3))


def test_every_attribution_works_on_images_and_labels_made_under_inference_mode(case):
    # only IG and Grad-CAM did on images; saliency, input x gradient and SmoothGrad raised "Setting
    # requires_grad=True on inference tensor", and labels made there failed Grad-CAM ("Inference
    # tensors cannot be saved for backward")
    net, x, y = case
    calls = {"ig": lambda a, b: integrated_gradients(net, a, b, n_steps=3),
             "saliency": lambda a, b: saliency(net, a, b),
             "input_x_gradient": lambda a, b: input_x_gradient(net, a, b),
             "smoothgrad": lambda a, b: smoothgrad(net, a, b, samples=2, generator=torch.Generator().manual_seed(0)),
             "gradcam": lambda a, b: gradcam(net, a, b, layer="conv2")}
    expected = {name: call(x, y) for name, call in calls.items()}
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        for name, call in calls.items():
            torch.testing.assert_close(call(xi, yi).clone(), expected[name], msg=name)
    # a fitted schedule too: its labels and Gram matrix were inference tensors in its autograd block
    want = fit_schedule(net, x, y, torch.zeros_like(x), n_steps=3, reference_steps=8)
    with torch.inference_mode():
        got = fit_schedule(net, x.clone(), y.clone(), torch.zeros_like(x), n_steps=3, reference_steps=8)
    assert (got.alphas, got.weights) == (want.alphas, want.weights)


def test_numpy_integers_are_taken_as_batch_size_and_samples(case):
    # n_steps took numpy integers but batch_size and samples refused them as "not a positive integer"
    net, x, y = case
    assert torch.equal(integrated_gradients(net, x, y, n_steps=4, batch_size=np.int64(3)),
                       integrated_gradients(net, x, y, n_steps=4, batch_size=3))
    assert torch.equal(smoothgrad(net, x, y, samples=np.int64(2), generator=torch.Generator().manual_seed(0)),
                       smoothgrad(net, x, y, samples=2, generator=torch.Generator().manual_seed(0)))


def test_a_fitted_schedule_may_take_every_candidate(case):
    # --ig-steps equal to --ig-fit-reference: the exchange had no free candidate and raised
    # "attempt to get argmin of an empty sequence" after all the fit's passes
    net, x, y = case
    schedule = fit_schedule(net, x[:1], y[:1], torch.zeros_like(x[:1]), n_steps=4, reference_steps=4)
    assert schedule.alphas == pytest.approx([0.125, 0.375, 0.625, 0.875]) and sum(schedule.weights) == pytest.approx(1)


def test_a_fitted_schedule_with_more_steps_than_candidates_is_refused_before_any_pass(tmp_path):
    # the fit ran its 2 x reference passes on every fit image, then refused the step count
    data, teacher = tiny_dataset(), tiny_teacher()
    passes = []
    teacher.register_forward_pre_hook(lambda m, args: passes.append(len(args[0])))
    cfg = PrecomputeConfig(ig_method="fitted", ig_steps=10, ig_fit_images=2, ig_fit_reference=4, check_images=0)
    _one_line(lambda: precompute(teacher, data, cfg, tmp_path / "s", quiet=True),
              "give --ig-fit-reference >= --ig-steps")
    assert passes == [] and not (tmp_path / "s").exists()


def test_too_few_steps_for_the_trapezoid_rule_names_the_option(tmp_path):
    # the library's "n_steps=1 is too small" reached the command line, where --ig-steps was typed
    from helpers_cli import run_igkd
    r = run_igkd("precompute", "--teacher", Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors",
                 "--data", "demo", "--ig-method", "riemann_trapezoid", "--ig-steps", "1", "--store", tmp_path / "s")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--ig-steps 1 is too small for --ig-method riemann_trapezoid" \
        in lines[0], r.stderr
    assert not (tmp_path / "s").exists()
