"""``shadowlens report``: the per-cohort baseline-vs-candidate table with verdicts.

Formats: ``table`` (terminal), ``json``, ``markdown`` and ``html`` (one self-contained page: inline
CSS and SVG, no script or network fetch, so it opens offline and can be attached to a ticket; built in
exporters/report_html.py).
"""
from __future__ import annotations

import json

from .evidence_text import markdown_lines, table_lines
from .report_html import render_html
from .verdict_json import verdict_to_json

COLUMNS = ("rule", "cohort", "state", "effect", "lower", "upper", "n_baseline", "n_candidate", "margin")


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
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    out = [f"verdict: {doc['verdict']}", *[f"  {r}" for r in doc["reasons"]], "",
           line(COLUMNS), line(["-" * w for w in widths]), *[line(r) for r in rows], *table_lines(doc)]
    return "\n".join(out) + "\n"


def render_markdown(doc: dict) -> str:
    out = [f"## shadowlens gate: **{doc['verdict']}**", "", *[f"- {r}" for r in doc["reasons"]], "",
           "| " + " | ".join(COLUMNS) + " | reason |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r, cells in zip(doc["rules"], _rows(doc)):
        out.append("| " + " | ".join(cells) + " | " + r["reason"].replace("|", "\\|") + " |")
    out += markdown_lines(doc)
    return "\n".join(out) + "\n"


def render(verdict, fmt: str, bars: list[dict] | None = None) -> str:
    doc = verdict_to_json(verdict) if not isinstance(verdict, dict) else verdict
    if fmt == "json":
        return json.dumps({**doc, "cohorts": bars or []}, indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(doc)
    if fmt == "html":
        return render_html(doc, bars)
    return render_table(doc)
