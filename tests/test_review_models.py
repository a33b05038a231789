"""A user's own checkpoint of a built-in family, in the forms other tools save it: each loads
with the logits of the module it came from, or is refused in one line saying what the file
holds and what to pass instead."""

import re

import pytest
import torch

from helpers_cli import run_igkd
from igkd.errors import UserError
from igkd.models import build_model, load_model

SPEC = "resnet:depth=8"


def _source():
    """A small network with BatchNorm statistics and counters unlike a fresh one's."""
    net = build_model(SPEC, 10, 3)
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
    return net.eval()


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("form", [
    # a training loop's EMA copy alone beside its epoch and metrics (a tensor among them), its names
    # from the DDP module it averaged
    lambda sd: {"ema": _prefixed(sd, "module."), "epoch": 3, "top1": torch.tensor([0.9, 0.8])},
    # a PyTorch Lightning checkpoint: the module's attribute prefixes every name
    lambda sd: {"state_dict": _prefixed(sd, "model."), "epoch": 3, "global_step": 90},
    lambda sd: {"state_dict": {k: v for k, v in _prefixed(sd, "net.backbone.").items()
                               if not k.endswith("num_batches_tracked")}},
    # torchvision's reference scripts: "model" is the one used, "model_ema" beside it is not
    lambda sd: {"model": sd, "model_ema": {k: torch.zeros_like(v) for k, v in sd.items()}},
], ids=["ema", "lightning", "lightning-nested-old", "model-and-model_ema"])
def test_checkpoint_forms_load_with_the_source_logits(tmp_path, form):
    src = _source()
    torch.save(form(src.state_dict()), tmp_path / "w.ckpt")
    net, _ = load_model(tmp_path / "w.ckpt", SPEC, 10, 3)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(x), src(x))


def test_a_prefix_is_removed_only_where_the_names_then_fit(tmp_path):
    state = _prefixed(_source().state_dict(), "model.")
    state.pop("model.fc.bias")
    torch.save({"state_dict": state}, tmp_path / "w.ckpt")
    with pytest.raises(UserError, match=r"1 missing key\(s\), e.g. fc.bias"):
        load_model(tmp_path / "w.ckpt", SPEC, 10, 3)


def test_what_a_file_holds_instead_of_one_state_dict_is_named(tmp_path):
    src = _source()
    torch.save({"teacher": src.state_dict(), "net": src.state_dict(), "epoch": 3}, tmp_path / "two.pth")
    torch.save(src, tmp_path / "whole.pth")  # the module pickled, not its state dict
    torch.save({"weights": [1, 2]}, tmp_path / "none.pth")
    torch.jit.save(torch.jit.script(src), tmp_path / "scripted.pt")
    for name, words in [("two.pth", "holds several state dicts ('teacher', 'net') and none under state_dict"),
                        ("whole.pth", "holds a pickled igkd.models.resnet_cifar.CifarResNet, which igkd does not "
                                      "unpickle"),
                        ("none.pth", "does not hold a state dict of tensors (it holds a dict with keys 'weights')"),
                        ("scripted.pt", f"is a TorchScript program, not a state dict; give it as "
                                        f"torchscript:{tmp_path / 'scripted.pt'}")]:
        with pytest.raises(UserError) as e:
            load_model(tmp_path / name, SPEC, 10, 3)
        text = str(e.value)
        assert words in text and "\n" not in text and "\x1b" not in text and "In PyTorch 2.6" not in text, text


@pytest.mark.parametrize("source,given,fits", [
    ("resnet:depth=14", SPEC, "the built-in resnet:depth=14: pass --model resnet:depth=14"),
    ("resnet:depth=8,width=2", SPEC, "the built-in resnet:depth=8,width=2: pass --model resnet:depth=8,width=2"),
    ("wrn:depth=10,k=1", SPEC, "the built-in wrn:depth=10,k=1: pass --model wrn:depth=10,k=1"),
    ("mobilenetv2:width=0.25,drop=12", "mobilenetv2:drop=12",
     "the built-in mobilenetv2:width=0.25,drop=12 and mobilenetv2_imagenet:width=0.25,drop=12 (alike state dicts)"),
])
def test_weights_of_another_builtin_spec_name_it(tmp_path, source, given, fits):
    # saved as torchvision users do: DDP's prefix, 1000 classes, no BatchNorm counters (torch < 0.4.1)
    state = {k: v for k, v in build_model(source, 1000, 3).state_dict().items() if "num_batches" not in k}
    torch.save({"model": _prefixed(state, "module.")}, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"do not fit") as e:
        load_model(tmp_path / "w.pth", given, 10, 3)
    assert f"they fit {fits}" in str(e.value) and "\n" not in str(e.value)


def test_weights_fitting_no_builtin_spec_say_so_without_a_guess(tmp_path):
    state = build_model("resnet:depth=14", 10, 3).state_dict()
    state["extra.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"1 unexpected key\(s\), e.g. extra.weight; pass the --model they were "
                                        r"trained with$"):
        load_model(tmp_path / "w.pth", "resnet:depth=14", 10, 3)


def test_torchvision_resnet_depths_name_the_imagenet_specs(tmp_path):
    torch.save({}, tmp_path / "w.pth")  # the spec is refused before the file is read
    r = run_igkd("evaluate", "--weights", tmp_path / "w.pth", "--model", "resnet:depth=18", "--data", "demo")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("igkd: error: depth=18 in 'resnet:depth=18' is out of range; a CIFAR ResNet's depth "
                                "is 6n+2: 8, 14, 20, 32, 44, 56, 110 ... 1202; the ImageNet ResNets are the specs "
                                "resnet18, resnet34 and resnet50")


@pytest.mark.parametrize("spec", ["resnet:depth=600002", "wrn:depth=600004,k=1"])
def test_a_depth_past_the_deepest_published_network_is_refused_not_built(spec):
    """No upper bound: a typo'd depth began building 100,000 blocks per stage."""
    with pytest.raises(UserError, match=r"is out of range; a (CIFAR ResNet|WRN)'s depth is 6n\+\d: .* \.\.\. 1\d0\d"):
        build_model(spec, 10, 3)


def test_a_batch_of_one_image_where_batchnorm_sees_1x1_maps_is_refused_before_the_run(tmp_path):
    """resnet18 on 28-pixel images ends in 1x1 maps: at --batch-size 1 its first step failed with
    torch's "Expected more than 1 value per channel when training", after config.yaml and
    metrics.jsonl were written."""
    r = run_igkd("train", "--model", "resnet18", "--data", "demo", "--batch-size", 1, "--epochs", 1,
                 "--out", tmp_path / "run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert re.search(r"BatchNorm layer layer4\.0\.[\w.]+ a 1x1 feature map", lines[0]) and "--batch-size 2 or more" in lines[0]
    assert not (tmp_path / "run").exists()


def test_torchvisions_mobilenet_loaded_as_the_cifar_one_for_large_images_is_named(tmp_path, capsys):
    """mobilenetv2 and mobilenetv2_imagenet have one state dict layout and other strides: a
    foreign file loads into either without a mismatch, so the one made for images nearer the
    data's is named in a warning (once), and nothing is said where the choice fits."""
    net = build_model("mobilenetv2_imagenet:drop=12", 10, 3)
    torch.save(net.state_dict(), tmp_path / "mobilenet_v2.pth")
    path = str(tmp_path / "mobilenet_v2.pth")
    for _ in range(2):
        load_model(path, "mobilenetv2:drop=12", 10, 3, image_size=(224, 224), flag="--teacher-model")
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "fits mobilenetv2:drop=12 (strides for 32-pixel images) and mobilenetv2_imagenet:drop=12 " \
           "(for 224-pixel images) alike" in err and "pass --teacher-model mobilenetv2_imagenet:drop=12" in err
    # the paper's way round: a CIFAR file named as the ImageNet network for 32-pixel images
    load_model(path, "mobilenetv2_imagenet:drop=12", 10, 3, image_size=(32, 32))
    assert "pass --model mobilenetv2:drop=12" in capsys.readouterr().err
    # fitting choices, sizes within 2x, unknown sizes and a CIFAR ResNet (no alike family): silent
    load_model(path, "mobilenetv2_imagenet:drop=12", 10, 3, image_size=(224, 224))
    load_model(path, "mobilenetv2:drop=12", 10, 3, image_size=(64, 48))
    load_model(path, "mobilenetv2:drop=12", 10, 3)
    torch.save(_source().state_dict(), tmp_path / "r8.pth")
    load_model(str(tmp_path / "r8.pth"), SPEC, 10, 3, image_size=(224, 224))
    assert "warning" not in capsys.readouterr().err
