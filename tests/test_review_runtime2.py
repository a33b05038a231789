"""Training runtime: the explanation's gradient under fp16 loss scaling, the optimizer kernel
where torch lacks a fused one, and cuDNN's autotuner."""

import pytest
import torch
from torch import nn

from igkd.distill.losses import cosine_distance
from igkd.distill.speed import cudnn_autotune, has_fused, impl_kwargs, make_optimizer
from igkd.errors import UserError
from igkd.distill.parts.explain import SCORE_SCALE_MAX, GradCAM, InputXGradient, score_grad


class Tiny(nn.Module):
    """A conv layer, global average pooling, a factor 1e-6 and a linear head: the label logit's
    gradient at the conv output (below 1e-8) is under fp16's smallest subnormal (6e-8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.acts = self.conv(x)
        return self.fc(self.acts.mean((2, 3)) * 1e-6)


class Hook:  # what GradCAM.pair pops: the hooked layer's output of the last forward pass
    def __init__(self, model):
        self.model = model

    def pop(self):
        return self.model.acts


def fp16_step(model, x, y, explanation, scaler, state=None):
    """The explain part's term as the trainer computes it under --amp fp16 (CPU autocast)."""
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    score = out.float().gather(1, y[:, None]).sum()
    step = type("Step", (), {"batch": type("Batch", (), {"x": x})()})()
    mine, maps = explanation.pair(state or {"hook": Hook(model)}, step, score, torch.rand(len(y), 8, 8), scaler)
    return mine, cosine_distance(mine, maps)


def exact_grad(model, x, y, wrt):
    """The label logits' gradient in float32, no autocast."""
    out = model(x)
    return torch.autograd.grad(out.gather(1, y[:, None]).sum(), wrt(model, x))[0]


def test_the_explanations_gradient_survives_fp16_with_the_trainers_grad_scaler():
    from igkd.attribution.gradcam import gradcam_map
    model, x, y = Tiny(), torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    exact = exact_grad(model, x, y, lambda m, x: m.acts)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    score = out.float().gather(1, y[:, None]).sum()
    plain = score_grad(score, model.acts)
    assert plain.dtype == torch.float16 and not plain.any()  # the defect: all of it underflows to 0
    # the trainer's scaler: its first scale, 65536, is itself past fp16's largest value (65504)
    scaled = score_grad(score, model.acts, torch.amp.GradScaler("cpu"))
    assert scaled.dtype == torch.float32
    torch.testing.assert_close(scaled, exact, rtol=1e-2, atol=exact.abs().max().item() * 1e-3)

    # through the part: the student's Grad-CAM is the one of the exact gradient, and its
    # distance to the teacher's map trains the conv layer
    scaler = torch.amp.GradScaler("cpu")
    mine, term = fp16_step(model, x, y, GradCAM(), scaler)
    want = gradcam_map(model.acts, exact)
    torch.testing.assert_close(mine, want, rtol=2e-2, atol=want.abs().max().item() * 1e-2)
    scaler.scale(term).backward()
    grad = model.conv.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.conv.weight.grad = None
    fp16_step(model, x, y, GradCAM(), None)[1].backward()  # unscaled: a map of 0s, nothing learnt
    assert model.conv.weight.grad is None or not model.conv.weight.grad.any()


def test_input_x_gradient_takes_the_same_scaled_gradient_under_fp16():
    model, x, y = Tiny(), torch.rand(2, 3, 8, 8, requires_grad=True), torch.tensor([0, 2])
    exact = (x * exact_grad(model, x, y, lambda m, x: x)).abs().sum(1)
    assert not fp16_step(model, x, y, InputXGradient(), None)[0].any()  # unscaled: 0
    mine, _ = fp16_step(model, x, y, InputXGradient(), torch.amp.GradScaler("cpu"))
    torch.testing.assert_close(mine, exact, rtol=5e-2, atol=exact.abs().max().item() * 1e-2)


def test_the_scale_follows_a_grad_scaler_that_backed_off_and_is_ignored_without_one():
    model, x, y = Tiny(), torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    out = model(x)
    score = out.gather(1, y[:, None]).sum()
    # no scaler (fp32, bf16) and a disabled one: torch.autograd.grad itself, bit for bit
    want, = torch.autograd.grad(score, model.acts, retain_graph=True)
    for scaler in (None, torch.amp.GradScaler("cpu", enabled=False)):
        assert torch.equal(score_grad(score, model.acts, scaler), want)
    small = torch.amp.GradScaler("cpu", init_scale=4.0)  # below the cap: its own scale
    assert torch.equal(score_grad(score, model.acts, small), want * 4.0 / 4.0)
    assert SCORE_SCALE_MAX * 1.0 < torch.finfo(torch.float16).max


class Steep(nn.Module):
    """A 2x2 feature map and a head of weight 1000: the label logit's gradient at the conv
    output is 250, 1000 before the mean, which the cap's 2^10 lifts past fp16's largest
    value (65504)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)
        nn.init.constant_(self.fc.weight, 1000.0)
        nn.init.constant_(self.conv.bias, 2.0)  # positive maps: a Grad-CAM that is not 0

    def forward(self, x):
        self.acts = self.conv(x)
        return self.fc(self.acts.mean((2, 3)))


def test_an_overflowing_explanation_gradient_is_dropped_for_the_step_and_its_cap_halved():
    """fp16: a scaled gradient that overflows gives a 0 explanation and a finite loss (it was
    inf, and the run stopped with TrainingDiverged); the GradScaler then skips the step if
    the gradients are not finite, and the cap falls until the gradient fits."""
    from igkd.attribution.gradcam import gradcam_map
    model, x, y = Steep(), torch.rand(2, 3, 2, 2), torch.tensor([0, 2])
    exact = exact_grad(model, x, y, lambda m, x: m.acts)
    assert 200 < exact.abs().max() < 300
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    score = out.float().gather(1, y[:, None]).sum()
    scaler = torch.amp.GradScaler("cpu")
    assert not score_grad(score, model.acts, scaler).any()  # 250 x 2^10 overflows: 0, not inf

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state, caps = {"hook": Hook(model)}, []
    for _ in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        mine, term = fp16_step(model, x, y, GradCAM(), scaler, state)
        assert torch.isfinite(term)  # what the trainer sums and checks
        caps.append(state["score_cap"].item())
        want = gradcam_map(model.acts, exact_grad(model, x, y, lambda m, x: m.acts))  # before the step
        scaler.scale(term).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if mine.any():
            break
        # an overflowing step trains nothing: its term has no gradient (or a non-finite one, which
        # the scaler skips), and the weights stay as they were
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert caps[0] == SCORE_SCALE_MAX / 2 and caps == sorted(caps, reverse=True) and caps[-1] >= 64
    assert mine.any() and len(caps) > 1
    torch.testing.assert_close(mine.detach(), want, rtol=2e-2, atol=want.abs().max().item() * 1e-2)


CPU = torch.device("cpu")


def test_auto_takes_the_fused_kernel_this_torch_has_for_the_cpu():
    # torch 2.4 and newer: fused SGD and Adam on the CPU
    assert has_fused(torch.optim.SGD, CPU) and has_fused(torch.optim.Adam, CPU)
    assert impl_kwargs("auto", torch.optim.SGD, CPU) == impl_kwargs("fused", torch.optim.Adam, CPU) == {"fused": True}
    cfg = type("Cfg", (), dict(optimizer="sgd", optimizer_impl="auto", momentum=0.9, nesterov=True,
                               weight_decay=5e-4))()
    opt = make_optimizer(cfg, [nn.Parameter(torch.zeros(3))], 0.1, CPU)
    assert opt.defaults["fused"] is True


def test_auto_falls_back_to_foreach_where_torch_has_no_fused_kernel():
    # RMSprop takes no fused=True (TypeError), as SGD and Adam did not on the CPU before torch
    # 2.4 (they refused the device): auto runs foreach, an explicit fused is one line
    assert not has_fused(torch.optim.RMSprop, CPU)
    assert impl_kwargs("auto", torch.optim.RMSprop, CPU) == {"foreach": True}
    with pytest.raises(UserError, match=r"--optimizer-impl fused: torch .* has no fused RMSprop for cpu; use auto"):
        impl_kwargs("fused", torch.optim.RMSprop, CPU)
    assert impl_kwargs("loop", torch.optim.SGD, CPU) == {"foreach": False}
    assert impl_kwargs("foreach", torch.optim.SGD, CPU) == {"foreach": True}


def test_cudnn_autotuner_is_on_while_cuda_trains_unless_the_process_asked_for_determinism():
    # the flags are process settings torch keeps without a GPU; only the context's logic is tested
    cudnn, cuda = torch.backends.cudnn, torch.device("cuda")
    assert cudnn.benchmark is False  # torch's default, which the trainer's caller gets back
    with cudnn_autotune(CPU):
        assert cudnn.benchmark is False
    with cudnn_autotune(cuda):
        assert cudnn.benchmark is True
    assert cudnn.benchmark is False
    try:
        torch.use_deterministic_algorithms(True)
        with cudnn_autotune(cuda):
            assert cudnn.benchmark is False
        torch.use_deterministic_algorithms(False)
        cudnn.deterministic = True
        with cudnn_autotune(cuda):
            assert cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(False)
        cudnn.deterministic = False
