"""igkd.experiments.stats against scipy and against values computed by hand."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from igkd.experiments.stats import (compare, describe, detectable_difference, holm, paired_t, signed_rank_sums,
                                    wilcoxon)


def test_describe_matches_hand_values_and_scipy_interval():
    d = describe([1, 2, 3, 4, 5])
    # mean 3, sd sqrt(2.5), sem sqrt(0.5), t_{0.975, 4} = 2.776445
    assert d["n"] == 5 and d["mean"] == 3
    assert d["std"] == pytest.approx(math.sqrt(2.5)) and d["sem"] == pytest.approx(math.sqrt(0.5))
    assert d["t_crit"] == pytest.approx(2.776445, abs=1e-6)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((3 - 2.776445 * math.sqrt(0.5), 3 + 2.776445 * math.sqrt(0.5)),
                                                        abs=1e-5)
    x = [91.2, 90.8, 91.9, 91.5, 90.6, 91.1]
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    d = describe(x)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi), rel=1e-12)
    assert describe(x, 0.99)["ci_high"] > hi
    one = describe([80.0])
    assert one["n"] == 1 and one["mean"] == 80 and math.isnan(one["ci_low"])


def test_paired_t_hand_values_and_scipy():
    # differences 2, 4, 6: mean 4, sd 2, t = 4 / (2 / sqrt 3) = 2 sqrt 3, df 2; d_z = 2
    r = paired_t([3, 6, 9], [1, 2, 3])
    assert r["mean_diff"] == 4 and r["sd_diff"] == 2 and r["df"] == 2
    assert r["t"] == pytest.approx(2 * math.sqrt(3)) and r["cohen_dz"] == pytest.approx(2.0)
    assert r["p"] == pytest.approx(2 * sps.t.sf(2 * math.sqrt(3), 2))
    assert r["p"] == pytest.approx(0.07417990, abs=1e-7)
    half = sps.t.ppf(0.975, 2) * 2 / math.sqrt(3)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((4 - half, 4 + half))
    rng = np.random.default_rng(0)
    a = 90 + rng.normal(size=12)
    b = a - 0.4 + 0.3 * rng.normal(size=12)
    ref = sps.ttest_rel(a, b)
    r = paired_t(a, b)
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    assert r["cohen_dz"] == pytest.approx(np.mean(a - b) / np.std(a - b, ddof=1))


def test_paired_t_degenerate_cases():
    same = paired_t([90.0, 91.0, 92.0], [90.0, 91.0, 92.0])
    assert same["p"] == 1.0 and same["t"] == 0 and same["cohen_dz"] == 0
    shifted = paired_t([91.0, 92.0, 93.0], [90.0, 91.0, 92.0])
    assert shifted["p"] == 0.0 and shifted["t"] == math.inf and shifted["mean_diff"] == 1
    with pytest.raises(ValueError):
        paired_t([1, 2], [1, 2, 3])


def test_wilcoxon_hand_values_and_scipy():
    # |d| ranks 1..5; W+ = 1 + 2 + 4 + 5 = 12, W- = 3; exact two-sided p = 2 P(W <= 3) = 2 * 5 / 32
    r = wilcoxon([1, 2, -3, 4, 5], [0, 0, 0, 0, 0])
    assert (r["w_plus"], r["w_minus"], r["statistic"]) == (12, 3, 3)
    assert r["p"] == pytest.approx(10 / 32) and r["rank_biserial"] == pytest.approx(0.6)
    assert r["method"] == "exact"
    assert r["p"] == pytest.approx(sps.wilcoxon([1, 2, -3, 4, 5], method="exact").pvalue)
    # every run favours a: the smallest two-sided p five pairs can give, 2 / 2**5
    r = wilcoxon([91, 92, 93, 94, 95], [90.5, 91, 91.5, 92, 92.5])
    assert r["p"] == pytest.approx(2 / 32) and r["rank_biserial"] == 1.0
    # zero differences are dropped (Wilcoxon's convention), the rest is as above
    r = wilcoxon([0, 1, 2, -3, 4, 5], [0] * 6)
    assert r["n"] == 6 and r["n_nonzero"] == 5 and r["p"] == pytest.approx(10 / 32)
    # ties get average ranks: |d| = 1, 1, 2 -> ranks 1.5, 1.5, 3; W+ = W- = 3
    assert signed_rank_sums([1, 1, -2]) == (3.0, 3.0, 3)
    assert wilcoxon([1, 1, -2], [0, 0, 0])["rank_biserial"] == 0
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30) + 0.3
    assert wilcoxon(a, b)["p"] == pytest.approx(sps.wilcoxon(a, b).pvalue)
    none = wilcoxon([1, 2, 3], [1, 2, 3])
    assert none["p"] == 1.0 and none["n_nonzero"] == 0 and none["rank_biserial"] == 0


def test_float_noise_does_not_split_ties_or_hide_a_constant_difference():
    # 48.5 - 48.2 and 49.7 - 49.4 are both 0.3 points, but float subtraction gives
    # 0.30000000000000426 and 0.30000000000000426 / 0.2999999999999972: the tie must stand
    a, b = [48.5, 49.7, 50.2, 47.0, 48.0], [48.2, 49.4, 49.7, 46.3, 48.9]
    assert len(set(np.array(a) - np.array(b))) == 5  # the raw floats look untied
    r = wilcoxon(a, b)
    # |d| = .3, .3, .5, .7, .9 -> ranks 1.5, 1.5, 3, 4, 5; W- = 5 (the -0.9), W+ = 10
    assert (r["w_plus"], r["w_minus"]) == (10.0, 5.0)
    assert r["method"].startswith("scipy default")  # not "exact" over ranks that are not there
    assert r["p"] == pytest.approx(sps.wilcoxon([0.3, 0.3, 0.5, 0.7, -0.9]).pvalue)
    assert r["rank_biserial"] == pytest.approx(1 / 3)
    # a constant gain of 0.1 points in every run: an infinite t, as for exact inputs
    shifted = paired_t([90.1, 90.2, 90.3], [90.0, 90.1, 90.2])
    assert shifted["t"] == math.inf and shifted["sd_diff"] == 0


def test_holm_hand_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06,
    # 1 x 0.04 = 0.04 raised to 0.06 (monotone); back in input order
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == pytest.approx([0.02])
    out = holm([0.01, float("nan"), 0.02])  # NaN stays NaN and does not count in m
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_compare_pairs_tests_and_holm_family():
    groups = {"student": [90.1, 90.5, 89.9, 90.3, 90.0], "kd+ig": [91.0, 91.2, 90.6, 91.5, 90.9],
              "ig-shuffled": [90.2, 90.9, 90.1, 90.2, 90.4]}
    rows = compare(groups)
    assert [(r["a"], r["b"]) for r in rows] == [("kd+ig", "student"), ("ig-shuffled", "student"),
                                                ("ig-shuffled", "kd+ig")]
    first = rows[0]
    ref = sps.ttest_rel(groups["kd+ig"], groups["student"])
    assert first["t"]["p"] == pytest.approx(ref.pvalue) and first["t"]["mean_diff"] == pytest.approx(0.88)
    assert first["t"]["p_holm"] == pytest.approx(holm([r["t"]["p"] for r in rows])[0])
    assert [r["wilcoxon"]["p_holm"] for r in rows] == pytest.approx(holm([r["wilcoxon"]["p"] for r in rows]))
    assert all(r["t"]["p_holm"] >= r["t"]["p"] for r in rows)


@pytest.mark.parametrize("n,alpha", [(5, 0.05), (5, 0.05 / 15), (10, 0.05)])
def test_detectable_difference_has_the_stated_power(n, alpha):
    """Simulated paired t-tests with the returned true difference reject at the level in 80%
    of the trials (the noncentral t, checked by drawing the runs)."""
    delta = detectable_difference(2.0, n, alpha)
    rng = np.random.default_rng(0)
    d = rng.normal(delta, 2.0, (40000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    assert abs(np.mean(np.abs(t) > sps.t.ppf(1 - alpha / 2, n - 1)) - 0.8) < 0.01
    # scales with the spread, shrinks with more runs; nothing to detect without spread
    assert detectable_difference(4.0, n, alpha) == pytest.approx(2 * delta)
    assert detectable_difference(2.0, n + 5, alpha) < delta and detectable_difference(0.0, n, alpha) == 0.0


def test_compare_reports_what_the_runs_could_detect():
    rows = compare({"a": [1.0, 2.0, 3.0, 4.0], "b": [1.5, 2.0, 3.5, 4.0], "c": [0.0, 1.0, 1.0, 3.0]})
    for r in rows:
        t = r["t"]
        assert t["detectable"] == pytest.approx(detectable_difference(t["sd_diff"], 4, 0.05))
        assert t["detectable_holm"] == pytest.approx(detectable_difference(t["sd_diff"], 4, 0.05 / 3))


def test_committed_results_hold_the_statistics_of_their_own_runs():
    # the Evidence section's files: every stored statistic is what the current stats code
    # computes from the stored per-run accuracies (the report recomputes them the same way)
    import json
    from pathlib import Path
    from igkd.experiments.montecarlo import statistics
    root = Path(__file__).resolve().parent.parent / "results"
    files = sorted(root.glob("*/montecarlo.json"))
    assert len(files) >= 2
    for f in files:
        stored = json.loads(f.read_text())
        assert _differences(statistics(stored), stored) == [], f


def _differences(a, b, path="") -> list[str]:
    """Where two JSON-like trees differ (floats to 1e-9 relative, NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        same = (a != a and b != b) or a == pytest.approx(b, rel=1e-9, abs=1e-12)
        return [] if same else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
