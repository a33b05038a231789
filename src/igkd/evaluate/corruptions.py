"""Accuracy under common corruptions, computed on the fly (CIFAR-10-C's, batched and seeded).

CIFAR-10-C (Hendrycks and Dietterich, "Benchmarking neural network robustness to common
corruptions and perturbations", ICLR 2019) is a fixed set of corrupted copies of the
CIFAR-10 test split, five severities per corruption. igkd applies the same corruptions
to any dataset's test images as it scores them, so they work on every dataset igkd reads
(JPEG CIFAR-10, image folders, grayscale) and need no download. The parameters at the
five severities are those of the benchmark's generator, ``make_cifar_c.py`` in
github.com/hendrycks/robustness (ImageNet-C/create_c/), which for these five reads::

    gaussian_noise    c = [0.04, 0.06, .08, .09, .10]   x + N(0, c^2), clipped to [0, 1]
    gaussian_blur     c = [.4, .6, 0.7, .8, 1]          skimage.filters.gaussian(x, sigma=c)
    contrast          c = [.75, .5, .4, .3, 0.15]       (x - mean) * c + mean, mean per image and channel
    brightness        c = [.05, .1, .15, .2, .3]        V + c in HSV (skimage.color.rgb2hsv), clipped
    jpeg_compression  c = [80, 65, 58, 50, 40]          PIL JPEG save at quality c, decoded

Where igkd differs from the generator, on purpose:

* Images stay float after a corruption; the generator stores ``np.uint8(x * 255)``
  (truncated), a difference below 1/255 per pixel. JPEG is 8-bit by nature: its
  input is rounded to 8 bits (exact for the uint8 images every igkd dataset holds).
* Gaussian blur is skimage's ``gaussian`` as the generator calls it (``mode='nearest'``,
  ``truncate=4``: kernel radius ``int(4 sigma + 0.5)``), as separable convolutions.
* Brightness uses that HSV -> RGB is homogeneous of degree 1 in V for fixed H and S
  (every term of skimage's ``hsv2rgb`` is V times a function of H and S): raising V to
  V' = min(V + c, 1) scales the pixel's RGB by V' / V. A black pixel (V = 0, which
  ``rgb2hsv`` gives S = H = 0) becomes the gray (V', V', V'). Grayscale images are the
  case S = 0: x -> min(x + c, 1).
* Noise is drawn per image from a generator seeded by (seed, corruption, severity, the
  image's index in the test split), so the corrupted images are the same whatever the
  batch size, the device or the other images scored with them (``--class-map``,
  ``--teacher-correct``, ``--corruption-images`` only choose which images are scored),
  and every model scored with one seed sees the same corrupted images (paired
  comparisons). The generator drew from NumPy's global state in test-set order.

The levels are CIFAR-10-C's for images of any size: the blur's sigma is in pixels, not scaled
with the image (ImageNet-C's generator has its own, stronger levels for 224-pixel images);
a kernel wider than the image repeats its edges, as ``mode='nearest'`` does. A gray
(1-channel) image comes out of blur, contrast, brightness and JPEG as each channel of the RGB
image of three copies of it would; brightness (HSV) and JPEG take 1 or 3 channels only.

Corruptions act on images in [0, 1], before the model's own normalisation (an igkd model
normalises inside ``forward``, :class:`igkd.models.Normalized`).

Adding a corruption is one function ``f(x, level, noise) -> x`` (``x``: a float batch
N x C x H x W in [0, 1] on any device; ``noise``: a :class:`SampleNoise` giving seeded
per-image random numbers) and one line in :data:`CORRUPTIONS` with its five levels.

No torch at import: ``igkd evaluate --help`` lists these names without importing torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .. import plugins
from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

SEVERITIES = (1, 2, 3, 4, 5)
ALL = "all"
REFERENCE = ("CIFAR-10-C parameters (Hendrycks and Dietterich, ICLR 2019; make_cifar_c.py of "
             "github.com/hendrycks/robustness)")


class SampleNoise:
    """Standard normal numbers for a batch, drawn image by image from a generator seeded
    by (seed, corruption, severity, the image's dataset index): the same numbers for an
    image whatever batch, device or company it comes in."""

    def __init__(self, seed: int, name: str, severity: int, indices: torch.Tensor):
        digest = hashlib.sha256(f"igkd-corruption/{seed}/{name}/{severity}".encode()).digest()
        self.base = int.from_bytes(digest[:8], "little")
        self.indices = indices

    def seed_of(self, index: int) -> int:
        # torch's CPU generator (mt19937) is seeded by the low 32 bits of its seed: index ->
        # base + index * odd is one-to-one modulo 2^32, so no two images of a split share noise
        return (self.base + index * 0x9E3779B1) & 0xFFFFFFFF

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        import torch
        if len(self.indices) != len(like):
            raise ValueError(f"{len(self.indices)} indices for a batch of {len(like)} images")
        g = torch.Generator()
        out = torch.empty(like.shape, dtype=torch.float32)
        for row, index in enumerate(self.indices.tolist()):
            g.manual_seed(self.seed_of(index))
            out[row] = torch.randn(like.shape[1:], generator=g)  # on the CPU: the same on every device
        return out.to(device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------- corruptions
def gaussian_noise(x: torch.Tensor, sigma: float, noise: SampleNoise) -> torch.Tensor:
    return (x + sigma * noise.normal(x)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float, noise: SampleNoise) -> torch.Tensor:
    import torch
    import torch.nn.functional as F
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage's (and so skimage's) kernel at truncate=4
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    # in float64 on a GPU: cuDNN convolves float32 in TF32 by default (about 1e-3 off), and the
    # corrupted images are to be the same whatever the device. Not by switching TF32 off with
    # torch.backends.cudnn.flags: it reads the older TF32 flag, which raises (on the CPU too) in
    # a process that set TF32 through torch's newer fp32_precision settings
    work = torch.float64 if x.is_cuda else x.dtype
    k = (k / k.sum()).to(device=x.device, dtype=work)
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (radius,) * 4, mode="replicate")  # skimage's mode='nearest'
    y = F.conv2d(F.conv2d(y.to(work), k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).to(x.dtype)
    return y.reshape(n, c, h, w).clamp_(0, 1)


def contrast(x: torch.Tensor, c: float, noise: SampleNoise) -> torch.Tensor:
    mean = x.mean((2, 3), keepdim=True)  # per image and channel, as np.mean(x, axis=(0, 1)) on H x W x C
    return ((x - mean) * c + mean).clamp_(0, 1)


def _gray_or_rgb(x: torch.Tensor, name: str, what: str) -> None:
    if x.shape[1] not in (1, 3):
        raise UserError(f"corruption {name} is defined on gray or RGB images ({what}), not on {x.shape[1]}-channel "
                        f"ones; leave {name} out of --corruptions (corruptions: in a config)")


def brightness(x: torch.Tensor, c: float, noise: SampleNoise) -> torch.Tensor:
    import torch
    _gray_or_rgb(x, "brightness", "HSV")  # the max over 4 channels is no HSV value: RGBA's alpha would hide any change
    v = x.amax(1, keepdim=True)  # HSV value
    raised = (v + c).clamp(max=1.0)
    # RGB is V times a function of (H, S): scale by V'/V; black (V = 0, S = H = 0) becomes gray V'
    scaled = x * (raised / v.clamp_min(torch.finfo(x.dtype).tiny))
    return torch.where(v > 0, scaled, raised.expand_as(x)).clamp_(0, 1)


def jpeg_compression(x: torch.Tensor, quality: float, noise: SampleNoise) -> torch.Tensor:
    import io

    import numpy as np
    import torch
    from PIL import Image
    _gray_or_rgb(x, "jpeg", "a JPEG holds 1 or 3 channels")
    pixels = x.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):  # no tensor JPEG codec: one PIL round trip per image
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, "JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded).reshape(image.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype).div_(255)


@dataclass(frozen=True)
class Corruption:
    """A corruption: ``function(x, level, noise)`` and its level at severities 1 to 5."""

    function: Callable
    levels: tuple[float, ...]
    parameter: str
    help: str


# name -> corruption; one line each (levels: make_cifar_c.py's, see the module docstring)
CORRUPTIONS: dict[str, Corruption] = plugins.Registry({
    "gaussian_noise": Corruption(gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), "sigma", "additive Gaussian noise"),
    "gaussian_blur": Corruption(gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), "sigma", "Gaussian blur"),
    "contrast": Corruption(contrast, (0.75, 0.5, 0.4, 0.3, 0.15), "factor", "contrast scaled about the mean"),
    "brightness": Corruption(brightness, (0.05, 0.1, 0.15, 0.2, 0.3), "added V", "HSV value raised"),
    "jpeg": Corruption(jpeg_compression, (80, 65, 58, 50, 40), "quality", "JPEG compression"),
}, "corruptions", "corruption", plugins.expect(Corruption, "corruption"))  # and entry points igkd.corruptions
NAMES: tuple[str, ...] = tuple(dict.keys(CORRUPTIONS))  # igkd's own; `all` also takes installed packages'


def help_text() -> str:
    """``name (what, parameter levels), ...`` for the ``--corruptions`` help."""
    return "; ".join(f"{n} ({c.help}, {c.parameter} {'/'.join(f'{v:g}' for v in c.levels)})"
                     for n, c in CORRUPTIONS.items())


def parse(text: str | Sequence[str]) -> list[str]:
    """Names from a comma list (or a list) of names and ``all``, in registry order for
    ``all`` and as given otherwise, each once; a one-line UserError lists the valid names."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    names: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        if item == ALL:
            names += CORRUPTIONS
        elif item in CORRUPTIONS:
            names.append(item)
        else:
            raise _unknown(item)
    return list(dict.fromkeys(names))


def _unknown(name: str) -> UserError:
    return UserError(f"unknown corruption '{name}'; use a comma list of {', '.join(CORRUPTIONS)}, or {ALL}")


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Batch ``x`` (float, [0, 1], N x C x H x W) under corruption ``name`` at ``severity``
    (1 to 5); ``indices``: the images' indices in their split (they seed any noise)."""
    if severity not in SEVERITIES:
        raise UserError(f"severity {severity} is out of range; use 1 to {len(SEVERITIES)}")
    if name not in CORRUPTIONS:
        raise _unknown(name)
    entry = CORRUPTIONS[name]
    return entry.function(x, entry.levels[severity - 1], SampleNoise(seed, name, severity, indices))


def evenly_spaced(n: int, k: int):
    """Positions of ``k`` images evenly spaced over ``n`` (all when k is 0 or >= n)."""
    import torch
    if not k or k >= n:
        return torch.arange(n)
    # float64: float32 holds positions near 10,000 only to 0.001, and two picks could round onto one image
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long().unique()


def check_images(names: list[str], shape: tuple[int, int, int]) -> None:
    """Each corruption once on one blank C x H x W image: one that cannot take such images (a
    jpeg of 4 channels) says so in one line before any pass over a split, or any training."""
    import torch
    for name in names:
        corrupt(torch.zeros((1, *shape)), name, 1, 0, torch.arange(1))


def evaluate_corruptions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                         names: Sequence[str], seed: int = 0, batch_size: int = 128, device="cpu",
                         quiet: bool = True) -> dict:
    """Accuracy (percent) of ``model`` on uint8 ``images`` under each corruption of
    ``names`` at each severity, their mean over the severities per corruption and the
    mean of those over the corruptions; the clean accuracy on the same images too.

    ``indices``: each image's index in its split (seeds the noise). Returns
    ``{"names", "seed", "images", "clean_accuracy", "accuracy": {name: [5 values]},
    "mean": {name: value}, "overall_mean", "levels": {name: {"parameter", "values"}},
    "reference"}``."""
    from ..progress import Progress
    from .metrics import predict
    names = parse(list(names))
    n = len(labels)
    if not n:
        raise UserError("no test images to score under corruptions")
    labels = labels.cpu()
    check_images(names, tuple(images[0:1].shape[1:]))  # (a RowView has no shape: one row has)

    def accuracy(transform=None) -> float:
        logits = predict(model, images, batch_size, device, transform=transform)
        return 100.0 * (logits.argmax(1) == labels).sum().item() / n

    result = {"names": names, "seed": seed, "images": n, "reference": REFERENCE, "clean_accuracy": accuracy(),
              "accuracy": {}, "mean": {}, "levels": {}}
    with Progress(len(names) * len(SEVERITIES) * n, "corruptions", "img", quiet=quiet) as bar:
        for name in names:
            accs = []
            for severity in SEVERITIES:
                def transform(x, start, name=name, severity=severity):
                    return corrupt(x, name, severity, seed, indices[start:start + len(x)])
                accs.append(accuracy(transform))
                bar.update(n, extra=f"{name} severity {severity}: {accs[-1]:.2f}%")
            entry = CORRUPTIONS[name]
            result["accuracy"][name] = accs
            result["mean"][name] = sum(accs) / len(accs)
            result["levels"][name] = {"parameter": entry.parameter, "values": list(entry.levels)}
    result["overall_mean"] = sum(result["mean"].values()) / len(names) if names else None
    return result


__all__ = ["ALL", "CORRUPTIONS", "Corruption", "NAMES", "SEVERITIES", "SampleNoise", "check_images", "corrupt",
           "evaluate_corruptions", "evenly_spaced", "help_text", "parse"]
