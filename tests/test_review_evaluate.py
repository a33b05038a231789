"""Review of the evaluation area: defects found and fixed, each checked against a hand
computation or the one-line error the command line promises."""

import pytest
import torch
from torch import nn

import igkd
from igkd.errors import UserError
from igkd.evaluate.classmap import read_class_map
from igkd.evaluate.cost import weights_bytes
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
