"""The HTML report's interval charts and axis labels, as inline SVG in percentage coordinates (they stretch
with the page)."""
from __future__ import annotations

import html

from .report_scale import Axis, finite, fmt_value, no_change, short_decimals

STATE_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#b35c00", "insufficient_data": "#616161"}


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
    null = no_change(axis.unit)
    if axis.inside(null):
        p = axis.pos(null)
        out.append(f'<line class="nochange" x1="{p:.2f}%" y1="0" x2="{p:.2f}%" y2="{height}" stroke="#333"'
                   ' stroke-width="1.5" stroke-dasharray="4,3"/>')
    if axis.margin is not None:
        p = axis.pos(axis.margin)
        out.append(f'<line class="margin" x1="{p:.2f}%" y1="0" x2="{p:.2f}%" y2="{height}" stroke="#c62828"'
                   ' stroke-width="2.5"/>')
    return out


def axis_svg(axis: Axis, decimals: int, top: bool) -> str:
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
        label = f"margin {fmt_value(axis.margin, axis.unit, short_decimals(axis.margin, axis.unit))}"
        out.append(f'<text x="{p:.2f}%" y="{y_mark}" dx="{4 if anchor == "start" else -4}" text-anchor="{anchor}"'
                   f' style="fill:#c62828;font-weight:700">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def chart_svg(r: dict, axis: Axis, decimals: int) -> str:
    h = 24
    colour = STATE_COLOURS.get(r["state"], "#333")
    unit = axis.unit
    effect, lo, hi = r.get("effect"), r.get("lower"), r.get("upper")
    out = [f'<svg class="chart" height="{h}" role="img">']
    out += _frame_svg(axis, h)
    mid = h / 2
    if finite(effect) and finite(lo) and finite(hi):
        title = (f"effect {fmt_value(effect, unit, decimals)}, 95% CS {fmt_value(lo, unit, decimals)} to "
                 f"{fmt_value(hi, unit, decimals)}, margin {fmt_value(r.get('margin'), unit, decimals)}")
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
