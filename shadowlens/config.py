"""Configuration: defaults, YAML file, ``SHADOWLENS_*`` env overrides, validation.

This is the only module that reads environment variables. Every key is optional;
unknown keys are an error that names the key (exit status 2 from the CLI).

>>> cfg = load(None, env={"SHADOWLENS_TRACES__IDLE_SECONDS": "9"})
>>> cfg.traces.idle_seconds
9.0
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .collector.errors import ConfigError
from .collector.security import TLSFiles, tls_files

ENV_PREFIX = "SHADOWLENS_"

# The release gate's default rules (CONTRACT §7) and settings; analyzers/rules.py validates them.
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

# The contract's keys (CONTRACT §3) plus the developers' additions (documented in README).
DEFAULTS: dict[str, Any] = {
    "receivers": {
        "grpc": {"endpoint": "127.0.0.1:4317", "max_message_mib": 64, "max_workers": 32},
        # read_timeout: a request's headers and body; idle_timeout: the wait for the next request on a
        # connection (the OpenTelemetry Collector's confighttp idles out after 1m too); max_connections:
        # connection threads, beyond it new connections wait (README "What the OTLP receivers promise")
        "http": {"endpoint": "127.0.0.1:4318", "max_body_mib": 64,
                 "read_timeout": "30s", "idle_timeout": "60s", "max_connections": 128},
        "scanner": "auto",          # auto | c | python: the OTLP wire scanner (decode/scan.py)
    },
    # developers' additions: max_models / max_evals cap the model and eval labels as cohorts.max_values caps
    # a cohort label (README "Metrics": the most series /metrics can have)
    "metrics": {"endpoint": "0.0.0.0:9464", "max_models": 50, "max_evals": 10},
    "store": {
        "data_dir": "./data",
        "retention": "7d",
        # developers' additions
        "queue_max_spans": 262144,
        "dedup_max_keys": 4_000_000,
        "retention_check": "1m",
        # DuckDB tuning, measured on 2 cores (README "Ingest performance")
        "duckdb_threads": 1,
        "duckdb_memory_limit": "128MB",
        "checkpoint_threshold": "64MB",
    },
    "traces": {"idle_seconds": 5, "max_seconds": 300, "max_open": 100000},
    "window": "15m",
    # developers' addition: the analyzers' own knobs
    "analyzers": {"enabled": True, "window_refresh": "5s"},
    "cohorts": {
        "max_values": 50,
        "max_series": 100,          # developers' addition: route x cohort combinations, see README "Metrics"
        "labels": {
            "intent": ["cohort.intent"],
            "language": ["cohort.language"],
            "tier": ["cohort.tier"],
        },
    },
    "evals": {
        "threshold": 0.5,
        "thresholds": {},
        "fail_labels": ["fail", "failed", "false", "incorrect", "unsafe"],
    },
    "prices": [],
    "routes": {},
    "gate": {"rules": copy.deepcopy(DEFAULT_GATE_RULES), **GATE_SETTINGS_DEFAULTS},
    # developers' addition: serve writes closed hours to a Parquet lake (exporters/parquet.py); dir "" = off
    "export": {"parquet": {"dir": "", "interval": "1h", "delay": "10m", "source": "",
                           "tables": ["spans", "traces", "evals", "logs"]}},
    # where the team's trace UI shows a trace: "{trace_id}" is replaced, e.g.
    # https://tempo.example/explore?...{trace_id}...; empty: trace ids are printed, not linked
    "links": {"trace_url": ""},
}

# Security keys (CONTRACT §8), all off by default; collector/security.py reads them. Empty = not set.
for _section in (DEFAULTS["receivers"]["grpc"], DEFAULTS["receivers"]["http"], DEFAULTS["metrics"]):
    _section["tls"] = {"cert_file": "", "key_file": "", "client_ca_file": ""}
DEFAULTS["receivers"]["auth"] = {"bearer_token_file": ""}
DEFAULTS["metrics"]["auth"] = {"bearer_token_file": ""}

# Sections whose children are user data (names chosen by the user), not fixed keys.
FREE_FORM = {("cohorts", "labels"), ("routes",), ("evals", "thresholds"), ("prices",)}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any, key: str = "duration") -> float:
    """'15m' -> 900.0; plain numbers are seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a duration (use e.g. 30s, 15m, 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_endpoint(value: str, key: str) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ConfigError(f"{key}: {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ReceiversConfig:
    grpc: Endpoint
    grpc_max_bytes: int
    grpc_max_workers: int
    http: Endpoint
    http_max_bytes: int
    scanner: str = "auto"
    grpc_tls: TLSFiles | None = None
    http_tls: TLSFiles | None = None
    token_file: str | None = None       # receivers.auth.bearer_token_file
    http_read_timeout_s: float = 30.0
    http_idle_timeout_s: float = 60.0
    http_max_connections: int = 128


@dataclass(frozen=True)
class StoreConfig:
    data_dir: Path
    retention_s: float
    queue_max_spans: int
    dedup_max_keys: int
    retention_check_s: float
    duckdb_threads: int = 1
    duckdb_memory_limit: str = "128MB"
    checkpoint_threshold: str = "64MB"


@dataclass(frozen=True)
class EvalConfig:
    threshold: float
    thresholds: Mapping[str, float]
    fail_labels: frozenset[str]

    def passed(self, name: str | None, passed: bool | None, label: str | None, score: float | None) -> bool | None:
        """The eval outcome per CONTRACT §4: explicit flag, else fail label, else score threshold."""
        if passed is not None:
            return passed
        if label is not None:
            low = label.strip().lower()
            if low in self.fail_labels:
                return False
            if score is None:
                return True
        if score is not None:
            return score >= self.thresholds.get(name or "", self.threshold)
        return None


@dataclass(frozen=True)
class TracesConfig:
    idle_seconds: float
    max_seconds: float
    max_open: int


@dataclass(frozen=True)
class AnalyzersConfig:
    enabled: bool
    window_refresh_s: float


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
    receivers: ReceiversConfig
    metrics: Endpoint
    store: StoreConfig
    traces: TracesConfig
    window_s: float
    analyzers: AnalyzersConfig
    cohort_labels: Mapping[str, tuple[str, ...]]
    cohort_max_values: int
    evals: EvalConfig
    prices: tuple[Mapping[str, Any], ...]
    routes: Mapping[str, tuple[str, ...]]
    gate: Mapping[str, Any]
    metrics_tls: TLSFiles | None = None
    metrics_token_file: str | None = None
    export_parquet: ExportParquetConfig | None = None
    links: LinksConfig = LinksConfig()
    cohort_max_series: int = 100
    metrics_max_models: int = 50
    metrics_max_evals: int = 10
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def gate_settings(self):
        """The ``gate`` section as analyzers.rules.GateSettings; a bad rule raises ConfigError naming it."""
        from shadowlens.analyzers.rules import RuleError, parse_gate  # config stays importable alone
        try:
            return parse_gate(self.gate)
        except RuleError as exc:
            raise ConfigError(str(exc)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.raw), sort_keys=False)


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
        if path in FREE_FORM or any(path[: len(f)] == f for f in FREE_FORM if len(path) >= len(f)):
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
            if sub in FREE_FORM or any(sub[: len(f)] == f for f in FREE_FORM):
                node = node.setdefault(part, {})
                continue
            raise ConfigError(f"unknown config key '{'.'.join(sub)}' from environment variable {source}")
        node = node[part]
    leaf = path[-1]
    parent = path[:-1]
    if leaf not in node and not (parent in FREE_FORM or any(parent[: len(f)] == f for f in FREE_FORM)):
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


def _int(tree: Mapping, *path: str, minimum: int = 0) -> int:
    value = tree
    for p in path:
        value = value[p]
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{'.'.join(path)}: {value!r} is not an integer") from None
    if out < minimum:
        raise ConfigError(f"{'.'.join(path)}: must be >= {minimum}, got {out}")
    return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*$", re.IGNORECASE)


def _size(value: Any, key: str) -> str:
    """A byte size as DuckDB accepts it ('256MB')."""
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a size (use e.g. 256MB, 1GB)")
    return f"{m.group(1)}{m.group(2).upper().replace('I', 'i')}"


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> str:
    if str(value) not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes", "on"):
        return True
    if str(value).strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{key}: {value!r} is not true or false")


def _positive_duration(value: Any, key: str) -> float:
    out = parse_duration(value, key)
    if out <= 0:
        raise ConfigError(f"{key}: must be more than 0 (a timeout of 0 would refuse every request), got {value!r}")
    return out


def _float(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a number") from None


def _token_file(section: Any, key: str) -> str | None:
    if section in (None, ""):
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key} must be a mapping with bearer_token_file")
    return str(section.get("bearer_token_file") or "") or None


def _trace_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or "{trace_id}" not in value:
        raise ConfigError(f"links.trace_url: {value!r} has no {{trace_id}} placeholder; write the trace UI's URL"
                          " with {trace_id} where the trace id goes, e.g. https://tempo.example/trace/{trace_id}")
    return value


def build(tree: dict) -> Config:
    r = tree["receivers"]
    receivers = ReceiversConfig(
        grpc=Endpoint(*parse_endpoint(r["grpc"]["endpoint"], "receivers.grpc.endpoint")),
        grpc_max_bytes=_int(tree, "receivers", "grpc", "max_message_mib", minimum=1) << 20,
        grpc_max_workers=_int(tree, "receivers", "grpc", "max_workers", minimum=1),
        http=Endpoint(*parse_endpoint(r["http"]["endpoint"], "receivers.http.endpoint")),
        http_max_bytes=_int(tree, "receivers", "http", "max_body_mib", minimum=1) << 20,
        scanner=_choice(r["scanner"], ("auto", "c", "python"), "receivers.scanner"),
        grpc_tls=tls_files(r["grpc"].get("tls"), "receivers.grpc.tls"),
        http_tls=tls_files(r["http"].get("tls"), "receivers.http.tls"),
        token_file=_token_file(r.get("auth"), "receivers.auth"),
        http_read_timeout_s=_positive_duration(r["http"]["read_timeout"], "receivers.http.read_timeout"),
        http_idle_timeout_s=_positive_duration(r["http"]["idle_timeout"], "receivers.http.idle_timeout"),
        http_max_connections=_int(tree, "receivers", "http", "max_connections", minimum=1),
    )
    s = tree["store"]
    store = StoreConfig(
        data_dir=Path(str(s["data_dir"])),
        retention_s=parse_duration(s["retention"], "store.retention"),
        queue_max_spans=_int(tree, "store", "queue_max_spans", minimum=1),
        dedup_max_keys=_int(tree, "store", "dedup_max_keys", minimum=0),
        retention_check_s=parse_duration(s["retention_check"], "store.retention_check"),
        duckdb_threads=_int(tree, "store", "duckdb_threads", minimum=1),
        duckdb_memory_limit=_size(s["duckdb_memory_limit"], "store.duckdb_memory_limit"),
        checkpoint_threshold=_size(s["checkpoint_threshold"], "store.checkpoint_threshold"),
    )
    labels = tree["cohorts"]["labels"]
    if not isinstance(labels, Mapping):
        raise ConfigError("cohorts.labels must map a label name to a list of attribute keys")
    cohort_labels = {}
    for name, keys in labels.items():
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", str(name)):
            raise ConfigError(f"cohorts.labels: {name!r} is not a valid label name (lower-case letters, digits, _)")
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"cohorts.labels.{name} must be a list of attribute keys")
        cohort_labels[str(name)] = tuple(keys)
    ev = tree["evals"]
    routes = tree["routes"] or {}
    if not isinstance(routes, Mapping):
        raise ConfigError("routes must map a route name to a list of model regexes")
    route_map = {}
    for name, pats in routes.items():
        pats = [pats] if isinstance(pats, str) else pats
        for pat in pats:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ConfigError(f"routes.{name}: {pat!r} is not a valid regex ({exc})") from None
        route_map[str(name)] = tuple(pats)
    prices = tree["prices"] or []
    if not isinstance(prices, list):
        raise ConfigError("prices must be a list of {match, input, output, ...} entries")
    cfg = Config(
        receivers=receivers,
        metrics=Endpoint(*parse_endpoint(tree["metrics"]["endpoint"], "metrics.endpoint")),
        store=store,
        traces=TracesConfig(
            idle_seconds=_float(tree["traces"]["idle_seconds"], "traces.idle_seconds"),
            max_seconds=_float(tree["traces"]["max_seconds"], "traces.max_seconds"),
            max_open=_int(tree, "traces", "max_open", minimum=1),
        ),
        window_s=parse_duration(tree["window"], "window"),
        analyzers=AnalyzersConfig(
            enabled=_bool(tree["analyzers"]["enabled"], "analyzers.enabled"),
            window_refresh_s=parse_duration(tree["analyzers"]["window_refresh"], "analyzers.window_refresh"),
        ),
        cohort_labels=cohort_labels,
        cohort_max_values=_int(tree, "cohorts", "max_values", minimum=1),
        cohort_max_series=_int(tree, "cohorts", "max_series", minimum=1),
        metrics_max_models=_int(tree, "metrics", "max_models", minimum=1),
        metrics_max_evals=_int(tree, "metrics", "max_evals", minimum=1),
        evals=EvalConfig(
            threshold=_float(ev["threshold"], "evals.threshold"),
            thresholds={str(k): _float(v, f"evals.thresholds.{k}") for k, v in (ev["thresholds"] or {}).items()},
            fail_labels=frozenset(str(x).lower() for x in ev["fail_labels"]),
        ),
        prices=tuple(prices),
        routes=route_map,
        gate=tree["gate"] or {},
        metrics_tls=tls_files(tree["metrics"].get("tls"), "metrics.tls"),
        metrics_token_file=_token_file(tree["metrics"].get("auth"), "metrics.auth"),
        export_parquet=_export_parquet(tree["export"]["parquet"]),
        links=LinksConfig(trace_url=_trace_url((tree.get("links") or {}).get("trace_url"))),
        raw=tree,
    )
    cfg.gate_settings()      # validates gate.rules and the gate settings (names the bad key)
    return cfg


# the lake's tables (exporters/parquet.py exports them); named here so that loading the config, which the
# ingest frontend does, never imports pyarrow
EXPORT_TABLES = ("spans", "traces", "evals", "logs")


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


def default_config() -> Config:
    return build(copy.deepcopy(DEFAULTS))
