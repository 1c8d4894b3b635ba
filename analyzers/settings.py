"""The analyzers' settings: trace assembly, window, cohorts and the gate, each with its defaults, written once.

Each section's defaults are the config keys as a user writes them; ``parse_*`` turns a merged section into
a frozen dataclass and names the key of any bad value. The gate's rules and settings are parsed by
``rules.parse_gate`` against ``DEFAULT_GATE_RULES`` and ``GATE_SETTINGS_DEFAULTS`` below.
``shadowlens/config.py`` composes these sections with the collector's (``collector/settings.py``).

>>> parse_traces(TRACES).idle_seconds
5.0
>>> parse_window(WINDOW)
900.0
>>> parse_cohorts(COHORTS).labels["intent"]
('cohort.intent',)
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Mapping

from shadowlens.collector.errors import ConfigError
from shadowlens.collector.settings import boolean, integer, number, parse_duration

# The release gate's default rules (CONTRACT §7); rules.parse_gate validates them.
DEFAULT_GATE_RULES: list[dict[str, Any]] = [
    {"name": "task_completion", "measure": "eval_pass_rate", "eval": "task_completion", "max_drop": 0.02,
     "critical": True},
    {"name": "refusal_rate", "measure": "refusal_rate", "max_ratio": 2.0, "min_increase": 0.005},
    {"name": "p99_latency", "measure": "duration", "quantile": 0.99, "max_ratio": 1.3},
    {"name": "cost_per_trace", "measure": "cost", "max_ratio": 1.10},
    {"name": "steps", "measure": "steps", "max_ratio": 1.2},
]

GATE_SETTINGS_DEFAULTS: dict[str, Any] = {
    "alpha": 0.05,            # confidence sequences: valid at every look at once
    "fdr": 0.05,              # Benjamini-Hochberg level across every rule x cohort
    "window": "1h",           # traces the gate looks at (by start time)
    "pairing_window": "10m",  # a baseline and a candidate trace pair when their starts are this close
    "min_samples": 100,       # per route (or pairs), below it a rule says insufficient_data
    "budget": "30m",          # a critical rule still inconclusive this long after the first candidate trace blocks
    "refresh": "10s",         # how often serve recomputes /gate and the verdict metrics
}

GATE: dict[str, Any] = {"rules": copy.deepcopy(DEFAULT_GATE_RULES), **GATE_SETTINGS_DEFAULTS}

# content_pairing_seconds: a gateway's mirrored root calls (LiteLLM without an application span) pair when their
# input messages are identical and their starts this close (0: off; analyzers/units.py, docs/litellm.md)
TRACES: dict[str, Any] = {"idle_seconds": 5, "max_seconds": 300, "max_open": 100000, "content_pairing_seconds": 1}

WINDOW = "15m"

# developers' addition: the analyzers' own knobs
ANALYZERS: dict[str, Any] = {"enabled": True, "window_refresh": "5s"}

COHORTS: dict[str, Any] = {
    "max_values": 50,
    "max_series": 100,          # developers' addition: route x cohort combinations, see README "Metrics"
    "labels": {
        "intent": ["cohort.intent"],
        "language": ["cohort.language"],
        "tier": ["cohort.tier"],
    },
}


@dataclass(frozen=True)
class TracesSettings:
    idle_seconds: float
    max_seconds: float
    max_open: int
    content_pairing_seconds: float


@dataclass(frozen=True)
class AnalyzersSettings:
    enabled: bool
    window_refresh_s: float


@dataclass(frozen=True)
class CohortSettings:
    labels: Mapping[str, tuple[str, ...]]     # label name -> attribute keys, first found wins
    max_values: int
    max_series: int


def parse_traces(t: Mapping[str, Any]) -> TracesSettings:
    """The ``traces`` section (merged over ``TRACES``)."""
    return TracesSettings(idle_seconds=number(t["idle_seconds"], "traces.idle_seconds"),
                          max_seconds=number(t["max_seconds"], "traces.max_seconds"),
                          max_open=integer(t["max_open"], "traces.max_open", minimum=1),
                          content_pairing_seconds=number(t["content_pairing_seconds"], "traces.content_pairing_seconds"))


def parse_window(value: Any) -> float:
    """The top-level ``window`` key: the live window /metrics reports over, in seconds."""
    return parse_duration(value, "window")


def parse_analyzers(a: Mapping[str, Any]) -> AnalyzersSettings:
    """The ``analyzers`` section (merged over ``ANALYZERS``)."""
    return AnalyzersSettings(enabled=boolean(a["enabled"], "analyzers.enabled"),
                             window_refresh_s=parse_duration(a["window_refresh"], "analyzers.window_refresh"))


def parse_cohorts(c: Mapping[str, Any]) -> CohortSettings:
    """The ``cohorts`` section (merged over ``COHORTS``); label names become Prometheus label names."""
    labels = c["labels"]
    if not isinstance(labels, Mapping):
        raise ConfigError("cohorts.labels must map a label name to a list of attribute keys")
    out = {}
    for name, keys in labels.items():
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", str(name)):
            raise ConfigError(f"cohorts.labels: {name!r} is not a valid label name (lower-case letters, digits, _)")
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"cohorts.labels.{name} must be a list of attribute keys")
        out[str(name)] = tuple(keys)
    return CohortSettings(labels=out, max_values=integer(c["max_values"], "cohorts.max_values", minimum=1),
                          max_series=integer(c["max_series"], "cohorts.max_series", minimum=1))
