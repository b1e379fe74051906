"""Small-sample statistics for the studies, without scipy (a dev-only dependency).

Student's t distribution through the regularized incomplete beta function (continued fraction,
Lentz's method), Welch's unequal-variance t-test, Holm's step-down correction, and t-based 95%
confidence intervals. tests/tools/test_stats.py checks every function against scipy.

Worked example: a = [1, 2, 3], b = [2, 3, 4] -> diff -1.0, t = -1.2247, df = 4.0, p = 0.2879.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["betainc", "t_cdf", "t_ppf", "mean_ci", "welch", "holm"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"betainc continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1]; y = 1 - x when the
    caller knows it more precisely than 1 - x (x close to 1)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1], got {x}")
    y = 1.0 - x if y is None else y
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer)."""
    if not df > 0:
        raise ValueError(f"t_cdf needs df > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(0.5 * df, 0.5, df / (df + t * t), t * t / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on t_cdf, to ~1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf needs q in (0, 1), got {q}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def _mean_var(x: Sequence[float]) -> tuple[float, float]:
    n = len(x)
    m = sum(x) / n
    return m, sum((v - m) ** 2 for v in x) / (n - 1)


def mean_ci(x: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean of x (needs >= 2 values)."""
    if len(x) < 2:
        raise ValueError(f"mean_ci needs at least 2 values, got {len(x)}")
    m, v = _mean_var(x)
    half = t_ppf(0.5 + level / 2, len(x) - 1) * math.sqrt(v / len(x))
    return m - half, m + half


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Welch's two-sided t-test of mean(a) == mean(b), with the CI of mean(a) - mean(b).

    Returns diff, t, df (Welch-Satterthwaite), p, ci_low, ci_high."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch needs >= 2 values per group, got {len(a)} and {len(b)}")
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    sa, sb = va / len(a), vb / len(b)
    diff, se2 = ma - mb, sa + sb
    if se2 == 0.0:  # both groups constant
        p = 1.0 if diff == 0 else 0.0
        return {"diff": diff, "t": math.copysign(math.inf, diff) if diff else 0.0,
                "df": float(len(a) + len(b) - 2), "p": p, "ci_low": diff, "ci_high": diff}
    df = se2 ** 2 / (sa ** 2 / (len(a) - 1) + sb ** 2 / (len(b) - 1))
    t = diff / math.sqrt(se2)
    p = betainc(0.5 * df, 0.5, df / (df + t * t), t * t / (df + t * t))  # = 2 P(T > |t|)
    half = t_ppf(0.5 + level / 2, df) * math.sqrt(se2)
    return {"diff": diff, "t": t, "df": df, "p": p, "ci_low": diff - half, "ci_high": diff + half}


def holm(p: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as p): step-down, monotone, capped at 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out
