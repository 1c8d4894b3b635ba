"""The evidence of the gate's JSON (example pairs, attribution) as text for ``shadowlens report``'s table
and markdown formats; the rows come from verdict_json (analyzers/evidence.py fills them)."""
from __future__ import annotations


def attribution(r: dict) -> str:
    if r.get("root_cause"):
        return "root cause"
    if r.get("explained_by"):
        return f"explained by {r['explained_by']}"
    return ""


def _with_examples(doc: dict) -> list[dict]:
    """Results that carry examples: root causes first, each followed by the results it explains."""
    rows = [r for r in doc["rules"] if "examples" in r]
    first = [r for r in rows if not r.get("explained_by")]
    out = []
    for r in first:
        out.append(r)
        out += [x for x in rows if x.get("explained_by") == r["cohort"] and x["rule"] == r["rule"]]
    return out + [r for r in rows if r not in out]


def _title(r: dict) -> str:
    why = attribution(r)
    return f"{r['rule']} {r['cohort']} ({r['state']}{', ' + why if why else ''})"


def table_lines(doc: dict) -> list[str]:
    rows = _with_examples(doc)
    if not rows:
        return []
    linked = bool(doc.get("trace_url"))
    out = ["", "example pairs (one shadow.request_id each; " + ("trace links" if linked else "trace ids") + "):"]
    for r in rows:
        out.append(_title(r))
        if not r["examples"]:
            out.append(f"  {r.get('examples_note', 'none')}")
            continue
        cells = [("request_id", "baseline", "candidate", "values")]
        for e in r["examples"]:
            b = e.get("baseline_trace_url") or e["baseline_trace_id"]
            c = e.get("candidate_trace_url") or e["candidate_trace_id"]
            cells.append((str(e["request_id"]), str(b), str(c), e.get("display", "")))
        widths = [max(len(row[i]) for row in cells) for i in range(3)]
        out += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[3] for row in cells]
    return out


def _md_trace(trace_id: str, url: str | None) -> str:
    return f"[`{trace_id}`]({url})" if url else f"`{trace_id}`"


def markdown_lines(doc: dict) -> list[str]:
    rows = _with_examples(doc)
    if not rows:
        return []
    out = ["", "### Example pairs"]
    for r in rows:
        out += ["", f"**{_title(r)}**", ""]
        if not r["examples"]:
            out.append(r.get("examples_note", "none"))
            continue
        out += ["| request_id | baseline trace | candidate trace | values |", "|---|---|---|---|"]
        for e in r["examples"]:
            out.append(f"| `{e['request_id']}` | {_md_trace(e['baseline_trace_id'], e.get('baseline_trace_url'))} |"
                       f" {_md_trace(e['candidate_trace_id'], e.get('candidate_trace_url'))} |"
                       f" {e.get('display', '').replace('|', chr(92) + '|')} |")
    return out
