"""Method parts: the registry, each new loss against its paper's formula written out, the
batch transforms, and a part from outside the package run through the igkd command."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from igkd.config import DistillConfig, build
from igkd.distill.augment import ig_overlay
from igkd.distill.losses import cosine_distance, dist_terms, dkd_terms, kd_kl, standardize
from igkd.distill.parts import Batch, Step, get_part, parse_method, parts, register_part
from igkd.errors import UserError
from igkd.experiments.config import resolve
from igkd.experiments.runs import semantic_config
from igkd.experiments.search import search_space
from helpers_cli import installed_plugin

REPO = Path(__file__).resolve().parents[1]


def logits(seed=0, n=6, c=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * 3, torch.randn(n, c, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, c, (n,), generator=g))


# ---------------------------------------------------------------- losses vs. the papers' formulas
def test_dkd_terms_equal_the_papers_formula():
    s, t, y = logits(1)
    T = 4.0
    # Zhao et al. 2022 (their code): probabilities, binary split, -1000 masking of the target class
    gt = F.one_hot(y, 5).double()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T ** 2
    pt2 = F.softmax(t / T - 1000 * gt, 1)
    log_ps2 = F.log_softmax(s / T - 1000 * gt, 1)
    nckd = (torch.xlogy(pt2, pt2) - pt2 * log_ps2).sum(1).mean() * T ** 2
    got_t, got_n = dkd_terms(s, t, y, T)
    assert got_t.item() == pytest.approx(tckd.item(), rel=1e-5)
    assert got_n.item() == pytest.approx(nckd.item(), rel=1e-5)
    # TCKD + NCKD weighted by the teacher's non-target mass is KD's KL (the paper's equation 3)
    kl = kd_kl(s, t, T)
    pt_not = 1 - (pt * gt).sum(1)
    per = (torch.xlogy(bt, bt) - bt * bs.log()).sum(1) + pt_not * (
        torch.xlogy(pt2, pt2) - pt2 * log_ps2).sum(1)
    assert kl.item() == pytest.approx(per.mean().item() * T ** 2, rel=1e-4)


def test_dkd_is_stable_with_a_certain_teacher():
    s, t, y = logits(2)
    t = t.clone()
    t[torch.arange(6), y] = 200.0  # p_target = 1 in float32: the paper code's log(1 - p) is log(0)
    tckd, nckd = dkd_terms(s.float(), t.float(), y, 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)


def test_dist_terms_equal_pearson_written_out():
    s, t, _ = logits(3, n=7, c=4)
    T = 4.0
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (a.norm() * b.norm())
    inter = sum(1 - pearson(ps[i], pt[i]) for i in range(7)) / 7
    intra = sum(1 - pearson(ps[:, c], pt[:, c]) for c in range(4)) / 4
    got = dist_terms(s, t, T)
    assert got[0].item() == pytest.approx(inter.item(), rel=1e-6)
    assert got[1].item() == pytest.approx(intra.item(), rel=1e-6)
    same = dist_terms(s, s, T)
    assert abs(same[0].item()) < 1e-6 and abs(same[1].item()) < 1e-6


def test_logit_standardisation_is_a_z_score_with_unbiased_std():
    z = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    mean, std = 4.0, (sum((v - 4.0) ** 2 for v in (1, 2, 4, 9)) / 3) ** 0.5
    torch.testing.assert_close(standardize(z), (z - mean) / (std + 1e-7))
    # invariant to the teacher's logit scale and shift: standardised KD sees only the relations
    s, t, y = logits(4)
    kd = get_part("kd")
    cfg = DistillConfig(method="kd", T=2.0, alpha=0.3, kd_standardize=True)
    step = lambda tl: Step(cfg, 1, Batch(torch.arange(6), None, y), s, tl)  # noqa: E731
    a = kd.loss(None, step(t))["kd"][1]
    b = kd.loss(None, step(5 * t + 3))["kd"][1]
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    assert a.item() == pytest.approx(kd_kl(standardize(s), standardize(t), 2.0).item())


def test_part_terms_and_weights():
    s, t, y = logits(5)
    cfg = DistillConfig(method="dkd", dkd_alpha=1.5, dkd_beta=8.0, dkd_T=4.0, dkd_warmup=20)
    step = Step(cfg, 5, Batch(torch.arange(6), None, y), s, t)
    terms = get_part("dkd").loss(None, step)
    tckd, nckd = dkd_terms(s, t, y, 4.0)
    assert terms["tckd"][0] == pytest.approx(5 / 20 * 1.5) and terms["nckd"][0] == pytest.approx(5 / 20 * 8.0)
    assert terms["tckd"][1].item() == pytest.approx(tckd.item()) and terms["nckd"][1].item() == pytest.approx(
        nckd.item())
    step.epoch = 40  # after the warm-up: full weight
    assert get_part("dkd").loss(None, step)["nckd"][0] == 8.0
    d = get_part("dist").loss(None, Step(DistillConfig(method="dist"), 1, Batch(None, None, y), s, t))
    assert d["inter"][0] == 2.0 * 16 and d["intra"][0] == 2.0 * 16  # beta T^2, gamma T^2 (the paper's 2, 2, 4)
    assert get_part("kd").ce_weight(DistillConfig(alpha=0.25)) == 0.75 and get_part("dkd").ce_weight(cfg) == 1.0


def test_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    assert cosine_distance(a, b).item() == pytest.approx((1 + 0) / 2)


def explain_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))


@pytest.mark.parametrize("how", ["gradcam", "input_x_gradient"])
def test_explain_term_equals_grad_cam_or_input_x_gradient_written_out(how):
    from igkd.distill.attention import FeatureHook
    net, part = explain_net(), get_part("explain")
    g = torch.Generator().manual_seed(1)
    x, maps, y = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1])
    cfg = DistillConfig(method="explain", explain_lambda=2.0, explain_method=how)
    hook = FeatureHook(net, "3", "student") if how == "gradcam" else None
    x.requires_grad_(how == "input_x_gradient")
    out = net(x)
    from igkd.distill.parts.explain import STUDENT_EXPLANATIONS
    state = {"how": STUDENT_EXPLANATIONS[how], "hook": hook, "layer": "3"}
    weight, value = part.loss(state, Step(cfg, 1, Batch(torch.arange(5), x, y, maps=maps), out, None))["explain"]
    # by hand
    xx = x.detach().clone().requires_grad_(True)
    acts = net[:4](xx)
    score = net[4:](acts).gather(1, y[:, None]).sum()
    if how == "gradcam":
        grads, = torch.autograd.grad(score, acts)
        mine = torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1))  # 4 x 4
        theirs = maps.view(5, 4, 2, 4, 2).mean((2, 4))  # the teacher's map, 2 x 2 average-pooled
    else:
        grads, = torch.autograd.grad(score, xx)
        mine, theirs = (xx * grads).abs().sum(1), maps
    want = 1 - F.cosine_similarity(mine.flatten(1), theirs.flatten(1), dim=1).mean()
    assert weight == 2.0 and value.item() == pytest.approx(want.item(), rel=1e-5)
    value.backward()  # a second-order gradient reaches the student's weights
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    if hook:
        hook.remove()


# ---------------------------------------------------------------- batch transforms
def test_overlay_constant_blends_toward_the_maps_mean_with_the_same_draws():
    x = torch.rand(6, 3, 5, 5)
    maps = torch.rand(6, 5, 5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    real = ig_overlay(x, maps, 0.5, g1, blend=0.3)
    const = ig_overlay(x, maps, 0.5, g2, blend=0.3, constant=True)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same stream consumed
    picked = (real != x).flatten(1).any(1)
    assert torch.equal(picked, (const != x).flatten(1).any(1)) and 0 < int(picked.sum()) < 6
    shift = (const - 0.7 * x)[picked] / 0.3  # = the constant image, equal over pixels and channels
    assert torch.allclose(shift, shift.flatten(1)[:, :1, None, None].expand_as(shift), atol=1e-5)
    real_map = (real - 0.7 * x)[picked] / 0.3
    torch.testing.assert_close(shift[:, 0, 0, 0], real_map[:, 0].mean((1, 2)), rtol=1e-4, atol=1e-5)


def test_overlay_blend_and_exponents_follow_the_formula():
    x = torch.full((1, 1, 2, 2), 0.2)
    maps = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
    out = ig_overlay(x, maps, 1.0, torch.Generator().manual_seed(0), blend=0.8, exponents=(2.0, 2.0))
    want = 0.2 * 0.2 + 0.8 * maps.pow(2)  # minmax of M^2 is M^2 here
    torch.testing.assert_close(out[0, 0], want[0])


def cutmix_batch(n, world=1, rank=0, seed=3):
    """Sample i is a constant image of value i; labels i % 3; maps = the image's value too."""
    part = get_part("cutmix")
    cfg = DistillConfig(method="kd+cutmix", cutmix_p=0.75)
    state = {"cfg": cfg, "classes": 3}
    idx = torch.arange(n) + rank * n
    x = idx.float()[:, None, None, None].expand(n, 2, 8, 8).clone()
    b = Batch(idx, x, idx % 3, maps=x[:, 0].clone())
    return part.transform(state, b, torch.Generator().manual_seed(seed), (rank, world))


def test_cutmix_pastes_a_partners_box_and_mixes_the_labels_by_area():
    b = cutmix_batch(8)
    assert b.mixed and b.target.shape == (8, 3)
    partner = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    mixed = 0
    for i in range(8):
        own = (b.x[i] == i).float().mean().item()
        assert torch.all((b.x[i] == i) | (b.x[i] == int(partner[i])))
        want = own * F.one_hot(torch.tensor(i % 3), 3) + (1 - own) * F.one_hot(partner[i] % 3, 3)
        torch.testing.assert_close(b.target[i], want.float())
        torch.testing.assert_close(b.maps[i], b.x[i, 0])  # the map took the same box
        if own < 1:
            mixed += 1
            box = (b.x[i, 0] != i).nonzero()
            rows, cols = box[:, 0], box[:, 1]  # a rectangle
            assert len(box) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0 < mixed < 8


def test_cutmix_under_two_processes_gives_the_single_process_batch():
    one = cutmix_batch(8)
    halves = [cutmix_batch(4, world=2, rank=r) for r in (0, 1)]
    assert torch.equal(one.x, torch.cat([h.x for h in halves]))
    assert torch.equal(one.target, torch.cat([h.target for h in halves]))


# ---------------------------------------------------------------- registry, config, keys, search
def test_every_part_declares_what_the_registry_needs():
    known = parts()
    assert list(known)[:3] == ["kd", "dkd", "dist"]
    assert {"kd", "dkd", "dist", "ig", "ig-shuffled", "overlay-constant", "explain", "at", "cutmix"} <= set(known)
    names = {f for f in DistillConfig.__dataclass_fields__}
    for p in known.values():
        assert p.help and p.formula and p.reference and set(p.fields) <= names and set(p.search) <= set(p.fields)
    assert parse_method("cutmix+kd+ig").name == "kd+ig+cutmix"
    assert parse_method("kd+cutmix").online_teacher and not parse_method("kd+ig").online_teacher


def test_the_trainer_knows_no_method_by_name():
    source = (REPO / "src" / "igkd" / "distill" / "trainer.py").read_text()
    for name in parts():  # ("student" is also the role of the network a hook is on)
        assert not re.search(rf"""["']{re.escape(name)}["']""", source), name
    assert not re.search(r"\.(kd|ig|at|shuffled)\b", source.replace("self.dist", ""))


def test_register_part_refuses_new_options_after_configs_exist():
    from igkd.distill.parts.base import Part
    from igkd.options import opt

    class Late(Part):
        name = "late-part"
        fields = {"late_weight": opt(1.0, "late", low=0.0, high=1.0)}
    with pytest.raises(UserError, match="after igkd.config was built"):
        register_part(Late())

    class Bad(Part):
        name = "kd"
    with pytest.raises(UserError, match="already registered"):
        register_part(Bad())


def test_run_keys_hold_only_the_options_of_the_methods_parts():
    kd = semantic_config(build(DistillConfig, {"method": "kd", "blend": 0.3, "dkd_beta": 2}))
    assert "T" in kd and "kd_standardize" in kd and "blend" not in kd and "dkd_beta" not in kd and "p" not in kd
    assert "ig_steps" not in kd  # kd reads precomputed logits, whatever attribution the store's maps used
    ig = semantic_config(build(DistillConfig, {"method": "kd+ig", "blend": 0.3}))
    assert ig["blend"] == 0.3 and "ig_steps" in ig and "gamma" not in ig
    cut = semantic_config(build(DistillConfig, {"method": "kd+cutmix"}))
    assert "cutmix_p" in cut


def test_search_space_comes_from_the_parts():
    space = search_space(resolve("search", None, {"search_method": "kd+ig"}))
    assert space == {"T": [1, 2, 2.5, 4, 8], "alpha": [0.01, 0.1, 0.5, 0.9], "p": [0, 0.1, 0.25, 0.5]}
    blend = search_space(resolve("search", None, {"search_method": "ig", "space": "blend=0.25,0.5,0.75;p="}))
    assert blend == {"blend": [0.25, 0.5, 0.75]}
    assert set(search_space(resolve("search", None, {"search_method": "dkd"}))) == {"dkd_beta", "dkd_T"}
    with pytest.raises(UserError, match="'gamma' is not a numeric option of kd"):
        search_space(resolve("search", None, {"search_method": "kd", "space": "gamma=1,2"}))
    with pytest.raises(UserError, match="out of range for blend"):
        search_space(resolve("search", None, {"search_method": "ig", "space": "blend=2"}))


TOY = '''
from igkd.distill.parts import Part
from igkd.options import opt


class Toy(Part):
    name = "toy"
    help = "toy: mean squared logit"
    formula = "toy_weight mean(s^2)"
    order = 90
    fields = {"toy_weight": opt(0.5, "toy: weight of the mean squared logit", low=0.0, high=10.0)}

    def loss(self, state, step):
        return {"toy": (step.cfg.toy_weight, step.logits.float().pow(2).mean())}


PART = Toy()
'''


def test_a_part_from_outside_the_package_runs_through_the_command(tmp_path, small_real):
    env = installed_plugin(tmp_path, "toy_igkd_part", TOY, "[igkd.parts]\ntoy = toy_igkd_part:PART\n")
    helptext = subprocess.run([sys.executable, "-m", "igkd", "distill", "--help"], capture_output=True, text=True,
                              env=env, timeout=120)
    assert "--toy-weight" in helptext.stdout and "toy: mean squared logit" in helptext.stdout
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "igkd", "distill", "--data", f"imagefolder:{small_real / 'data'},gray=1",
                        "--method", "toy", "--toy-weight", "0.25", "--model", "mobilenetv2:width=0.25,drop=14",
                        "--epochs", "1", "--batch-size", "64", "--threads", "2", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["toy"] > 0 and row["loss"] == pytest.approx(row["ce"] + 0.25 * row["toy"], rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "toy" and summary["toy_weight"] == 0.25
    bad = subprocess.run([sys.executable, "-m", "igkd", "distill", "--data", "demo", "--method", "kd+toy2",
                          "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown method part 'toy2'" in bad.stderr and "toy" in bad.stderr


def test_no_branch_on_an_attribution_or_part_name_outside_its_registry():
    from igkd.attribution.registry import entries
    attributions = [e.name for e in entries()]
    assert "gradcam" in attributions
    src = REPO / "src" / "igkd"
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        text = path.read_text()
        names = ([] if rel.startswith("attribution/") else attributions) + \
            ([] if rel.startswith("distill/parts/") else list(parts()))
        for n in names:
            branch = rf"""(==|!=)\s*["']{re.escape(n)}["']|["']{re.escape(n)}["']\s*(==|!=)|\bin\s*\(["']{re.escape(n)}["']"""
            assert not re.search(branch, text), f"{rel} branches on {n!r}"
