"""Attention transfer: hooked features are the named layers' outputs, the trainer's AT term
is the hand computation, layer errors are one-line UserErrors, and every method name
trains for an epoch on a small real dataset (a 256-image subset of the demo set)."""

import json

import pytest
import torch

from igkd.config import DistillConfig, build
from igkd.data import Dataset, Split, load_dataset
from igkd.api import needs_store
from igkd.distill import METHODS, MODERN_METHODS, FeatureHook, Trainer, at_loss, choose_layers, parse_method
from igkd.distill.parts import Batch
from igkd.errors import UserError
from igkd.models import Normalized, bare, build_model
from igkd.precompute import precompute

TEACHER, STUDENT = "mobilenetv2:width=0.25,drop=12", "mobilenetv2:width=0.25,drop=14"


def tiny_teacher(classes=10, channels=1):
    torch.manual_seed(0)
    return Normalized(build_model(TEACHER, classes, channels), [0.3] * channels, [0.3] * channels).eval()


@pytest.fixture(scope="module")
def demo_subset() -> Dataset:
    demo = load_dataset("demo")
    tr, te = demo.train, demo.test
    return Dataset("demo[:256]", demo.classes, demo.channels, demo.image_size,
                   Split(tr.images[:256], tr.labels[:256]), Split(te.images[:128], te.labels[:128]))


def test_hooks_take_the_named_layers_outputs_through_the_wrapper():
    teacher, student = tiny_teacher(4, 3), build_model(STUDENT, 4, 3).eval()
    x = torch.rand(3, 3, 16, 16)
    th, sh = FeatureHook(teacher, "features.5", "teacher"), FeatureHook(student, "features.3.conv", "student")
    with torch.no_grad():
        teacher(x), student(x)
        want_t = bare(teacher).features[:6]((x - teacher.mean) / teacher.std)  # by hand, normalised input
        want_s = student.features[:3](x)
        want_s = student.features[3].conv(want_s)
    torch.testing.assert_close(th.pop(), want_t, rtol=0, atol=0)
    torch.testing.assert_close(sh.pop(), want_s, rtol=0, atol=0)
    th.remove(), sh.remove()


def test_trainer_at_term_equals_hand_computation(tmp_path, demo_subset):
    cfg = build(DistillConfig, dict(model=STUDENT, normalize="none", method="at", epochs=1, batch_size=32,
                                    val_fraction=0.25, warmup_epochs=0, gamma=0.5))
    torch.manual_seed(0)
    tr = Trainer(cfg, build_model(STUDENT, 10, 1), demo_subset, tmp_path / "run", torch.device("cpu"),
                 teacher=tiny_teacher(), quiet=True)
    assert (tr.meta["at"]["teacher_layer"], tr.meta["at"]["student_layer"]) == ("features.6", "features.4")
    idx, x, y = next(tr.batches(1))
    t, s = tr.teacher, tr.model
    with torch.no_grad():
        ft = bare(t).features[:7]((x - t.mean) / t.std)
        fs = s.features[:5](x)  # train mode: the same batch statistics the step uses
    want = at_loss(fs, ft).item()
    _, parts = tr.train_step(Batch(idx, x, y))
    assert parts["at"].item() == pytest.approx(want, rel=1e-5)
    assert tr.teacher_hooks[0].features is None  # popped; the teacher stopped after its AT layer


def test_auto_layers_for_the_papers_networks():
    teacher = Normalized(build_model("mobilenetv2", 10, 3), [0.5] * 3, [0.25] * 3)
    got = choose_layers(teacher, build_model("mobilenetv2:drop=5", 10, 3), "auto", "auto", (3, 32, 32))
    assert got == ("features.6", "features.6", (32, 16, 16), (32, 16, 16))
    got = choose_layers(teacher, build_model("mobilenetv2:drop=5", 10, 3), "features.9", "auto", (3, 32, 32))
    assert got[:2] == ("features.9", "features.13")  # the student's last 8x8 block


@pytest.mark.parametrize("teacher,student,size,want", [
    ("resnet:depth=56", "resnet:depth=20", 32, ("layer2.8", "layer2.2")),
    ("wrn:depth=40,k=2", "wrn:depth=16,k=2", 32, ("block2.layer", "block2.layer")),
    ("mobilenetv2", "resnet:depth=20", 32, ("features.6", "layer2.2")),
    ("resnet50", "mobilenetv2_imagenet", 64, ("layer1.2", "features.3")),
])
def test_auto_layers_for_any_family_from_feature_map_sizes(teacher, student, size, want):
    t, s = build_model(teacher, 10, 3), build_model(student, 10, 3)
    got = choose_layers(t, s, "auto", "auto", (3, size, size))
    assert got[:2] == want and got[2][1:] == got[3][1:]

def test_mismatched_spatial_sizes_are_a_one_line_user_error():
    with pytest.raises(UserError) as e:
        choose_layers(tiny_teacher(4, 3), build_model(STUDENT, 4, 3), "features.6", "features.2", (3, 16, 16))
    msg = str(e.value)
    assert "\n" not in msg and "8 x 8" in msg and "16 x 16" in msg and "features.6" in msg
    assert "pick other layers" in msg


def test_unknown_layer_is_a_user_error_listing_valid_names():
    with pytest.raises(UserError, match=r"unknown student layer 'features\.30'.*features\.0, features\.1"):
        choose_layers(tiny_teacher(4, 3), build_model(STUDENT, 4, 3), "auto", "features.30", (3, 16, 16))
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(UserError, match="no block of the student gives a C x H x W feature map"):
        choose_layers(tiny_teacher(4, 3), flat, "auto", "auto", (3, 16, 16))


TERMS = {"kd": ["kd"], "dkd": ["tckd", "nckd"], "dist": ["inter", "intra"], "explain": ["explain"], "at": ["at"]}
# every method (the paper's, the modern baselines and controls) and every part option that changes the code path
# (the paper's combinations of at with an overlay are covered by kd+ig+at and the parts alone)
SKIPPED = {"kd+at", "ig+at", "ig-shuffled+at", "kd+ig-shuffled+at",
           "ig-shuffled", "dkd+ig", "kd+explain"}  # covered by kd+ig-shuffled, dkd and ig, kd+explain+cutmix
CASES = [(m, {}) for m in METHODS + MODERN_METHODS if m not in SKIPPED] + [
    ("kd", {"kd_standardize": True}), ("dkd", {"dkd_standardize": True, "dkd_warmup": 0}),
    ("explain", {"explain_method": "input_x_gradient"}), ("explain", {"explain_layer": "features.3"}),
    ("ig", {"blend": 0.3, "exponent_min": 0.5, "exponent_max": 3.0}), ("kd+explain+cutmix", {"cutmix_p": 1.0}),
    ("kd", {"logits": "online"})]


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}{'-' + '-'.join(o) if o else ''}" for m, o in CASES])
def test_every_method_runs_an_epoch_on_real_data(tmp_path, demo_subset, method, options):
    cfg = build(DistillConfig, dict(model=STUDENT, normalize="none", method=method, epochs=1, batch_size=32,
                                    val_fraction=0.25, warmup_epochs=0, ig_steps=2, chunk_size=256, T=2.0,
                                    alpha=0.5, p=0.5, crop_padding=2, eval_batch_size=128, **options))
    teacher, m = tiny_teacher(), parse_method(method)
    store = precompute(teacher, demo_subset, cfg, tmp_path / "store", quiet=True) if needs_store(m, cfg) else None
    torch.manual_seed(0)
    summary = Trainer(cfg, build_model(STUDENT, 10, 1), demo_subset, tmp_path / "run", torch.device("cpu"),
                      teacher=teacher if m.needs_teacher else None, store=store, quiet=True).fit()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert summary["method"] == method and 0 <= summary["test_accuracy"] <= 100
    want = {"ce", *(t for p in m.part_names for t in TERMS.get(p, []))}
    assert {k for k in row if k not in ("epoch", "loss", "images_per_s", "seconds", "val_accuracy", "lr")} == want
    assert all(row[k] == row[k] and abs(row[k]) < 1e4 for k in want)  # finite
    if m.has("at"):
        assert 0 < row["at"] < 1 and summary["at"]["student_layer"] == "features.4"
    if m.has("explain"):
        assert 0 <= row["explain"] <= 2  # a cosine distance
    # hooks removed after training: the caller's networks come back as they were given
    assert not any(mod._forward_hooks for net in (teacher,) for mod in net.modules())
