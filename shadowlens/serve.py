"""The composition root of ``shadowlens serve``: wires the stages, starts them downstream-first,
stops them upstream-first on SIGTERM/SIGINT (stop accepting, drain, commit, exit 0).

    frontend process:  receivers (gRPC, HTTP) -> ExportHandler (check) -> Intake: payload log (fsync) -> acknowledge
                                                   | the record's place over a pipe
    decoding:          payload -> normalize -> Arrow batch (in this process; in the decoder process under load)
                                                   | a Batch; Acks go back to the frontend
    this process:      IngestSupervisor -> StoreWriter (grouped inserts) -> DuckDB -> TraceAssembler -> aggregates
                                                                               -> PairingSink (pairs, sums)
                                                                               -> GateStateSink (the gate's sums)
                       QueryServer, Retention, WindowRefresher, GateRefresher (compare -> Verdict);
                       /metrics and /gate read stats and the latest snapshots
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from shadowlens.analyzers.aggregates import StreamingAggregates
from shadowlens.analyzers.assembly import TraceAssembler
from shadowlens.analyzers.cohorts import CohortLimiter
from shadowlens.analyzers.fleet import DurationSketch
from shadowlens.analyzers.gate import GateRefresher
from shadowlens.analyzers.gate_state import GateState, GateStateSink
from shadowlens.analyzers.pairing import PairingSink
from shadowlens.analyzers.reprice import reprice_write
from shadowlens.analyzers.rules import GateSettings
from shadowlens.analyzers.window import WindowQuery, WindowRefresher
from shadowlens.analyzers.window_state import WindowState
from shadowlens.exporters.analysis import AnalysisMetrics, GateMetrics
from shadowlens.exporters.http import MetricsServer
from shadowlens.exporters.parquet import ExportCollector, ParquetRunner, store_source
from shadowlens.exporters.prometheus import IngestCollector, StoreBudgetCollector
from shadowlens.exporters.verdict_json import http_status, verdict_to_json

from . import startup
from .collector import security
from .collector.counters import IngestCounters
from .collector.decode.normalize import Normalizer
from .collector.decode.pricing import PriceTable
from .collector.ingest import memory
from .collector.ingest.messages import IngestSettings
from .collector.ingest.supervisor import IngestSupervisor
from .collector.store.compaction import Compactor
from .collector.store.diskfull import readiness
from .collector.store.files import private_umask
from .collector.store.reader import QueryServer
from .collector.store.retention import Retention, store_bytes
from .collector.store.segments import SEGMENTS_DIR
from .collector.store.writer import StoreWriter
from .config import Config

log = logging.getLogger("shadowlens.serve")


@dataclass
class App:
    """The one explicit app context: every long-lived component, in start order."""
    config: Config
    stats: IngestCounters
    store: StoreWriter
    components: list = field(default_factory=list)
    metrics: MetricsServer | None = None
    ingest: IngestSupervisor | None = None
    ready: bool = False

    def start(self) -> None:
        started = []
        try:
            for c in self.components:
                c.start()
                started.append(c)
        except BaseException:
            for c in reversed(started):
                c.shutdown()
            raise
        self.ready = True

    def shutdown(self, timeout: float = 30.0) -> None:
        self.ready = False
        for c in reversed(self.components):
            try:
                c.shutdown(timeout)
            except Exception:  # keep stopping the rest
                log.exception("error while stopping %s", type(c).__name__)


def build_app(cfg: Config) -> App:
    gate = cfg.gate_settings()           # a bad gate rule fails here, before anything starts
    stats = IngestCounters(max_models=cfg.metrics_max_models)
    data_dir = cfg.store.data_dir
    store = StoreWriter(data_dir, cfg.cohort_labels, stats, settings=cfg.store)
    app = App(config=cfg, stats=stats, store=store)
    registry = CollectorRegistry(auto_describe=False)
    child_counters: dict = {}      # the ingest processes' counters, summed
    registry.register(IngestCollector(stats, lambda: store_bytes(data_dir), child_counters,
                                      max_models=cfg.metrics_max_models, derived=store.derived.snapshot))
    listeners = security.load(cfg)
    app.metrics = MetricsServer(cfg.metrics.host, cfg.metrics.port, registry,
                                ready=lambda: readiness(app.ready, stats, child_counters),
                                tls=listeners.metrics_tls, token=listeners.metrics_token)
    PriceTable.load(cfg.prices)        # a bad user price entry fails here, before anything starts
    app.ingest = IngestSupervisor(store, ingest_settings(cfg), child_counters)
    store.replay_normalizer = Normalizer(cfg.cohort_labels, cfg.evals, PriceTable.load(cfg.prices), cfg.receivers.scanner)
    retention = Retention(data_dir, store.write, cfg.store.retention_s, cfg.store.retention_check_s,
                          current_segment=store.current_segment, max_bytes=cfg.store.max_bytes, cursor=store.cursor)
    registry.register(StoreBudgetCollector(retention.snapshot))
    analyzers = _analyzers(cfg, gate, store, app.metrics) if cfg.analyzers.enabled else []
    # downstream first: the store must be open before anything can submit to it
    # reprice uses the price entries of the config the *command* was given (the current table),
    # which may be newer than what this server loaded at start; the store's writer runs it
    requests = {"reprice": lambda req: store.write(reprice_write(PriceTable.load(req.get("prices") or []),
                                                                 req.get("since_s"))).result().as_table()}
    app.components = [store, QueryServer(data_dir, store.cursor, requests, sync=app.ingest.sync),
                      retention, *_compaction(cfg, store), *analyzers, *_parquet_export(cfg, store, registry), app.metrics,
                      app.ingest]
    return app


def _compaction(cfg: Config, store: StoreWriter) -> list:
    """store.compression_level > 0: closed payload segments compressed on a low-priority thread."""
    if not cfg.store.compression_level:
        return []
    compactor = Compactor(cfg.store.data_dir / SEGMENTS_DIR, store.current_segment, cfg.store.compression_level,
                          after_pass=lambda: store.decoder is not None and store.decoder.segments.prune())
    store.stats.gauges.update(store_compaction_pending_bytes=compactor.pending_bytes,
                              store_compacted_input_bytes=lambda: float(compactor.input_bytes),
                              store_compacted_output_bytes=lambda: float(compactor.output_bytes))
    return [compactor]


def ingest_settings(cfg: Config) -> IngestSettings:
    """What the ingest processes need of the configuration (they never load it themselves)."""
    return IngestSettings(data_dir=cfg.store.data_dir, receivers=cfg.receivers, cohort_labels=dict(cfg.cohort_labels),
                          evals=cfg.evals, prices=tuple(cfg.prices), queue_max_spans=cfg.store.queue_max_spans,
                          metrics_max_models=cfg.metrics_max_models)


def _parquet_export(cfg: Config, store: StoreWriter, registry: CollectorRegistry) -> list:
    """export.parquet: closed hours into the lake, on the exporter's own thread and cursor."""
    p = cfg.export_parquet
    if p is None or not p.dir:
        return []
    runner = ParquetRunner(store.cursor, Path(p.dir), lambda: store_source(cfg.store.data_dir, p.source), p.tables,
                           p.interval_s, p.delay_s)
    registry.register(ExportCollector(runner))
    return [runner]


def _analyzers(cfg: Config, gate: GateSettings, store: StoreWriter, metrics: MetricsServer) -> list:
    """store -> TraceAssembler -> StreamingAggregates, PairingSink; WindowRefresher, GateRefresher;
    all exposed by AnalysisMetrics / GateMetrics, the verdict also at /gate."""
    limiter = CohortLimiter(cfg.cohort_labels, cfg.cohort_max_values, forget_after_s=2 * cfg.window_s)
    aggregates = StreamingAggregates(limiter, max_series=cfg.cohort_max_series, max_models=cfg.metrics_max_models,
                                     max_evals=cfg.metrics_max_evals)
    pairing = PairingSink(gate, limiter)
    sketch = DurationSketch(limiter)      # the fleet's p99 (analyzers/fleet.py)
    # the gate's window as mergeable sums (analyzers/gate_state.py): a refresh merges them instead of rescanning
    gate_state = GateStateSink(GateState(gate, cfg.cohort_labels, pending_s=gate.pairing_window_s
                                         + cfg.traces.max_seconds + cfg.traces.idle_seconds))
    assembler = TraceAssembler(store, cfg.cohort_labels, cfg.traces.idle_seconds, cfg.traces.max_seconds, cfg.routes,
                               max_open=cfg.traces.max_open, sinks=[aggregates, pairing, sketch, gate_state],
                               content_pairing_s=cfg.traces.content_pairing_seconds)

    def forget(older_than_s: float) -> None:
        aggregates.forget_stale(older_than_s)
        for each in aggregates.limiters:
            each.forget_stale()
        sketch.forget()

    # the window's rows in memory, fed by the assembler's writes: a refresh no longer reads the window from
    # DuckDB (analyzers/window_state.py)
    state = WindowState(WindowQuery(store.cursor, limiter, cfg.window_s, combos=aggregates.combos,
                                    eval_names=aggregates.eval_names), derived=store.derived.done)
    assembler.writes.append(state.on_write)
    window = WindowRefresher(state, cfg.analyzers.window_refresh_s, forget=forget, generation=state.generation)
    verdicts = GateRefresher(store.cursor, gate, cfg.cohort_labels, trace_url=cfg.links.trace_url, sink=gate_state)
    # rounds wait for more due traces at low rates (assembly.ROUND_MIN_DUE); these readers never do
    window.before = verdicts.before = assembler.round_now
    analysis = AnalysisMetrics(aggregates, lambda: window.latest, assembler.stats, limiter)
    gate_metrics = GateMetrics(lambda: verdicts.latest, pairing, cfg.cohort_labels, lambda: verdicts.last_seconds,
                               limiter=limiter, sketch=sketch)
    metrics.extra = lambda openmetrics: analysis.render(openmetrics) + gate_metrics.render(openmetrics)

    def gate_route(query: dict) -> tuple[int, object]:
        flag = lambda name: query.get(name, "").lower() in ("1", "true", "yes")
        v = verdicts.latest
        if v is None:
            return 200 if flag("always_ok") else 503, {
                "verdict": "inconclusive", "reasons": ["the first gate evaluation is still running"], "rules": []}
        return http_status(v.verdict, strict=flag("strict"), always_ok=flag("always_ok")), verdict_to_json(v)

    metrics.json_routes["/gate"] = gate_route
    return [assembler, window, verdicts]


def run(cfg: Config, data_dir_text: str | None = None, ready_file: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status. A start that fails on something outside
    (a held data dir, a taken address) raises startup.StartupError and leaves no new store behind.
    ``ready_file``: written once every listener is up, with this process's pid and the addresses,
    so that a parent (``shadowlens demo``) knows the server it reaches is the one it started."""
    data_dir_text = data_dir_text or str(cfg.store.data_dir)
    startup.check(cfg, data_dir_text)
    private_umask()     # DuckDB's files (database, WAL, spills) and the ingest processes' files: owner-only
    # The GIL is handed over every 1 ms instead of 5 ms: the store writer (DuckDB's binding takes the
    # GIL back often) gets it back sooner from the analyzer threads that share this process.
    sys.setswitchinterval(0.001)
    memory.limit_arenas()       # before the components start their threads
    footprint = startup.StoreFootprint(cfg.store.data_dir)
    stop = threading.Event()
    child_died = threading.Event()
    try:
        app = build_app(cfg)

        def on_child_exit() -> None:
            child_died.set()
            stop.set()
        app.ingest.on_child_exit = on_child_exit
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        app.start()
    except BaseException as exc:
        footprint.take_back()
        pid = startup.lock_error_pid(exc)       # another serve won the race for the store after the check
        if pid is not None:
            raise startup.StartupError(startup.data_dir_in_use(data_dir_text, pid)) from None
        raise
    log.info("shadowlens serving: OTLP/gRPC %s, OTLP/HTTP %s, metrics %s://%s/metrics, store %s",
             cfg.receivers.grpc, cfg.receivers.http, "https" if cfg.metrics_tls else "http", cfg.metrics,
             cfg.store.data_dir)
    for warning in security.exposure_warnings(cfg):
        log.warning(warning)
    if ready_file:
        _write_ready_file(ready_file, cfg, app)
    stop.wait()
    if child_died.is_set():
        log.error("an ingest process exited unexpectedly; stopping with exit status 1 so that a supervisor restarts"
                  " shadowlens (every acknowledged span is in the payload log and is inserted on the next start)")
    else:
        log.info("shutting down: stop accepting, drain, commit")
    app.shutdown()
    if child_died.is_set():
        return 1
    log.info("stopped cleanly")
    return 0


def _write_ready_file(path: str, cfg: Config, app: App) -> None:
    doc = {"pid": os.getpid(), **{key: str(ep) for key, ep in startup.endpoints(cfg).items()}}
    doc["metrics.endpoint"] = f"{cfg.metrics.host}:{app.metrics.port}"     # the bound port, also for port 0
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)      # the reader never sees half a file
