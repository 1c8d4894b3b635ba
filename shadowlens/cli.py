"""The ``shadowlens`` command. Each command parses flags, loads Config and calls one library function."""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import click

from . import config as config_mod
from .collector.errors import ConfigError, ShadowlensError


def _load(config_file, overrides) -> config_mod.Config:
    try:
        return config_mod.load(config_file, overrides={k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


class _Group(click.Group):
    def main(self, *args, **kwargs):
        # One line for every usage error (click prints usage + hint by default), exit 2.
        kwargs.setdefault("standalone_mode", True)
        try:
            return super().main(*args, standalone_mode=False, **{k: v for k, v in kwargs.items()
                                                                  if k != "standalone_mode"})
        except click.UsageError as exc:
            click.echo(f"shadowlens: error: {exc.format_message()}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            sys.exit(1)
        except ShadowlensError as exc:
            click.echo(f"shadowlens: error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shadowlens")
def main() -> None:
    """shadowlens: an OTLP sidecar that compares a candidate LLM agent against its baseline, per cohort."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the store lives (store.data_dir).")
@click.option("--print-config", is_flag=True, help="Print the effective configuration and exit.")
@click.option("--ready-file", type=click.Path(dir_okay=False), hidden=True,
              help="Write this file (pid and addresses, JSON) once serving; used by `shadowlens demo`.")
def serve(config_file, data_dir, print_config, ready_file) -> None:
    """Run the sidecar: OTLP receivers, store, /metrics; until SIGTERM/SIGINT."""
    cfg = _load(config_file, {("store", "data_dir"): data_dir})
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .collector.ingest import memory
    memory.set_environment()        # before serve's modules load pyarrow, which reads it once
    from .serve import run
    from .startup import StartupError
    # the data dir as the user wrote it ("./data"), not as a normalised Path ("data")
    shown = data_dir or str((cfg.raw.get("store") or {}).get("data_dir") or cfg.store.data_dir)
    try:
        sys.exit(run(cfg, data_dir_text=shown, ready_file=ready_file))
    except (StartupError, OSError) as exc:
        raise click.UsageError(f"cannot start: {exc}") from None


def _printable(table):
    """Nanosecond timestamps (span times) have no Python datetime: print them as ISO text."""
    import pyarrow as pa
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type.unit == "ns":
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    return table


def format_table(table, fmt: str) -> str:
    table = _printable(table)
    rows = table.to_pylist()
    cols = table.column_names
    if fmt == "json":
        return json.dumps(rows, default=str, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in cols])
        return buf.getvalue()
    cells = [[("NULL" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    out = [line(cols), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"


@main.command()
@click.argument("sql")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="The store's directory (store.data_dir).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def query(sql, config_file, data_dir, fmt) -> None:
    """Read-only SQL over the store (spans, traces, evals, logs); works while serve runs."""
    cfg = _load(config_file, {("store", "data_dir"): data_dir})
    from .collector.store.reader import QueryError
    from .collector.store.reader import query as run_query
    try:
        table = run_query(Path(cfg.store.data_dir), sql)
    except QueryError as exc:
        # SQL DuckDB refuses, or a --data-dir with no store, is a mistake in what was typed: exit 2
        raise click.UsageError(str(exc)) from None
    click.echo(format_table(table, fmt), nl=False)


@main.command("reprice")
@click.option("--since", "since", help="Only spans that started within this duration (e.g. 7d); default: all.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file (its prices).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="The store's directory (store.data_dir).")
def reprice_cmd(since, config_file, data_dir) -> None:
    """Recompute stored span and trace costs from the current price table."""
    cfg = _load(config_file, {("store", "data_dir"): data_dir})
    try:
        since_s = config_mod.parse_duration(since, "--since") if since else None
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from .collector.store.reader import call_server
    table = call_server(Path(cfg.store.data_dir), {"op": "reprice", "since_s": since_s, "prices": list(cfg.prices)})
    if table is None:   # no server running: this command opens the store and is its one writer
        from .analyzers.reprice import reprice_write
        from .collector.decode.pricing import PriceTable
        from .collector.store.database import db_path
        from .collector.store.derived import run_alone
        path = db_path(Path(cfg.store.data_dir))
        if not path.exists():
            raise click.UsageError(f"no store at {path}")
        table = run_alone(path, reprice_write(PriceTable.load(cfg.prices), since_s)).as_table()
    row = table.to_pylist()[0]
    click.echo(f"repriced {row['spans']} LLM spans in {row['traces']} traces"
               f" ({row['unpriced_spans']} spans have no price)")


def _gate_settings(cfg: config_mod.Config, rules_file: str | None):
    """The config's gate section, or the one in --rules (a list of rules, or a mapping with `rules:`)."""
    from shadowlens.analyzers.rules import RuleError, parse_gate
    section = dict(cfg.gate)
    if rules_file:
        import yaml
        try:
            loaded = yaml.safe_load(Path(rules_file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise click.UsageError(f"--rules {rules_file}: {str(exc).splitlines()[0]}") from None
        if isinstance(loaded, list):
            section["rules"] = loaded
        elif isinstance(loaded, dict):
            section.update(loaded.get("gate", loaded))
        else:
            raise click.UsageError(f"--rules {rules_file}: expected a list of rules or a mapping with `rules:`")
    try:
        return parse_gate(section)
    except RuleError as exc:
        raise click.UsageError(str(exc)) from None


def _judge_store(cfg: config_mod.Config, settings, window: str | None, summary: bool = False,
                 rule: str | None = None, cohort: str | None = None):
    """(Verdict with its evidence, per-cohort route figures or None) from the store: through a running
    serve's socket, else the file itself (read-only). ``rule`` / ``cohort`` keep only those results,
    each with its example pairs."""
    import time
    from dataclasses import replace

    from shadowlens.analyzers.evidence import select
    from shadowlens.analyzers.gate import evaluate_with_evidence, route_summary, trace_frame_sql

    from .collector.store.reader import query as run_query
    if window:
        try:
            settings = replace(settings, window_s=config_mod.parse_duration(window, "--window"))
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
    now = time.time()
    labels = tuple(cfg.cohort_labels)
    run_sql = lambda sql: run_query(Path(cfg.store.data_dir), sql)
    if rule is not None and rule not in {r.name for r in settings.rules}:
        raise click.UsageError(f"--rule {rule}: no such gate rule (rules: {', '.join(r.name for r in settings.rules)})")
    trace_url = cfg.links.trace_url
    try:
        verdict = evaluate_with_evidence(run_sql, settings, labels, now, trace_url)
        if cohort is not None and cohort not in {r.cohort for r in verdict.results}:
            known = ", ".join(dict.fromkeys(r.cohort for r in verdict.results)) or "none: no traces in the window"
            raise click.UsageError(f"--cohort {cohort}: not a cohort of this window (as label=value; cohorts: {known})")
        if rule is not None or cohort is not None:
            verdict = select(verdict, run_sql, settings, labels, trace_frame_sql(settings, labels, now), rule, cohort,
                             trace_url)
        bars = route_summary(run_sql, settings, labels, now) if summary else None
    except ShadowlensError as exc:
        raise click.UsageError(str(exc)) from None
    if bars is not None and cohort is not None:
        bars = [b for b in bars if b["cohort"] == cohort]
    return verdict, bars


def _fetch_gate(url: str) -> dict:
    import urllib.error
    import urllib.request
    target = url.rstrip("/")
    if not target.endswith("/gate"):
        target += "/gate"
    try:
        with urllib.request.urlopen(target, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:       # 409 on block, 503 before the first evaluation: still JSON
        try:
            return json.loads(exc.read())
        except ValueError:
            raise click.UsageError(f"--url {target}: HTTP {exc.code} without a gate answer") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise click.UsageError(f"--url {target}: {getattr(exc, 'reason', exc)}") from None


def _judge_fleet(cfg: config_mod.Config, settings, window: str | None, prometheus: str, match: str | None):
    """(the fleet's Verdict, the fields the fleet adds to the JSON) from the sidecars' counters in Prometheus."""
    from dataclasses import replace

    from shadowlens.exporters.fleet import FleetError, judge_prometheus
    if window:
        try:
            settings = replace(settings, window_s=config_mod.parse_duration(window, "--window"))
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
    try:
        fv, extra = judge_prometheus(prometheus, settings, tuple(cfg.cohort_labels), match)
    except FleetError as exc:
        raise click.UsageError(str(exc)) from None
    return fv.verdict, extra


def _fleet_line(extra: dict) -> str:
    n = extra["sidecars"]
    notes = "".join(f"  note: {x}\n" for x in extra.get("notes", ()))
    return f"source: prometheus ({n} sidecar{'s' if n != 1 else ''} contributed; {extra['prometheus']})\n{notes}"


@main.command("gate")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Judge the store in this directory (store.data_dir).")
@click.option("--url", help="Ask a running sidecar instead, e.g. http://127.0.0.1:9464 (its /gate).")
@click.option("--prometheus", help="Judge the whole fleet from the sidecars' summed counters in this Prometheus"
              " (or Thanos / Mimir), e.g. http://prometheus:9090.")
@click.option("--match", help="With --prometheus: only these sidecars, e.g. '{namespace=\"agents\", rollout=\"v42\"}'.")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False),
              help="YAML with gate rules (a list, or a mapping with `rules:` and gate settings); default: the config's.")
@click.option("--window", help="Judge traces that started within this duration (default: gate.window).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def gate_cmd(data_dir, url, prometheus, match, rules_file, window, config_file, fmt) -> None:
    """May the candidate be promoted? Exit 0 promote, 1 block, 3 inconclusive or insufficient data, 2 usage error."""
    from shadowlens.exporters.verdict_json import EXIT_CODES, verdict_text, verdict_to_json
    if url and (data_dir or rules_file or window):
        raise click.UsageError("--url asks a running sidecar, which judges with its own gate config;"
                               " do not combine it with --data-dir, --rules or --window")
    if sum(bool(x) for x in (data_dir, url, prometheus)) > 1:
        raise click.UsageError("give one of --data-dir, --url, --prometheus")
    if match and not prometheus:
        raise click.UsageError("--match narrows the fleet of --prometheus; give --prometheus URL too")
    if url:
        doc = _fetch_gate(url)
    elif prometheus:
        from shadowlens.exporters.fleet import fleet_json
        cfg = _load(config_file, {})
        verdict, extra = _judge_fleet(cfg, _gate_settings(cfg, rules_file), window, prometheus, match)
        doc = fleet_json(verdict_to_json(verdict), extra)
        text = verdict_text(doc) + _fleet_line(extra)
        click.echo(json.dumps(doc, indent=2) if fmt == "json" else text, nl=fmt == "json")
        sys.exit(EXIT_CODES.get(doc.get("verdict"), 3))
    else:
        cfg = _load(config_file, {("store", "data_dir"): data_dir})
        verdict, _ = _judge_store(cfg, _gate_settings(cfg, rules_file), window)
        doc = verdict_to_json(verdict)
    click.echo(json.dumps(doc, indent=2) if fmt == "json" else verdict_text(doc), nl=fmt == "json")
    sys.exit(EXIT_CODES.get(doc.get("verdict"), 3))


@main.command("report")
@click.option("--data-dir", type=click.Path(file_okay=False), help="The store's directory (store.data_dir).")
@click.option("--prometheus", help="The whole fleet, from the sidecars' summed counters in this Prometheus.")
@click.option("--match", help="With --prometheus: only these sidecars (label matchers).")
@click.option("--window", help="Traces that started within this duration (default: gate.window).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown", "html"]), default="table",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write to this file (html defaults to shadowlens-report.html; the others print).")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False), help="YAML with gate rules (as for gate).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--cohort", help="Only this cohort's results (label=value, or all), with their example pairs.")
@click.option("--rule", "rule_name", help="Only this rule's results (e.g. refusal_rate), with their example pairs.")
def report_cmd(data_dir, prometheus, match, window, fmt, out, rules_file, config_file, cohort, rule_name) -> None:
    """Per-cohort baseline-vs-candidate table with verdicts, reasons and example pairs of failing results."""
    from shadowlens.exporters.report import render
    if data_dir and prometheus:
        raise click.UsageError("give one of --data-dir, --prometheus")
    if match and not prometheus:
        raise click.UsageError("--match narrows the fleet of --prometheus; give --prometheus URL too")
    cfg = _load(config_file, {("store", "data_dir"): data_dir})
    if prometheus:
        from shadowlens.exporters.fleet import fleet_json
        from shadowlens.exporters.verdict_json import verdict_to_json
        verdict, extra = _judge_fleet(cfg, _gate_settings(cfg, rules_file), window, prometheus, match)
        doc = fleet_json(verdict_to_json(verdict), extra)
        # --rule / --cohort keep those results (the fleet has no per-trace figures for the side-by-side bars)
        doc["rules"] = [r for r in doc["rules"] if (rule_name is None or r["rule"] == rule_name)
                        and (cohort is None or r["cohort"] == cohort)]
        text = render(doc, fmt, None)
        if fmt in ("table", "markdown"):
            text += ("\n" if fmt == "markdown" else "") + _fleet_line(extra)
    else:
        verdict, bars = _judge_store(cfg, _gate_settings(cfg, rules_file), window, summary=True, rule=rule_name,
                                     cohort=cohort)
        text = render(verdict, fmt, bars)
    if fmt == "html" and not out:
        out = "shadowlens-report.html"
    if out:
        Path(out).write_text(text)
        click.echo(f"report: {verdict.verdict}; wrote {out}")
    else:
        click.echo(text, nl=False)


SCENARIO_NAMES = ("healthy", "regression", "noisy")   # traffic.SCENARIOS (tested to match)


def _traffic_options(rate_default: float, duration_default: float, scenario_default: str):
    def wrap(f):
        f = click.option("--seed", type=int, default=1, show_default=True, help="Random seed.")(f)
        f = click.option("--scenario", type=click.Choice(SCENARIO_NAMES), default=scenario_default,
                         show_default=True, help="healthy, regression (planted candidate regressions) or noisy.")(f)
        f = click.option("--duration", type=click.FloatRange(min=0), default=duration_default, show_default=True,
                         help="Seconds to run; 0 = until interrupted.")(f)
        return click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=rate_default,
                            show_default=True, help="Requests per second (each request = a baseline and a candidate trace).")(f)
    return wrap


@main.command()
@click.option("--endpoint", default="127.0.0.1:4317", show_default=True, help="OTLP receiver HOST:PORT.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True,
              help="grpc (OTLP/gRPC) or http (OTLP/HTTP protobuf to /v1/traces).")
@_traffic_options(20.0, 60.0, "healthy")
def generate(endpoint, protocol, rate, duration, scenario, seed) -> None:
    """Send synthetic shadow traffic (baseline + candidate traces) through the OTel SDK OTLP exporter."""
    try:
        host, port = config_mod.parse_endpoint(endpoint, "--endpoint")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from .generate import GenerateOptions, main_generate
    sys.exit(main_generate(GenerateOptions(endpoint=f"{host}:{port}", protocol=protocol, rate=rate,
                                           duration=duration, scenario=scenario, seed=seed)))


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file for serve.")
@click.option("--data-dir", type=click.Path(file_okay=False), default="./data-demo", show_default=True,
              help="Where the demo's store lives.")
@_traffic_options(50.0, 0.0, "regression")
def demo(config_file, data_dir, rate, duration, scenario, seed) -> None:
    """Run serve plus the synthetic generator (a planted regression) and print the gate every 5 s."""
    cfg = _load(config_file, {("store", "data_dir"): data_dir})
    from .demo import run_demo
    sys.exit(run_demo(cfg, config_file=config_file, data_dir=data_dir, rate=rate, duration=duration,
                      scenario=scenario, seed=seed))


def _export_time(value: str, flag: str, now: float) -> float:
    """A duration back from now (2h, 7d) or an ISO date / time (UTC unless it names a zone)."""
    from datetime import datetime, timezone
    try:
        return now - config_mod.parse_duration(value, flag)
    except ConfigError:
        pass
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.UsageError(f"{flag} {value!r} is neither a duration (2h, 7d) nor an ISO time"
                               " (2026-11-29, 2026-11-29T13:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


@main.group("export", cls=click.Group)
def export_group() -> None:
    """Copy the store out of shadowlens (Parquet lake)."""


@export_group.command("parquet")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The lake's directory: OUT/<table>/date=YYYY-MM-DD/*.parquet.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="The store's directory (store.data_dir).")
@click.option("--since", help="Rows from this long ago (e.g. 2h, 7d) or this ISO time on; default: all.")
@click.option("--until", help="Rows before this ISO time (UTC unless it says) or this long ago; default: now.")
@click.option("--tables", default=",".join(("spans", "traces", "evals", "logs")), show_default=True,
              help="Comma-separated tables to write.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML config file (store.data_dir, export.parquet.source).")
def export_parquet_cmd(out, data_dir, since, until, tables, config_file) -> None:
    """Write the store as Hive-partitioned Parquet (zstd), one file per UTC hour; idempotent; works with
    serve running or stopped."""
    import time

    from shadowlens.exporters.parquet import ExportError, export, parse_tables, store_source

    from .collector.store.reader import QueryError
    from .collector.store.reader import query as run_query
    cfg = _load(config_file, {("store", "data_dir"): data_dir})
    now = time.time()
    try:
        names = parse_tables(tables)
    except ExportError as exc:
        raise click.UsageError(f"--{exc}") from None
    since_s = _export_time(since, "--since", now) if since else None
    until_s = _export_time(until, "--until", now) if until else now
    store = Path(cfg.store.data_dir)
    try:
        run_query(store, "SELECT 1")        # no store, or one we cannot open: say so before writing anything
    except QueryError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        res = export(lambda sql: run_query(store, sql), Path(out), store_source(store, cfg.export_parquet.source),
                     names, since_us=None if since_s is None else int(since_s * 1e6), until_us=int(until_s * 1e6))
    except OSError as exc:
        raise ShadowlensError(f"cannot write the lake at {out}: {exc}") from None
    rate = sum(res.rows.values()) / res.seconds if res.seconds > 0 else 0.0
    click.echo(f"exported {', '.join(f'{n} {t}' for t, n in res.rows.items())} in {res.files} files"
               f" ({res.bytes / 1e6:.1f} MB, {res.seconds:.1f} s, {rate:,.0f} rows/s) to {out}")


if __name__ == "__main__":
    main()
