"""igkd: compress image classifiers by knowledge distillation with integrated-gradient overlays.

Library first; the ``igkd`` command is a thin layer over these functions::

    import igkd
    data = igkd.load_dataset("demo")
    teacher = igkd.build_model("mobilenetv2", num_classes=10, in_channels=1)
    attr = igkd.integrated_gradients(teacher, images, target=labels, n_steps=50)
    igkd.distill(igkd.DistillConfig(data="demo", teacher="teacher/model.safetensors"), out="runs/kdig")
"""

__version__ = "0.1.0"

from .api import distill, evaluate, load_teacher, precompute, train  # noqa: E402
from .attribution import attribution_map, integrated_gradients  # noqa: E402
from .config import DistillConfig, PrecomputeConfig, TrainConfig  # noqa: E402
from .data import load_dataset  # noqa: E402
from .deploy import audit, bench_latency, deployment_section, export_model  # noqa: E402
from .errors import UserError  # noqa: E402
from .experiments import (ExperimentConfig, run_ablation, run_compression, run_experiment,  # noqa: E402
                          run_montecarlo, run_search)
from .models import build_model, count_parameters, load_model  # noqa: E402
from .report import write_report  # noqa: E402

__all__ = [
    "DistillConfig", "PrecomputeConfig", "TrainConfig", "UserError", "attribution_map", "build_model",
    "count_parameters", "distill", "evaluate", "integrated_gradients", "load_dataset", "load_model",
    "load_teacher", "precompute", "train",
]
__all__ += ["audit", "bench_latency", "deployment_section", "export_model"]  # deployment (issue 6)
__all__ += ["ExperimentConfig", "run_ablation", "run_compression", "run_experiment", "run_montecarlo",  # issue 5
            "run_search", "write_report"]
