"""Session 21: --augment auto (the augmentation chosen by image size, as DESIGN.md asks)."""
import pytest
import torch
import yaml
from torch import nn

import igkd
from igkd.data import from_tensors
from igkd.distill.augment import resolve_augment


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _images(h, w):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, h, w), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 4)
    return from_tensors((x, y), (x[:4], y[:4]), ["a", "b"])


def test_auto_crops_random_boxes_from_128_pixels_on_the_shorter_side():
    assert resolve_augment("auto", (32, 32)) == "pad-crop"
    assert resolve_augment("auto", (96, 96)) == "pad-crop"          # STL-10
    assert resolve_augment("auto", (100, 224)) == "pad-crop"        # the shorter side decides
    assert resolve_augment("auto", (128, 160)) == "random-resized-crop"
    assert resolve_augment("auto", (224, 224)) == "random-resized-crop"
    assert resolve_augment("pad-crop", (224, 224)) == "pad-crop"    # a choice is kept
    assert resolve_augment("random-resized-crop", (32, 32)) == "random-resized-crop"
    assert igkd.TrainConfig().augment == igkd.DistillConfig().augment == "auto"


@pytest.mark.parametrize("size,chosen,words", [((128, 160), "random-resized-crop", "random resized crops + flip"),
                                               ((32, 32), "pad-crop", "pad-crop 4 + flip")])
def test_a_run_records_and_says_what_auto_chose(tmp_path, capsys, size, chosen, words):
    cfg = igkd.TrainConfig(data="demo", epochs=1, batch_size=4, val_fraction=0.0, threads=1)
    igkd.train(cfg, tmp_path / "run", model=_net(), data=_images(*size))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["augment"] == chosen
    err = capsys.readouterr().err
    assert f"lr 0.05, {words}, device cpu" in err
    assert ", val n/a *," in err and "(val n/a)" in err and "nan" not in err  # no validation split: said so


def test_a_run_recorded_with_pad_crop_resumes_under_auto_and_keeps_its_experiment_key(tmp_path):
    """Runs made before auto recorded pad-crop: a resume with the new default, and an
    experiment looking for its finished runs, must take them as the same run."""
    data = _images(32, 32)
    old = igkd.TrainConfig(data="demo", epochs=1, batch_size=4, val_fraction=0.0, threads=1, augment="pad-crop")
    igkd.train(old, tmp_path / "run", quiet=True, model=_net(), data=data)
    new = igkd.TrainConfig(data="demo", epochs=2, batch_size=4, val_fraction=0.0, threads=1)
    assert igkd.train(new, tmp_path / "run", resume=True, quiet=True, model=_net(), data=data)["epochs"] == 2
    from igkd.experiments.runs import know_image_size, run_key
    auto, pad, rrc = (run_key(igkd.DistillConfig(data="memory:sizes", augment=a))
                      for a in ("auto", "pad-crop", "random-resized-crop"))
    assert len({auto, pad, rrc}) == 3  # the data's size not known yet: nothing is loaded to resolve auto
    know_image_size("memory:sizes", data)  # as an experiment's start() does
    assert run_key(igkd.DistillConfig(data="memory:sizes")) == pad != rrc


def test_a_delayed_progress_is_silent_for_quick_work_and_a_plain_one_is_not():
    import io
    from igkd.progress import Progress
    for delay, shown in ((3600.0, False), (0.0, True)):
        out = io.StringIO()
        with Progress(3, "check", "img", stream=out, delay=delay) as bar:
            for _ in range(3):
                bar.update(1)
        assert ("check: 3/3 img (100%)" in out.getvalue()) == shown, out.getvalue()


# ---------------------------------------------------------------- py: factories with their own argument names
FACTORIES = '''
import torch.nn as nn

def head(c_in, n, width=4):
    return nn.Sequential(nn.Conv2d(c_in, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n))

def plain(num_classes=10):                  # the most common: no channels argument
    return head(3, num_classes)

class Net(nn.Module):                       # a class, its own name for the classes
    def __init__(self, n_classes):
        super().__init__()
        self.body = head(3, n_classes)
    def forward(self, x):
        return self.body(x)

def timm_style(num_classes=1000, in_chans=3):
    return head(in_chans, num_classes)

def forwarding(**kwargs):                   # torchvision's builders pass their keywords on
    return head(kwargs.pop("in_channels", 3), kwargs.pop("num_classes"), **kwargs)

def wide(num_classes, channels=6):          # 'channels' is a width here, not the input's
    return head(3, num_classes, width=channels)

def no_classes(width=4):
    return head(3, 10, width)

def keywords(**kw):                         # written for igkd's names: reads both
    return head(kw["in_channels"], kw["num_classes"])

def torchvision_style(*, weights=None, **kwargs):   # named parameters, then keywords passed on
    assert "in_channels" not in kwargs, "an RGB network's builder got in_channels"
    return head(3, kwargs["num_classes"])

def broken(num_classes, in_channels):
    raise ValueError("width must be a power of two")
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "user_nets.py"
    path.write_text(FACTORIES)
    return path


@pytest.mark.parametrize("name,channels,first,last", [
    ("plain", 3, 3, 5), ("Net", 3, 3, 5), ("timm_style", 1, 1, 5), ("forwarding", 3, 3, 5), ("forwarding", 1, 1, 5),
    ("wide", 3, 3, 5), ("keywords", 3, 3, 5), ("keywords", 1, 1, 5), ("torchvision_style", 3, 3, 5)])
def test_a_factory_gets_the_size_arguments_by_its_own_names(factories, name, channels, first, last):
    from igkd.models import build_model
    net = build_model(f"py:{factories}:{name}", 5, channels)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert (convs[0].in_channels, linears[-1].out_features) == (first, last)
    if name == "wide":
        assert convs[0].out_channels == 6  # its width, untouched


@pytest.mark.parametrize("name,channels,words", [
    ("plain", 1, "plain takes no argument for the image channels .* these have 1 channel"),
    ("no_classes", 3, "no_classes takes no argument for the number of classes .* it takes width"),
    ("plain", 3, "cannot be called with num_classes, depth"),
    ("broken", 3, r"broken raised ValueError: width must be a power of two \(at user_nets.py line \d+\) when igkd "
                  r"called it with num_classes=5, in_channels=3")])
def test_a_factory_that_cannot_take_the_data_is_one_line(factories, name, channels, words):
    from igkd.errors import UserError
    from igkd.models import build_model
    spec = f"py:{factories}:{name}" + (",depth=3" if "depth" in words else "")
    with pytest.raises(UserError, match=words) as e:
        build_model(spec, 5, channels)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- evaluate of an in-memory module
def test_evaluate_scores_a_module_as_its_checkpoint_scores(tmp_path):
    """A network igkd.train (or distill) just trained in place is scored without saving it (its
    checkpoint records module:Sequential, which igkd cannot rebuild), its training flag left as it was."""
    from igkd.errors import UserError
    data = _images(32, 32)
    net = _net()
    cfg = igkd.TrainConfig(data="demo", epochs=1, batch_size=4, val_fraction=0.0, threads=1)
    igkd.train(cfg, tmp_path / "run", quiet=True, model=net, data=data)
    net.train()
    got = igkd.evaluate(net, data, corruptions="gaussian_noise", corruption_images=4, quiet=True)
    assert net.training  # as it was
    with torch.no_grad():
        right = (net.eval()(data.test.images.float() / 255).argmax(1) == data.test.labels).sum().item()
    assert got["weights"] is None and got["model"] == "module:Sequential"
    assert (got["correct"], got["total"], got["params"]) == (right, 4, sum(p.numel() for p in net.parameters()))
    assert set(got["corruptions"]["accuracy"]) == {"gaussian_noise"}
    with pytest.raises(UserError, match="returns torch.float32 of shape \\(1, 3\\)"):
        igkd.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), data)
    with pytest.raises(UserError, match="a class map names the model's classes"):
        igkd.evaluate(net, data, class_map={"a": "a"})


def _without_augment(run):
    """``run``'s last.pt as igkd wrote it before --augment existed: no augment options (it ran pad-crop)."""
    state = torch.load(run / "last.pt", weights_only=True)
    for name in ("augment", "rrc_scale_min", "rrc_scale_max", "rrc_ratio_min", "rrc_ratio_max"):
        del state["config"][name]
    torch.save(state, run / "last.pt")


def test_a_run_from_before_the_augment_option_resumes_under_auto(tmp_path):
    # its missing augment counted as today's default, auto, against the resolved pad-crop:
    # refused whatever --augment was given ("'auto' in the run")
    data = _images(32, 32)
    base = dict(data="demo", batch_size=4, val_fraction=0.0, threads=1)
    igkd.train(igkd.TrainConfig(**base, epochs=1, augment="pad-crop"), tmp_path / "run", quiet=True, model=_net(),
               data=data)
    _without_augment(tmp_path / "run")
    assert igkd.train(igkd.TrainConfig(**base, epochs=2), tmp_path / "run", resume=True, quiet=True, model=_net(),
                      data=data)["epochs"] == 2


def test_a_pad_crop_run_of_large_images_resumed_under_auto_is_told_the_option(tmp_path):
    # recorded pad-crop before auto: the same command line now means random boxes, and
    # 'resume with the same options' said nothing the user could act on
    from igkd.errors import UserError
    data = _images(128, 128)
    base = dict(data="demo", batch_size=4, val_fraction=0.0, threads=1)
    igkd.train(igkd.TrainConfig(**base, epochs=1, augment="pad-crop"), tmp_path / "run", quiet=True, model=_net(),
               data=data)
    with pytest.raises(UserError, match=r"--augment pad-crop: the default, --augment auto, takes random-resized-crop "
                                        r"for these 128x128 images"):
        igkd.train(igkd.TrainConfig(**base, epochs=2), tmp_path / "run", resume=True, quiet=True, model=_net(), data=data)
    assert igkd.train(igkd.TrainConfig(**base, epochs=2, augment="pad-crop"), tmp_path / "run", resume=True,
                      quiet=True, model=_net(), data=data)["epochs"] == 2


def test_experiment_records_and_study_recipes_from_before_the_augment_option_still_match():
    """A finished run's run.json (or a search study's recipe) without augment ran pad-crop:
    it counted as auto and matched nothing (the run was trained again, the study refused)."""
    from igkd.experiments.runs import know_image_size, run_key, same_run, semantic_config
    from igkd.experiments.search import _as_now
    know_image_size("demo:size=12,gray=0", _images(32, 32))
    wanted = semantic_config(igkd.DistillConfig(data="demo:size=12,gray=0", method="kd"))
    assert wanted["augment"] == "pad-crop"
    older = {k: v for k, v in wanted.items() if k != "augment" and not k.startswith("rrc_")}
    assert same_run(older, wanted)
    assert _as_now(older, wanted) == wanted
    # the data spec in another option order is the same data: auto resolved for both spellings
    assert run_key(igkd.DistillConfig(data="demo:gray=0,size=12", method="kd")) == \
        run_key(igkd.DistillConfig(data="demo:size=12,gray=0", method="kd"))


# ---------------------------------------------------------------- a part's own state survives a resume
def test_a_parts_running_state_is_kept_in_the_checkpoint_and_resumed(tmp_path, monkeypatch):
    from igkd.distill import parts as registry
    registry.parts()
    monkeypatch.setattr(registry, "_parts", dict(registry._parts))  # the registration ends with the test
    seen = []

    class Counter(registry.Part):  # a part whose state changes as it trains (as an EMA would)
        name = "test-counter"

        def setup(self, run):
            return {"steps": torch.zeros((), dtype=torch.long)}

        def loss(self, state, step):
            state["steps"] += 1
            seen.append(int(state["steps"]))
            return {}

        def state_dict(self, state):
            return {"steps": state["steps"]}

        def load_state_dict(self, state, saved):
            state["steps"] = saved["steps"].clone()
    igkd.register_part(Counter())
    data = _images(32, 32)
    cfg = dict(method="test-counter", batch_size=4, val_fraction=0.0, threads=1)
    igkd.distill(igkd.DistillConfig(**cfg, epochs=1), tmp_path / "run", quiet=True, student=_net(), data=data)
    assert seen == [1, 2]  # 8 images, batches of 4
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["parts"] == {"test-counter": {"steps": 2}}
    igkd.distill(igkd.DistillConfig(**cfg, epochs=2), tmp_path / "run", resume=True, quiet=True, student=_net(),
                 data=data)
    assert seen == [1, 2, 3, 4]  # went on, not from 0


def test_the_fp16_explanation_cap_is_kept_and_put_back_on_the_device():
    from igkd.distill.parts.explain import Explain, score_grad
    part, state = Explain(), {}
    assert part.state_dict(state) == {}  # never scaled (fp32, bf16): nothing to keep
    state["score_cap"] = torch.tensor(64.0)
    saved = part.state_dict(state)
    fresh = {}
    part.load_state_dict(fresh, saved)
    assert fresh["score_cap"].item() == 64.0
    x = torch.ones(2, requires_grad=True)
    scaler = torch.amp.GradScaler("cpu")
    score_grad((x * 3).sum(), x, scaler, fresh)
    assert fresh["score_cap"].item() == 64.0  # used, not reset to 2^10


# ---------------------------------------------------------------- --init FILE: fine-tuning from other weights
@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A resnet:depth=8 for 5 classes saved as a plain PyTorch state dict, as torchvision's are."""
    from igkd.models import build_model
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("init") / "pretrained.pth"
    torch.save(build_model("resnet:depth=8", 5, 3).state_dict(), path)
    return path


def test_train_starts_from_every_matching_tensor_of_a_weights_file(tmp_path, capsys, other_weights):
    from safetensors.torch import load_file
    cfg = igkd.TrainConfig(data="demo", model="resnet:depth=8", init=str(other_weights), epochs=1, batch_size=4,
                           val_fraction=0.0, lr=1e-12, weight_decay=0.0, warmup_epochs=0.0, threads=1)
    summary = igkd.train(cfg, tmp_path / "run", model=None, data=_images(32, 32))
    init = summary["init"]
    assert (init["copied"], init["kept"]) == (init["of"] - 2, ["fc.weight", "fc.bias"])  # 5 classes, not 2
    err = capsys.readouterr().err
    assert f"--init {other_weights}: copied {init['of'] - 2} of {init['of']} tensors; left as initialised: " \
           "fc.weight, fc.bias" in err
    assert "does not say how its training images were normalised" in err and "--normalize imagenet" in err
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"- **Initialised from:** `{other_weights}` (sha256 `{init['sha256'][:16]}...`), {init['copied']} of " \
           f"{init['of']} tensors copied" in card
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    source = torch.load(other_weights, weights_only=True)
    assert torch.allclose(trained["conv1.weight"], source["conv1.weight"], atol=1e-6)  # lr 1e-12: as copied


def test_distill_takes_init_file_for_its_student_and_run_keys_follow_the_files_content(tmp_path, other_weights):
    import shutil
    from igkd.experiments.runs import run_key
    data = _images(32, 32)
    cfg = igkd.DistillConfig(data="demo", method="student", model="resnet:depth=8", init=str(other_weights),
                             epochs=1, batch_size=4, val_fraction=0.0, threads=1)
    assert igkd.distill(cfg, tmp_path / "run", quiet=True, data=data)["init"]["from"] == str(other_weights)
    same = tmp_path / "copy.pth"
    shutil.copy(other_weights, same)
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(other_weights, weights_only=True).items()}, other)
    key = lambda path: run_key(igkd.DistillConfig(data="demo", model="resnet:depth=8", init=str(path)))  # noqa: E731
    assert key(other_weights) == key(same) != key(other) != key("scratch")


@pytest.mark.parametrize("args,words", [
    (["train", "--init", "teacher"], "--init teacher copies a teacher's layers into a student: it is an option of "
                                     "igkd distill"),
    (["train", "--init", "missing.pth"], "--init missing.pth: no such file"),
    (["train", "--init", "OTHER", "--model", "mobilenetv2:width=0.25"], "shares no tensor .* with "
                                                                        "mobilenetv2:width=0.25"),
])
def test_a_bad_init_is_one_line_and_writes_nothing(tmp_path, other_weights, args, words):
    from helpers_cli import run_igkd
    args = [str(other_weights) if a == "OTHER" else a for a in args]
    r = run_igkd(*args, "--data", "demo", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert __import__("re").search(words, r.stderr), r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_started_from_a_weights_file_resumes_without_it(tmp_path, other_weights):
    import shutil
    mine = tmp_path / "weights.pth"
    shutil.copy(other_weights, mine)
    base = dict(data="demo", model="resnet:depth=8", init=str(mine), batch_size=4, val_fraction=0.0, threads=1)
    first = igkd.train(igkd.TrainConfig(**base, epochs=1), tmp_path / "run", quiet=True, data=_images(32, 32))
    mine.unlink()  # last.pt holds the weights now
    again = igkd.train(igkd.TrainConfig(**base, epochs=2), tmp_path / "run", resume=True, quiet=True,
                       data=_images(32, 32))
    assert again["epochs"] == 2 and again["init"] == first["init"]


def test_weights_of_another_depth_are_named_beside_the_count(tmp_path, capsys, other_weights):
    """A layer named as the model's with another shape (resnet18 weights in a resnet50: its
    stem copies, its bottlenecks do not) is said beside the count, which looked like success."""
    state = torch.load(other_weights, weights_only=True)
    state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)  # a 1x1 where the model has a 3x3
    other = tmp_path / "other.pth"
    torch.save(state, other)
    cfg = igkd.TrainConfig(data="demo", model="resnet:depth=8", init=str(other), epochs=1, batch_size=4,
                           val_fraction=0.0, threads=1)
    igkd.train(cfg, tmp_path / "other", data=_images(32, 32))
    err = capsys.readouterr().err
    assert "has tensors named as resnet:depth=8's with other shapes (layer1.0.conv1.weight), beyond its " \
           "classifier" in err, err
    igkd.train(igkd.TrainConfig(data="demo", model="resnet:depth=8", init=str(other_weights), epochs=1,
                                batch_size=4, val_fraction=0.0, threads=1), tmp_path / "same", data=_images(32, 32))
    assert "other shapes" not in capsys.readouterr().err  # only the classifier differs: nothing to say


def test_distill_init_teacher_without_a_teacher_says_so():
    from igkd.errors import UserError
    with pytest.raises(UserError, match="^--init teacher copies the teacher's layers into the student; pass --teacher"):
        igkd.distill(igkd.DistillConfig(data="demo", method="student", init="teacher"), "/nonexistent/run")


def test_a_distilled_run_resumes_with_its_teacher_at_another_path(tmp_path):
    """A project folder moved (or a teacher copied elsewhere) between the sessions of a run:
    its teacher's path differs, its weights do not (experiments already key teachers by content)."""
    import shutil
    from igkd.errors import UserError
    from igkd.models import build_model, save_checkpoint
    torch.manual_seed(0)
    first = tmp_path / "a" / "teacher"
    first.parent.mkdir()
    save_checkpoint(first, build_model("resnet:depth=8", 2, 3), {"model": "resnet:depth=8", "num_classes": 2,
                    "in_channels": 3, "classes": ["a", "b"], "preprocessing": {"normalize": "none"}})
    data = _images(32, 32)
    base = dict(data="demo", method="kd", model="resnet:depth=8", batch_size=4, val_fraction=0.0, threads=1)
    igkd.distill(igkd.DistillConfig(**base, teacher=str(first) + ".safetensors", epochs=1), tmp_path / "run",
                 quiet=True, data=data)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = str(tmp_path / "b" / "teacher.safetensors")
    assert igkd.distill(igkd.DistillConfig(**base, teacher=moved, epochs=2), tmp_path / "run", resume=True,
                        quiet=True, data=data)["epochs"] == 2
    torch.manual_seed(1)  # another teacher at that path: refused, and told what is compared
    save_checkpoint(tmp_path / "b" / "teacher", build_model("resnet:depth=8", 2, 3), {
        "model": "resnet:depth=8", "num_classes": 2, "in_channels": 3, "classes": ["a", "b"],
        "preprocessing": {"normalize": "none"}})
    other = str(tmp_path / "c.safetensors")
    shutil.copy(moved, other)
    shutil.copy(moved.replace(".safetensors", ".json"), other.replace(".safetensors", ".json"))
    with pytest.raises(UserError, match="differs in teacher .* its weights are compared, not its path"):
        igkd.distill(igkd.DistillConfig(**base, teacher=other, epochs=3), tmp_path / "run", resume=True,
                     quiet=True, data=data)
