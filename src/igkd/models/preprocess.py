"""Input preprocessing kept beside, not inside, a network's weights.

Every igkd model takes images in [0, 1] (NCHW float). A teacher trained on mean/std
normalised inputs is wrapped in :class:`Normalized`, which applies the normalisation
inside ``forward``; its weights stay those of the bare network, so state dicts match
other tools. IG computed through the wrapper w.r.t. [0, 1] pixels equals IG w.r.t. the
normalised input (IG is invariant to per-channel affine reparametrisation).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then each module's own ``training`` flag back
    (not ``model.train(prev)``, which sets every module to one flag: a model with frozen
    BatchNorm layers inside a training model is left as found)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


class Normalized(nn.Module):
    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


# torchvision's ImageNet normalisation: what its (and most published) ImageNet checkpoints expect
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def with_preprocessing(net: nn.Module, preprocessing: dict | None) -> nn.Module:
    """Wrap ``net`` as its metadata says: ``{"normalize": "none"}`` or ``{"normalize":
    "dataset", "mean": [...], "std": [...]}``."""
    if not preprocessing or preprocessing.get("normalize", "none") == "none":
        return net
    return Normalized(net, preprocessing["mean"], preprocessing["std"])


def preprocessing_of(model: nn.Module) -> dict:
    """The metadata ``with_preprocessing`` takes back to wrap a network as ``model`` is wrapped."""
    if isinstance(model, Normalized):
        return {"normalize": "dataset", "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
    return {"normalize": "none"}


def bare(model: nn.Module) -> nn.Module:
    """The network inside a preprocessing wrapper (the one whose weights are saved)."""
    return model.net if isinstance(model, Normalized) else model


# module -> the preprocessing igkd.train or igkd.distill put in front of it while training it
# in place (by identity; forgotten with the module). Its weights then expect normalised
# inputs, yet the module itself takes them as given: igkd.evaluate(module) read it as taking
# raw [0, 1] pixels and scored a just-trained network at 21% against the run's 47%.
_TRAINED_WITH: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def remember_preprocessing(module: nn.Module, wrapped: nn.Module) -> None:
    """Record that ``module`` was trained inside ``wrapped`` (itself, or :class:`Normalized`
    around it): :func:`trained_preprocessing` gives that preprocessing back."""
    _TRAINED_WITH[module] = preprocessing_of(wrapped)


def trained_preprocessing(module: nn.Module) -> dict | None:
    """The preprocessing an igkd run of this process trained ``module`` behind, or None."""
    return _TRAINED_WITH.get(module)
