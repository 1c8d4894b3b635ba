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
This module lays out the page; values and the shared axis are in report_scale.py, the SVG charts in
report_charts.py, the table head, cohort order and route figures in report_tables.py.
"""
from __future__ import annotations

import html
import re
from urllib.parse import quote

from shadowlens.analyzers.compare import readable_duration

from .evidence_text import attribution
from .report_charts import STATE_COLOURS, axis_svg, chart_svg
from .report_scale import Axis, finite, fmt_value, rule_decimals, short_decimals, thousands, unit_of
from .report_tables import cohort_order, route_decimals, routes_table, table_head

STATE_TINTS = {"pass": "#e6f2e7", "fail": "#fbe2df", "inconclusive": "#fff0d9", "insufficient_data": "#eeeeee"}
STATE_WORDS = {"pass": "pass", "fail": "fail", "inconclusive": "inconclusive", "insufficient_data": "insufficient data"}
VERDICT_COLOURS = {"promote": "#2e7d32", "block": "#c62828", "inconclusive": "#b35c00"}

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


def _anchor(rule: str, cohort: str) -> str:
    return "r-" + re.sub(r"[^A-Za-z0-9_-]+", "-", f"{rule}--{cohort}")


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
    trace_text = ", ".join(f"{thousands(traces[k])} {k}" for k in ("baseline", "candidate") if k in traces) or "none"
    pair_text = f"{thousands(pairs.get('matched', 0))} matched"
    unmatched = [f"{thousands(pairs[k])} {k.removeprefix('unmatched_')}" for k in ("unmatched_baseline", "unmatched_candidate")
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


def _grid(rows: list[dict], rules: list[str], cohorts: list[str], fmt) -> str:
    e = html.escape
    by = {(r["rule"], r["cohort"]): r for r in rows}
    out = ["<h2>Overview: rule \u00d7 cohort</h2>",
           "<p class='muted small'>Each cell: the result's state and effect; \u25c6 marks a root cause, \u21b3 a"
           " failure explained by another cohort. A cell links to its row below.</p>",
           table_head("grid", 22, [f"<a href='#{_anchor(rule, '')}'>{e(rule)}</a>" for rule in rules])]
    for cohort in cohorts:
        cells = [f"<td class='cohort'>{e(cohort)}</td>"]
        for rule in rules:
            r = by.get((rule, cohort))
            if r is None:
                cells.append("<td class='muted'>-</td>")
                continue
            st = r["state"]
            eff = fmt[rule](r.get("effect")) if finite(r.get("effect")) else ""
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
    if not finite(v):
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
    decimals = route_decimals([v for v in numbers if finite(v)], "")
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
        return f"{thousands(nb)} pairs"
    return f"{thousands(nb)} / {thousands(nc)}"


def _rule_section(rule: str, rows: list[dict], cohorts: list[str], template: str | None) -> str:
    e = html.escape
    unit = unit_of(rows[0])
    axis = Axis(rows, unit)
    d = rule_decimals(rows, unit)
    first = rows[0]
    what = ("candidate / baseline" if unit == "ratio" else
            "candidate \u2212 baseline" + (", in points of the rate" if unit == "points" else f", in {unit}"))
    margin = fmt_value(first["margin"], unit, short_decimals(first["margin"], unit)) if finite(first.get("margin")) else "n/a"
    direction = "larger" if axis.worse > 0 else "smaller"
    crit = " \u00b7 <b>critical</b>" if any(r.get("critical") for r in rows) else ""
    order = {c: i for i, c in enumerate(cohorts)}
    rows = sorted(rows, key=lambda r: order.get(r["cohort"], len(order)))
    out = [f"<h2 id='{_anchor(rule, '')}'>{e(rule)}</h2>",
           f"<p class='muted'>effect = {e(what)}; margin {e(margin)} (worse when {direction}){crit}</p>",
           "<table class='detail'><colgroup><col style='width:20%'><col style='width:15%'><col style='width:51%'>"
           "<col style='width:14%'></colgroup>",
           f"<tr><th>cohort, state</th><th>effect (95% CS)</th><th>{axis_svg(axis, d, top=True)}</th>"
           "<th>n</th></tr>"]
    for r in rows:
        st = r["state"]
        colour = STATE_COLOURS.get(st, "#333")
        if finite(r.get("effect")):
            eff = (f"<b>{e(fmt_value(r['effect'], unit, d))}</b><br><span class='muted small'>"
                   f"{e(fmt_value(r.get('lower'), unit, d))} \u2026 {e(fmt_value(r.get('upper'), unit, d))}</span>")
        else:
            eff = "<span class='muted'>-</span>"
        out.append(
            f"<tr class='res' id='{_anchor(rule, r['cohort'])}'><td class='cohort'>{e(r['cohort'])}<br>"
            f"<span class='chip' style='background:{STATE_TINTS.get(st, '#fff')};color:{colour}'>"
            f"{e(STATE_WORDS.get(st, st))}</span>{_marks(r)}</td><td class='eff'>{eff}</td>"
            f"<td class='chart'>{chart_svg(r, axis, d)}</td><td class='num'>{e(_n(r))}</td></tr>"
            f"<tr class='why'><td></td><td colspan='3'><div>{e(str(r.get('reason', '')))}</div>{_examples(r, template)}"
            "</td></tr>")
    out.append(f"<tr><td colspan='2'></td><td>{axis_svg(axis, d, top=False)}</td><td></td></tr></table>")
    return "".join(out)


LEGEND = ("<p class='legend'>Charts: <i><svg width='14' height='12'><circle cx='7' cy='6' r='5' fill='#555'/></svg></i>"
          "effect <i><svg width='22' height='12'><line x1='0' y1='6' x2='22' y2='6' stroke='#555' stroke-width='5'/>"
          "</svg></i>95% confidence sequence <i><svg width='10' height='14'><line x1='5' y1='0' x2='5' y2='14'"
          " stroke='#333' stroke-width='1.5' stroke-dasharray='4,3'/></svg></i>no change"
          " <i><svg width='10' height='14'><line x1='5' y1='0' x2='5' y2='14' stroke='#c62828' stroke-width='2.5'/>"
          "</svg></i>margin <i><svg width='16' height='12'><rect width='16' height='12' fill='#fbe3e0'/></svg></i>"
          "past the margin. One axis per rule: bars compare down a column; \u25b8 an interval runs off it.</p>")


# ------------------------------------------------------------------------------------------ page

def render_html(doc: dict, bars: list[dict] | None = None) -> str:
    rows = list(doc.get("rules") or [])
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    cohorts = cohort_order(rows)
    fmt = {}
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule]
        unit, d = unit_of(mine[0]), rule_decimals(mine, unit_of(mine[0]))
        fmt[rule] = lambda x, unit=unit, d=d: fmt_value(x, unit, d)
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
        parts.append(routes_table(bars))
    parts.append("</body></html>\n")
    return "".join(parts)
