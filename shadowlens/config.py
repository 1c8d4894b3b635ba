"""Configuration: the layers' defaults, YAML file, ``SHADOWLENS_*`` env overrides, validation.

This is the only module that reads environment variables. It composes the sections each layer owns
(``collector/settings.py``: receivers, store, evals; ``analyzers/settings.py``: traces, window, analyzers,
cohorts, gate) with the application's own (metrics, export, links, prices, routes) into one ``Config``.
Every key is optional; unknown keys are an error that names the key (exit status 2 from the CLI).

>>> cfg = load(None, env={"SHADOWLENS_TRACES__IDLE_SECONDS": "9"})
>>> cfg.traces.idle_seconds
9.0
>>> load(None, env={"SHADOWLENS_STORE__TTL": "1d"})
Traceback (most recent call last):
...
shadowlens.collector.errors.ConfigError: unknown config key 'store.ttl' from environment variable SHADOWLENS_STORE__TTL
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .analyzers import settings as analyzers_settings
from .analyzers.rules import GateSettings, RuleError, parse_gate
from .analyzers.settings import AnalyzersSettings, CohortSettings, TracesSettings
from .collector import settings as collector_settings
from .collector.errors import ConfigError
from .collector.security import TLSFiles, tls_files
from .collector.settings import Endpoint, EvalSettings, ReceiversSettings, StoreSettings, parse_duration, parse_endpoint

# parse_duration and parse_endpoint: the CLI and the demo read their flags with the config's value parsers
__all__ = ["Config", "ConfigError", "DEFAULTS", "Endpoint", "FREE_FORM", "default_config", "load", "parse_duration",
           "parse_endpoint"]

ENV_PREFIX = "SHADOWLENS_"

_NO_TLS = {"cert_file": "", "key_file": "", "client_ca_file": ""}

# the lake's tables (exporters/parquet.py exports them); named here so that loading the config, which the
# ingest frontend does, never imports pyarrow
EXPORT_TABLES = ("spans", "traces", "evals", "logs")

# Every config key with its default, in the order --print-config shows them: the contract's keys (CONTRACT §3)
# plus the developers' additions (documented in README). Each layer's sections come from its settings module.
DEFAULTS: dict[str, Any] = copy.deepcopy({
    "receivers": collector_settings.RECEIVERS,
    # developers' additions: max_models / max_evals cap the model and eval labels as cohorts.max_values caps
    # a cohort label (README "Metrics": the most series /metrics can have); tls and auth: CONTRACT §8
    "metrics": {"endpoint": "0.0.0.0:9464", "max_models": 50, "max_evals": 10, "tls": _NO_TLS,
                "auth": {"bearer_token_file": ""}},
    "store": collector_settings.STORE,
    "traces": analyzers_settings.TRACES,
    "window": analyzers_settings.WINDOW,
    "analyzers": analyzers_settings.ANALYZERS,
    "cohorts": analyzers_settings.COHORTS,
    "evals": collector_settings.EVALS,
    "prices": [],
    "routes": {},
    "gate": analyzers_settings.GATE,
    # developers' addition: serve writes closed hours to a Parquet lake (exporters/parquet.py); dir "" = off
    "export": {"parquet": {"dir": "", "interval": "1h", "delay": "10m", "source": "",
                           "tables": list(EXPORT_TABLES)}},
    # where the team's trace UI shows a trace: "{trace_id}" is replaced, e.g.
    # https://tempo.example/explore?...{trace_id}...; empty: trace ids are printed, not linked
    "links": {"trace_url": ""},
})

# Sections whose children are user data (names chosen by the user), not fixed keys.
FREE_FORM = {("cohorts", "labels"), ("routes",), ("evals", "thresholds"), ("prices",)}


@dataclass(frozen=True)
class ExportParquetConfig:
    dir: str                   # "" = off
    interval_s: float
    delay_s: float
    source: str
    tables: tuple[str, ...]


@dataclass(frozen=True)
class LinksConfig:
    trace_url: str | None = None      # links.trace_url, with "{trace_id}" where the trace id goes


@dataclass(frozen=True)
class Config:
    """The effective configuration: each layer's settings, composed. ``raw`` is the merged key tree."""
    receivers: ReceiversSettings
    metrics: Endpoint
    store: StoreSettings
    traces: TracesSettings
    window_s: float
    analyzers: AnalyzersSettings
    cohorts: CohortSettings
    evals: EvalSettings
    prices: tuple[Mapping[str, Any], ...]
    routes: Mapping[str, tuple[str, ...]]
    gate: Mapping[str, Any]
    metrics_tls: TLSFiles | None
    metrics_token_file: str | None
    export_parquet: ExportParquetConfig
    links: LinksConfig
    metrics_max_models: int
    metrics_max_evals: int
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def cohort_labels(self) -> Mapping[str, tuple[str, ...]]:
        return self.cohorts.labels

    @property
    def cohort_max_values(self) -> int:
        return self.cohorts.max_values

    @property
    def cohort_max_series(self) -> int:
        return self.cohorts.max_series

    def gate_settings(self) -> GateSettings:
        """The ``gate`` section as analyzers.rules.GateSettings; a bad rule raises ConfigError naming it."""
        try:
            return parse_gate(self.gate)
        except RuleError as exc:
            raise ConfigError(str(exc)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.raw), sort_keys=False)


def _free(path: tuple[str, ...]) -> bool:
    """Is ``path`` inside a section whose keys the user names?"""
    return any(path[: len(f)] == f for f in FREE_FORM)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _merge(base: dict, override: Mapping, path: tuple[str, ...], source: str) -> None:
    for key, value in override.items():
        here = path + (str(key),)
        dotted = ".".join(here)
        if _free(path):
            base[key] = value
            continue
        if key not in base:
            known = ", ".join(sorted(base)) or "none"
            raise ConfigError(f"unknown config key '{dotted}' in {source} (known keys here: {known})")
        if isinstance(base[key], dict) and here not in FREE_FORM:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{dotted}' in {source} must be a mapping, got {value!r}")
            _merge(base[key], value, here, source)
        else:
            base[key] = value


def _env_overrides(env: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any, str]]:
    out = []
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in ("SHADOWLENS_CONFIG",):
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        out.append((path, yaml.safe_load(text) if text != "" else "", name))
    return sorted(out)


def _set_path(tree: dict, path: tuple[str, ...], value: Any, source: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        sub = path[: i + 1]
        if part not in node or not isinstance(node[part], dict):
            if _free(sub):
                node = node.setdefault(part, {})
                continue
            raise ConfigError(f"unknown config key '{'.'.join(sub)}' from environment variable {source}")
        node = node[part]
    leaf = path[-1]
    parent = path[:-1]
    if leaf not in node and not _free(parent):
        raise ConfigError(f"unknown config key '{'.'.join(path)}' from environment variable {source}")
    node[leaf] = value


def load(path: str | os.PathLike | None, env: Mapping[str, str] | None = None,
         overrides: Mapping[tuple[str, ...], Any] | None = None) -> Config:
    """Build the effective configuration: defaults <- file <- env <- explicit overrides (flags)."""
    tree = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(doc, Mapping):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        _merge(tree, doc, (), f"config file {str(p)!r}")
    for key_path, value, source in _env_overrides(os.environ if env is None else env):
        _set_path(tree, key_path, value, source)
    for key_path, value in (overrides or {}).items():
        _set_path(tree, key_path, value, "command line")
    return build(tree)


def _trace_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or "{trace_id}" not in value:
        raise ConfigError(f"links.trace_url: {value!r} has no {{trace_id}} placeholder; write the trace UI's URL"
                          " with {trace_id} where the trace id goes, e.g. https://tempo.example/trace/{trace_id}")
    return value


def _routes(routes: Any) -> dict[str, tuple[str, ...]]:
    """``routes``: route name -> anchored regexes over the request model."""
    routes = routes or {}
    if not isinstance(routes, Mapping):
        raise ConfigError("routes must map a route name to a list of model regexes")
    out = {}
    for name, pats in routes.items():
        pats = [pats] if isinstance(pats, str) else pats
        for pat in pats:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ConfigError(f"routes.{name}: {pat!r} is not a valid regex ({exc})") from None
        out[str(name)] = tuple(pats)
    return out


def _prices(prices: Any) -> tuple[Mapping[str, Any], ...]:
    """``prices``: user entries; collector/decode/pricing.py checks each when the table loads."""
    prices = prices or []
    if not isinstance(prices, list):
        raise ConfigError("prices must be a list of {match, input, output, ...} entries")
    return tuple(prices)


def _export_parquet(p: Mapping[str, Any]) -> ExportParquetConfig:
    interval = parse_duration(p["interval"], "export.parquet.interval")
    if interval <= 0:
        raise ConfigError(f"export.parquet.interval: must be more than 0, got {p['interval']!r}")
    raw = p["tables"] if isinstance(p["tables"], (str, list, tuple)) else ""
    names = [str(t).strip() for t in (raw.split(",") if isinstance(raw, str) else raw) if str(t).strip()]
    bad = [t for t in names if t not in EXPORT_TABLES]
    if bad or not names:
        raise ConfigError(f"export.parquet.tables {','.join(bad) or '(none)'}: choose from {','.join(EXPORT_TABLES)}")
    tables = tuple(dict.fromkeys(names))
    return ExportParquetConfig(dir=str(p["dir"] or ""), interval_s=interval,
                               delay_s=parse_duration(p["delay"], "export.parquet.delay"),
                               source=str(p["source"] or ""), tables=tables)


def build(tree: dict) -> Config:
    """The merged key tree -> Config: each section parsed by its owner; the gate is checked last."""
    m = tree["metrics"]
    cfg = Config(
        receivers=collector_settings.parse_receivers(tree["receivers"]),
        store=collector_settings.parse_store(tree["store"]),
        cohorts=analyzers_settings.parse_cohorts(tree["cohorts"]),
        routes=_routes(tree["routes"]),
        prices=_prices(tree["prices"]),
        metrics=collector_settings.endpoint(m["endpoint"], "metrics.endpoint"),
        traces=analyzers_settings.parse_traces(tree["traces"]),
        window_s=analyzers_settings.parse_window(tree["window"]),
        analyzers=analyzers_settings.parse_analyzers(tree["analyzers"]),
        metrics_max_models=collector_settings.integer(m["max_models"], "metrics.max_models", minimum=1),
        metrics_max_evals=collector_settings.integer(m["max_evals"], "metrics.max_evals", minimum=1),
        evals=collector_settings.parse_evals(tree["evals"]),
        gate=tree["gate"] or {},
        metrics_tls=tls_files(m.get("tls"), "metrics.tls"),
        metrics_token_file=collector_settings.token_file(m.get("auth"), "metrics.auth"),
        export_parquet=_export_parquet(tree["export"]["parquet"]),
        links=LinksConfig(trace_url=_trace_url((tree.get("links") or {}).get("trace_url"))),
        raw=tree,
    )
    cfg.gate_settings()      # validates gate.rules and the gate settings (names the bad key)
    return cfg


def default_config() -> Config:
    return build(copy.deepcopy(DEFAULTS))
