"""Cross-dataset check: `igkd evaluate --class-map` scores a model on an image folder whose
classes have other names (and include classes the model does not know), on real CIFAR-10
JPEGs with the paper's published student."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import igkd
from conftest import shared_or_skip
from helpers_data import cifar10_jpg_dir

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STUDENT = "CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt"
# folder class -> CIFAR-10 class; "vehicle" gathers two; "lorry" is left unmapped
RENAMED = {"plane": "airplane", "car": "automobile", "vehicle": "truck", "kitty": "cat", "pony": "horse"}
PER_CLASS = 40


@pytest.fixture(scope="module")
def renamed_folder(tmp_path_factory):
    """Real CIFAR-10 test JPEGs under new class names, plus an unmapped class: test/ alone, as
    a folder brought only to be scored."""
    shared_or_skip("data", "cifar10-jpg.tar.gz")
    src = cifar10_jpg_dir() / "test"
    root = tmp_path_factory.mktemp("renamed")
    sources = {"plane": ["airplane"], "car": ["automobile"], "vehicle": ["truck"], "kitty": ["cat"],
               "pony": ["horse"], "lorry": ["ship"]}
    files = {}
    for new, olds in sources.items():
        (root / "test" / new).mkdir(parents=True)
        for old in olds:
            for f in sorted((src / old).iterdir())[:PER_CLASS]:
                shutil.copy(f, root / "test" / new / f.name)
                files.setdefault(new, []).append((f, old))
    return root, files


def direct_accuracy(files: dict, classes: list[str]) -> tuple[int, int]:
    """Correct / total on the mapped images, computed here without igkd's data or evaluate code."""
    path = shared_or_skip("checkpoints", "nordlinglab", STUDENT)
    net = igkd.build_model("mobilenetv2:drop=5", 10, 3)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.eval()
    images, labels = [], []
    for new, items in sorted(files.items()):
        if new not in RENAMED:
            continue
        for f, _ in sorted(items, key=lambda t: t[0].name):
            images.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
            labels.append(CIFAR10.index(RENAMED[new]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    with torch.no_grad():
        pred = net(x).argmax(1)
    return int((pred == torch.tensor(labels)).sum()), len(labels)


def test_class_map_scores_the_published_student_on_renamed_classes(renamed_folder, tmp_path):
    root, files = renamed_folder
    path = shared_or_skip("checkpoints", "nordlinglab", STUDENT)
    cmap = tmp_path / "map.yaml"
    cmap.write_text(json.dumps({"classes": CIFAR10, "map": RENAMED}))  # JSON is YAML
    r = subprocess.run([sys.executable, "-m", "igkd.cli", "evaluate", "--weights", str(path), "--model",
                        "mobilenetv2:drop=5", "--normalize", "none", "--data", f"imagefolder:{root}",
                        "--class-map", str(cmap), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    correct, total = direct_accuracy(files, CIFAR10)
    assert total == 5 * PER_CLASS
    assert (result["correct"], result["total"]) == (correct, total)
    assert result["accuracy"] == pytest.approx(100 * correct / total)
    assert result["class_map"]["dropped_images"] == PER_CLASS and result["class_map"]["dropped_classes"] == ["lorry"]
    assert set(k for k, v in result["per_class"].items() if v is not None) == {"airplane", "automobile", "truck",
                                                                                "cat", "horse"}
    assert 0.5 < correct / total < 1.0  # a real model on real images, far above chance
    text = subprocess.run([sys.executable, "-m", "igkd.cli", "evaluate", "--weights", str(path), "--model",
                           "mobilenetv2:drop=5", "--normalize", "none", "--data", f"imagefolder:{root}",
                           "--class-map", str(cmap)], capture_output=True, text=True, timeout=300).stdout
    assert f"accuracy: {100 * correct / total:.2f}% ({correct}/{total})" in text
    assert f"5 class(es) mapped, {PER_CLASS} image(s) of 1 unmapped class(es) dropped (lorry)" in text


def test_class_map_errors(renamed_folder, tmp_path):
    root, _ = renamed_folder
    path = shared_or_skip("checkpoints", "nordlinglab", STUDENT)
    data = f"imagefolder:{root}"
    cases = [({"plane": "airplane"}, "no class names"),  # a foreign .pt needs 'classes:'
             ({"classes": CIFAR10, "map": {"plane": "aeroplane"}}, "not classes of the model"),
             ({"classes": CIFAR10, "map": {"planes": "airplane"}}, "not classes of the evaluated data"),
             ({"classes": CIFAR10, "map": {"plane": 3}}, "must map folder class names")]
    for doc, message in cases:
        f = tmp_path / "m.json"
        f.write_text(json.dumps(doc))
        with pytest.raises(igkd.UserError, match=message):
            igkd.evaluate(path, data, model="mobilenetv2:drop=5", normalize="none", class_map=f)
    with pytest.raises(igkd.UserError, match="does not exist"):
        igkd.evaluate(path, data, model="mobilenetv2:drop=5", class_map=tmp_path / "absent.yaml")
    # without a map, a model with metadata still refuses data with other classes
    teacher = igkd.__file__.replace("__init__.py", "assets/demo_teacher.safetensors")
    with pytest.raises(igkd.UserError, match="--class-map"):
        igkd.evaluate(teacher, data)


def test_class_map_with_checkpoint_metadata_needs_no_class_list(tmp_path):
    """The demo teacher knows its classes; a plain mapping scores it on a renamed copy of the demo
    test set, a folder of test/ alone."""
    from igkd.data import load_dataset
    data = load_dataset("demo")
    classes = data.classes
    root = tmp_path / "fm"
    names = {"Trouser": "pants", "Sneaker": "shoe", "Bag": "bag", "Coat": "other"}
    for c in names.values():
        (root / "test" / c).mkdir(parents=True)
    for i in range(len(data.test)):
        c = classes[int(data.test.labels[i])]
        if c in names:
            Image.fromarray(data.test.images[i, 0].numpy()).save(root / "test" / names[c] / f"{i:05d}.png")
    teacher = igkd.__file__.replace("__init__.py", "assets/demo_teacher.safetensors")
    mapping = tmp_path / "map.yaml"
    mapping.write_text("pants: Trouser\nshoe: Sneaker\nbag: Bag\n")
    r = igkd.evaluate(teacher, f"imagefolder:{root},gray=1", class_map=mapping)
    direct = igkd.evaluate(teacher, "demo")
    keep = [classes.index(c) for c in ("Trouser", "Sneaker", "Bag")]
    conf = np.array(direct["confusion"])
    assert r["total"] == 300 and r["class_map"]["dropped_images"] == 100
    assert r["correct"] == int(sum(conf[k, k] for k in keep))  # PNG is lossless: the same images, same answers
