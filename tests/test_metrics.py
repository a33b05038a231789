"""Balanced accuracy and Cohen's kappa next to accuracy (hand computations written out), and
the teacher-correct protocol of `igkd evaluate` (with and without a class map)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import igkd
from igkd.cli import format_evaluation, main
from igkd.data import load_dataset
from igkd.evaluate import classification_metrics, cohen_kappa, predict
from igkd.fileio import dumps
from igkd.models import load_model, save_checkpoint

DEMO_TEACHER = igkd.__file__.replace("__init__.py", "assets/demo_teacher.safetensors")


def cli(capsys, argv: list[str]) -> dict:
    """``igkd ... --json`` in this process (no interpreter start-up): the printed JSON."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


def user_error(capsys, argv: list[str]) -> str:
    """The one line ``igkd ...`` prints before it exits with status 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("igkd: error: "), lines
    return lines[0]


def logits_for(pred: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), k).float()


# ---------------------------------------------------------------- metrics by hand

def test_balanced_accuracy_and_kappa_by_hand():
    # 10 images of classes a (4), b (3), c (3); class d has none
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 0, 0, 1, 1, 1, 0, 2, 2, 1]
    m = classification_metrics(logits_for(pred, 4), torch.tensor(labels), ["a", "b", "c", "d"])
    # confusion (rows true, columns predicted):
    #   a: 3 1 0 0     row totals r = 4 3 3 0
    #   b: 1 2 0 0     column totals p = 4 4 2 0
    #   c: 0 1 2 0     trace = 7
    #   d: 0 0 0 0
    assert m["confusion"] == [[3, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    assert (m["correct"], m["total"]) == (7, 10) and m["accuracy"] == pytest.approx(70.0)
    # recalls 3/4, 2/3, 2/3 over the three classes present (d has no image: left out, not a 0)
    assert m["per_class"]["d"] is None
    assert m["balanced_accuracy"] == pytest.approx(100 * (3 / 4 + 2 / 3 + 2 / 3) / 3)  # 69.44...
    # p_o = 7/10; p_e = (4*4 + 3*4 + 3*2 + 0*0) / 10^2 = 34/100; kappa = (0.70 - 0.34) / (1 - 0.34) = 6/11
    assert m["kappa"] == pytest.approx(6 / 11)
    try:  # the same figures from scikit-learn, where it is installed (not a dependency)
        from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score
    except ImportError:
        pass
    else:
        assert m["balanced_accuracy"] == pytest.approx(100 * balanced_accuracy_score(labels, pred))
        assert m["kappa"] == pytest.approx(cohen_kappa_score(labels, pred))


def test_predict_builds_no_autograd_graph_for_a_model_that_trains():
    # out of inference mode, every batch's graph stayed alive through the filled output tensor:
    # 24 GB resident to score 10,000 CIFAR images with a MobileNetV2
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert all(p.requires_grad for p in model.parameters())
    logits = predict(model, torch.zeros(5, 3, 2, 2, dtype=torch.uint8), batch_size=2, channels_last=False)
    assert logits.shape == (5, 3) and not logits.requires_grad and logits.grad_fn is None


def test_kappa_extremes_and_undefined_cases():
    k = ["a", "b", "c"]
    perfect = classification_metrics(logits_for([0, 1, 2, 2], 3), torch.tensor([0, 1, 2, 2]), k)
    assert perfect["kappa"] == 1.0 and perfect["balanced_accuracy"] == 100.0
    # always wrong, swapping a and b: p_o = 0, p_e = (1*1 + 1*1) / 4 = 1/2, kappa = -1/2 / (1/2) = -1
    swapped = classification_metrics(logits_for([1, 0, 1, 0], 3), torch.tensor([0, 1, 0, 1]), k)
    assert swapped["kappa"] == pytest.approx(-1.0) and swapped["balanced_accuracy"] == 0.0
    # one class present, predictions vary: p_o = 3/5, p_e = (5*3)/25 = 3/5, kappa = 0 (defined)
    one = classification_metrics(logits_for([0, 0, 0, 1, 2], 3), torch.tensor([0] * 5), k)
    assert one["kappa"] == 0.0 and one["balanced_accuracy"] == pytest.approx(60.0)
    # one class present and always predicted: p_e = 25/25 = 1, kappa = 0/0: undefined, None
    same = classification_metrics(logits_for([2] * 5, 3), torch.tensor([2] * 5), k)
    assert same["kappa"] is None and same["accuracy"] == 100.0 and same["balanced_accuracy"] == 100.0
    assert json.loads(dumps(same))["kappa"] is None  # strict JSON: null, never NaN
    empty = classification_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.long), k)
    assert empty["kappa"] is None and empty["balanced_accuracy"] is None and empty["total"] == 0
    assert json.loads(dumps(empty))["accuracy"] is None
    assert cohen_kappa(torch.tensor([[3, 1], [1, 3]])) == pytest.approx((6 / 8 - 1 / 2) / (1 - 1 / 2))


def test_evaluate_reports_the_new_metrics_in_json_and_text(capsys):
    r = cli(capsys, ["evaluate", "--weights", DEMO_TEACHER, "--data", "demo", "--json"])
    conf = np.array(r["confusion"])
    recall = conf.diagonal() / conf.sum(1)
    n, chance = conf.sum(), (conf.sum(1) * conf.sum(0)).sum() / conf.sum() ** 2
    assert r["balanced_accuracy"] == pytest.approx(100 * recall.mean())
    assert r["kappa"] == pytest.approx((conf.trace() / n - chance) / (1 - chance))
    assert {"accuracy", "correct", "total", "per_class", "confusion"} <= r.keys()  # accuracy's keys unchanged
    text = format_evaluation(r)
    assert f"balanced accuracy: {r['balanced_accuracy']:.2f}%, Cohen's kappa: {r['kappa']:.4f}" in text
    assert "Cohen's kappa: undefined" in format_evaluation({**r, "kappa": None})


# ---------------------------------------------------------------- teacher-correct protocol

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Students whose right answers are known from the demo teacher's: 'mirror' is the teacher
    with its outputs and class list in reverse order (right exactly where the teacher is);
    'swapped' is the teacher with the outputs of Trouser (1) and Sneaker (7) exchanged (right
    where the teacher is, except on those two classes); 'alien' is the teacher under other
    class names."""
    root = tmp_path_factory.mktemp("tc")

    def variant(name, order, classes):
        net, meta = load_model(DEMO_TEACHER)
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.weight.copy_(head.weight[order])
            head.bias.copy_(head.bias[order])
        keep = {k: meta[k] for k in ("model", "num_classes", "in_channels", "preprocessing")}
        return save_checkpoint(root / name, net, {**keep, "classes": classes})

    classes = load_dataset("demo").classes
    swap = list(range(10))
    swap[1], swap[7] = 7, 1
    return {"mirror": variant("mirror", list(range(9, -1, -1)), classes[::-1]),
            "swapped": variant("swapped", swap, classes),
            "alien": variant("alien", list(range(10)), [f"c{i}" for i in range(10)])}


@pytest.fixture(scope="module")
def teacher_view():
    """The demo teacher's predictions on the demo test images, computed once here."""
    data = load_dataset("demo").test
    teacher, meta = load_model(DEMO_TEACHER)
    return {"pred": predict(teacher, data.images).argmax(1), "classes": meta["classes"], "labels": data.labels,
            "images": data.images}


def direct(view, weights, keep_classes=None):
    """Correct / kept / total of ``weights`` on the demo test images (of ``keep_classes``, by
    name) that the demo teacher gets right, computed here from raw predictions."""
    student, smeta = load_model(weights)
    spred = predict(student, view["images"]).argmax(1)
    names = [view["classes"][int(y)] for y in view["labels"]]
    rows = [i for i, c in enumerate(names) if keep_classes is None or c in keep_classes]
    right = [i for i in rows if view["classes"][int(view["pred"][i])] == names[i]]
    correct = sum(smeta["classes"][int(spred[i])] == names[i] for i in right)
    return correct, len(right), len(rows)


def test_teacher_correct_on_the_same_dataset(models, teacher_view, capsys):
    pred, labels = teacher_view["pred"], teacher_view["labels"]
    kept = int((pred == labels).sum())
    r = igkd.evaluate(DEMO_TEACHER, "demo", teacher_correct=DEMO_TEACHER)
    tc = r["teacher_correct"]
    # the teacher as the student: right on every image the teacher gets right
    assert (tc["images"], tc["of"]) == (kept, 1000) == (r["total"], 1000) and r["correct"] == kept
    assert r["accuracy"] == 100.0 and r["kappa"] == 1.0 and tc["teacher_accuracy"] == pytest.approx(kept / 10)
    assert tc["teacher"] == DEMO_TEACHER and tc["model"] == "mobilenetv2:width=0.5"
    # wrong on the teacher's right Trousers (1) and Sneakers (7) only
    correct = kept - int(((pred == labels) & ((labels == 1) | (labels == 7))).sum())
    assert (correct, kept, 1000) == direct(teacher_view, models["swapped"])
    s = cli(capsys, ["evaluate", "--weights", str(models["swapped"]), "--data", "demo", "--teacher-correct",
                     DEMO_TEACHER, "--json"])
    assert (s["correct"], s["total"], s["teacher_correct"]["images"], s["teacher_correct"]["of"]) == \
        (correct, kept, kept, 1000)
    assert s["accuracy"] == pytest.approx(100 * correct / kept)
    assert s["per_class"]["Trouser"] == 0.0 and s["per_class"]["Bag"] == 100.0
    text = format_evaluation(s)
    assert f"accuracy: {100 * correct / kept:.2f}% ({correct}/{kept})" in text
    assert f"teacher-correct: scored on the {kept} of 1000 image(s) that teacher {DEMO_TEACHER}" in text


@pytest.fixture(scope="module")
def renamed_demo(tmp_path_factory):
    """Three demo classes under other names (PNG, lossless), a fourth left unmapped."""
    data = load_dataset("demo")
    root = tmp_path_factory.mktemp("renamed-demo")
    names = {"Trouser": "pants", "Sneaker": "shoe", "Bag": "bag", "Coat": "other"}
    for part, split in (("train", data.train), ("test", data.test)):
        for c in names.values():
            (root / part / c).mkdir(parents=True)
        for i in range(len(split)):
            c = data.classes[int(split.labels[i])]
            folder = root / part / names.get(c, "")
            if c in names and (part == "test" or not any(folder.iterdir())):  # train/: one image per class
                Image.fromarray(split.images[i, 0].numpy()).save(folder / f"{i:05d}.png")
    (root / "map.yaml").write_text("pants: Trouser\nshoe: Sneaker\nbag: Bag\n")
    return root


def test_teacher_correct_with_a_class_map(models, teacher_view, renamed_demo):
    data, cmap = f"imagefolder:{renamed_demo},gray=1", renamed_demo / "map.yaml"
    correct, kept, of = direct(teacher_view, models["swapped"], {"Trouser", "Sneaker", "Bag"})
    s = igkd.evaluate(models["swapped"], data, class_map=cmap, teacher_correct=DEMO_TEACHER)
    assert of == 300 and (s["teacher_correct"]["images"], s["teacher_correct"]["of"]) == (kept, of)
    assert (s["correct"], s["total"]) == (correct, kept)
    assert s["correct"] == int(s["confusion"][8][8]) > 0  # of the three mapped classes, only Bag is right
    assert s["teacher_correct"]["teacher_accuracy"] == pytest.approx(100 * kept / of)
    assert s["class_map"]["dropped_images"] == 100
    # the same map applies to each model's own classes: the mirror has them in reverse order
    m = igkd.evaluate(models["mirror"], data, class_map=cmap, teacher_correct=DEMO_TEACHER)
    assert (m["correct"], m["total"]) == (kept, kept)
    # and to a teacher in reverse order, scoring the teacher itself
    t = igkd.evaluate(DEMO_TEACHER, data, class_map=cmap, teacher_correct=models["mirror"])
    assert (t["correct"], t["total"], t["teacher_correct"]["of"]) == (kept, kept, of)


def test_teacher_correct_errors(models, renamed_demo, tmp_path, capsys):
    data, cmap = f"imagefolder:{renamed_demo},gray=1", str(renamed_demo / "map.yaml")
    torch.save({"w": torch.zeros(1)}, tmp_path / "foreign.pt")
    demo = ["evaluate", "--weights", DEMO_TEACHER, "--data", "demo", "--teacher-correct"]
    cases = [([*demo, str(tmp_path)], "does not exist"),
             # the mirror's classes are the demo's in another order: no map, so the teacher does not fit
             ([*demo, str(models["mirror"])], "was trained on 10 classes"),
             ([*demo, str(models["alien"])], "was trained on "),
             # with a map, a teacher without the mapped classes
             (["evaluate", "--weights", DEMO_TEACHER, "--data", data, "--class-map", cmap, "--teacher-correct",
               str(models["alien"])], "not classes of the teacher"),
             ([*demo, str(tmp_path / "foreign.pt")], "--teacher-correct-model")]
    for args, words in cases:
        line = user_error(capsys, args)
        assert words in line, (args, line)
    # as a user runs it: one line on stderr, exit status 2
    r = subprocess.run([sys.executable, "-m", "igkd.cli", *demo, str(tmp_path / "absent.safetensors")],
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], r.stderr
