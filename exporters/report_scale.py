"""The HTML report's numbers: a rule's unit, values written in it with one precision per rule, and the
axis its interval charts share."""
from __future__ import annotations

import math

MINUS = "\u2212"


def unit_of(r: dict) -> str:
    """The unit a result's effect reads in. A ratio is "ratio" (even of costs: x1.1, not $); a difference
    is in points of a rate unless the result names its own unit (a difference of costs in usd, of s)."""
    if r.get("kind") == "ratio":
        return "ratio"
    unit = str(r.get("unit") or "points")
    return "points" if unit in ("ratio", "rate", "%", "bool") else unit


def no_change(unit: str) -> float:
    return 1.0 if unit == "ratio" else 0.0


def _signed(text: str, x: float) -> str:
    return (MINUS if x < 0 else "+") + text


def fmt_value(x: float | None, unit: str, decimals: int, sign: bool = True) -> str:
    """One value in the rule's unit: x1.41, -0.27 pt, +$0.0042, +0.31 s."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if unit == "ratio":
        return f"\u00d7{x:.{decimals}f}"
    if unit == "points":
        text = f"{abs(x) * 100:.{decimals}f} pt"
    elif unit == "usd":
        text = f"${abs(x):.{decimals}f}"
    else:
        text = f"{abs(x):.{decimals}f} {unit}".rstrip()
    return _signed(text, x) if sign and x != 0 else text


def scale_of(unit: str) -> float:
    return 100.0 if unit == "points" else 1.0


def rule_decimals(rows: list[dict], unit: str) -> int:
    """One precision for the whole rule: enough that no effect or bound prints as its margin while being
    on the other side of it, and that a value differs visibly from "no change"."""
    base = 2
    if unit not in ("ratio", "points"):
        values = [abs(r[k]) for r in rows for k in ("effect", "lower", "upper") if finite(r.get(k)) and r[k]]
        top = max(values, default=1.0)
        base = max(0, min(6, 2 - math.floor(math.log10(top)))) if top > 0 else 2
    for d in range(base, base + 3):
        clash = False
        for r in rows:
            m = r.get("margin")
            if not finite(m):
                continue
            mv = m * scale_of(unit)
            for k in ("effect", "lower", "upper"):
                v = r.get(k)
                if finite(v) and v != m and round(v * scale_of(unit), d) == round(mv, d):
                    clash = True
        if not clash:
            return d
    return base + 2


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def thousands(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


class Axis:
    """One rule's shared scale: log for ratios (x2 and x0.5 sit equally far from x1), linear otherwise."""

    LEFT, RIGHT = 3.0, 97.0      # percent of the chart's width the domain maps onto

    def __init__(self, rows: list[dict], unit: str):
        self.unit = unit
        self.log = unit == "ratio"
        null = no_change(unit)
        margins = [r["margin"] for r in rows if self._ok(r.get("margin"))]
        self.margin = margins[0] if margins else None
        core = [self.t(null)] + [self.t(m) for m in margins]
        core += [self.t(r["effect"]) for r in rows if self._ok(r.get("effect"))]
        spread = [self.t(r[k]) for r in rows for k in ("lower", "upper") if self._ok(r.get(k))]
        lo, hi = min(core), max(core)
        span = (hi - lo) or (0.2 if self.log else max(abs(hi) * 0.2, 0.01))
        # Intervals widen the axis, but one very wide interval (a small cohort) may not squeeze the others
        # into a sliver: beyond 1.5 spans of the estimates it is drawn to the edge with an arrow.
        lo = max(min([lo, *spread]), lo - 1.5 * span)
        hi = min(max([hi, *spread]), hi + 1.5 * span)
        pad = (hi - lo) * 0.06
        self.lo, self.hi = lo - pad, hi + pad
        self.worse = 1 if self.margin is None or self.margin >= null else -1

    def _ok(self, x) -> bool:
        return finite(x) and (not self.log or x > 0)

    def t(self, x: float) -> float:
        return math.log(x) if self.log else x

    def pos(self, x: float) -> float:
        """Percent of the chart's width for value x, clipped to the drawing area."""
        if not self._ok(x):
            return self.LEFT if x is not None and x <= 0 else self.RIGHT
        f = (self.t(x) - self.lo) / (self.hi - self.lo)
        return self.LEFT + (self.RIGHT - self.LEFT) * min(1.0, max(0.0, f))

    def inside(self, x: float) -> bool:
        return self._ok(x) and self.lo <= self.t(x) <= self.hi

    def ticks(self) -> list[float]:
        """Round values spread evenly over the axis, "no change" always among them."""
        gap = 0.15 * (self.hi - self.lo)
        picked = [no_change(self.unit)] if self.inside(no_change(self.unit)) else []
        for level in self._candidates():
            for c in sorted(level, key=lambda v: abs(self.t(v) - self.t(no_change(self.unit)))):
                if not self.inside(c):
                    continue
                tc = self.t(c)
                if all(abs(tc - self.t(p)) >= gap for p in picked):
                    picked.append(c)
        return sorted(picked)

    def _candidates(self) -> list[list[float]]:
        if self.log:
            lo, hi = math.exp(self.lo), math.exp(self.hi)
            ks = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
            levels = [(1, 2, 5), (1.5, 3), (1.2, 4, 8), (1.1, 1.3, 1.4, 2.5, 6), (1.05, 1.15, 1.25, 1.6, 1.8, 7, 9)]
            return [[m * 10 ** k for k in ks for m in level] for level in levels]
        scale = scale_of(self.unit)
        span = (self.hi - self.lo) * scale
        raw = span / 5
        mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
        step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
        first = math.ceil(self.lo * scale / step)
        return [[round((first + i) * step, 10) / scale for i in range(int(span / step) + 2)]]

    def tick_label(self, x: float) -> str:
        if self.log:
            return f"\u00d7{x:g}" if x >= 0.01 else f"\u00d7{x:.1e}"
        v = x * scale_of(self.unit)
        text = f"{abs(v):.4g}"
        if self.unit == "points":
            text += " pt"
        elif self.unit == "usd":
            text = "$" + text
        elif self.unit:
            text += f" {self.unit}"
        return (MINUS + text) if v < 0 else ("+" + text if v > 0 else ("\u00d71" if self.log else "0"))


def short_decimals(x: float, unit: str) -> int:
    """Decimals to print a margin as configured (x1.1, -2 pt), not padded."""
    v = abs(x) * scale_of(unit)
    for d in range(0, 5):
        if abs(round(v, d) - v) < 1e-9:
            return d
    return 4
