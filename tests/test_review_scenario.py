"""A new user's path with a torchvision-style teacher of their own (a plain .pt state dict),
an image folder, built-in and py: students, export, bench latency, audit and report: what
got in the way, each fixed and checked here on tiny real files (32-pixel PNGs, ResNet-8)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_cli import run_igkd
from helpers_data import write_image_folder
from igkd.models import build_model, count_parameters, save_checkpoint

SMALL = "resnet:depth=8"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenario")
    write_image_folder(root / "data", per_class=3, side=32)
    torch.manual_seed(0)
    torch.save(build_model(SMALL, 2, 3).state_dict(), root / "teacher.pt")  # a foreign file: no metadata
    return root


def _data(root) -> str:
    return f"imagefolder:{root / 'data'},cache=0"


def test_evaluate_names_imagenet_preprocessing_it_applied(folder):
    r = run_igkd("evaluate", "--weights", folder / "teacher.pt", "--model", SMALL, "--normalize", "imagenet",
                 "--data", _data(folder), "--threads", "1")
    assert r.returncode == 0, r.stderr
    # it printed "preprocessing dataset", as if --normalize imagenet had been ignored
    assert "preprocessing imagenet)" in r.stdout.splitlines()[0]
    r = run_igkd("evaluate", "--weights", folder / "teacher.pt", "--model", SMALL, "--normalize", "dataset",
                 "--data", _data(folder), "--threads", "1")
    assert "preprocessing dataset)" in r.stdout.splitlines()[0]


def test_evaluate_counts_a_teacher_spec_at_the_data_classes(folder):
    r = run_igkd("evaluate", "--weights", folder / "teacher.pt", "--model", SMALL, "--data", _data(folder),
                 "--teacher", "resnet:depth=14", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    want = count_parameters(build_model("resnet:depth=14", 2, 3))  # 2 classes, not 10
    assert result["teacher_params"] == want
    assert result["compression"] == pytest.approx(want / count_parameters(build_model(SMALL, 2, 3)))


def test_bench_latency_names_classes_for_a_foreign_file(folder):
    r = run_igkd("bench", "latency", "--model", SMALL, "--weights", folder / "teacher.pt", "--warmup", "0",
                 "--min-time", "0", "--min-reps", "1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("igkd: error: ")
    # it said "the data has 10 classes; use the data they were trained on": bench reads no data
    assert "the data has" not in lines[0] and "pass --classes 2" in lines[0]
    r = run_igkd("bench", "latency", "--model", SMALL, "--weights", folder / "teacher.pt", "--classes", "2",
                 "--warmup", "0", "--min-time", "0", "--min-reps", "1", "--json")
    assert r.returncode == 0, r.stderr


def _crafted(path, spec: str):
    torch.manual_seed(1)
    return save_checkpoint(path, build_model(SMALL, 2, 3), {
        "model": spec, "num_classes": 2, "in_channels": 3, "classes": ["cat", "dog"],
        "preprocessing": {"normalize": "none"}})


def test_audit_names_its_own_model_options(folder, tmp_path):
    student = _crafted(tmp_path / "student", "py:mynet.py:make,width=16")
    r = run_igkd("audit", "--teacher", folder / "teacher.pt", "--teacher-model", SMALL, "--student", student,
                 "--data", _data(folder), "--images", "2", "--ig-steps", "2", "--threads", "1")
    assert r.returncode == 2
    # it told the user to "pass --model", an option audit does not have
    assert "pass --student-model py:mynet.py:make,width=16" in r.stderr
    teacher = _crafted(tmp_path / "teacher", "module:Net")
    r = run_igkd("audit", "--teacher", teacher, "--student", student, "--student-model", SMALL,
                 "--data", _data(folder), "--images", "2", "--ig-steps", "2", "--threads", "1")
    assert r.returncode == 2 and "pass --teacher-model SPEC" in r.stderr


def test_the_model_given_is_the_model_reported(folder, tmp_path):
    weights = _crafted(tmp_path / "s", "module:Net")  # a module handed to the API, rebuilt by --model
    r = run_igkd("evaluate", "--weights", weights, "--model", SMALL, "--data", _data(folder), "--threads", "1",
                 "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == SMALL  # it said module:Net, which nothing can build


def test_the_model_card_of_an_api_module_says_how_to_load_it():
    from igkd.modelcard import model_card
    card = model_card({"model": "module:Sequential", "dataset": "demo", "params": 10, "epochs": 1,
                       "test_accuracy": 50.0, "method": "student"}, {})
    # it gave 'igkd evaluate --weights model.safetensors --data demo', which igkd refuses for module:CLASS
    evaluate = next(line for line in card.splitlines() if line.startswith("igkd evaluate"))
    assert "--model py:FILE.py:CALLABLE" in evaluate
    assert 'igkd.load_model("model.safetensors", "py:FILE.py:CALLABLE")' in card


def test_int8_summary_prints_no_negative_zero():
    from igkd.deploy.export import export_summary
    r = {"model": SMALL, "out": "m.onnx", "format": "onnx", "int8": True, "bytes": 1, "sidecar": "m.onnx.json",
         "data": "demo", "parity": {"images": 4, "max_abs_diff": 0.0, "atol": 1e-3, "top1_agreement": 100.0},
         "int8_check": {"accuracy_int8": 25.0, "accuracy_fp32": 25.0, "accuracy_change": -0.0,
                        "top1_agreement": 100.0, "threads": 1, "latency_int8_ms": 1.0, "latency_fp32_ms": 1.0,
                        "speedup": 1.0}}
    assert "(+0.00 points)" in export_summary(r)


def test_report_prints_no_empty_section(tmp_path):
    from igkd.report import terminal_summary
    md = ("# igkd report: run\n\n## Deployment\n\n### Latency\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
          "### Export\n\nm -> m.onnx (onnx)\n\n### Attribution\n\n| c |\n|---|\n| 3 |\n\n## Training curves\n\n"
          "![curves](curves.png)\n")
    text = terminal_summary(md)
    assert "### Export" not in text and "## Training curves" not in text  # headings over nothing printed
    assert "## Deployment" in text and "### Latency" in text and "### Attribution" in text and "| 3 |" in text


def test_a_file_without_metadata_under_auto_normalisation_is_said_once(tmp_path):
    """A foreign .pt under --normalize auto gets raw pixels: a torchvision ImageNet teacher
    scored 25% instead of its 75% without a word. Now one warning naming the option; none
    once the user states it, and none for igkd's own checkpoints, which record theirs."""
    torch.manual_seed(0)
    net = build_model("mobilenetv2:width=0.25,drop=14", 10, 1)
    torch.save(net.state_dict(), tmp_path / "foreign.pt")
    own = save_checkpoint(tmp_path / "own", net, {"model": "mobilenetv2:width=0.25,drop=14", "num_classes": 10,
                                                  "in_channels": 1, "preprocessing": {"normalize": "none"}})
    base = ["evaluate", "--data", "demo", "--model", "mobilenetv2:width=0.25,drop=14", "--json", "--quiet"]
    r = run_igkd(*base, "--weights", tmp_path / "foreign.pt")
    warned = [line for line in r.stderr.splitlines() if line.startswith("igkd: warning:")]
    assert r.returncode == 0 and len(warned) == 1, r.stderr
    assert "foreign.pt has no igkd metadata" in warned[0] and "--normalize imagenet" in warned[0]
    for extra in (["--weights", tmp_path / "foreign.pt", "--normalize", "none"], ["--weights", own]):
        r = run_igkd(*base, *extra)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_a_teacher_module_gets_the_teacher_normalisation_asked_for(folder, tmp_path):
    """igkd.distill(cfg, teacher=module) ignored cfg.teacher_normalize: a torchvision model
    handed over as it is, with teacher_normalize='imagenet', saw raw pixels."""
    import igkd
    from igkd.config import DistillConfig, build
    from igkd.data import load_dataset
    from igkd.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from igkd.store import open_store
    torch.manual_seed(0)
    teacher = build_model(SMALL, 2, 3).eval()
    cfg = build(DistillConfig, dict(data=_data(folder), method="kd", epochs=1, batch_size=4, val_fraction=0.0,
                                    teacher_normalize="imagenet", store=str(tmp_path / "store"), threads=1))
    igkd.distill(cfg, tmp_path / "run", quiet=True, teacher=teacher)
    x = load_dataset(_data(folder)).train.images.float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = teacher((x - mean) / std)
    torch.testing.assert_close(torch.from_numpy(open_store(tmp_path / "store").logits[:].copy()).float(), want,
                               rtol=1e-4, atol=1e-4)
    # igkd.precompute of the same module and normalisation is that store, not one of raw pixels
    again = igkd.precompute(teacher, _data(folder), cfg, tmp_path / "other", teacher_normalize="imagenet",
                            quiet=True)
    assert again.manifest["identity"] == open_store(tmp_path / "store").manifest["identity"]
