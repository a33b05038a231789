"""Review of the BatchNorm-folded inference copy and the foreign-file stride warning: the
copy's check at a coarse working precision, the warning's words the other way round, and
the loader's no-init builds beside another thread's."""

import threading

import torch

from igkd.models import build_model, inference_copy, load_model
from igkd.models.checkpoint import _no_init
from test_fold import IMAGES, MaskUse, with_statistics


def test_a_folded_copy_that_computes_another_function_is_refused_under_a_coarse_arithmetic():
    # the check's tolerance grew with the working precision (0.125 of the logit scale under
    # CUDA's TF32, 0.35 under a bfloat16 autocast) while a wrong fold moves the logits by
    # 0.07-0.37 here: the mask network's copy was accepted, and evaluate scored another network
    torch.manual_seed(0)
    net = with_statistics(MaskUse())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert inference_copy(net, IMAGES[:4].float() / 255) is net
    good = with_statistics(build_model("resnet:depth=8", 10, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert inference_copy(good, IMAGES[:4].float() / 255) is not good


def test_the_stride_warning_says_torchvisions_weights_are_the_imagenet_networks_only(tmp_path, capsys):
    path = str(tmp_path / "m.pth")
    torch.save(build_model("mobilenetv2_imagenet:width=0.25,drop=12", 10, 3).state_dict(), path)
    load_model(path, "mobilenetv2_imagenet:width=0.25,drop=12", 10, 3, image_size=(32, 32))
    err = capsys.readouterr().err
    assert "pass --model mobilenetv2:width=0.25,drop=12" in err and "torchvision" not in err
    load_model(path, "mobilenetv2:width=0.25,drop=12", 10, 3, image_size=(224, 224))
    assert "mobilenetv2_imagenet:width=0.25,drop=12 (torchvision's weights are)" in capsys.readouterr().err


def test_a_network_built_in_another_thread_while_the_loader_builds_its_guesses_is_initialised():
    # the loader's guesses are built with torch.nn.init's initialisers as no-ops; they were
    # swapped for the whole process, and a student another thread built meanwhile kept
    # torch.empty's memory as its weights
    torch.manual_seed(0)
    want = build_model("resnet:depth=8", 10, 3).state_dict()
    inside, leave = threading.Event(), threading.Event()

    def guesses():
        with _no_init():
            inside.set()
            leave.wait(10)
    t = threading.Thread(target=guesses)
    t.start()
    try:
        assert inside.wait(10)
        torch.manual_seed(0)
        got = build_model("resnet:depth=8", 10, 3).state_dict()
    finally:
        leave.set()
        t.join()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    with _no_init():  # and in its own thread it still skips them
        torch.manual_seed(0)
        assert not torch.equal(build_model("resnet:depth=8", 10, 3).state_dict()["fc.weight"], want["fc.weight"])


def test_the_attributions_fast_copy_is_checked_in_float64_too():
    # its twin in the attribution engine compared in the working arithmetic: under a bfloat16
    # autocast (as under CUDA's TF32) the wrongly folded mask network's copy was taken in 7
    # seeds of 8, and IG was computed of another function
    from igkd.attribution.engine import _prepare
    torch.manual_seed(0)
    net = with_statistics(MaskUse())
    good = with_statistics(build_model("resnet:depth=8", 10, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _prepare(net, IMAGES[:4].float() / 255, True)[0] is net
        assert _prepare(good, IMAGES[:4].float() / 255, True)[0] is not good
