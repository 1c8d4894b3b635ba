"""The gate's answer as CONTRACT §7 JSON, as text, and as an HTTP status; shared by /gate and the CLI.

    {"verdict": "promote|block|inconclusive",
     "rules": [{"rule", "cohort", "state", "effect", "lower", "upper", "n_baseline", "n_candidate",
                "margin", "reason"}, ...], ...}
"""
from __future__ import annotations

import math
from datetime import datetime, timezone

from shadowlens.analyzers.compare import Verdict
from shadowlens.analyzers.evidence import NO_PAIRS, NO_TRACE_DATA

EXIT_CODES = {"promote": 0, "block": 1, "inconclusive": 3}
# /gate: 2xx unless blocked, so a Flagger webhook (any non-2xx = failed check) fails only on a block.
# ?strict=1 answers non-2xx also while inconclusive (Flagger confirm-promotion waits on it);
# ?always_ok=1 always answers 200 (Argo Rollouts' web provider treats non-2xx as an error, not a result).
HTTP_STATUS = {"promote": 200, "inconclusive": 200, "block": 409}
STRICT_INCONCLUSIVE = 425


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 6)


def verdict_to_json(v: Verdict) -> dict:
    ordered = sorted(v.results, key=lambda r: (r.state != "fail", r.cohort != "all", r.rule, r.cohort))
    doc = {
        "verdict": v.verdict,
        "reasons": list(v.reasons),
        "as_of": datetime.fromtimestamp(v.as_of, timezone.utc).isoformat(timespec="seconds"),
        "window_seconds": v.window_s,
        "traces": v.traces,
        "pairs": v.pairs,
        "rules": [{"rule": r.rule, "cohort": r.cohort, "state": r.state, "effect": _num(r.effect),
                   "lower": _num(r.lower), "upper": _num(r.upper), "n_baseline": r.n_baseline,
                   "n_candidate": r.n_candidate, "margin": r.margin, "reason": r.reason, "paired": r.paired,
                   "p_value": _num(r.p_value), "critical": r.critical, "kind": r.kind,
                   "no_input": r.no_input, "past_margin": r.past_margin, **_evidence(v, r)} for r in ordered],
    }
    if getattr(v, "trace_url", None):
        doc["trace_url"] = v.trace_url
    return doc


def _evidence(v: Verdict, r) -> dict:
    """A result's example pairs and attribution (analyzers/evidence.py). A failing result judged without
    the store's traces has no examples, and says why."""
    key = (r.rule, r.cohort)
    explained = getattr(v, "explained_by", {})
    out = {"explained_by": explained.get(key), "root_cause": key in explained and explained[key] is None}
    examples = getattr(v, "examples", None)
    if examples is None:       # a plain Verdict: judged without trace data
        if r.state == "fail":
            out.update(examples=[], examples_note=NO_TRACE_DATA)
    elif key in examples or r.state == "fail":
        out["examples"] = [dict(e) for e in examples.get(key, ())]
        if not out["examples"]:
            out["examples_note"] = v.examples_note or NO_PAIRS
    return out


def http_status(verdict: str, strict: bool = False, always_ok: bool = False) -> int:
    if always_ok:
        return 200
    if strict and verdict == "inconclusive":
        return STRICT_INCONCLUSIVE
    return HTTP_STATUS[verdict]


def verdict_text(doc: dict) -> str:
    """For a terminal or a pipeline log: the verdict and why, every all-traffic result, cohort counts."""
    lines = [f"gate: {doc['verdict']}", *[f"  {r}" for r in doc.get("reasons", [])]]
    overall = [r for r in doc["rules"] if r["cohort"] == "all"]
    if overall:
        lines.append("all traffic:")
        lines += [f"  {r['rule']:<16} {r['state']:<17} {r['reason']}" for r in overall]
    cohorts = [r for r in doc["rules"] if r["cohort"] != "all"]
    if cohorts:
        counts = {s: sum(r["state"] == s for r in cohorts) for s in ("fail", "inconclusive", "pass", "insufficient_data")}
        lines.append("cohort results: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                     + " (`shadowlens report` shows them all)")
    return "\n".join(lines) + "\n"
