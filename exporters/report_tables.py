"""The HTML report's tables: the shared table head, the cohort order, and both routes' figures per cohort."""
from __future__ import annotations

import html
import math

from .report_scale import finite


def cohort_order(rows: list[dict]) -> list[str]:
    """all first, then by label and value, alphabetically (__other__ last in its label)."""
    cohorts = list(dict.fromkeys(r["cohort"] for r in rows))
    labels = sorted({c.partition("=")[0] for c in cohorts if c != "all"})
    def key(c):
        if c == "all":
            return (-1, 0, "")
        label, _, value = c.partition("=")
        return (labels.index(label), value == "__other__", value)
    return sorted(cohorts, key=key)


def table_head(cls: str, first_pct: int, heads: list[str]) -> str:
    """A table's opening, colgroup and header row: a ``cohort`` column of ``first_pct`` %, the others
    sharing the rest equally; ``heads`` are HTML already."""
    width = (100 - first_pct) / max(1, len(heads))
    return (f"<table class='{cls}'><colgroup><col style='width:{first_pct}%'>"
            + "".join(f"<col style='width:{width:.2f}%'>" for _ in heads) + "</colgroup>"
            + "<tr><th>cohort</th>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>")


def _measure_unit(name: str) -> tuple[str, str]:
    """(heading, unit) of a route-summary column: p99_duration_s -> seconds, *_usd -> $, *_rate -> %."""
    if name.endswith("_usd"):
        return name.removesuffix("_usd").replace("_", " "), "usd"
    if name.endswith("_s"):
        return name.removesuffix("_s").replace("_", " "), "s"
    if name.endswith("_rate"):
        return name.replace("_", " "), "%"
    return name.replace("_", " "), ""


def _route_value(v: float, unit: str, decimals: int) -> str:
    if unit == "usd":
        return f"${v:.{decimals}f}"
    if unit == "%":
        return f"{v * 100:.{decimals}f} %"
    if unit == "s":
        return f"{v:.{decimals}f} s"
    if float(v).is_integer() and decimals == 0:
        return f"{int(v):,}"
    return f"{v:,.{decimals}f}"


def route_decimals(values: list[float], unit: str) -> int:
    """Three significant digits for the column's largest value, the same decimals for every cell."""
    if unit == "" and all(float(v).is_integer() for v in values):
        return 0
    top = max((abs(v) * (100 if unit == "%" else 1) for v in values), default=0)
    if top <= 0:
        return 1
    return max(0, min(6, 2 - math.floor(math.log10(top))))


def routes_table(bars: list[dict]) -> str:
    e = html.escape
    measures = [k for k in bars[0] if k not in ("cohort", "route")]
    colours = {"baseline": "#cfe0f7", "candidate": "#e6d3f0"}
    numeric = {m: [b[m] for b in bars if finite(b.get(m))] for m in measures}
    top = {m: max((abs(v) for v in numeric[m]), default=0) or 1 for m in measures}
    dec = {m: route_decimals(numeric[m], _measure_unit(m)[1]) for m in measures}
    out = ["<h2>Routes side by side, per cohort</h2>",
           "<p class='muted small'>Each cell: baseline (blue) over candidate (purple); bars share one scale per"
           " column.</p>",
           table_head("routes", 16, [e(_measure_unit(m)[0]) for m in measures])]
    by_cohort: dict[str, list[dict]] = {}
    for b in bars:
        by_cohort.setdefault(b["cohort"], []).append(b)
    for cohort in cohort_order([{"cohort": c} for c in by_cohort]):
        sides = sorted(by_cohort[cohort], key=lambda b: b.get("route") != "baseline")
        cells = []
        for m in measures:
            unit = _measure_unit(m)[1]
            lines = []
            for b in sides:
                v = b.get(m)
                if not finite(v):
                    lines.append("<div class='v muted'>-</div>")
                    continue
                pct = 100 * abs(v) / top[m]
                bg = colours.get(b.get("route"), "#ddd")
                lines.append(f"<div class='v' title='{e(str(b.get('route')))}' style='background:linear-gradient("
                             f"to right,{bg} {pct:.1f}%,transparent {pct:.1f}%)'>{e(_route_value(v, unit, dec[m]))}</div>")
            cells.append("<td>" + "".join(lines) + "</td>")
        out.append(f"<tr><td class='cohort'><b>{e(cohort)}</b></td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)
