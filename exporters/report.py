"""``shadowlens report``: the per-cohort baseline-vs-candidate table with verdicts.

Formats: ``table`` (terminal), ``json``, ``markdown`` and ``html`` (one self-contained page: inline
CSS and SVG, no script or network fetch, so it opens offline and can be attached to a ticket).
"""
from __future__ import annotations

import html
import json
import math

from analyzers.compare import readable_duration

from .verdict_json import verdict_to_json

COLUMNS = ("rule", "cohort", "state", "effect", "lower", "upper", "n_baseline", "n_candidate", "margin")
STATE_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#ef6c00", "insufficient_data": "#757575"}
VERDICT_COLOURS = {"promote": "#2e7d32", "block": "#c62828", "inconclusive": "#ef6c00"}


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rows(doc: dict) -> list[list[str]]:
    return [[_cell(r[c]) for c in COLUMNS] for r in doc["rules"]]


def render_table(doc: dict) -> str:
    rows = _rows(doc)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [f"verdict: {doc['verdict']}", *[f"  {r}" for r in doc["reasons"]], "",
           line(COLUMNS), line(["-" * w for w in widths]), *[line(r) for r in rows]]
    return "\n".join(out) + "\n"


def render_markdown(doc: dict) -> str:
    out = [f"## shadowlens gate: **{doc['verdict']}**", "", *[f"- {r}" for r in doc["reasons"]], "",
           "| " + " | ".join(COLUMNS) + " | reason |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r, cells in zip(doc["rules"], _rows(doc)):
        out.append("| " + " | ".join(cells) + " | " + r["reason"].replace("|", "\\|") + " |")
    return "\n".join(out) + "\n"


def _interval_svg(r: dict) -> str:
    """The effect and its interval against the margin and 'no change', on one small axis."""
    effect, lo, hi, margin = r["effect"], r["lower"], r["upper"], r["margin"]
    if effect is None or lo is None or hi is None:
        return ""
    ratio = r.get("kind") == "ratio"
    null = 1.0 if ratio else 0.0
    tx = (lambda x: math.log(x)) if ratio else (lambda x: x)
    pts = [tx(v) for v in (lo, hi, margin, null, effect) if v is not None and (not ratio or v > 0)]
    if len(pts) < 5:
        return ""
    left, right = min(pts), max(pts)
    pad = (right - left) * 0.08 or 1.0
    left, right = left - pad, right + pad
    x = lambda v: 10 + 280 * (tx(v) - left) / (right - left)  # noqa: E731
    colour = STATE_COLOURS.get(r["state"], "#333")
    return (f'<svg width="300" height="28" role="img" aria-label="interval">'
            f'<line x1="{x(null):.1f}" y1="2" x2="{x(null):.1f}" y2="26" stroke="#999" stroke-dasharray="2,2"/>'
            f'<line x1="{x(margin):.1f}" y1="2" x2="{x(margin):.1f}" y2="26" stroke="#c62828"/>'
            f'<line x1="{x(lo):.1f}" y1="14" x2="{x(hi):.1f}" y2="14" stroke="{colour}" stroke-width="3"/>'
            f'<circle cx="{x(effect):.1f}" cy="14" r="4" fill="{colour}"/></svg>')


def render_html(doc: dict, bars: list[dict] | None = None) -> str:
    """One page: verdict, reasons, per-rule tables (interval charts) and per-cohort route bars."""
    e = html.escape
    colour = VERDICT_COLOURS.get(doc["verdict"], "#333")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>shadowlens report</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}",
        "td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}",
        ".state{font-weight:600}.verdict{font-size:1.6em;font-weight:700}",
        ".bar{display:inline-block;height:10px;vertical-align:middle}",
        "</style></head><body>",
        f"<h1>shadowlens: baseline vs candidate</h1><p class='verdict' style='color:{colour}'>{e(doc['verdict'])}</p>",
        "<ul>" + "".join(f"<li>{e(r)}</li>" for r in doc["reasons"]) + "</ul>",
        f"<p>as of {e(str(doc.get('as_of', '')))}; window {readable_duration(doc.get('window_seconds', 0))};"
        f" traces {e(json.dumps(doc.get('traces', {})))}; pairs {e(json.dumps(doc.get('pairs', {})))}</p>",
        "<p>Charts: the candidate's effect (dot) with its confidence sequence (bar), the margin (red line) and"
        " no change (dashed).</p>",
    ]
    for rule in dict.fromkeys(r["rule"] for r in doc["rules"]):
        parts.append(f"<h2>{e(rule)}</h2><table><tr><th>cohort</th><th>state</th><th>effect</th><th>interval</th>"
                     "<th>n baseline</th><th>n candidate</th><th>reason</th></tr>")
        for r in (x for x in doc["rules"] if x["rule"] == rule):
            parts.append(
                f"<tr><td>{e(r['cohort'])}</td><td class='state' style='color:{STATE_COLOURS.get(r['state'], '#333')}'>"
                f"{e(r['state'])}</td><td>{e(_cell(r['effect']))}</td><td>{_interval_svg(r)}</td>"
                f"<td>{r['n_baseline']}</td><td>{r['n_candidate']}</td><td>{e(r['reason'])}</td></tr>")
        parts.append("</table>")
    if bars:
        parts.append(_bars_html(bars))
    parts.append("</body></html>\n")
    return "".join(parts)


def _bars_html(bars: list[dict]) -> str:
    """Per cohort: the two routes' values of each measure as horizontal bars."""
    e = html.escape
    measures = [k for k in bars[0] if k not in ("cohort", "route")]
    out = ["<h2>Routes side by side, per cohort</h2><table><tr><th>cohort</th><th>route</th>"
           + "".join(f"<th>{e(m)}</th>" for m in measures) + "</tr>"]
    top = {m: max((abs(b[m]) for b in bars if isinstance(b.get(m), (int, float))), default=0) or 1 for m in measures}
    for b in bars:
        colour = "#1565c0" if b["route"] == "baseline" else "#8e24aa"
        cells = []
        for m in measures:
            v = b.get(m)
            if not isinstance(v, (int, float)):
                cells.append("<td>-</td>")
                continue
            cells.append(f"<td><span class='bar' style='width:{80 * abs(v) / top[m]:.0f}px;background:{colour}'></span>"
                         f" {v:.4g}</td>")
        out.append(f"<tr><td>{e(b['cohort'])}</td><td>{e(b['route'])}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)


def render(verdict, fmt: str, bars: list[dict] | None = None) -> str:
    doc = verdict_to_json(verdict) if not isinstance(verdict, dict) else verdict
    if fmt == "json":
        return json.dumps({**doc, "cohorts": bars or []}, indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(doc)
    if fmt == "html":
        return render_html(doc, bars)
    return render_table(doc)
