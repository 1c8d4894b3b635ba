"""``shadowlens report --format html``: one self-contained page an SRE can act on.

Inline CSS and SVG only (no script, font or image fetched), so the page opens offline, prints, and can be
attached to a ticket. Built for 900 px and wider:

* the verdict and a plain-text header (window, traces, pairs) first, then the reasons;
* a rule x cohort grid: every result's state, coloured and spelled out, its effect, root causes marked;
* per rule, one table whose interval charts share one axis (ticks in the rule's unit, "no change" dashed,
  the margin red with the region past it shaded), so bars compare down the column;
* the example pairs of a failing result, with trace ids linked through the verdict's ``trace_url``;
* per cohort, both routes' figures side by side, each column on one scale.

Charts use percentage coordinates, so they stretch with the page instead of forcing a fixed width.
"""
from __future__ import annotations

import html
import math
import re
from urllib.parse import quote

from shadowlens.analyzers.compare import readable_duration

from .evidence_text import attribution

STATE_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#b35c00", "insufficient_data": "#616161"}
STATE_TINTS = {"pass": "#e6f2e7", "fail": "#fbe2df", "inconclusive": "#fff0d9", "insufficient_data": "#eeeeee"}
STATE_WORDS = {"pass": "pass", "fail": "fail", "inconclusive": "inconclusive", "insufficient_data": "insufficient data"}
VERDICT_COLOURS = {"promote": "#2e7d32", "block": "#c62828", "inconclusive": "#b35c00"}
MINUS = "\u2212"

CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f1f1f;margin:0 auto;padding:12px 16px 40px;
 max-width:1280px}
h1{font-size:15px;font-weight:600;color:#555;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 2px}
h3{font-size:15px;margin:18px 0 4px}
p{margin:4px 0}
a{color:#0b57d0}
.verdict{display:inline-block;font-size:26px;font-weight:800;letter-spacing:.04em;color:#fff;padding:2px 14px;
 border-radius:6px;margin:2px 12px 4px 0;vertical-align:middle}
.summary{display:inline-block;font-size:15px;vertical-align:middle}
.facts{color:#333;margin:6px 0}
.facts b{font-weight:600}
.reasons{margin:6px 0 0;padding-left:20px}
.reasons li{margin:2px 0;overflow-wrap:anywhere}
.muted{color:#666}
.small{font-size:12px}
table{border-collapse:collapse;width:100%;table-layout:fixed;margin:6px 0}
th,td{padding:4px 6px;text-align:left;vertical-align:middle;overflow-wrap:anywhere}
th{font-weight:600;font-size:12px;color:#444;border-bottom:1px solid #bbb}
.grid td{border:2px solid #fff;padding:3px 6px;font-size:13px}
.grid td.cohort,.detail td.cohort{font-weight:600}
.grid a{color:inherit;text-decoration:none;display:block}
.grid .eff{font-variant-numeric:tabular-nums}
.st{font-weight:700}
.mark{font-size:11px;font-weight:600;display:block;line-height:1.2}
.root{color:#8b0000}
.expl{color:#555;font-weight:400}
.detail tr.res td{border-top:1px solid #ddd;padding-top:5px}
.detail tr.why td{padding-top:0;padding-bottom:6px;font-size:12px;color:#444}
.detail td.num,.detail td.eff{font-variant-numeric:tabular-nums;white-space:nowrap}
.eff b{font-size:14px}
.chip{display:inline-block;padding:0 5px;border-radius:3px;font-weight:700;font-size:12px;white-space:nowrap}
svg.chart,svg.axis{display:block;width:100%;overflow:visible}
svg text{font:11px system-ui,sans-serif;fill:#444}
.legend{font-size:12px;color:#444;margin:2px 0 6px}
.legend i{display:inline-block;vertical-align:middle;margin:0 4px 0 10px}
.examples{margin:4px 0 2px;width:auto;table-layout:auto;font-size:12px}
.examples td,.examples th{padding:1px 10px 1px 0;border:0}
code{font:12px ui-monospace,Menlo,Consolas,monospace}
.routes td{font-size:12px;padding:2px 4px;border-top:1px solid #eee}
.routes .v{padding:0 4px;margin:1px 0;white-space:nowrap;overflow:hidden;font-variant-numeric:tabular-nums}
"""


# ------------------------------------------------------------------------------------------ numbers

def _unit(r: dict) -> str:
    """The unit a result's effect reads in. A ratio is "ratio" (even of costs: x1.1, not $); a difference
    is in points of a rate unless the result names its own unit (a difference of costs in usd, of s)."""
    if r.get("kind") == "ratio":
        return "ratio"
    unit = str(r.get("unit") or "points")
    return "points" if unit in ("ratio", "rate", "%", "bool") else unit


def _null(unit: str) -> float:
    return 1.0 if unit == "ratio" else 0.0


def _signed(text: str, x: float) -> str:
    return (MINUS if x < 0 else "+") + text


def _fmt(x: float | None, unit: str, decimals: int, sign: bool = True) -> str:
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


def _scale(unit: str) -> float:
    return 100.0 if unit == "points" else 1.0


def _decimals(rows: list[dict], unit: str) -> int:
    """One precision for the whole rule: enough that no effect or bound prints as its margin while being
    on the other side of it, and that a value differs visibly from "no change"."""
    base = 2
    if unit not in ("ratio", "points"):
        values = [abs(r[k]) for r in rows for k in ("effect", "lower", "upper") if _finite(r.get(k)) and r[k]]
        top = max(values, default=1.0)
        base = max(0, min(6, 2 - math.floor(math.log10(top)))) if top > 0 else 2
    for d in range(base, base + 3):
        clash = False
        for r in rows:
            m = r.get("margin")
            if not _finite(m):
                continue
            mv = m * _scale(unit)
            for k in ("effect", "lower", "upper"):
                v = r.get(k)
                if _finite(v) and v != m and round(v * _scale(unit), d) == round(mv, d):
                    clash = True
        if not clash:
            return d
    return base + 2


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _thousands(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


# ------------------------------------------------------------------------------------------ axis

class Axis:
    """One rule's shared scale: log for ratios (x2 and x0.5 sit equally far from x1), linear otherwise."""

    LEFT, RIGHT = 3.0, 97.0      # percent of the chart's width the domain maps onto

    def __init__(self, rows: list[dict], unit: str):
        self.unit = unit
        self.log = unit == "ratio"
        null = _null(unit)
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
        return _finite(x) and (not self.log or x > 0)

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
        picked = [_null(self.unit)] if self.inside(_null(self.unit)) else []
        for level in self._candidates():
            for c in sorted(level, key=lambda v: abs(self.t(v) - self.t(_null(self.unit)))):
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
        scale = _scale(self.unit)
        span = (self.hi - self.lo) * scale
        raw = span / 5
        mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
        step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
        first = math.ceil(self.lo * scale / step)
        return [[round((first + i) * step, 10) / scale for i in range(int(span / step) + 2)]]

    def tick_label(self, x: float) -> str:
        if self.log:
            return f"\u00d7{x:g}" if x >= 0.01 else f"\u00d7{x:.1e}"
        v = x * _scale(self.unit)
        text = f"{abs(v):.4g}"
        if self.unit == "points":
            text += " pt"
        elif self.unit == "usd":
            text = "$" + text
        elif self.unit:
            text += f" {self.unit}"
        return (MINUS + text) if v < 0 else ("+" + text if v > 0 else ("\u00d71" if self.log else "0"))


# ------------------------------------------------------------------------------------------ svg

def _frame_svg(axis: Axis, height: int) -> list[str]:
    """What every chart of a rule shares: the region past the margin, the ticks, no change, the margin."""
    out = []
    if axis.margin is not None:
        m = axis.pos(axis.margin)
        x0, x1 = (m, axis.RIGHT) if axis.worse > 0 else (axis.LEFT, m)
        out.append(f'<rect class="past" x="{x0:.2f}%" y="0" width="{x1 - x0:.2f}%" height="{height}" fill="#fbe3e0"/>')
    for tick in axis.ticks():
        p = axis.pos(tick)
        out.append(f'<line class="tick" x1="{p:.2f}%" y1="0" x2="{p:.2f}%" y2="{height}" stroke="#e2e2e2"/>'
                   f'<line class="tick" x1="{p:.2f}%" y1="{height - 4}" x2="{p:.2f}%" y2="{height}" stroke="#888"/>')
    null = _null(axis.unit)
    if axis.inside(null):
        p = axis.pos(null)
        out.append(f'<line class="nochange" x1="{p:.2f}%" y1="0" x2="{p:.2f}%" y2="{height}" stroke="#333"'
                   ' stroke-width="1.5" stroke-dasharray="4,3"/>')
    if axis.margin is not None:
        p = axis.pos(axis.margin)
        out.append(f'<line class="margin" x1="{p:.2f}%" y1="0" x2="{p:.2f}%" y2="{height}" stroke="#c62828"'
                   ' stroke-width="2.5"/>')
    return out


def _axis_svg(axis: Axis, decimals: int, top: bool) -> str:
    """The rule's tick labels (and the margin's), above its first chart or below its last."""
    h = 30
    y_tick, y_mark = (26, 11) if top else (12, 27)
    out = [f'<svg class="axis" height="{h}" role="img" aria-label="axis in {html.escape(axis.unit)}">']
    for tick in axis.ticks():
        out.append(f'<text class="ticklabel" x="{axis.pos(tick):.2f}%" y="{y_tick}" text-anchor="middle">'
                   f'{html.escape(axis.tick_label(tick))}</text>')
    if axis.margin is not None:
        p = axis.pos(axis.margin)
        anchor = "start" if p < 50 else "end"
        label = f"margin {_fmt(axis.margin, axis.unit, _short(axis.margin, axis.unit))}"
        out.append(f'<text x="{p:.2f}%" y="{y_mark}" dx="{4 if anchor == "start" else -4}" text-anchor="{anchor}"'
                   f' style="fill:#c62828;font-weight:700">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _short(x: float, unit: str) -> int:
    """Decimals to print a margin as configured (x1.1, -2 pt), not padded."""
    v = abs(x) * _scale(unit)
    for d in range(0, 5):
        if abs(round(v, d) - v) < 1e-9:
            return d
    return 4


def _chart_svg(r: dict, axis: Axis, decimals: int) -> str:
    h = 24
    colour = STATE_COLOURS.get(r["state"], "#333")
    unit = axis.unit
    effect, lo, hi = r.get("effect"), r.get("lower"), r.get("upper")
    out = [f'<svg class="chart" height="{h}" role="img">']
    out += _frame_svg(axis, h)
    mid = h / 2
    if _finite(effect) and _finite(lo) and _finite(hi):
        title = (f"effect {_fmt(effect, unit, decimals)}, 95% CS {_fmt(lo, unit, decimals)} to "
                 f"{_fmt(hi, unit, decimals)}, margin {_fmt(r.get('margin'), unit, decimals)}")
        out.insert(1, f"<title>{html.escape(title)}</title>")
        x0, x1, xe = axis.pos(lo), axis.pos(hi), axis.pos(effect)
        out.append(f'<line class="ci" x1="{x0:.2f}%" y1="{mid}" x2="{x1:.2f}%" y2="{mid}" stroke="{colour}"'
                   ' stroke-width="5" stroke-linecap="butt"/>')
        for v, x, arrow, anchor in ((lo, x0, "\u25c2", "end"), (hi, x1, "\u25b8", "start")):
            if not axis.inside(v):       # the interval runs off the axis
                out.append(f'<text x="{x:.2f}%" y="{mid + 4}" text-anchor="{anchor}" style="fill:{colour};'
                           f'font-size:13px">{arrow}</text>')
        out.append(f'<circle class="effect" cx="{xe:.2f}%" cy="{mid}" r="5" fill="{colour}" stroke="#fff"'
                   ' stroke-width="1.5"/>')
    else:
        out.insert(1, "<title>no estimate</title>")
        out.append(f'<text x="50%" y="{mid + 4}" text-anchor="middle" style="fill:#666">no estimate</text>')
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------ page parts

def _anchor(rule: str, cohort: str) -> str:
    return "r-" + re.sub(r"[^A-Za-z0-9_-]+", "-", f"{rule}--{cohort}")


def _cohort_order(rows: list[dict]) -> list[str]:
    """all first, then by label and value, alphabetically (__other__ last in its label)."""
    cohorts = list(dict.fromkeys(r["cohort"] for r in rows))
    labels = sorted({c.partition("=")[0] for c in cohorts if c != "all"})
    def key(c):
        if c == "all":
            return (-1, 0, "")
        label, _, value = c.partition("=")
        return (labels.index(label), value == "__other__", value)
    return sorted(cohorts, key=key)


def _marks(r: dict) -> str:
    text = attribution(r)
    if not text:
        return ""
    cls, sign = ("root", "\u25c6") if r.get("root_cause") else ("expl", "\u21b3")
    return f'<span class="mark {cls}">{sign} {html.escape(text)}</span>'


def _header(doc: dict, rows: list[dict]) -> str:
    e = html.escape
    verdict = str(doc.get("verdict", "inconclusive"))
    counts = {s: sum(r["state"] == s for r in rows) for s in STATE_WORDS}
    roots = sum(bool(r.get("root_cause")) for r in rows)
    summary = ", ".join(f"{n} {STATE_WORDS[s]}" for s, n in counts.items() if n)
    if roots:
        summary += f"; {roots} root cause{'s' if roots != 1 else ''}"
    traces = doc.get("traces") or {}
    pairs = doc.get("pairs") or {}
    as_of = str(doc.get("as_of", "")).replace("T", " ").replace("+00:00", " UTC")
    window = readable_duration(doc.get("window_seconds") or 0)
    trace_text = ", ".join(f"{_thousands(traces[k])} {k}" for k in ("baseline", "candidate") if k in traces) or "none"
    pair_text = f"{_thousands(pairs.get('matched', 0))} matched"
    unmatched = [f"{_thousands(pairs[k])} {k.removeprefix('unmatched_')}" for k in ("unmatched_baseline", "unmatched_candidate")
                 if k in pairs]
    if unmatched:
        pair_text += " (unmatched: " + ", ".join(unmatched) + ")"
    return (
        "<header><h1>shadowlens \u00b7 candidate vs baseline</h1>"
        f"<div><span id='verdict' class='verdict' style='background:{VERDICT_COLOURS.get(verdict, '#333')}'>"
        f"{e(verdict.upper())}</span><span class='summary'>{e(summary) or 'no results'}"
        f" ({len(rows)} results)</span></div>"
        f"<p class='facts'><b>Window</b> last {e(window)}, as of {e(as_of)} \u00b7 <b>Traces</b> {e(trace_text)}"
        f" \u00b7 <b>Pairs</b> {e(pair_text)}</p>"
        "<ul class='reasons'>" + "".join(f"<li>{e(str(x))}</li>" for x in doc.get("reasons", [])) + "</ul></header>")


def _table_head(cls: str, first_pct: int, heads: list[str]) -> str:
    """A table's opening, colgroup and header row: a ``cohort`` column of ``first_pct`` %, the others
    sharing the rest equally; ``heads`` are HTML already."""
    width = (100 - first_pct) / max(1, len(heads))
    return (f"<table class='{cls}'><colgroup><col style='width:{first_pct}%'>"
            + "".join(f"<col style='width:{width:.2f}%'>" for _ in heads) + "</colgroup>"
            + "<tr><th>cohort</th>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>")


def _grid(rows: list[dict], rules: list[str], cohorts: list[str], fmt) -> str:
    e = html.escape
    by = {(r["rule"], r["cohort"]): r for r in rows}
    out = ["<h2>Overview: rule \u00d7 cohort</h2>",
           "<p class='muted small'>Each cell: the result's state and effect; \u25c6 marks a root cause, \u21b3 a"
           " failure explained by another cohort. A cell links to its row below.</p>",
           _table_head("grid", 22, [f"<a href='#{_anchor(rule, '')}'>{e(rule)}</a>" for rule in rules])]
    for cohort in cohorts:
        cells = [f"<td class='cohort'>{e(cohort)}</td>"]
        for rule in rules:
            r = by.get((rule, cohort))
            if r is None:
                cells.append("<td class='muted'>-</td>")
                continue
            st = r["state"]
            eff = fmt[rule](r.get("effect")) if _finite(r.get("effect")) else ""
            outline = ";box-shadow:inset 0 0 0 2px #c62828" if r.get("root_cause") else ""
            cells.append(f"<td class='cell {e(st)}' style='background:{STATE_TINTS.get(st, '#fff')}{outline}'>"
                         f"<a href='#{_anchor(rule, cohort)}'><span class='st' style='color:{STATE_COLOURS.get(st)}'>"
                         f"{e(STATE_WORDS.get(st, st))}</span> <span class='eff'>{e(eff)}</span>{_marks(r)}</a></td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _trace_link(trace_id, template: str | None) -> str:
    if not trace_id:
        return "<span class='muted'>-</span>"
    tid = str(trace_id)
    short = tid if len(tid) <= 14 else f"{tid[:8]}\u2026{tid[-4:]}"
    text = f"<code title='{html.escape(tid)}'>{html.escape(short)}</code>"
    if template and "{trace_id}" in template:
        href = template.replace("{trace_id}", quote(tid, safe=""))
        return f"<a href='{html.escape(href)}'>{text}</a>"
    return text


def _example_value(v, unit: str, decimals: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not _finite(v):
        return html.escape(str(v))
    if unit in ("usd", "$"):
        return f"${v:.{decimals}f}"
    suffix = f" {unit}" if unit and unit not in ("ratio", "points", "bool", "rate") else ""
    return html.escape(f"{v:,.{decimals}f}{suffix}")


def _examples(r: dict, template: str | None) -> str:
    ex = r.get("examples") or []
    if not ex:
        note = r.get("examples_note")
        return f"<div class='muted'>{html.escape(str(note))}</div>" if note else ""
    out = ["<table class='examples'><tr><th>request</th><th>baseline trace</th><th>candidate trace</th>"
           "<th>baseline \u2192 candidate</th></tr>"]
    numbers = [x.get(k) for x in ex for k in ("baseline_value", "candidate_value")]
    # the pairs' values share one precision: three significant digits of the largest
    decimals = _route_decimals([v for v in numbers if _finite(v)], "")
    for x in ex:
        unit = str(x.get("unit") or "")
        out.append(f"<tr><td>{_trace_link(x.get('request_id'), None)}</td>"
                   f"<td>{_trace_link(x.get('baseline_trace_id'), template)}</td>"
                   f"<td>{_trace_link(x.get('candidate_trace_id'), template)}</td>"
                   f"<td>{_example_value(x.get('baseline_value'), unit, decimals)} \u2192 "
                   f"{_example_value(x.get('candidate_value'), unit, decimals)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _n(r: dict) -> str:
    nb, nc = r.get("n_baseline"), r.get("n_candidate")
    if r.get("paired") and nb == nc:
        return f"{_thousands(nb)} pairs"
    return f"{_thousands(nb)} / {_thousands(nc)}"


def _rule_section(rule: str, rows: list[dict], cohorts: list[str], template: str | None) -> str:
    e = html.escape
    unit = _unit(rows[0])
    axis = Axis(rows, unit)
    d = _decimals(rows, unit)
    first = rows[0]
    what = ("candidate / baseline" if unit == "ratio" else
            "candidate \u2212 baseline" + (", in points of the rate" if unit == "points" else f", in {unit}"))
    margin = _fmt(first["margin"], unit, _short(first["margin"], unit)) if _finite(first.get("margin")) else "n/a"
    direction = "larger" if axis.worse > 0 else "smaller"
    crit = " \u00b7 <b>critical</b>" if any(r.get("critical") for r in rows) else ""
    order = {c: i for i, c in enumerate(cohorts)}
    rows = sorted(rows, key=lambda r: order.get(r["cohort"], len(order)))
    out = [f"<h2 id='{_anchor(rule, '')}'>{e(rule)}</h2>",
           f"<p class='muted'>effect = {e(what)}; margin {e(margin)} (worse when {direction}){crit}</p>",
           "<table class='detail'><colgroup><col style='width:20%'><col style='width:15%'><col style='width:51%'>"
           "<col style='width:14%'></colgroup>",
           f"<tr><th>cohort, state</th><th>effect (95% CS)</th><th>{_axis_svg(axis, d, top=True)}</th>"
           "<th>n</th></tr>"]
    for r in rows:
        st = r["state"]
        colour = STATE_COLOURS.get(st, "#333")
        if _finite(r.get("effect")):
            eff = (f"<b>{e(_fmt(r['effect'], unit, d))}</b><br><span class='muted small'>"
                   f"{e(_fmt(r.get('lower'), unit, d))} \u2026 {e(_fmt(r.get('upper'), unit, d))}</span>")
        else:
            eff = "<span class='muted'>-</span>"
        out.append(
            f"<tr class='res' id='{_anchor(rule, r['cohort'])}'><td class='cohort'>{e(r['cohort'])}<br>"
            f"<span class='chip' style='background:{STATE_TINTS.get(st, '#fff')};color:{colour}'>"
            f"{e(STATE_WORDS.get(st, st))}</span>{_marks(r)}</td><td class='eff'>{eff}</td>"
            f"<td class='chart'>{_chart_svg(r, axis, d)}</td><td class='num'>{e(_n(r))}</td></tr>"
            f"<tr class='why'><td></td><td colspan='3'><div>{e(str(r.get('reason', '')))}</div>{_examples(r, template)}"
            "</td></tr>")
    out.append(f"<tr><td colspan='2'></td><td>{_axis_svg(axis, d, top=False)}</td><td></td></tr></table>")
    return "".join(out)


LEGEND = ("<p class='legend'>Charts: <i><svg width='14' height='12'><circle cx='7' cy='6' r='5' fill='#555'/></svg></i>"
          "effect <i><svg width='22' height='12'><line x1='0' y1='6' x2='22' y2='6' stroke='#555' stroke-width='5'/>"
          "</svg></i>95% confidence sequence <i><svg width='10' height='14'><line x1='5' y1='0' x2='5' y2='14'"
          " stroke='#333' stroke-width='1.5' stroke-dasharray='4,3'/></svg></i>no change"
          " <i><svg width='10' height='14'><line x1='5' y1='0' x2='5' y2='14' stroke='#c62828' stroke-width='2.5'/>"
          "</svg></i>margin <i><svg width='16' height='12'><rect width='16' height='12' fill='#fbe3e0'/></svg></i>"
          "past the margin. One axis per rule: bars compare down a column; \u25b8 an interval runs off it.</p>")


# ------------------------------------------------------------------------------------------ route figures

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


def _route_decimals(values: list[float], unit: str) -> int:
    """Three significant digits for the column's largest value, the same decimals for every cell."""
    if unit == "" and all(float(v).is_integer() for v in values):
        return 0
    top = max((abs(v) * (100 if unit == "%" else 1) for v in values), default=0)
    if top <= 0:
        return 1
    return max(0, min(6, 2 - math.floor(math.log10(top))))


def _routes(bars: list[dict]) -> str:
    e = html.escape
    measures = [k for k in bars[0] if k not in ("cohort", "route")]
    colours = {"baseline": "#cfe0f7", "candidate": "#e6d3f0"}
    numeric = {m: [b[m] for b in bars if _finite(b.get(m))] for m in measures}
    top = {m: max((abs(v) for v in numeric[m]), default=0) or 1 for m in measures}
    dec = {m: _route_decimals(numeric[m], _measure_unit(m)[1]) for m in measures}
    out = ["<h2>Routes side by side, per cohort</h2>",
           "<p class='muted small'>Each cell: baseline (blue) over candidate (purple); bars share one scale per"
           " column.</p>",
           _table_head("routes", 16, [e(_measure_unit(m)[0]) for m in measures])]
    by_cohort: dict[str, list[dict]] = {}
    for b in bars:
        by_cohort.setdefault(b["cohort"], []).append(b)
    for cohort in _cohort_order([{"cohort": c} for c in by_cohort]):
        sides = sorted(by_cohort[cohort], key=lambda b: b.get("route") != "baseline")
        cells = []
        for m in measures:
            unit = _measure_unit(m)[1]
            lines = []
            for b in sides:
                v = b.get(m)
                if not _finite(v):
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


# ------------------------------------------------------------------------------------------ page

def render_html(doc: dict, bars: list[dict] | None = None) -> str:
    rows = list(doc.get("rules") or [])
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    cohorts = _cohort_order(rows)
    fmt = {}
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule]
        unit, d = _unit(mine[0]), _decimals(mine, _unit(mine[0]))
        fmt[rule] = lambda x, unit=unit, d=d: _fmt(x, unit, d)
    template = doc.get("trace_url") or None
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width,initial-scale=1'>",
             f"<title>shadowlens report: {html.escape(str(doc.get('verdict', '')))}</title><style>{CSS}</style>"
             "</head><body>", _header(doc, rows)]
    if rows:
        parts.append(_grid(rows, rules, cohorts, fmt))
        parts.append(LEGEND)
        for rule in rules:
            parts.append(_rule_section(rule, [r for r in rows if r["rule"] == rule], cohorts, template))
    else:
        parts.append("<p>No results: no baseline and candidate traces in the window.</p>")
    if bars:
        parts.append(_routes(bars))
    parts.append("</body></html>\n")
    return "".join(parts)
