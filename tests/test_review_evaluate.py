"""Review of the evaluation area: defects found and fixed, each checked against a hand
computation or the one-line error the command line promises."""

import pytest
import torch
from torch import nn

import igkd
from igkd.errors import UserError
from igkd.evaluate.classmap import read_class_map
from igkd.evaluate.cost import weights_bytes
from igkd.models import build_model
from test_metrics import user_error

DEMO_TEACHER = igkd.__file__.replace("__init__.py", "assets/demo_teacher.safetensors")


def test_weights_bytes_of_a_model_with_tied_weights():
    # one Linear used twice: safetensors refuses tensors sharing memory, and the size was a
    # traceback; written as save_checkpoint writes it, it is the size of two separate Linears
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    tied = nn.Sequential(shared, nn.ReLU(), shared)
    untied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    assert weights_bytes(tied) == weights_bytes(untied)
    assert tied[0].weight.data_ptr() == tied[2].weight.data_ptr()  # the model itself is left tied


@pytest.mark.parametrize("text, named", [("0: T-shirt/top\n", "0: 'T-shirt/top'"),
                                         ("no: Bag\n", "False: 'Bag'"),
                                         ("classes: [a, 1]\nmap: {Bag: a}\n", "not 1;")])
def test_class_map_names_yaml_reads_as_numbers_or_booleans(tmp_path, capsys, text, named):
    # digit class folders (0 ... 9) are common; unquoted, YAML reads them as numbers, and the
    # refusal said neither which entry nor how to fix it
    path = tmp_path / "map.yaml"
    path.write_text(text)
    line = user_error(capsys, ["evaluate", "--weights", DEMO_TEACHER, "--data", "demo", "--class-map", str(path),
                               "--threads", "1"])
    assert named in line and "; quote class names" in line


def test_class_map_errors_name_the_fix():
    with pytest.raises(UserError, match=r"not 'Bag': \['a'\]; give one model class name per folder class"):
        read_class_map({"Bag": ["a"]})
    with pytest.raises(UserError, match="maps no class; add lines"):
        read_class_map({"map": {}})
    with pytest.raises(UserError, match=r"not one name; write classes: \[name, name, \.\.\.\]"):
        read_class_map({"classes": "abc", "map": {"a": "b"}})
    # keys YAML read as numbers beside names: listing them was a TypeError (int < str)
    with pytest.raises(UserError, match=r"unknown keys \['0', 'x'\]"):
        read_class_map({"map": {"a": "b"}, 0: "c", "x": "d"})


def test_weights_for_other_classes_than_a_class_map_lists_name_the_map(tmp_path):
    # the model is sized by the class map's `classes:`; the message said "the data has 3 classes"
    # (the data has 10) and advised --class-map, the option already given
    torch.save(build_model("resnet:depth=8", 10, 1).state_dict(), tmp_path / "ten.pt")
    cmap = tmp_path / "map.yaml"
    cmap.write_text("classes: [a, b, c]\nmap: {Trouser: a, Bag: b, Sneaker: c}\n")
    with pytest.raises(UserError) as e:
        igkd.evaluate(tmp_path / "ten.pt", "demo", model="resnet:depth=8", class_map=cmap)
    line = str(e.value)
    assert f"are for 10 classes, --class-map {cmap} lists 3 classes" in line and "under 'classes:'" in line, line
    assert "the data has" not in line and "\n" not in line


def test_a_teacher_spec_is_built_once_at_the_data_classes(monkeypatch):
    # it was built twice: at 10 classes and 3 channels as an early check, then at the data's
    import igkd.api as api
    built = []

    def counting(spec, *args, **kwargs):
        built.append((spec, *args))
        return build_model(spec, *args, **kwargs)

    monkeypatch.setattr(api, "build_model", counting)
    r = igkd.evaluate(DEMO_TEACHER, "demo", teacher="resnet:depth=8", threads=1)
    assert built == [("resnet:depth=8", 10, 1)]
    assert r["teacher_params"] == igkd.count_parameters(build_model("resnet:depth=8", 10, 1))
    with pytest.raises(UserError, match="resnet"):
        igkd.evaluate(DEMO_TEACHER, "demo", teacher="resnet:depth=7", threads=1)
