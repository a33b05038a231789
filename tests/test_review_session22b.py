"""Review of a plug-in part's contract (helper 22b): what a part's loss returns is checked at
the first step (reserved and duplicate term names overwrote metrics.jsonl; a per-sample
vector, a bare tensor or a float gave raw tracebacks), a NaN names its term, and a final
model that predicts one class for the whole test split is said to be one."""
import json

import pytest
import torch
from torch import nn

import igkd
from igkd.data import from_tensors
from igkd.distill import parts as registry
from igkd.errors import UserError


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 4)
    return from_tensors((x, y), (x[:4], y[:4]), ["a", "b"])


_DATA = _data()


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


@pytest.fixture
def part(monkeypatch):
    """Registers parts made from a loss function for this test only."""
    registry.parts()
    monkeypatch.setattr(registry, "_parts", dict(registry._parts))

    def make(name, fn):
        cls = type(f"Part_{name.replace('-', '_')}", (registry.Part,),
                   {"name": name, "loss": lambda self, state, step: fn(step)})
        return igkd.register_part(cls())
    return make


def _distill(out, method, student=None, quiet=True):
    return igkd.distill(igkd.DistillConfig(data="demo", method=method, batch_size=4, val_fraction=0.0, threads=1,
                                           epochs=1), out, quiet=quiet, student=student or _net(), data=_DATA)


def _sq(step):
    return step.logits.float().pow(2).mean()


@pytest.mark.parametrize("returns, words", [
    (lambda s: {"epoch": (1.0, _sq(s))}, r"term 'epoch' of method part 't22b' takes a name the run's records use"),
    (lambda s: {"loss": (1.0, _sq(s))}, r"term 'loss' of method part 't22b' takes a name"),
    (lambda s: {"ce": (1.0, _sq(s))}, r"term 'ce' of method part 't22b' takes a name"),
    (lambda s: {"val_accuracy": (1.0, _sq(s))}, r"term 'val_accuracy' of method part 't22b' takes a name"),
    (lambda s: {"v": (1.0, s.logits.pow(2).mean(1))},
     r"term 'v' of method part 't22b' has value a tensor of shape \(4,\) \(float32\); it must be one number"),
    (lambda s: {"b": _sq(s)},
     r"term 'b' of method part 't22b' is a 0-d tensor \(float32\), not a pair \(weight, value\)"),
    (lambda s: {"f": (1.0, float(_sq(s).detach()))},
     r"term 'f' of method part 't22b' has value a Python float \(.*\), not a tensor"),
    (lambda s: None, r"method part 't22b''s loss returned None; expected \{name: \(weight, value\)\}"),
], ids=["epoch", "loss", "ce", "val_accuracy", "vector", "bare", "float", "none"])
def test_a_parts_wrong_return_is_one_line_at_the_first_step(tmp_path, part, returns, words):
    part("t22b", returns)
    with pytest.raises(UserError, match=words):
        _distill(tmp_path / "run", "t22b")
    written = ("last.pt", "model.safetensors", "model-pending.safetensors")
    assert not any((tmp_path / "run" / f).exists() for f in written)


def test_two_parts_with_one_term_name_are_refused_naming_both(tmp_path, part):
    part("t22b-one", lambda s: {"mine": (1.0, _sq(s))})
    part("t22b-two", lambda s: {"mine": (0.5, s.logits.abs().mean())})
    with pytest.raises(UserError, match="term 'mine' of method part 't22b-two' has the name of a term of method part "
                                        "'t22b-one'"):
        _distill(tmp_path / "run", "t22b-one+t22b-two")


def test_a_part_that_changes_its_terms_between_steps_is_refused(tmp_path, part):
    calls = []

    def returns(s):
        calls.append(1)
        return {f"x{len(calls)}": (1.0, _sq(s))}
    part("t22b", returns)
    with pytest.raises(UserError, match="method part 't22b' returned terms x2 at this step and x1 at the first"):
        _distill(tmp_path / "run", "t22b")


def test_a_nan_names_the_term_that_was_not_finite_first(tmp_path, part):
    """After the NaN step the weights are NaN and so is every term: the epoch's sums alone named none."""
    part("t22b", lambda s: {"n": (1.0, _sq(s) * float("nan"))})
    with pytest.raises(UserError, match=r"^loss became nan at epoch 1, before any checkpoint; .*; not finite first: "
                                        r"term 'n' of method part 't22b'$"):
        _distill(tmp_path / "run", "t22b")


def test_a_good_part_is_logged_under_its_name_and_a_term_without_gradient_warned(tmp_path, part, capsys):
    part("t22b-one", lambda s: {"mine": (0.1, _sq(s))})
    part("t22b-two", lambda s: {"fixed": (1.0, _sq(s).detach())})
    _distill(tmp_path / "run", "t22b-one+t22b-two")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and {"loss", "ce", "mine", "fixed"} <= row.keys()
    err = capsys.readouterr().err
    assert "term 'fixed' of method part 't22b-two' carries no gradient" in err and "'mine'" not in err


def _collapsed():
    net = _net()
    with torch.no_grad():  # a bias two steps do not move: class 'a' for every image
        net[-1].bias.copy_(torch.tensor([100.0, 0.0]))
    return net


def test_a_model_predicting_one_class_for_the_whole_test_split_is_said_to(tmp_path, capsys):
    """Every method then has the same test accuracy, the class's share: a user took it for a
    loss that did nothing (it was BatchNorm statistics after 1 epoch of a small subset)."""
    summary = _distill(tmp_path / "one", "student", _collapsed(), quiet=False)
    assert summary["test_accuracy"] == 50.0 and summary["test"]["confusion"] == [[2, 0], [2, 0]]
    err = capsys.readouterr().err
    assert "igkd: warning: the trained model predicts class 'a' for all 4 test images, so its accuracy (50.00%) " \
           "is that class's share and says nothing of the method; likely too few training steps (2)" in err
    _distill(tmp_path / "quiet", "student", _collapsed())  # --quiet: a smoke test's few steps are often meant
    assert "predicts class" not in capsys.readouterr().err


def test_a_model_predicting_both_classes_is_not_said_to_be_collapsed(tmp_path, capsys):
    # dark images are class 'a', bright ones 'b', and the student tells them apart from the start
    x = torch.tensor([0, 255] * 4, dtype=torch.uint8)[:, None, None, None].expand(8, 3, 32, 32).contiguous()
    y = torch.tensor([0, 1] * 4)
    data = from_tensors((x, y), (x[:4], y[:4]), ["a", "b"])
    net = _net()
    with torch.no_grad():  # channel 0 of the features: the brightness; the classifier thresholds it
        net[0].weight.zero_()
        net[0].bias.zero_()
        net[0].weight[0, 0] = 1.0
        net[-1].weight.copy_(torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        net[-1].bias.copy_(torch.tensor([2.0, -2.0]))
    summary = igkd.distill(igkd.DistillConfig(data="demo", method="student", batch_size=4, val_fraction=0.0,
                                              threads=1, epochs=1), tmp_path / "run", student=net, data=data)
    assert summary["test"]["confusion"] == [[2, 0], [0, 2]]
    assert "predicts class" not in capsys.readouterr().err
