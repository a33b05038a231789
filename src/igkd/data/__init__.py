"""Datasets by spec string: ``load_dataset("imagefolder:/data/pets,size=64")``.

Known kinds (see each module's docstring for what it expects on disk):

    cifar10:DIR[,download=0][,verify=0]   official python-pickle release (downloaded if absent)
    cifar100:DIR[,labels=fine|coarse][,download=0][,verify=0]   the same for CIFAR-100
    imagefolder:DIR[,size=N|HxW][,resize=fixed|shorter][,gray=1][,test=0.2,seed=0][,cache=0][,mmap=auto|0|1]
    fashion-mnist[:DIR]              IDX files (default: Debian's dataset-fashion-mnist)
    demo                             3,000 Fashion-MNIST images shipped with igkd
    memory:sha256=HEX                data given to the Python API in memory (data=): recorded, refused here

A new source is one function ``Spec -> Dataset`` added to :data:`DATASETS`. A source that
decodes images can keep them in the memory-mappable on-disk cache of
:mod:`igkd.data.image_cache`, as ``imagefolder`` does.
"""

from __future__ import annotations

from typing import Callable

from .. import plugins
from ..errors import UserError
from ..spec import Spec, parse_spec
from .base import Dataset, RowView, Split
from .cifar10 import load_cifar10
from .cifar100 import load_cifar100
from .demo import load_demo
from .fashion_mnist import load_fashion_mnist
from .imagefolder import load_imagefolder
from .memory import KIND as MEMORY_KIND, from_tensors, load_memory
from .splits import stratified_split, subset_indices

DATASETS: dict[str, Callable[[Spec], Dataset]] = plugins.Registry({
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "fashion-mnist": load_fashion_mnist,
    "demo": load_demo,
}, "datasets", "dataset source")  # and installed packages' (entry points igkd.datasets)


def load_dataset(spec: str) -> Dataset:
    """The dataset a spec string names; a UserError for unknown kinds, paths or options."""
    parsed = parse_spec(spec, "dataset spec")
    if parsed.kind == MEMORY_KIND:  # not a source in DATASETS: it loads nothing, and no plug-in may take the name
        load_memory(parsed)
    if parsed.kind not in DATASETS:
        raise UserError(f"unknown dataset kind '{parsed.kind}' in '{spec}'; known kinds: {', '.join(DATASETS)}")
    dataset = DATASETS[parsed.kind](parsed)
    dataset.loaded_from = spec  # given as data= to the API, it is recorded as this spec (igkd.data.memory)
    return dataset


__all__ = ["DATASETS", "Dataset", "RowView", "Split", "from_tensors", "load_dataset", "stratified_split",
           "subset_indices"]
