"""Fitted IG schedules (--ig-method fitted): the fit's sums against a direct computation,
determinism, the store's identity and reuse, refusal of a store built with another
schedule, and the held-out error estimate against a direct computation."""

import json

import numpy as np
import pytest
import torch

from igkd.attribution import attribution_map, integrated_gradients
from igkd.attribution.fitted import _error, fit_images, fit_schedule, gram, load
from igkd.attribution.quadrature import quadrature
from igkd.config import PrecomputeConfig
from igkd.errors import UserError
from igkd.precompute import precompute, relative_l1
from igkd.store import open_store

from helpers_cli import run_igkd
from test_store import tiny_dataset, tiny_teacher

R, N_STEPS = 8, 3


@pytest.fixture(scope="module")
def fit_case():
    data, teacher = tiny_dataset(), tiny_teacher()
    x = data.train.images[:2].float() / 255
    y = data.train.labels[:2]
    base = torch.zeros_like(x)
    return teacher, x, y, base


def test_gram_matches_gradients_taken_one_by_one(fit_case):
    teacher, x, y, base = fit_case
    cand, K, b = gram(teacher, x, y, base, R)
    assert np.allclose(cand, (np.arange(R) + 0.5) / R, atol=1e-7)
    ref_a, ref_w = quadrature("gausslegendre", R)

    def contribution(i, alpha):  # d F_y / dx at x' + alpha (x - x'), times (x - x'), plain autograd
        point = (base[i] + float(alpha) * (x[i] - base[i])).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(teacher(point)[0, int(y[i])], point)
        return (grad[0] * (x[i] - base[i])).double().flatten()

    K_direct, b_direct = np.zeros((R, R)), np.zeros(R)
    for i in range(len(x)):
        c = torch.stack([contribution(i, a) for a in cand])
        ref = sum(float(w) * contribution(i, a) for a, w in zip(ref_a, ref_w))
        s = 1 / float(ref @ ref)
        K_direct += s * (c @ c.T).numpy()
        b_direct += s * (c @ ref).numpy()
    assert np.allclose(K, K_direct, rtol=2e-3, atol=1e-6 * np.abs(K_direct).max())
    assert np.allclose(b, b_direct, rtol=2e-3, atol=1e-6 * np.abs(b_direct).max())


def test_fitted_error_is_the_relative_l2_of_ig_with_the_schedule(fit_case):
    teacher, x, y, base = fit_case
    s = fit_schedule(teacher, x, y, base, N_STEPS, reference_steps=R)
    assert s.steps == N_STEPS and abs(sum(s.weights) - 1) < 1e-9 and s.alphas == sorted(s.alphas)
    again = fit_schedule(teacher, x, y, base, N_STEPS, reference_steps=R)
    assert (again.alphas, again.weights) == (s.alphas, s.weights)  # deterministic
    ig = integrated_gradients(teacher, x, y, baseline=base, schedule=(s.alphas, s.weights)).double().flatten(1)
    ref = integrated_gradients(teacher, x, y, baseline=base, n_steps=R, method="gausslegendre").double().flatten(1)
    direct = ((ig - ref).pow(2).sum(1) / ref.pow(2).sum(1)).mean().sqrt().item()
    assert s.fit["relative_l2"] == pytest.approx(direct, rel=1e-3)
    # the midpoint rule it starts from is no better, and no single exchange of a point improves it
    assert s.fit["relative_l2"] <= s.fit["midpoint_relative_l2"] + 1e-12
    _, K, b = gram(teacher, x, y, base, R)
    chosen = np.searchsorted((np.arange(R) + 0.5) / R, np.array(s.alphas) - 1e-9)
    best = _error(K, b, len(x), chosen[None])[1][0]
    for k in range(N_STEPS):
        for j in set(range(R)) - set(chosen):
            trial = chosen.copy()
            trial[k] = j
            assert _error(K, b, len(x), trial[None])[1][0] >= best * (1 - 1e-9)


def test_fit_images_are_seeded_and_leave_out_the_check_images():
    held = np.array([0, 10, 20, 30])
    a, b = fit_images(40, 8, 0, held), fit_images(40, 8, 0, held)
    assert (a == b).all() and not set(a) & set(held) and len(set(a)) == 8
    assert (fit_images(40, 8, 1, held) != a).any()


def test_store_holds_the_schedule_reuses_it_and_refuses_another(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    cfg = PrecomputeConfig(ig_method="fitted", ig_steps=N_STEPS, ig_fit_images=2, ig_fit_reference=R,
                           check_images=4, check_steps=16, chunk_size=10)
    store = precompute(teacher, data, cfg, tmp_path / "s", quiet=True)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    schedule_file = manifest["settings"]["ig_schedule"]
    schedule = load(schedule_file)
    assert manifest["identity"]["settings"]["ig_schedule"] == schedule.identity()
    assert manifest["identity"]["settings"]["ig_steps"] == N_STEPS
    # held out: the error check's evenly spaced images are not among the fit images
    check = torch.linspace(0, len(data.train) - 1, 4).round().long()
    assert not set(schedule.fit["image_indices"]) & set(check.tolist())
    # the estimate is the relative L1 of the fitted maps against a 16-step Gauss-Legendre IG on them
    x, y = data.train.images[check].float() / 255, data.train.labels[check]
    base = torch.zeros_like(x) + torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)  # "zero" in the teacher's space
    ours = attribution_map(integrated_gradients(teacher, x, y, baseline=base, schedule=(schedule.alphas,
                                                                                         schedule.weights)))
    ref = attribution_map(integrated_gradients(teacher, x, y, baseline=base, n_steps=16, method="gausslegendre"))
    assert manifest["error_estimate"]["mean"] == pytest.approx(relative_l1(ours, ref).mean().item(), rel=1e-3)
    # the stored maps are those of the schedule
    row = attribution_map(integrated_gradients(teacher, x[:1], y[:1], baseline=base[:1],
                                               schedule=(schedule.alphas, schedule.weights)))[0]
    assert np.allclose(store.maps[int(check[0])], (row / row.max()).numpy(), atol=2e-3)

    # same settings: the schedule is reused, not fitted again, and so is the store
    mtime = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    again = precompute(teacher, data, cfg, tmp_path / "s", quiet=True)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["settings"]["ig_schedule"] == schedule_file
    assert (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == mtime and len(again) == len(store)

    # another schedule: the store is refused, never read as if it were this schedule's
    other = json.loads(open(schedule_file).read())
    other["weights"] = [w * 1.01 for w in other["weights"]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    from dataclasses import replace
    with pytest.raises(UserError, match="other map settings"):
        precompute(teacher, data, replace(cfg, ig_schedule=str(tmp_path / "other.json")), tmp_path / "s", quiet=True)
    with pytest.raises(UserError, match="other map settings"):
        from igkd.precompute import store_identity
        open_store(tmp_path / "s", store_identity(teacher, data, replace(cfg, ig_schedule=str(tmp_path / "other.json"))))


def test_a_bad_schedule_file_is_one_line(small_real, tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    for path, words in ((tmp_path / "missing.json", "does not exist"), (tmp_path / "bad.json", "not an igkd IG schedule")):
        run = run_igkd(*["precompute", "--teacher", str(small_real / "teacher.safetensors"), "--data",
                                   f"imagefolder:{small_real / 'data'},gray=1", "--store", str(tmp_path / "s"),
                                   "--ig-method", "fitted", "--ig-schedule", str(path)])
        assert run.returncode == 2 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert not (tmp_path / "s").exists()
