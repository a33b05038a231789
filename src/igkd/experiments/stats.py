"""Statistics for repeated runs: summaries with t-based confidence intervals, paired tests
with effect sizes, and Holm's correction for multiple comparisons.

Accuracies of several methods measured on the same runs (same training subset, same
seed) are paired: the tests work on the per-run differences.

* :func:`describe`: mean, sample standard deviation (n - 1), standard error and the
  t-based confidence interval ``mean +/- t_{1-a/2, n-1} * sd / sqrt(n)``.
* :func:`paired_t`: paired t-test (scipy.stats.ttest_rel) with Cohen's d_z
  ``= mean(d) / sd(d)`` and the confidence interval of the mean difference.
* :func:`wilcoxon`: Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero differences
  dropped) with the matched-pairs rank-biserial correlation
  ``r = (W+ - W-) / (W+ + W-)`` (+1: every run favours the first method).
* :func:`holm`: Holm-Bonferroni step-down adjusted p-values.
* :func:`detectable_difference`: the smallest mean difference the paired t-test detects
  with 80% power given the observed spread (per comparison in :func:`compare`; undefined,
  NaN with ``detectable_note``, where every paired difference is equal).
* :func:`compare`: every pair of methods, both tests, Holm-adjusted per test family.
* :func:`by_condition`: the same for each of several conditions (accuracy under each
  corruption and their mean), Holm within each condition.

Degenerate cases are answered, not raised: identical results (all differences zero)
give p = 1 and effect 0; a constant non-zero difference gives t = +/-inf, p = 0 for the
t-test. A Wilcoxon test on n pairs cannot give a two-sided p below 2 / 2**n (0.0625 for
n = 5): with few runs rely on the t-test and say so.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
from scipy import stats as sps


def _array(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError("values must be finite numbers")
    return a


def describe(x, confidence: float = 0.95) -> dict:
    """n, mean, std (n - 1), sem and the t-based ``confidence`` interval of the mean."""
    a = _array(x)
    n = len(a)
    if n == 0:
        raise ValueError("no values")
    mean = float(a.mean())
    if n < 2:
        nan = float("nan")
        return {"n": 1, "mean": mean, "std": nan, "sem": nan, "ci_low": nan, "ci_high": nan, "t_crit": nan,
                "confidence": confidence}
    std = float(a.std(ddof=1))
    sem = std / math.sqrt(n)
    t_crit = float(sps.t.ppf(0.5 + confidence / 2, n - 1))
    return {"n": n, "mean": mean, "std": std, "sem": sem, "ci_low": mean - t_crit * sem,
            "ci_high": mean + t_crit * sem, "t_crit": t_crit, "confidence": confidence}


def _pair(a, b) -> np.ndarray:
    a, b = _array(a), _array(b)
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    # Accuracies are ratios of counts, so equal differences are common (two runs that each
    # gain 0.68 points), but float subtraction gives 0.6799999999999926 and
    # 0.6799999999999997: unrounded, the rank tests would see distinct |d| where there is a
    # tie (and an "exact" p computed for the wrong ranks), and a constant difference would
    # get a tiny sd and a huge finite t. Nine decimals keep every real digit of a percentage.
    return np.round(a - b, 9)


def paired_t(a, b, confidence: float = 0.95) -> dict:
    """Two-sided paired t-test of ``a - b``, Cohen's d_z and the CI of the mean difference."""
    d = _pair(a, b)
    n = len(d)
    # a constant difference has sd 0 exactly (np.std of three 0.1s is 1.7e-17, not 0)
    mean, sd = float(d.mean()), (0.0 if np.ptp(d) == 0 else float(d.std(ddof=1)))
    t_crit = float(sps.t.ppf(0.5 + confidence / 2, n - 1))
    half = t_crit * sd / math.sqrt(n)
    out = {"test": "paired t", "n": n, "df": n - 1, "mean_diff": mean, "sd_diff": sd,
           "ci_low": mean - half, "ci_high": mean + half, "confidence": confidence}
    if sd == 0:
        if mean == 0:
            return {**out, "t": 0.0, "p": 1.0, "cohen_dz": 0.0}
        return {**out, "t": math.copysign(math.inf, mean), "p": 0.0, "cohen_dz": math.copysign(math.inf, mean)}
    res = sps.ttest_1samp(d, 0.0)  # ttest_rel(a, b) on the rounded differences
    return {**out, "t": float(res.statistic), "p": float(res.pvalue), "cohen_dz": mean / sd}


def detectable_difference(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test of ``n`` pairs at level
    ``alpha`` detects with probability ``power``, when the differences have standard
    deviation ``sd_diff``: ``delta = nc * sd / sqrt(n)``, with ``nc`` the noncentrality at
    which the noncentral t (n - 1 degrees of freedom) exceeds the critical value with that
    probability. With the observed sd, it says what the runs could have seen: a null
    result rules out effects above it (at that power), not below."""
    if n < 2:
        return float("nan")
    if sd_diff == 0:
        return 0.0
    from scipy.optimize import brentq
    df = n - 1
    crit = float(sps.t.ppf(1 - alpha / 2, df))

    def short(nc: float) -> float:
        lower = float(sps.nct.cdf(-crit, df, nc))  # the far tail; scipy gives NaN where it underflows
        return float(sps.nct.sf(crit, df, nc)) + (lower if math.isfinite(lower) else 0.0) - power
    hi = 2 * crit + 2.0
    while short(hi) < 0:
        hi *= 2
        if hi > 1e4:
            return float("nan")
    return brentq(short, 0.0, hi) * sd_diff / math.sqrt(n)


def signed_rank_sums(d) -> tuple[float, float, int]:
    """(W+, W-, number of non-zero differences): sums of the average ranks of |d| over the
    positive and the negative non-zero differences."""
    d = np.round(_array(d), 9)  # as _pair: float noise must not split tied or zero differences
    d = d[d != 0]
    if len(d) == 0:
        return 0.0, 0.0, 0
    ranks = sps.rankdata(np.abs(d))
    return float(ranks[d > 0].sum()), float(ranks[d < 0].sum()), len(d)


def wilcoxon(a, b) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``a - b`` (zero differences dropped; the exact
    null distribution when the rest has no ties and n <= 50, else scipy's default) and the
    matched-pairs rank-biserial correlation."""
    d = _pair(a, b)
    w_plus, w_minus, m = signed_rank_sums(d)
    out = {"test": "wilcoxon", "n": len(d), "n_nonzero": m, "w_plus": w_plus, "w_minus": w_minus}
    if m == 0:
        return {**out, "statistic": 0.0, "p": 1.0, "rank_biserial": 0.0, "method": "all differences zero"}
    nz = d[d != 0]
    exact = m <= 50 and len(np.unique(np.abs(nz))) == m
    res = sps.wilcoxon(nz, alternative="two-sided", **({"method": "exact"} if exact else {}))
    return {**out, "statistic": float(res.statistic), "p": float(res.pvalue),
            "rank_biserial": (w_plus - w_minus) / (w_plus + w_minus),
            "method": "exact" if exact else "scipy default (tied differences or n > 50)"}


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    Sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``;
    rejecting where the adjusted value is below alpha controls the family-wise error rate.
    NaN p-values stay NaN and do not count in m.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out.tolist()


def compare(groups: dict[str, list[float]], pairs: list[tuple[str, str]] | None = None,
            confidence: float = 0.95) -> list[dict]:
    """Paired t and Wilcoxon tests for each pair (a, b) (default: every pair, later method
    first, so gains over an earlier baseline are positive), with Holm-adjusted p-values
    per test over all the pairs."""
    names = list(groups)
    if pairs is None:
        pairs = [(b, a) for a, b in combinations(names, 2)]
    rows = []
    for a, b in pairs:
        rows.append({"a": a, "b": b, "t": paired_t(groups[a], groups[b], confidence),
                     "wilcoxon": wilcoxon(groups[a], groups[b])})
    for test in ("t", "wilcoxon"):
        for row, adj in zip(rows, holm([r[test]["p"] for r in rows])):
            row[test]["p_holm"] = adj
    for row in rows:  # what these runs could detect: at 5% per test, and at Holm's strictest level
        t = row["t"]
        if t["sd_diff"] == 0:
            # the power calculation scales by the observed spread: with none it said "detectable
            # 0.00", as if these runs could detect any difference, from runs that measured no spread
            t.update(detectable=math.nan, detectable_holm=math.nan, detectable_note=NO_SPREAD)
            continue
        t["detectable"] = detectable_difference(t["sd_diff"], t["n"], 0.05)
        t["detectable_holm"] = detectable_difference(t["sd_diff"], t["n"], 0.05 / len(rows))
    return rows


# why a comparison has no detectable difference (null in JSON)
NO_SPREAD = "every paired difference equal (sd 0): no spread to size the smallest detectable difference by"


def by_condition(values: dict[str, dict[str, list[float]]], pairs: list[tuple[str, str]] | None = None,
                 confidence: float = 0.95) -> dict[str, dict]:
    """:func:`describe` per method and :func:`compare` of ``pairs`` for each condition
    (e.g. each corruption, and their mean): ``values[condition][method]`` holds the
    per-run accuracies, paired across methods by run as for the clean accuracy. Holm's
    correction runs within each condition over its pairs, the family the clean accuracy
    is corrected over too: each condition is its own question (does the method help
    under blur?), answered with the clean accuracy's error control."""
    return {cond: {"summary": {m: describe(v) for m, v in groups.items()},
                   "comparisons": compare(groups, pairs, confidence)} for cond, groups in values.items()}


__all__ = ["NO_SPREAD", "by_condition", "compare", "describe", "detectable_difference", "holm", "paired_t", "signed_rank_sums", "wilcoxon"]
