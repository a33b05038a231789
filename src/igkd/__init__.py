"""igkd: compress image classifiers by knowledge distillation with integrated-gradient overlays.

Library first; the ``igkd`` command is a thin layer over these functions::

    import igkd
    data = igkd.load_dataset("demo")
    teacher = igkd.build_model("mobilenetv2", num_classes=10, in_channels=1)
    attr = igkd.integrated_gradients(teacher, images, target=labels, n_steps=50)
    igkd.distill(igkd.DistillConfig(data="demo", teacher="teacher/model.safetensors"), out="runs/kdig")
"""

from importlib.metadata import PackageNotFoundError, version

from ._lazy import lazy_package

try:  # one version source: pyproject.toml, as installed
    __version__ = version("igkd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_API = {
    "distill": ".api", "evaluate": ".api", "load_teacher": ".api", "precompute": ".api", "train": ".api",
    "attribution_map": ".attribution", "integrated_gradients": ".attribution",
    "DistillConfig": ".config", "PrecomputeConfig": ".config", "TrainConfig": ".config",
    "from_tensors": ".data", "load_dataset": ".data",
    "Part": ".distill.parts", "register_part": ".distill.parts",
    "audit": ".deploy", "bench_latency": ".deploy", "deployment_section": ".deploy", "export_model": ".deploy",
    "predict": ".deploy",
    "UserError": ".errors",
    "ExperimentConfig": ".experiments", "run_ablation": ".experiments", "run_compression": ".experiments",
    "run_experiment": ".experiments", "run_montecarlo": ".experiments", "run_search": ".experiments",
    "build_model": ".models", "count_parameters": ".models", "load_model": ".models",
    "write_report": ".report",
}
lazy_package(__name__, _API)  # imported on first use: 'igkd --help' starts without torch
__all__ = sorted(_API)
