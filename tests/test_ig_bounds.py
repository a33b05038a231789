"""The analysis behind benchmarks/ig_quadrature.py --bounds, checked against hand
computations (its figures are why igkd's IG keeps 36-50 passes: README, "The precompute")."""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from igkd.attribution import integrated_gradients

_spec = importlib.util.spec_from_file_location(
    "ig_quadrature", Path(__file__).resolve().parents[1] / "benchmarks" / "ig_quadrature.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def one_kink_net():
    """logit 1 = v * relu(w . x + c): one kink on the path from black to x, at alpha = -c / (w . x)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, -0.5, 2.0, 0.25]]))
        net[1].bias.fill_(-1.0)
        net[3].weight.copy_(torch.tensor([[0.3], [1.7]]))
        net[3].bias.zero_()
    return net.eval()


def test_completeness_corrected_trapezoid_is_exact_with_one_kink_per_interval():
    net = one_kink_net()
    x = torch.tensor([[[[0.9, 0.2], [0.8, 0.6]]]])  # w . x = 2.55, kink at alpha = 1 / 2.55 = 0.392
    w = net[1].weight[0].detach().view(1, 1, 2, 2)
    kink = 1.0 / float((w * x).sum())
    exact = 1.7 * w * x * (1 - kink)  # IG_i = v w_i x_i * (share of the path where the unit is on)
    got = bench.completeness_corrected(net, x, torch.tensor([1]), 4)  # kink inside the 2nd of 4 intervals
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-7)
    midpoint = integrated_gradients(net, x, 1, n_steps=5, method="riemann_middle")
    assert not torch.allclose(midpoint, exact, rtol=1e-3)  # a fixed rule with as many passes is not exact


def test_oracle_allocation_by_hand():
    counts = [8, 16, 32]
    errors = np.array([[10.0, 5.0, 2.5],    # drops 5 for 8 more passes, then 2.5 for 16
                       [4.0, 3.5, 3.0],     # drops 0.5 for 8
                       [12.0, 6.0, 3.0]])   # drops 6 for 8: the first to be raised
    # target 6.0: raise image 3 to 16 (mean 7.33 -> 5.33 after raising image 1 to 16)
    mean, chosen = bench.allocate(errors, counts, 6.0)
    assert chosen.tolist() == [16, 8, 16] and mean == (16 + 8 + 16) / 3
    assert bench.allocate(errors, counts, 2.0) is None  # even 32 passes everywhere give 2.83
