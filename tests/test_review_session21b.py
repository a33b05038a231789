"""Review of session 21's py: factory arguments and igkd.evaluate(module) (helper 21b)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igkd.errors import UserError

# ---------------------------------------------------------------- py: factories igkd reads the names of
FACTORIES = '''
import torch.nn as nn

def head(c_in, n):
    return nn.Sequential(nn.Conv2d(c_in, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n))

class Net(nn.Module):                        # its own names, behind a __new__ that passes everything on
    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)
    def __init__(self, n_classes, in_chans=3):
        super().__init__()
        self.body = head(in_chans, n_classes)
    def forward(self, x):
        return self.body(x)

class PassOn(type(nn.Module)):
    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **kwargs)

class MetaNet(nn.Module, metaclass=PassOn):  # ... or behind a metaclass __call__
    def __init__(self, n_classes, in_chans=3):
        super().__init__()
        self.body = head(in_chans, n_classes)
    def forward(self, x):
        return self.body(x)

class TimmNet(nn.Module):
    def __init__(self, num_classes=1000, in_chans=3):
        super().__init__()
        self.body = head(in_chans, num_classes)
    def forward(self, x):
        return self.body(x)

def create_model(model_name, pretrained=False, **kwargs):   # timm.create_model's shape
    return {"timmnet": TimmNet}[model_name](**kwargs)

def by_position(num_classes, /):
    return head(3, num_classes)
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories21b") / "user_nets21b.py"
    path.write_text(FACTORIES)
    return path


def _sizes(net: nn.Module) -> tuple[int, int]:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return convs[0].in_channels, linears[-1].out_features


@pytest.mark.parametrize("name", ["Net", "MetaNet"])
@pytest.mark.parametrize("channels", [3, 1])
def test_a_class_behind_a_generic_new_or_metaclass_is_read_from_its_init(factories, name, channels):
    # inspect reads (*args, **kwargs) from the __new__ / metaclass __call__: igkd passed
    # num_classes, and Net(n_classes) failed with a TypeError from inside its __init__
    from igkd.models import build_model
    assert _sizes(build_model(f"py:{factories}:{name}", 5, channels)) == (channels, 5)


def test_a_kwargs_factory_takes_the_channels_by_the_name_its_options_give(factories):
    # timm.create_model passes its keywords on to a class taking in_chans: igkd's added
    # in_channels broke it for gray images, with or without in_chans=1 in the spec
    from igkd.models import build_model
    net = build_model(f"py:{factories}:create_model,model_name=timmnet,in_chans=1", 5, 1)
    assert _sizes(net) == (1, 5)
    assert _sizes(build_model(f"py:{factories}:create_model,model_name=timmnet", 5, 3)) == (3, 5)


def test_a_positional_only_size_argument_is_named_as_such(factories):
    from igkd.models import build_model
    with pytest.raises(UserError, match=r"by_position takes num_classes by position only .*remove the '/'") as e:
        build_model(f"py:{factories}:by_position", 5, 3)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- evaluate(module) keeps each module's mode
def _training_with_a_frozen_dropout() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    net.train()
    net[1].eval()  # frozen inside a training model, as a fine-tuning loop leaves it
    return net


@pytest.mark.parametrize("normalize", ["none", "dataset"])
def test_evaluate_leaves_each_module_of_a_module_in_its_own_mode(normalize):
    import igkd
    from igkd.data import from_tensors
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(12) % 2
    # a test split alone where nothing needs the train images (normalize dataset takes its mean and std)
    data = from_tensors(train=None if normalize == "none" else (images, labels), test=(images, labels),
                        classes=["a", "b"])
    net = _training_with_a_frozen_dropout()
    modes = [m.training for m in net.modules()]
    result = igkd.evaluate(net, data, normalize=normalize, corruptions="gaussian_noise", corruption_images=4,
                           quiet=True)
    assert result["total"] == 12 and "corruptions" in result
    assert [m.training for m in net.modules()] == modes  # the Dropout came back training


def test_predict_restores_each_modules_own_flag():
    from igkd.evaluate.metrics import predict
    net = _training_with_a_frozen_dropout()
    predict(net, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 1)
    assert [m.training for m in net.modules()] == [True, True, False, True, True]
