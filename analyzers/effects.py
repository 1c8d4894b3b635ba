"""Sufficient statistics -> one rule's effect on one cohort: the estimate, its confidence sequence, the
tests against the margin (analyzers/compare.py states the method), and the effect written for people."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .rules import Rule
from .sequential import anytime_p_one_sided, log_se_from_grid, radius


@dataclass(slots=True)          # ~1,200 of each a refresh: no __dict__ to make
class Test:
    """One one-sided comparison with the margin, on the scale its standard error is on."""
    estimate: float          # e.g. log(ratio), or candidate - baseline
    se: float
    bound: float             # the margin on that scale (log(max_ratio), the signed difference, the floor)
    worse: int               # +1: larger is worse


@dataclass(slots=True)
class Estimate:
    effect: float | None
    lower: float | None
    upper: float | None
    tests: list              # Test: every one must be past its bound for a fail (intersection-union)
    diff: float              # candidate - baseline on the measure's scale
    diff_lower: float
    diff_upper: float
    n: int
    radius: float
    p_past: float = field(init=False, repr=False)      # set by __post_init__
    past: bool = field(init=False, repr=False)
    within: bool = field(init=False, repr=False)

    def __post_init__(self):
        # read several times per refresh for each of ~1,000 results: computed once, in one pass over the tests
        # (plain attributes; functools.cached_property takes a lock on every read in Python 3.11)
        n, r = self.n, self.radius
        best = None
        past, within = bool(self.tests), False
        for t in self.tests:
            # the anytime p-value for "the effect is within the margin" (one-sided; the largest of the tests')
            p = anytime_p_one_sided((t.estimate - t.bound) * t.worse / t.se, n)
            if best is None or p > best:
                best = p
            # the whole confidence sequence past the margin (and past the floor, if the rule has one) ...
            if past and not (t.estimate - t.worse * r * t.se - t.bound) * t.worse > 0:
                past = False
            # ... or within it (or the rise bounded below the floor)
            if not within and (t.estimate + t.worse * r * t.se - t.bound) * t.worse <= 0:
                within = True
        self.p_past = 1.0 if best is None else best
        self.past = past
        self.within = within


def _var(sum_: float, sumsq: float, n: int, binary: bool) -> float:
    # max(a, b) spelled `b if b > a else a` (what max returns, NaN included): called ~2,000 times a refresh,
    # where the builtin's call costs more than the arithmetic
    var = (sumsq - sum_ * sum_ / n) / (1 if 1 > n - 1 else n - 1)
    var = 0.0 if 0.0 > var else var
    # A rate seen as all-0 or all-1 has sample variance 0, which would claim certainty;
    # floor it at one observation's worth (the rule of three's spirit).
    floor = 1.0 / n if binary else 1e-18
    return floor if floor > var else var


def judge_moments(rule: Rule, s: dict, paired: bool, alpha: float) -> Estimate:
    """Difference or ratio of means from n/sums (paired: one n and cross sums; unpaired: per route)."""
    binary = rule.binary
    sb, sc, sbb, scc = s["sb"], s["sc"], s["sbb"], s["scc"]     # read once: ~800 results a refresh
    if paired:
        n = nb = nc = s["n"]
        mb, mc = sb / n, sc / n
        sdd = sbb + scc - 2 * s["sbc"]
        var_d = _var(sc - sb, sdd, n, binary)
        se_d = math.sqrt(var_d / n)
        n_eff = n
    else:
        nb, nc = s["nb"], s["nc"]
        mb, mc = sb / nb, sc / nc
        vb, vc = _var(sb, sbb, nb, binary), _var(sc, scc, nc, binary)
        se_d = math.sqrt(vb / nb + vc / nc)
        n_eff = min(nb, nc)
    r = radius(n_eff, alpha)
    d = mc - mb
    floor = [Test(d, se_d, rule.min_increase, 1)] if rule.min_increase > 0 else []
    if rule.kind == "difference":
        return Estimate(d, d - r * se_d, d + r * se_d, [Test(d, se_d, rule.margin, rule.worse)],
                         d, d - r * se_d, d + r * se_d, n_eff, r)
    # ratio of means, on the log scale; rates get half a pseudo-count so 0 refusals stay finite
    if binary:
        mb_, mc_ = (sb + 0.5) / (nb + 1), (sc + 0.5) / (nc + 1)
    else:
        mb_, mc_ = mb, mc
    if mb_ <= 0 or mc_ <= 0:
        # no ratio (a baseline mean of 0): any rise is past a ratio margin, so judge the rise alone
        rise = floor or [Test(d, se_d, 0.0, 1)]
        return Estimate(None, None, None, rise, d, d - r * se_d, d + r * se_d, n_eff, r)
    if paired:
        vb, vc = _var(sb, sbb, n, binary), _var(sc, scc, n, binary)
        cov = (s["sbc"] - sb * sc / n) / max(n - 1, 1)
        var_log = (vc / mc_ ** 2 + vb / mb_ ** 2 - 2 * cov / (mb_ * mc_)) / n
    else:
        var_log = vc / (nc * mc_ ** 2) + vb / (nb * mb_ ** 2)
    if binary:      # no discordant pair is not certainty: at least one discordant pair's worth
        var_log = max(var_log, 1.0 / (min(nb, nc) ** 2 * mb_ * mc_))
    se_log = math.sqrt(max(var_log, 1e-18))
    log_ratio = math.log(mc_ / mb_)
    return Estimate(math.exp(log_ratio), math.exp(log_ratio - r * se_log), math.exp(log_ratio + r * se_log),
                     [Test(log_ratio, se_log, math.log(rule.margin), 1), *floor],
                     d, d - r * se_d, d + r * se_d, n_eff, r)


def judge_quantile(rule: Rule, b: tuple, c: tuple, alpha: float, grid=None) -> Estimate:
    """b, c: (n, quantiles on quantile_grid(rule)) per route; ``grid``: quantile_grid(rule), when the caller
    judges many cohorts of one rule."""
    grid = quantile_grid(rule) if grid is None else grid
    (nb, gb), (nc, gc) = b, c
    qb, se_b = log_se_from_grid(grid, gb, rule.quantile, nb)
    qc, se_c = log_se_from_grid(grid, gc, rule.quantile, nc)
    n = min(nb, nc)
    if not (qb > 0 and qc > 0) or not math.isfinite(se_b + se_c):
        return Estimate(None, None, None, [], qc - qb, -math.inf, math.inf, n, math.inf)
    log_ratio = math.log(qc / qb)
    se = math.sqrt(se_b ** 2 + se_c ** 2)
    r = radius(n, alpha)
    # the quantiles' difference, for a floor (min_increase): delta method from the log scale
    se_d = math.hypot(qb * se_b, qc * se_c)
    floor = [Test(qc - qb, se_d, rule.min_increase, 1)] if rule.min_increase > 0 else []
    return Estimate(qc / qb, math.exp(log_ratio - r * se), math.exp(log_ratio + r * se),
                     [Test(log_ratio, se, math.log(rule.margin), 1), *floor],
                     qc - qb, qc - qb - r * se_d, qc - qb + r * se_d, n, r)


def _fmt(rule: Rule, x: float | None, decimals: int = 2, unit: bool = True) -> str:
    if x is None:
        return "n/a"
    if rule.kind == "ratio":
        return f"x{x:.{decimals}f}"
    return f"{x * 100:+.{decimals}f}{' points' if unit else ''}"


_UNITS = {d: 2 * 10.0 ** -d for d in range(2, 7)}     # two units of the d-th decimal (see _decimals)
# (bound * scale, decimals) -> the bound as printed: the same few margins are printed for ~1,000 results a refresh
_SHOWN: dict[tuple[float, int], str] = {}


def _shown(x: float, d: int) -> str:
    got = _SHOWN.get((x, d))
    if got is None:
        if len(_SHOWN) > 4096:        # margins come from the config: a few; bounded all the same
            _SHOWN.clear()
        got = _SHOWN[(x, d)] = f"{x:.{d}f}"
    return got


def _decimals(values, bound: float, scale: float = 1.0) -> int:
    """Decimals (2 to 6) with which no value that differs from the bound prints as the bound, so a
    bound just past the margin reads past it (x1.1004 is "x1.1004", never "x1.10" next to "x1.10")."""
    scaled = bound * scale
    for d in range(2, 7):
        shown = None
        for v in values:
            if v is None or v == bound:
                continue
            x = v * scale
            # rounding to d decimals moves a number by at most half a unit of the d-th decimal, so numbers more
            # than 2 units apart never print alike: most results skip the formatting (1,000 results a refresh)
            if -_UNITS[d] <= x - scaled <= _UNITS[d]:
                shown = _shown(scaled, d) if shown is None else shown
                if f"{x:.{d}f}" == shown:
                    break
        else:
            return d
    return 6



_LEVELS: dict[float, str] = {}       # alpha -> "95% CS"


def describe(rule: Rule, est: Estimate, alpha: float) -> tuple[str, str]:
    """(the effect with its confidence sequence, the margin) written with the same decimals, in the
    rule's unit: ("x1.27 (95% CS x1.15..x1.41)", "x1.10"); a floor (min_increase) adds the rise in points."""
    level = _LEVELS.get(alpha)
    if level is None:
        level = _LEVELS[alpha] = f"{(1 - alpha) * 100:g}% CS"
    if est.effect is None:
        ci, margin = "no ratio (baseline mean is 0)", rule.describe_margin()
    elif rule.kind == "ratio":
        d = _decimals((est.effect, est.lower, est.upper), rule.margin, 1.0)
        lo, hi = _fmt(rule, est.lower, d, False), _fmt(rule, est.upper, d)
        ci = f"x{est.effect:.{d}f} ({level} {lo}..{hi})"
        margin = "x" + _shown(rule.margin, d)
    else:
        d = _decimals((est.effect, est.lower, est.upper), rule.margin, 100.0)
        ci = (f"{_fmt(rule, est.effect, d)} ({level} {_fmt(rule, est.lower, d, False)}.."
              f"{_fmt(rule, est.upper, d)})")
        margin = _fmt(rule, rule.margin, d)
    if rule.min_increase > 0:
        d = _decimals((est.diff, est.diff_lower, est.diff_upper), rule.min_increase, 100.0)
        ci += (f", {est.diff * 100:+.{d}f} points ({level} {est.diff_lower * 100:+.{d}f}.."
               f"{est.diff_upper * 100:+.{d}f} points)")
        margin += f" and {rule.min_increase * 100:+.{d}f} points"
    return ci, margin


def quantile_grid(rule: Rule) -> list[float]:
    """Probabilities around the rule's quantile wide enough for its smallest sample (see log_se_from_grid)."""
    q = rule.quantile
    d = min(math.sqrt(q * (1 - q) / rule.min_samples) * 1.05, q * 0.999, (1 - q) * 0.999)
    return [q - d, q - d / 2, q, q + d / 2, q + d]
