"""The collector's settings: receivers, store and the eval pass/fail rule, each with its defaults, written once.

Each section's defaults are the config keys as a user writes them (``RECEIVERS``, ``STORE``, ``EVALS``);
``parse_*`` turns a merged section into a frozen dataclass and names the key of any bad value.
``shadowlens/config.py`` composes these sections with the analyzers' (``analyzers/settings.py``).
The value parsers here (durations, endpoints, sizes ...) serve every layer's settings.

>>> parse_store(STORE).retention_s
604800.0
>>> parse_receivers(RECEIVERS).grpc_max_bytes == 64 << 20
True
>>> parse_evals(EVALS).passed("helpful", None, None, 0.4)
False
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .security import TLSFiles, tls_files

_NO_TLS = {"cert_file": "", "key_file": "", "client_ca_file": ""}    # security keys (CONTRACT §8): off

RECEIVERS: dict[str, Any] = {
    "grpc": {"endpoint": "127.0.0.1:4317", "max_message_mib": 64, "max_workers": 32, "tls": dict(_NO_TLS)},
    # read_timeout: a request's headers and body; idle_timeout: the wait for the next request on a
    # connection (the OpenTelemetry Collector's confighttp idles out after 1m too); max_connections:
    # connection threads, beyond it new connections wait (README "What the OTLP receivers promise")
    "http": {"endpoint": "127.0.0.1:4318", "max_body_mib": 64,
             "read_timeout": "30s", "idle_timeout": "60s", "max_connections": 128, "tls": dict(_NO_TLS)},
    "scanner": "auto",          # auto | c | python: the OTLP wire scanner (decode/scan.py)
    # decoder_process: where acknowledged requests are decoded (collector/ingest/supervisor.py). auto: in
    # serve's process while decoding takes under a quarter of a core, in a decoder process of its own
    # (started then, stopped after 5 minutes under a twentieth) when it takes more; always: in the decoder
    # process from the start; never: in serve's process only.
    "decoder_process": "auto",
    "auth": {"bearer_token_file": ""},
}

STORE: dict[str, Any] = {
    "data_dir": "./data",
    "retention": "7d",
    # developers' additions
    # max_bytes: a disk budget for the store, as Prometheus' storage.tsdb.retention.size: over it the oldest
    # segments and their rows go first (retention.py). 0 = off, like Prometheus' default.
    "max_bytes": 0,
    # compression_level: zstd level of closed payload segments (store/compaction.py); 0 = keep them plain.
    # 3 measured 7.7x at ~300 MB/s of one core on the bench traffic; higher levels gain little and cost a lot.
    "compression_level": 3,
    "queue_max_spans": 262144,
    "dedup_max_keys": 4_000_000,
    "retention_check": "1m",
    # One DuckDB thread and a larger checkpoint threshold: with 2 cores shared with the decoder, parallel
    # inserts and frequent checkpoints cost more than they give (measured: 53k -> 65k spans/s for the commit
    # path alone). The memory limit bounds the sidecar's RSS: DuckDB keeps the blocks it read and wrote
    # cached up to it. 64MB since checkpoints run under load (store/writer.py, _write_replay_from): a
    # closed loop's median 548 -> 515 MB, with the window full 368 -> 346 MB in serve's main process,
    # and the same acknowledged rate (bench/ingest.py, alternating: 88.2k and 88.2k with 128MB, 94.0k and
    # 87.7k with 64MB). Before, the rows of a WAL that never checkpointed had to fit in it.
    "duckdb_threads": 1,
    "duckdb_memory_limit": "64MB",
    "checkpoint_threshold": "64MB",
}

# CONTRACT §4: fail = passed false, a label in the fail set, or a score below the eval's threshold
EVALS: dict[str, Any] = {
    "threshold": 0.5,
    "thresholds": {},
    "fail_labels": ["fail", "failed", "false", "incorrect", "unsafe"],
}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ReceiversSettings:
    grpc: Endpoint
    grpc_max_bytes: int
    grpc_max_workers: int
    http: Endpoint
    http_max_bytes: int
    scanner: str
    decoder_process: str                # auto | always | never
    grpc_tls: TLSFiles | None
    http_tls: TLSFiles | None
    token_file: str | None              # receivers.auth.bearer_token_file
    http_read_timeout_s: float
    http_idle_timeout_s: float
    http_max_connections: int


@dataclass(frozen=True)
class StoreSettings:
    data_dir: Path
    retention_s: float
    queue_max_spans: int
    dedup_max_keys: int
    retention_check_s: float
    duckdb_threads: int
    duckdb_memory_limit: str
    checkpoint_threshold: str
    max_bytes: int              # store.max_bytes; 0 = no budget
    compression_level: int = 3  # store.compression_level; 0 = payload segments stay uncompressed


@dataclass(frozen=True)
class EvalSettings:
    """The eval pass/fail rule; decoding applies it to each eval result a span or log record carries."""
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


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*$", re.IGNORECASE)


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


def endpoint(value: str, key: str) -> Endpoint:
    return Endpoint(*parse_endpoint(value, key))


def integer(value: Any, key: str, minimum: int = 0) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not an integer") from None
    if out < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {out}")
    return out


def number(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a number") from None


def size(value: Any, key: str) -> str:
    """A byte size as DuckDB accepts it ('256MB')."""
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a size (use e.g. 256MB, 1GB)")
    return f"{m.group(1)}{m.group(2).upper().replace('I', 'i')}"


_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def byte_count(value: Any, key: str) -> int:
    """A number of bytes: an integer, or a size with a unit ('50GiB' = 50 * 2**30, '500MB' = 500 * 10**6, as
    DuckDB reads them); 0, '' or null = off.

    >>> byte_count("1.5KiB", "k"), byte_count(2048, "k"), byte_count(None, "k")
    (1536, 2048, 0)
    """
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a size (use bytes, or e.g. 500MB, 50GiB; 0 = off)")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0 (0 = off), got {value!r}")
        return int(value)
    m = _BYTES.match(str(value))
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a size (use bytes, or e.g. 500MB, 50GiB; 0 = off)")
    return int(float(m.group(1)) * _BYTE_UNITS[(m.group(2) or "b").lower()])


def choice(value: Any, allowed: tuple[str, ...], key: str) -> str:
    if str(value) not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def boolean(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes", "on"):
        return True
    if str(value).strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{key}: {value!r} is not true or false")


def positive_duration(value: Any, key: str) -> float:
    out = parse_duration(value, key)
    if out <= 0:
        raise ConfigError(f"{key}: must be more than 0 (a timeout of 0 would refuse every request), got {value!r}")
    return out


def token_file(section: Any, key: str) -> str | None:
    """``<key>.bearer_token_file``, or None when unset."""
    if section in (None, ""):
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key} must be a mapping with bearer_token_file")
    return str(section.get("bearer_token_file") or "") or None


def parse_receivers(r: Mapping[str, Any]) -> ReceiversSettings:
    """The ``receivers`` section (merged over ``RECEIVERS``)."""
    grpc, http = r["grpc"], r["http"]
    return ReceiversSettings(
        grpc=endpoint(grpc["endpoint"], "receivers.grpc.endpoint"),
        grpc_max_bytes=integer(grpc["max_message_mib"], "receivers.grpc.max_message_mib", minimum=1) << 20,
        grpc_max_workers=integer(grpc["max_workers"], "receivers.grpc.max_workers", minimum=1),
        http=endpoint(http["endpoint"], "receivers.http.endpoint"),
        http_max_bytes=integer(http["max_body_mib"], "receivers.http.max_body_mib", minimum=1) << 20,
        scanner=choice(r["scanner"], ("auto", "c", "python"), "receivers.scanner"),
        decoder_process=choice(r["decoder_process"], ("auto", "always", "never"), "receivers.decoder_process"),
        grpc_tls=tls_files(grpc.get("tls"), "receivers.grpc.tls"),
        http_tls=tls_files(http.get("tls"), "receivers.http.tls"),
        token_file=token_file(r.get("auth"), "receivers.auth"),
        http_read_timeout_s=positive_duration(http["read_timeout"], "receivers.http.read_timeout"),
        http_idle_timeout_s=positive_duration(http["idle_timeout"], "receivers.http.idle_timeout"),
        http_max_connections=integer(http["max_connections"], "receivers.http.max_connections", minimum=1),
    )


def parse_store(s: Mapping[str, Any]) -> StoreSettings:
    """The ``store`` section (merged over ``STORE``)."""
    return StoreSettings(
        data_dir=Path(str(s["data_dir"])),
        retention_s=parse_duration(s["retention"], "store.retention"),
        queue_max_spans=integer(s["queue_max_spans"], "store.queue_max_spans", minimum=1),
        dedup_max_keys=integer(s["dedup_max_keys"], "store.dedup_max_keys", minimum=0),
        retention_check_s=parse_duration(s["retention_check"], "store.retention_check"),
        duckdb_threads=integer(s["duckdb_threads"], "store.duckdb_threads", minimum=1),
        duckdb_memory_limit=size(s["duckdb_memory_limit"], "store.duckdb_memory_limit"),
        checkpoint_threshold=size(s["checkpoint_threshold"], "store.checkpoint_threshold"),
        max_bytes=byte_count(s["max_bytes"], "store.max_bytes"),
        compression_level=compression_level(s.get("compression_level", STORE["compression_level"])),
    )


def compression_level(value: Any, key: str = "store.compression_level") -> int:
    level = integer(value, key, minimum=0)
    if level > 22:
        raise ConfigError(f"{key}: zstd levels go up to 22 (0 = no compression), got {level}")
    return level


def parse_evals(ev: Mapping[str, Any]) -> EvalSettings:
    """The ``evals`` section (merged over ``EVALS``)."""
    return EvalSettings(
        threshold=number(ev["threshold"], "evals.threshold"),
        thresholds={str(k): number(v, f"evals.thresholds.{k}") for k, v in (ev["thresholds"] or {}).items()},
        fail_labels=frozenset(str(x).lower() for x in ev["fail_labels"]),
    )


def default_receivers() -> ReceiversSettings:
    return parse_receivers(RECEIVERS)


def default_store() -> StoreSettings:
    return parse_store(STORE)


def default_evals() -> EvalSettings:
    return parse_evals(EVALS)
