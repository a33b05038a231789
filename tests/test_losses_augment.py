import math

import pytest
import torch
import torch.nn.functional as F

from igkd.distill import at_loss, attention_map, crop_flip, ig_overlay, kd_loss


def test_kd_loss_equals_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.5, 0.3
    ce = sum(-math.log(math.exp(s[i, y[i]]) / sum(math.exp(v) for v in s[i])) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        ps = [math.exp(v / T) for v in s[i].tolist()]
        pt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    kl /= 2  # batch mean
    want = (1 - alpha) * ce + alpha * T * T * kl
    loss, parts = kd_loss(s, y, t, T, alpha)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(T * T * kl, rel=1e-6)
    ce_only, parts = kd_loss(s, y, None, T, alpha)
    assert ce_only.item() == pytest.approx(ce, rel=1e-6) and set(parts) == {"ce"}


def test_at_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    def att(f):
        a = (f ** 2).mean(1).reshape(f.shape[0], -1)
        return a / a.norm(dim=1, keepdim=True)
    assert at_loss(fs, ft).item() == pytest.approx(((att(ft) - att(fs)) ** 2).mean().item(), rel=1e-6)
    assert torch.allclose(attention_map(fs).norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError):
        at_loss(fs, torch.randn(2, 8, 4, 4))


def test_overlay_formula_per_sample():
    x = torch.rand(6, 3, 8, 8)
    maps = torch.rand(6, 8, 8) * 5
    out = ig_overlay(x, maps, 1.0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u = torch.rand(6, generator=g)
    for i in range(6):
        m = maps[i] ** math.exp(u[i].item() * math.log(2))
        m = (m - m.min()) / (m.max() - m.min())
        torch.testing.assert_close(out[i], 0.5 * x[i] + 0.5 * m.expand(3, 8, 8))
    assert torch.equal(ig_overlay(x, maps, 0.0, torch.Generator().manual_seed(3)), x)


def test_overlay_probability_is_respected():
    x, maps = torch.zeros(20000, 1, 2, 2), torch.rand(20000, 2, 2)
    out = ig_overlay(x, maps, 0.1, torch.Generator().manual_seed(0))
    share = (out.flatten(1).abs().sum(1) > 0).float().mean().item()
    assert 0.09 < share < 0.11


def test_crop_flip_moves_map_with_its_image():
    """Overlay then crop/flip == crop/flip of image and map with the same draws."""
    x = torch.rand(16, 3, 10, 10)
    maps = torch.rand(16, 10, 10)
    over = ig_overlay(x, maps, 1.0, torch.Generator().manual_seed(1))
    m_only = over - 0.5 * x  # 0.5 * M' per sample
    a = crop_flip(over, 3, True, torch.Generator().manual_seed(5))
    b = crop_flip(x, 3, True, torch.Generator().manual_seed(5))
    c = crop_flip(m_only, 3, True, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, 0.5 * b + c)


def test_crop_flip_is_a_real_shifted_crop():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = crop_flip(x, 2, False, g)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        torch.testing.assert_close(out[i], padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5])
    flipped = crop_flip(x, 0, True, torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


def test_random_resized_crop_boxes_follow_torchvision_rules_and_shards():
    from igkd.distill.augment import resized_crop_boxes
    g = torch.Generator().manual_seed(3)
    boxes = resized_crop_boxes(256, 40, 30, (0.08, 1.0), (3 / 4, 4 / 3), g)
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= 40).all() and (left + bw <= 30).all()
    area = (bh * bw).float() / (40 * 30)
    # rounding of the sides moves area and ratio a little past the drawn ranges
    assert area.min() > 0.06 and area.max() <= 1.0 and len(set(area.tolist())) > 100
    ratio = bw.float() / bh.float()
    assert ratio.min() > 0.75 * 0.8 and ratio.max() < 4 / 3 * 1.25
    # a range no box can fit falls back to the centre crop clamped to the ratio range
    fb = resized_crop_boxes(4, 40, 30, (1.0, 1.0), (2.0, 3.0), torch.Generator().manual_seed(0))
    assert fb.tolist() == [[12, 0, 15, 30]] * 4
    # rank r of 2 gets slice r of the single-process global batch
    whole = resized_crop_boxes(8, 40, 30, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5))
    for r in range(2):
        part = resized_crop_boxes(4, 40, 30, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5), (r, 2))
        assert torch.equal(part, whole[4 * r:4 * r + 4])


def test_random_resized_crop_moves_the_map_with_its_image_pixel_by_pixel():
    from igkd.distill.augment import resized_crop_boxes, resized_crop_flip
    h, w, n = 24, 20, 16
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, h, w, generator=g)
    # a constructed map: a ramp plus one hot pixel per image, so any misplacement shows
    ramp = torch.arange(h * w, dtype=torch.float32).view(h, w) / (h * w)
    maps = ramp.expand(n, h, w).clone()
    maps[torch.arange(n), torch.arange(n) % h, (3 * torch.arange(n)) % w] = 5.0
    out = resized_crop_flip(torch.cat([x, maps[:, None]], 1), (0.2, 1.0), (3 / 4, 4 / 3), True,
                            torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    boxes = resized_crop_boxes(n, h, w, (0.2, 1.0), (3 / 4, 4 / 3), g)
    flips = torch.rand(n, generator=g) < 0.5
    for i in range(n):
        top, left, bh, bw = boxes[i].tolist()
        for c, plane in enumerate([*x[i], maps[i]]):
            crop = plane[top:top + bh, left:left + bw][None, None]
            want = F.interpolate(crop, (h, w), mode="bilinear", align_corners=False)[0, 0]
            got = out[i, c].flip(1) if flips[i] else out[i, c]
            # interpolate clamps to the box's edge where grid_sample blends in the pixel beyond
            # it: the outermost output rows and columns are compared only where the box
            # touches the image's edge
            inner = (slice(1, -1), slice(1, -1))
            assert torch.allclose(got[inner], want[inner], atol=1e-5), (i, c)
            if (top, left, bh, bw) == (0, 0, h, w):
                assert torch.allclose(got, want, atol=1e-5)
    assert flips.any() and (~flips).any()


def test_warm_up_never_exceeds_the_peak_and_reaches_it():
    from igkd import DistillConfig
    from igkd.distill.speed import lr_lambda
    for warm_epochs, steps in [(0.5, 29), (1.5, 1), (1, 10), (0.01, 7)]:
        cfg = DistillConfig(epochs=3, warmup_epochs=warm_epochs, schedule="cosine")
        f = lr_lambda(cfg, steps)
        factors = [f(i) for i in range(3 * steps)]
        warm = max(1, round(warm_epochs * steps))  # whole steps
        assert max(factors) == 1.0 and factors[warm - 1] == 1.0, (warm_epochs, steps)
        assert factors[:warm] == sorted(factors[:warm]) and factors[warm:] == sorted(factors[warm:], reverse=True)
    f = lr_lambda(DistillConfig(epochs=2, warmup_epochs=0, schedule="cosine"), 5)
    assert f(0) == 1.0 and f(9) < f(1)
