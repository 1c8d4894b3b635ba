"""Gate rules: non-inferiority margins on the candidate's effect (CONTRACT §7), read from ``gate``.

A rule names one per-trace measure and how much worse the candidate may be; the default set
(``settings.DEFAULT_GATE_RULES``):

    gate:
      rules:
        - {name: task_completion, measure: eval_pass_rate, eval: task_completion, max_drop: 0.02, critical: true}
        - {name: refusal_rate, measure: refusal_rate, max_ratio: 2.0, min_increase: 0.005}
        - {name: p99_latency, measure: duration, quantile: 0.99, max_ratio: 1.3}
        - {name: cost_per_trace, measure: cost, max_ratio: 1.10}
        - {name: steps, measure: steps, max_ratio: 1.2}

``max_drop`` / ``max_increase`` bound the difference candidate - baseline (a rate that should stay
high / low); ``max_ratio`` bounds candidate / baseline (of means, or of a quantile with ``quantile``).

>>> rules = parse_gate({})
>>> [r.name for r in rules.rules]
['task_completion', 'refusal_rate', 'p99_latency', 'cost_per_trace', 'steps']
>>> rules.rules[2].min_samples
368
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from shadowlens.collector.settings import parse_duration

from .sequential import min_samples_for_quantile
from .settings import DEFAULT_GATE_RULES, GATE_SETTINGS_DEFAULTS

# per-trace measures the gate can judge; values are the frame column (analyzers/compare.py)
MEASURES = {
    "eval_pass_rate": "eval_pass",     # needs `eval`
    "eval_fail_rate": "eval_fail",     # needs `eval`
    "refusal_rate": "refused",
    "escalation_rate": "escalated",
    "duration": "duration",
    "cost": "cost",
    "steps": "steps",
    "tokens": "tokens",
}
BINARY = {"eval_pass_rate", "eval_fail_rate", "refusal_rate", "escalation_rate"}

_RULE_KEYS = {"name", "measure", "eval", "max_drop", "max_increase", "max_ratio", "min_increase", "quantile",
              "critical", "min_samples"}


class RuleError(ValueError):
    """A gate rule or setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Rule:
    name: str
    measure: str
    kind: str                 # "difference" | "ratio"
    margin: float             # the effect's tolerated bound (difference: signed, e.g. -0.02; ratio: 1.3)
    worse: int                # +1 when a larger effect is worse, -1 when a smaller one is
    min_samples: int          # per route (or pairs): below it the rule says insufficient_data
    eval: str | None = None
    quantile: float | None = None
    min_increase: float = 0.0  # absolute floor a rate must also rise by to count (ratio rules on rates)
    critical: bool = False

    @property
    def column(self) -> str:
        return MEASURES[self.measure]

    @property
    def binary(self) -> bool:
        return self.measure in BINARY

    def beyond(self, effect: float) -> bool:
        """Is this effect past the margin (in the worse direction)?"""
        return (effect - self.margin) * self.worse > 0

    def describe_margin(self) -> str:
        if self.kind == "ratio":
            floor = f", and +{self.min_increase * 100:g} points" if self.min_increase else ""
            return f"x{self.margin:g}{floor}"
        return f"{self.margin * 100:+g} points"


@dataclass(frozen=True)
class GateSettings:
    """The ``gate`` section, parsed; its defaults are ``settings.GATE_SETTINGS_DEFAULTS``."""
    rules: tuple[Rule, ...]
    alpha: float
    fdr: float
    window_s: float
    pairing_window_s: float
    min_samples: int
    budget_s: float
    refresh_s: float

    @property
    def eval_names(self) -> tuple[str, ...]:
        return tuple(sorted({r.eval for r in self.rules if r.eval}))


def _number(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, str):           # from an environment override
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuleError(f"{where}: {value!r} is not a number")
    if positive and value <= 0:
        raise RuleError(f"{where}: must be > 0, got {value!r}")
    return float(value)


def parse_rule(raw: Mapping[str, Any], index: int, min_samples: int, alpha: float) -> Rule:
    where = f"gate.rules[{index}]"
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: must be a mapping like {{name: ..., measure: ..., max_ratio: ...}}")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise RuleError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_RULE_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise RuleError(f"{where}: needs a name")
    where = f"gate.rules[{index}] ({name})"
    measure = raw.get("measure")
    if measure not in MEASURES:
        raise RuleError(f"{where}: measure {measure!r} is not one of {', '.join(MEASURES)}")
    bounds = [k for k in ("max_drop", "max_increase", "max_ratio") if k in raw]
    if len(bounds) != 1:
        raise RuleError(f"{where}: give exactly one of max_drop, max_increase, max_ratio")
    bound = bounds[0]
    value = _number(raw[bound], f"{where}.{bound}", positive=True)
    if bound == "max_drop":
        kind, margin, worse = "difference", -value, -1
    elif bound == "max_increase":
        kind, margin, worse = "difference", value, 1
    else:
        if value <= 1:
            raise RuleError(f"{where}.max_ratio: must be > 1 (1.3 allows the candidate 30 % more), got {value!r}")
        kind, margin, worse = "ratio", value, 1
    ev = raw.get("eval")
    if measure.startswith("eval_") and not ev:
        raise RuleError(f"{where}: measure {measure} needs `eval: <eval name>`")
    quantile = raw.get("quantile")
    if quantile is not None:
        quantile = _number(quantile, f"{where}.quantile")
        if not 0 < quantile < 1 or measure in BINARY or kind != "ratio":
            raise RuleError(f"{where}.quantile: needs 0 < quantile < 1, a non-rate measure and max_ratio")
    floor = _number(raw.get("min_increase", 0.0), f"{where}.min_increase")
    need = int(raw.get("min_samples", min_samples))
    if quantile is not None:
        need = max(need, min_samples_for_quantile(quantile, alpha))
    return Rule(name=name, measure=measure, kind=kind, margin=margin, worse=worse, eval=ev, quantile=quantile,
                min_increase=floor, critical=bool(raw.get("critical", False)), min_samples=need)


def parse_gate(section: Mapping[str, Any] | None) -> GateSettings:
    """The ``gate`` config section → GateSettings; an empty ``rules`` list means the default set."""
    section = dict(section or {})
    unknown = sorted(set(section) - set(GATE_SETTINGS_DEFAULTS) - {"rules"})
    if unknown:
        raise RuleError(f"unknown config key 'gate.{unknown[0]}' (known: rules, {', '.join(GATE_SETTINGS_DEFAULTS)})")
    opts = {**GATE_SETTINGS_DEFAULTS, **{k: v for k, v in section.items() if k != "rules"}}
    alpha = _number(opts["alpha"], "gate.alpha", positive=True)
    fdr = _number(opts["fdr"], "gate.fdr", positive=True)
    if alpha >= 1 or fdr >= 1:
        raise RuleError("gate.alpha and gate.fdr must be below 1 (e.g. 0.05)")
    min_samples = int(_number(opts["min_samples"], "gate.min_samples", positive=True))
    raw_rules = section.get("rules") or DEFAULT_GATE_RULES
    if not isinstance(raw_rules, list):
        raise RuleError("gate.rules: must be a list of rules")
    rules = tuple(parse_rule(r, i, min_samples, alpha) for i, r in enumerate(raw_rules))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise RuleError(f"gate.rules: rule names must be unique, got {names}")
    return GateSettings(rules=rules, alpha=alpha, fdr=fdr, window_s=parse_duration(opts["window"], "gate.window"),
                        pairing_window_s=parse_duration(opts["pairing_window"], "gate.pairing_window"),
                        min_samples=min_samples, budget_s=parse_duration(opts["budget"], "gate.budget"),
                        refresh_s=parse_duration(opts["refresh"], "gate.refresh"))
