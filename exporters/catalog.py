"""Every metric name shadowlens exposes, declared once (CONTRACT §6). Never rename one."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str          # without the _total suffix for counters (prometheus_client adds it)
    type: str          # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str


SELF_METRICS = (
    MetricSpec("shadowlens_spans_received", "counter", ("receiver",), "Spans received, by receiver (grpc|http)."),
    MetricSpec("shadowlens_spans_rejected", "counter", ("reason",),
               "Spans rejected as invalid and reported in partial_success, by reason."),
    MetricSpec("shadowlens_spans_duplicate", "counter", (), "Spans received again (same trace_id+span_id), stored once."),
    MetricSpec("shadowlens_records_quarantined", "counter", ("stage",),
               "Acknowledged requests the store could not decode or insert, set aside in DATA_DIR/quarantine/ (by stage:"
               " decode, insert; read: payload-log bytes that no longer frame as a record) instead of failing the"
               " requests committed with them."),
    MetricSpec("shadowlens_log_records_received", "counter", ("receiver",), "OTLP log records received."),
    MetricSpec("shadowlens_log_records_rejected", "counter", ("reason",), "OTLP log records rejected as invalid."),
    MetricSpec("shadowlens_requests_refused", "counter", ("reason",),
               "Export requests refused whole (queue_full, too_large, invalid)."),
    MetricSpec("shadowlens_ingest_queue_spans", "gauge", (), "Spans accepted and waiting for their commit."),
    MetricSpec("shadowlens_unpriced_spans", "counter", ("model",), "LLM spans with tokens but no price."),
    MetricSpec("shadowlens_mixed_spans", "counter", ("gateway",),
               "Application spans a gateway wrote two calls' attributes onto (litellm: a non-LiteLLM span carrying"
               " metadata.is_silent_experiment); stored with route mixed, never compared."),
    MetricSpec("shadowlens_store_bytes", "gauge", (), "Bytes on disk: DuckDB file, its WAL and payload segments."),
    MetricSpec("shadowlens_store_compaction_pending_bytes", "gauge", (),
               "Bytes of closed payload segments not compressed yet: the compactor's lag (it may grow at peak and"
               " falls back once the rate drops; 0 when store.compression_level is 0)."),
    MetricSpec("shadowlens_store_compacted_input_bytes", "counter", (),
               "Bytes of payload segments compressed, before compression."),
    MetricSpec("shadowlens_store_compacted_output_bytes", "counter", (),
               "Bytes of payload segments compressed, after compression (input / output: the ratio)."),
    MetricSpec("shadowlens_store_commits", "counter", (), "Group commits (each covers every Export waiting)."),
    MetricSpec("shadowlens_store_commit_seconds", "counter", (),
               "Time spent in group commits, from taking the group to durable (rate / commits = mean commit)."),
    MetricSpec("shadowlens_store_insert_seconds", "counter", (), "Part of the commit time spent in DuckDB."),
    MetricSpec("shadowlens_store_derived_writes", "counter", ("write", "result"),
               "Writes the store writer runs between span commits (write: traces, retention, reprice, quarantine;"
               " result: done, failed)."),
    MetricSpec("shadowlens_store_derived_write_seconds", "counter", ("write",),
               "Time the store writer spends on derived writes; span commits wait meanwhile."),
    MetricSpec("shadowlens_store_sync_seconds", "counter", (), "Time spent in fdatasync of payload segments."),
    MetricSpec("shadowlens_store_write_errors", "counter", ("reason",),
               "Writes to the data disk refused for want of space (payload log appends and fdatasyncs, DuckDB"
               " commits and their retries), by reason (disk_full, disk_quota)."),
    MetricSpec("shadowlens_store_writable", "gauge", (),
               "0 while writes to the data disk fail for want of space (Exports get UNAVAILABLE / 503, /readyz is"
               " 503), else 1."),
    MetricSpec("shadowlens_store_max_bytes", "gauge", (), "The store's disk budget, store.max_bytes (0: none)."),
    MetricSpec("shadowlens_store_used_bytes", "gauge", (),
               "Bytes the disk budget counts: payload segments, DuckDB's used blocks and its WAL (DuckDB's file keeps"
               " the blocks a delete frees for reuse, so shadowlens_store_bytes may be larger)."),
    MetricSpec("shadowlens_store_retention_seconds", "gauge", (), "store.retention: how long data is kept at most."),
    MetricSpec("shadowlens_store_oldest_age_seconds", "gauge", (),
               "Age of the oldest data kept (its oldest payload's receive time); shown once the store holds data."
               " Below shadowlens_store_retention_seconds on an old store: the disk budget keeps less."),
    MetricSpec("shadowlens_store_budget_deleted_spans", "counter", (),
               "Spans deleted because the store was over store.max_bytes (the oldest first), not for their age."),
    MetricSpec("shadowlens_store_budget_deleted_segments", "counter", (),
               "Payload segments deleted because the store was over store.max_bytes."),
    MetricSpec("shadowlens_store_budget_deleted_bytes", "counter", (),
               "Payload-log bytes (segment files) deleted because the store was over store.max_bytes."),
)

# CONTRACT §6; <cohort> stands for the configured cohort labels (default intent, language, tier).
STREAMING_METRICS = (
    MetricSpec("shadowlens_traces", "counter", ("route", "<cohort>"), "Completed traces."),
    MetricSpec("shadowlens_trace_duration_seconds", "histogram", ("route", "<cohort>"),
               "Trace duration, first span start to last span end (exemplars: trace_id)."),
    MetricSpec("shadowlens_trajectory_steps", "histogram", ("route", "<cohort>"),
               "Trajectory length: distinct agent.trajectory.step values, else LLM + TOOL spans."),
    MetricSpec("shadowlens_trace_cost_usd", "histogram", ("route", "<cohort>"),
               "Cost per trace in USD (reported cost, else the price table); traces of unknown cost are left out."),
    MetricSpec("shadowlens_evals", "counter", ("route", "<cohort>", "eval", "result"), "Eval results by outcome."),
    MetricSpec("shadowlens_refusals", "counter", ("route", "<cohort>"), "Traces with a refusal."),
    MetricSpec("shadowlens_escalations", "counter", ("route", "<cohort>"), "Traces escalated to a human."),
    MetricSpec("shadowlens_tokens", "counter", ("route", "model", "type"), "Tokens of LLM spans (prompt|completion)."),
    MetricSpec("shadowlens_cost_usd", "counter", ("route", "model"), "USD spent by LLM spans."),
)
WINDOW_METRICS = (
    MetricSpec("shadowlens_window_traces", "gauge", ("route", "<cohort>"), "Traces completed in the window."),
    MetricSpec("shadowlens_window_trace_duration_seconds", "gauge", ("route", "<cohort>", "quantile"),
               "Exact trace duration quantiles over the window."),
    MetricSpec("shadowlens_window_trajectory_steps_mean", "gauge", ("route", "<cohort>"), "Mean steps over the window."),
    MetricSpec("shadowlens_window_cost_per_trace_usd", "gauge", ("route", "<cohort>"),
               "Mean cost per trace over the window (traces of known cost)."),
    MetricSpec("shadowlens_window_eval_fail_ratio", "gauge", ("route", "<cohort>", "eval"),
               "Failed / all eval results over the window."),
    MetricSpec("shadowlens_window_refusal_ratio", "gauge", ("route", "<cohort>"), "Refused / all traces over the window."),
    MetricSpec("shadowlens_window_escalation_ratio", "gauge", ("route", "<cohort>"),
               "Escalated / all traces over the window."),
)
ANALYZER_SELF_METRICS = (
    MetricSpec("shadowlens_late_spans", "counter", (), "Spans that arrived after their trace completed."),
    MetricSpec("shadowlens_open_traces", "gauge", (), "Traces waiting to complete."),
    MetricSpec("shadowlens_traces_evicted", "counter", (),
               "Open traces finalized early (as incomplete) because traces.max_open was reached."),
    MetricSpec("shadowlens_cohort_overflow", "counter", ("label",),
               "Values of a client-set label that became __overflow__ because its cap was reached: traces for a"
               " cohort label (cohorts.max_values) and for label=series (a new cohort combination past"
               " cohorts.max_series), a trace's model for label=model (metrics.max_models), eval results for"
               " label=eval (metrics.max_evals)."),
    MetricSpec("shadowlens_window_refresh_seconds", "gauge", (), "How long the last window refresh took."),
)

# CONTRACT §6 comparison and gate. A per-cohort result sets one cohort label and leaves the
# others "__all__"; the all-traffic result has every cohort label "__all__".
COMPARE_METRICS = (
    MetricSpec("shadowlens_compare_effect", "gauge", ("rule", "<cohort>", "bound"),
               "Candidate effect per rule (ratio, or difference for max_drop/max_increase rules): estimate and the"
               " bounds of its confidence sequence."),
    MetricSpec("shadowlens_verdict", "gauge", ("rule", "<cohort>", "state"),
               "1 for the rule's current state (pass|fail|inconclusive|insufficient_data), 0 otherwise."),
    MetricSpec("shadowlens_gate_state", "gauge", ("state",), "1 for the gate's state (promote|block|inconclusive)."),
    MetricSpec("shadowlens_compare_samples", "gauge", ("rule", "<cohort>", "route"),
               "Traces (or pairs) per route behind each rule result in the gate window."),
    MetricSpec("shadowlens_pairs", "counter", ("status",),
               "Shadow pairs by request id: matched, a trace (or call) whose partner never came (unmatched_<route>), or"
               " ambiguous: a parent span with several calls on one side, not paired (analyzers/units.py)."),
    MetricSpec("shadowlens_compare_stat", "counter", ("rule", "<cohort>", "stat"),
               "Mergeable sufficient statistics of matched pairs per mean/rate rule: pairs, sum_baseline,"
               " sum_candidate, sumsq_baseline, sumsq_candidate, sum_product."),
    MetricSpec("shadowlens_gate_refresh_seconds", "gauge", (), "How long the last gate evaluation took."),
    MetricSpec("shadowlens_trace_duration_sketch", "counter", ("route", "<cohort>", "bucket"),
               "Traces (baseline and candidate) per log-spaced duration bucket, on all traffic and on each cohort"
               " value: bucket i holds durations in (2^((i-1)/8), 2^(i/8)] seconds; only non-empty buckets are"
               " shown. Summed across sidecars it gives the fleet's p99 (shadowlens gate --prometheus)."),
)

# `export.parquet` in serve (exporters/parquet.py); present only when export.parquet.dir is set.
EXPORT_METRICS = (
    MetricSpec("shadowlens_export_parquet_lag_seconds", "gauge", (),
               "Seconds since the end of the newest hour up to which the Parquet lake holds every closed hour"
               " (grows while exports fail)."),
    MetricSpec("shadowlens_export_parquet_failures", "counter", (),
               "Export passes to the Parquet lake that failed (each is retried; ingest never waits for them)."),
    MetricSpec("shadowlens_export_parquet_rows", "counter", ("table",),
               "Rows written to the Parquet lake, by table (an hour written again counts again)."),
)

ALL_METRICS = SELF_METRICS + STREAMING_METRICS + WINDOW_METRICS + ANALYZER_SELF_METRICS + COMPARE_METRICS + EXPORT_METRICS


def exposed_names(spec: MetricSpec) -> list[str]:
    """The series names Prometheus sees for one metric (what dashboards and rules may use)."""
    if spec.type == "counter":
        return [spec.name + "_total"]
    if spec.type == "histogram":
        return [spec.name + s for s in ("_bucket", "_sum", "_count")]
    return [spec.name]
