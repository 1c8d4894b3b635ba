"""Always-valid inference: confidence sequences, anytime p-values and e-BH.

The gate is read every few seconds by Prometheus and by rollout pipelines, so a fixed-sample test
(z = 1.96) would be looked at hundreds of times and its false-block rate would climb towards 1.
We use the normal-mixture sequential probability ratio (Robbins; Howard et al. 2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences"; Waudby-Smith et al. 2023 for the asymptotic form
with an estimated variance). For an estimate with standard error ``se`` after ``n`` samples:

    k = n / n0                                   # n0 tunes where the boundary is tightest
    Lambda = (1 + k)^(-1/2) * exp(z^2 * k / (2 (1 + k)))      with z = estimate / se
    P(Lambda ever exceeds 1/alpha under the null) <= alpha       (Ville's inequality)

so ``1/Lambda`` is an anytime-valid p-value and ``estimate +- radius(n) * se`` with

    radius(n) = sqrt((1 + k) / k * (2 log(1/alpha) + log(1 + k)))

is a confidence sequence: it covers the truth at every look at once with probability >= 1 - alpha.
With alpha = 0.05 and n0 = 250 the radius is 3.0-3.1 for 1,000-5,000 samples (a fixed-sample
interval would use 1.96).

>>> round(radius(1000, 0.05), 2)
3.08
>>> round(anytime_p(z=0.0, n=1000), 3)
1.0
>>> anytime_p(z=6.0, n=2000) < 1e-6
True
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

# Where the mixture boundary is tightest, in samples. Decisions are usually taken between
# a few hundred and a few thousand samples per cohort; k = n / N0 in 2..20 keeps radius near 3.
N0 = 250.0


@functools.lru_cache(maxsize=8192)
def radius(n: float, alpha: float, n0: float = N0) -> float:
    """Half-width of the two-sided confidence sequence in standard errors. Cached: a refresh asks it for
    ~1,000 results, and a cohort's rules share their n (pairs)."""
    if n <= 0:
        return math.inf
    k = n / n0
    return math.sqrt((1.0 + k) / k * (2.0 * math.log(1.0 / alpha) + math.log1p(k)))


def anytime_p(z: float, n: float, n0: float = N0) -> float:
    """1 / mixture likelihood ratio: valid however often and whenever it is looked at."""
    if n <= 0 or not math.isfinite(z):
        return 0.0 if (n > 0 and math.isinf(z)) else 1.0
    k = n / n0
    log_lambda = -0.5 * math.log1p(k) + z * z * k / (2.0 * (1.0 + k))
    return min(1.0, math.exp(-log_lambda))


def anytime_p_one_sided(z: float, n: float, n0: float = N0) -> float:
    """1 / the one-sided mixture (half-normal over effects in the worse direction only).

    Still a nonnegative supermartingale under every effect <= 0, so still anytime-valid; about half
    the two-sided p-value when the effect is clearly positive: the gate only ever blocks on one side.
    """
    if n <= 0 or z <= 0:
        return 1.0
    if math.isinf(z):
        return 0.0
    k = n / n0
    shrink = math.sqrt(k / (1.0 + k))
    log_phi = math.log(max(0.5 * math.erfc(-z * shrink / math.sqrt(2.0)), 1e-300))
    log_lambda = math.log(2.0) - 0.5 * math.log1p(k) + z * z * k / (2.0 * (1.0 + k)) + log_phi
    return min(1.0, math.exp(-log_lambda))


def ebh(pvalues: Sequence[float], q: float, weights: Sequence[float] | None = None) -> list[bool]:
    """Benjamini-Hochberg at level q over anytime p-values that are 1/e-values.

    Applied to p = 1/Lambda this is the e-BH procedure (Wang & Ramdas 2022), which controls the
    false discovery rate under any dependence between the tests, so rules and cohorts that share
    traces (all traffic, language=de, tier=pro, ...) need no independence assumption.

    ``weights`` (>= 0, summing to at most m) multiply the e-values: e-BH's proof bounds the FDR by
    q * (sum of the null tests' weights) / m, so the guarantee holds and a test may be given more of
    the level than another (the gate gives all traffic half of it). A 0 weight never rejects.
    When every hypothesis is null, FDR = P(any rejection): so, at the first look that would
    reject anything (a stopping time, at which every e-process is still an e-value), the chance of
    ever rejecting anything over all looks is at most q.
    """
    m = len(pvalues)
    if weights is None:
        weights = [1.0] * m
    if m and sum(weights) > m * (1 + 1e-9):
        raise ValueError(f"e-BH weights sum to {sum(weights):g}, more than the {m} tests: the level would not hold")
    adjusted = [p / w if w > 0 else math.inf for p, w in zip(pvalues, weights)]
    ranked = sorted(adjusted)
    passing = [p for i, p in enumerate(ranked, 1) if p <= q * i / m]
    if not passing:
        return [False] * m
    cutoff = max(passing)
    return [p <= cutoff for p in adjusted]


def min_samples_for_quantile(q: float, alpha: float = 0.05) -> int:
    """The smallest n whose largest observation bounds the q-quantile with two-sided level alpha.

    Below it no distribution-free interval for the quantile exists: 368 for p99 at alpha = 0.05
    (0.99^368 < 0.025), which is why no p99 verdict is given on fewer traces per route.
    """
    return int(math.ceil(math.log(alpha / 2.0) / math.log(q)))


def log_se_from_grid(probs, values, q: float, n: int) -> tuple[float, float]:
    """The q-quantile and the standard error of its log, from quantiles on a grid of probabilities around q.

    A sample quantile's rank has a binomial spread of sqrt(n q (1-q)), so its standard error is half
    the distance between the quantiles at q -+ sqrt(q (1-q) / n) (the order-statistic interval; the
    analytic limit of bootstrapping the quantile). Those two probabilities are read off the grid by
    linear interpolation of log(quantile), so one quantile_cont(x, grid) per cohort and route serves
    every n; the grid (effects.quantile_grid) is wide enough for the smallest n allowed.

    >>> probs = [0.98, 0.985, 0.99, 0.995, 1.0]
    >>> est, se = log_se_from_grid(probs, [8.0, 9.0, 10.0, 12.0, 20.0], 0.99, 396)
    >>> est, round(se, 4)          # q -+ 0.005: quantiles 9 and 12
    (10.0, 0.1438)
    """
    probs, values = list(probs), [float(v) for v in values]
    estimate = _interp(q, probs, values)
    if n <= 0 or min(values) <= 0:
        return estimate, math.inf
    d = math.sqrt(q * (1 - q) / n)
    logs = [math.log(v) for v in values]
    lo, hi = _interp(q - d, probs, logs), _interp(q + d, probs, logs)
    return estimate, max((hi - lo) / 2.0, 1e-9)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """numpy.interp for one point (clamped at the ends), without importing numpy for the CLI."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]
