"""Accuracy under common corruptions (`igkd evaluate --corruptions`): each corruption against a
hand computation written here with numpy, scipy, colorsys and PIL (CIFAR-10-C's definitions,
make_cifar_c.py), seeded noise that does not depend on the batch, and the command line."""

import colorsys
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import igkd
from helpers_cli import run_igkd
from igkd.cli import format_evaluation
from igkd.data import load_dataset
from igkd.errors import UserError
from igkd.evaluate.corruptions import CORRUPTIONS, NAMES, corrupt, evaluate_corruptions, parse

# CIFAR-10-C's levels (make_cifar_c.py, hendrycks/robustness), written out again here
LEVELS = {"gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10], "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
          "contrast": [0.75, 0.5, 0.4, 0.3, 0.15], "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
          "jpeg": [80, 65, 58, 50, 40]}


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    """Six 12x12 RGB uint8 images with the cases the formulas branch on: black, gray, white
    and saturated pixels, and a constant image."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 12, 12), generator=g, dtype=torch.uint8)
    x[0, :, 0, 0] = 0                                     # black (V = 0)
    x[0, :, 0, 1] = 128                                   # gray (S = 0)
    x[0, :, 0, 2] = 255                                   # white
    x[1, :, 2, 3] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # saturated red
    x[5] = 77                                             # constant image
    return x


@pytest.fixture(scope="module")
def gray() -> torch.Tensor:
    return load_dataset("demo").test.images[:4]           # 1 x 28 x 28 Fashion-MNIST


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def test_the_registry_holds_cifar10c_levels():
    assert set(LEVELS) <= set(NAMES)
    for name, levels in LEVELS.items():
        assert list(CORRUPTIONS[name].levels) == pytest.approx(levels)
    assert parse("all") == list(NAMES) and parse("contrast, jpeg,contrast") == ["contrast", "jpeg"]
    assert parse(["jpeg", "all"])[0] == "jpeg" and parse("") == []


def test_contrast_by_hand(rgb):
    x = as_float(rgb).numpy().astype(np.float64)
    c = 0.5  # severity 2
    mean = x.mean(axis=(2, 3), keepdims=True)  # per image and channel
    want = np.clip((x - mean) * c + mean, 0, 1)
    got = corrupt(as_float(rgb), "contrast", 2, 0, torch.arange(6))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert torch.allclose(got[5], as_float(rgb)[5])  # a constant image has no contrast to lose


@pytest.mark.parametrize("severity", [1, 5])
def test_gaussian_blur_by_hand(rgb, gray, severity):
    sigma = LEVELS["gaussian_blur"][severity - 1]
    for images in (rgb, gray):
        x = as_float(images).numpy().astype(np.float64)
        # skimage.filters.gaussian(x, sigma, multichannel=True) is scipy's filter with these defaults
        want = np.clip(ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0), 0, 1)
        got = corrupt(as_float(images), "gaussian_blur", severity, 0, torch.arange(len(images)))
        np.testing.assert_allclose(got.numpy(), want, atol=2e-6)


def test_brightness_by_hand_through_hsv(rgb, gray):
    c = 0.3  # severity 5
    x = as_float(rgb).numpy().astype(np.float64)
    want = np.empty_like(x)
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j])
                want[n, :, i, j] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
    got = corrupt(as_float(rgb), "brightness", 5, 0, torch.arange(6)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0, :, 0, 0] == pytest.approx([0.3] * 3) and got[0, :, 0, 2] == pytest.approx([1.0] * 3)
    g = as_float(gray)  # grayscale: S = 0, so V + c is the pixel itself
    np.testing.assert_allclose(corrupt(g, "brightness", 5, 0, torch.arange(4)).numpy(),
                               np.clip(g.numpy() + c, 0, 1), atol=1e-6)


def test_jpeg_by_hand_with_pil(rgb, gray):
    quality = 40  # severity 5
    for images in (rgb, gray):
        want = []
        for im in images.numpy():
            hwc = im.transpose(1, 2, 0)
            buf = io.BytesIO()
            Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(buf, "JPEG", quality=quality)
            want.append(np.asarray(Image.open(io.BytesIO(buf.getvalue()))).reshape(hwc.shape).transpose(2, 0, 1))
        got = corrupt(as_float(images), "jpeg", 5, 0, torch.arange(len(images)))
        assert torch.equal(got.mul(255).round().to(torch.uint8), torch.from_numpy(np.stack(want)))
        assert not torch.equal(got, as_float(images))


def test_gaussian_noise_by_hand(rgb):
    """x + N(0, 0.08^2) clipped: the noise is read off a mid-gray image (no clipping within 6
    sigma) and must be what the same seed and indices add to any other image."""
    idx = torch.arange(100, 106)
    half = torch.full((6, 3, 12, 12), 0.5)
    z = corrupt(half, "gaussian_noise", 3, 7, idx) - 0.5
    assert z.std().item() == pytest.approx(0.08, rel=0.05) and abs(z.mean().item()) < 0.08 * 4 / z.numel() ** 0.5
    want = np.clip(as_float(rgb).numpy() + z.numpy(), 0, 1)
    np.testing.assert_allclose(corrupt(as_float(rgb), "gaussian_noise", 3, 7, idx).numpy(), want, atol=1e-6)


def test_noise_depends_on_seed_and_index_not_on_batch_or_company(gray):
    x = as_float(load_dataset("demo").test.images[:10])
    idx = torch.arange(50, 60)
    whole = corrupt(x, "gaussian_noise", 4, 11, idx)
    assert torch.equal(whole, corrupt(x, "gaussian_noise", 4, 11, idx))  # same seed, same images
    pieces = torch.cat([corrupt(x[s:s + 3], "gaussian_noise", 4, 11, idx[s:s + 3]) for s in range(0, 10, 3)])
    assert torch.equal(whole, pieces)  # batch size 3 or 10
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(corrupt(x[perm], "gaussian_noise", 4, 11, idx[perm]), whole[perm])  # any order or company
    assert not torch.equal(whole, corrupt(x, "gaussian_noise", 4, 12, idx))  # another seed
    assert not torch.equal(whole, corrupt(x, "gaussian_noise", 4, 11, idx + 1))  # another image's noise

    torch.set_num_threads(1)  # (restored by conftest) tiny network: see test_evaluate_corruptions_on_the_command_line
    torch.manual_seed(0)  # a small real network: what is tested is the batching around it
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    data = load_dataset("demo").test
    images, labels = data.images[:24], data.labels[:24]
    small, large = (evaluate_corruptions(net, images, labels, torch.arange(24), ["gaussian_noise", "contrast"],
                                         seed=5, batch_size=b) for b in (5, 64))
    assert small == large and len(small["accuracy"]["gaussian_noise"]) == 5
    assert small["mean"]["contrast"] == pytest.approx(sum(small["accuracy"]["contrast"]) / 5)
    assert small["overall_mean"] == pytest.approx((small["mean"]["contrast"] + small["mean"]["gaussian_noise"]) / 2)


def test_evaluate_corruptions_on_the_command_line(small_real):
    """The command's figures against a hand computation of contrast (numpy) on the same
    evenly spaced images through the same network."""
    weights = small_real / "teacher.safetensors"
    data = f"imagefolder:{small_real / 'data'},gray=1"
    # one thread: tiny networks gain nothing from two, and lose several times over when other work shares the cores
    r = run_igkd("evaluate", "--weights", weights, "--data", data, "--corruptions", "contrast", "--corruptions",
                 "gaussian_noise", "--corruption-images", "20", "--corruption-seed", "3", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    c = out["corruptions"]
    assert c["names"] == ["contrast", "gaussian_noise"] and c["images"] == 20 and c["seed"] == 3
    assert c["levels"]["contrast"] == {"parameter": "factor", "values": LEVELS["contrast"]}

    net, _ = igkd.load_model(weights)
    test = load_dataset(data).test
    pick = np.unique(np.round(np.linspace(0, len(test.labels) - 1, 20)).astype(int))
    x = test.images[pick].double().numpy() / 255
    y = test.labels[pick].numpy()
    mean = x.mean(axis=(2, 3), keepdims=True)
    want = []
    for level in LEVELS["contrast"]:
        xc = torch.from_numpy(np.clip((x - mean) * level + mean, 0, 1)).float()
        with torch.no_grad():
            want.append(100.0 * (net.eval()(xc).argmax(1).numpy() == y).mean())
    assert c["accuracy"]["contrast"] == pytest.approx(want)
    with torch.no_grad():
        clean = 100.0 * (net(torch.from_numpy(x).float()).argmax(1).numpy() == y).mean()
    assert c["clean_accuracy"] == pytest.approx(clean)
    assert c["mean"]["contrast"] == pytest.approx(np.mean(want))
    assert c["overall_mean"] == pytest.approx((c["mean"]["contrast"] + c["mean"]["gaussian_noise"]) / 2)
    assert out["total"] == len(test.labels)  # the clean metrics stay those of every test image
    text = format_evaluation(out)
    assert f"mean over 2 corruption(s): {c['overall_mean']:.2f}%" in text
    assert "  contrast" in text and "(factor 0.75/0.5/0.4/0.3/0.15)" in text


def test_unknown_corruption_is_one_line_listing_the_valid_names():
    r = run_igkd("evaluate", "--weights", "missing.safetensors", "--data", "demo", "--corruptions", "contrast,fog")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == ("igkd: error: unknown corruption 'fog'; use a comma list of gaussian_noise, gaussian_blur, "
                        "contrast, brightness, jpeg, or all")
    with pytest.raises(UserError, match="unknown corruption 'blur'"):
        igkd.evaluate(igkd.__file__, "demo", corruptions="blur")
    with pytest.raises(UserError, match="unknown corruption 'fog'"):
        igkd.ExperimentConfig(corruptions="fog")
    help_text = " ".join(run_igkd("evaluate", "--help").stdout.split())
    for text in ("--corruptions NAME[,NAME...]", "--corruption-seed", "--corruption-images", "gaussian_noise (",
                 "jpeg (JPEG compression, quality 80/65/58/50/40)", "CIFAR-10-C"):
        assert text in help_text, text


@pytest.mark.parametrize("name", ["gaussian_blur", "contrast", "brightness", "jpeg"])
def test_gray_images_are_corrupted_as_each_channel_of_equal_rgb(name):
    """Fashion-MNIST-like 1-channel images (odd, non-square sizes: JPEG's 8x8 blocks and 2x2
    chroma subsampling do not divide them) come out as each channel of the RGB image made of
    three copies of them: a gray JPEG, HSV with S = 0, blur and contrast channel by channel."""
    x = as_float(torch.randint(0, 256, (2, 1, 13, 7), generator=torch.Generator().manual_seed(5), dtype=torch.uint8))
    for severity in (1, 5):
        gray = corrupt(x, name, severity, 0, torch.arange(2))
        rgb = corrupt(x.expand(-1, 3, -1, -1).contiguous(), name, severity, 0, torch.arange(2))
        assert gray.shape == x.shape and torch.equal(rgb, gray.expand(-1, 3, -1, -1))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 3, 40), (1, 1, 8, 8)])
def test_blur_kernel_wider_than_the_image_repeats_its_edges(shape):
    # sigma 1 (severity 5): radius 4, a 9-pixel kernel; sigma stays in pixels whatever the size
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    want = ndimage.gaussian_filter(x.double().numpy(), sigma=(0, 0, 1.0, 1.0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(corrupt(x, "gaussian_blur", 5, 0, torch.arange(1)).numpy(), want, atol=2e-6)


class CountingNet(torch.nn.Module):
    """A 4-channel classifier that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.calls, self.head = 0, torch.nn.Linear(4, 3)

    def forward(self, x):
        self.calls += 1
        return self.head(x.mean((2, 3)))


def test_hsv_and_jpeg_refuse_other_channel_counts_in_one_line_before_scoring():
    """A dataset plugin may give 2 or 4 channels: PIL cannot write them as JPEG, and the max
    over RGBA's channels is no HSV value (an opaque alpha of 1 would hide any brightening)."""
    for channels in (2, 4):
        for name in ("jpeg", "brightness"):
            with pytest.raises(UserError, match=rf"^corruption {name} is defined on gray or RGB images .*not on "
                                                rf"{channels}-channel ones; leave {name} out of --corruptions"):
                corrupt(torch.rand(2, channels, 5, 5), name, 1, 0, torch.arange(2))
    net = CountingNet()
    images = torch.randint(0, 256, (6, 4, 5, 5), dtype=torch.uint8)
    with pytest.raises(UserError, match="corruption jpeg"):
        evaluate_corruptions(net, images, torch.zeros(6, dtype=torch.long), torch.arange(6), ["contrast", "jpeg"])
    assert net.calls == 0  # refused before the clean pass and contrast's five
    r = evaluate_corruptions(net, images, torch.zeros(6, dtype=torch.long), torch.arange(6), ["contrast", "gaussian_noise"],
                             batch_size=4)
    assert len(r["accuracy"]["gaussian_noise"]) == 5  # the others take any channels


def test_evenly_spaced_picks_as_many_images_as_asked():
    # --corruption-images 9999 of a 10,000-image test split scores 9999 of them, not 9997
    from igkd.evaluate.corruptions import evenly_spaced
    for n, k in ((10000, 9999), (10000, 9990), (60000, 59999)):
        got = evenly_spaced(n, k)
        assert len(got) == k and got[0] == 0 and got[-1] == n - 1 and bool((got.diff() <= 2).all())
    for n, k in ((10000, 2000), (200, 20), (7, 3)):  # numpy's linspace, rounded (the README's evidence: 2000)
        assert np.array_equal(evenly_spaced(n, k).numpy(), np.unique(np.round(np.linspace(0, n - 1, k)).astype(int)))
    assert torch.equal(evenly_spaced(5, 0), torch.arange(5)) and torch.equal(evenly_spaced(5, 9), torch.arange(5))


def test_an_experiment_refuses_a_corruption_its_images_cannot_take_before_any_run(tmp_path, monkeypatch):
    """A 4-channel plug-in dataset with --corruptions jpeg: refused after every run had trained
    (the scores come last); now at the experiment's start, with nothing written."""
    import igkd
    from igkd.data import DATASETS, Dataset, Split
    from igkd.experiments import resolve, run_ablation
    g = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randint(0, 256, (n, 4, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 2)
    monkeypatch.setitem(DATASETS, "fourch", lambda spec: Dataset(str(spec), ["a", "b"], 4, (8, 8), split(8), split(4)))
    cfg = resolve("ablation", overrides={"data": "fourch", "methods": "student", "corruptions": "contrast,jpeg",
                                         "model": "resnet:depth=8", "epochs": 1})
    with pytest.raises(igkd.UserError, match="^corruption jpeg is defined on gray or RGB images"):
        run_ablation(cfg, tmp_path / "exp", quiet=True)
    assert not (tmp_path / "exp").exists()
