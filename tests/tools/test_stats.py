"""tools.stats against scipy (a dev dependency; the library itself never imports it)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tools import stats

sp = pytest.importorskip("scipy.stats")
special = pytest.importorskip("scipy.special")


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 3.0), (2.5, 0.5), (40.0, 0.5), (0.1, 7.0)])
def test_betainc_matches_scipy(a, b):
    for x in np.linspace(0, 1, 41):
        assert stats.betainc(a, b, float(x)) == pytest.approx(special.betainc(a, b, x),
                                                               rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("df", [1.0, 1.7, 2.0, 4.0, 7.3, 30.0, 200.0])
def test_t_cdf_and_ppf_match_scipy(df):
    for t in [-50.0, -6.0, -2.0, -0.3, 0.0, 0.3, 1.96, 2.5, 12.0]:
        assert stats.t_cdf(t, df) == pytest.approx(sp.t.cdf(t, df), rel=1e-9, abs=1e-14)
    for q in [0.001, 0.025, 0.3, 0.5, 0.9, 0.975, 0.999]:
        assert stats.t_ppf(q, df) == pytest.approx(sp.t.ppf(q, df), rel=1e-8, abs=1e-10)
    assert stats.t_cdf(math.inf, df) == 1.0 and stats.t_cdf(-math.inf, df) == 0.0


def test_welch_matches_scipy_over_random_samples():
    rng = np.random.default_rng(0)
    for _ in range(50):
        na, nb = rng.integers(2, 9, size=2)
        a = rng.normal(rng.normal(), rng.uniform(0.1, 3), na)
        b = rng.normal(rng.normal(), rng.uniform(0.1, 3), nb)
        got = stats.welch(a.tolist(), b.tolist())
        ref = sp.ttest_ind(a, b, equal_var=False)
        assert got["t"] == pytest.approx(ref.statistic, rel=1e-10)
        assert got["p"] == pytest.approx(ref.pvalue, rel=1e-8)
        ci = ref.confidence_interval(0.95)
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-7)
        assert got["diff"] == pytest.approx(a.mean() - b.mean())


def test_welch_worked_example_and_constant_groups():
    r = stats.welch([1, 2, 3], [2, 3, 4])
    assert (r["diff"], round(r["t"], 4), r["df"], round(r["p"], 4)) == (-1.0, -1.2247, 4.0, 0.2879)
    assert stats.welch([1, 1], [1, 1])["p"] == 1.0
    assert stats.welch([2, 2], [1, 1])["p"] == 0.0
    with pytest.raises(ValueError, match="welch needs >= 2 values per group, got 1 and 2"):
        stats.welch([1], [1, 2])


def test_mean_ci_matches_scipy():
    x = [0.61, 0.64, 0.58, 0.66, 0.60]
    lo, hi = stats.mean_ci(x)
    ref = sp.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sp.sem(x))
    assert (lo, hi) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="mean_ci needs at least 2 values, got 1"):
        stats.mean_ci([1.0])


def test_holm_against_a_direct_implementation():
    rng = np.random.default_rng(1)
    for _ in range(30):
        p = rng.uniform(0, 0.2, rng.integers(1, 7)).tolist()
        m = len(p)
        order = np.argsort(p)
        expect = np.empty(m)
        for k, i in enumerate(order):  # max over the smaller ones of (m - j) p_(j), capped
            expect[i] = min(1.0, max((m - j) * p[order[j]] for j in range(k + 1)))
        assert stats.holm(p) == pytest.approx(expect.tolist())
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_argument_errors():
    with pytest.raises(ValueError, match="betainc needs x in \\[0, 1\\], got 1.5"):
        stats.betainc(1, 1, 1.5)
    with pytest.raises(ValueError, match="betainc needs a > 0 and b > 0, got a=0, b=1"):
        stats.betainc(0, 1, 0.5)
    with pytest.raises(ValueError, match="t_cdf needs df > 0, got 0"):
        stats.t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="t_ppf needs q in \\(0, 1\\), got 1.0"):
        stats.t_ppf(1.0, 3)
