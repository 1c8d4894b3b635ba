"""The shipped SRE artefacts against a real Prometheus and a real ``serve`` (README "Deployment").

For each synthetic scenario (``regression``, ``healthy``; shadowlens/traffic.py) a ``shadowlens serve`` gets
shadow traffic through the OTel SDK (``run_generate``) while a real Prometheus scrapes it with
deploy/prometheus/prometheus.yml and loads deploy/prometheus/rules/*.yml. Only what a test cannot wait for
is rewritten, in copies under ``tmp_path``: the target (the server's metrics port), the scrape and evaluation
intervals (1 s), the rule file paths, and every alert's ``for:`` (``FOR``). Every PromQL expression, range
selector and threshold is the shipped one. Prometheus is started before the traffic, so ``rate(...[5m])``
and ``rate(...[1m])`` have many samples by the time they are asserted. Then:

* every recording and alerting rule reports ``health: ok`` in ``/api/v1/rules`` (Prometheus evaluated it
  without error);
* every recording rule's expression returns data via ``/api/v1/query``;
* every alerting rule's expression evaluates without error as shipped, and "un-thresholded"
  (``unthreshold``: each comparison with a number, e.g. ``> 1.3``, becomes ``> bool 1.3``, which keeps every
  series with value 0 or 1 instead of filtering) returns data, except ``ALERT_EMPTY`` (no series to compare:
  the counters are born with the first rejection / overflow, which this traffic never causes);
* every PromQL target of every Grafana dashboard (template variables substituted as Grafana's "All" does:
  ``GRAFANA_VARIABLES``) evaluates without error and returns data, except ``PANEL_EMPTY`` (series born with
  an event this traffic never causes: log records, rejections, refused requests, duplicates, late spans,
  evictions, overflow);
* regression: ``ShadowlensGateBlocked`` fires and ``ShadowlensCohortRuleFailing`` fires for each cohort
  result the gate fails, which include the planted steps of intent=billing (at 3,000 requests the planted
  refusals of language=de and p99 of tier=enterprise are past their margins but not yet fails: the gate fails
  a result only once its whole interval is past the margin; tests/test_gate_e2e.py follows them);
* healthy: ``shadowlens_gate_state{state="promote"} == 1`` in Prometheus and, at a rule evaluation after
  that, ``ShadowlensGateBlocked`` is neither pending nor firing, and neither is any other gate or comparison
  alert (no false alarm on a candidate that draws from the baseline's distributions).
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from harness import REPO, wait_for
from prometheus_server import PrometheusServer, prometheus_binary, value

from shadowlens.generate import GenerateOptions, run_generate

pytestmark = pytest.mark.timeout(240)

DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

FAST = {"SHADOWLENS_TRACES__IDLE_SECONDS": "1", "SHADOWLENS_GATE__REFRESH": "1s",
        "SHADOWLENS_ANALYZERS__WINDOW_REFRESH": "1s"}
RATE = 250.0
# scenario -> (requests, seed): the same workloads as tests/test_gate_e2e.py, which reach block / promote.
SCENARIOS = {"regression": (3000, 1), "healthy": (3500, 5)}
# The planted cohort (shadowlens/traffic.py) whose result fails at this traffic, and the gate rule naming it.
PLANTED = {("steps", "intent", "billing")}
FOR = "2s"              # every alert's `for:` in the test copy (pending, then firing, within a few evaluations)

# Grafana's "All" for a multi-value query variable with allValue ".*"; the intervals as Grafana would pick
# them for a dashboard over the last minutes.
GRAFANA_VARIABLES = {"intent": ".*", "language": ".*", "tier": ".*", "instance": ".*",
                     "__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

# Alerting rules whose un-thresholded expression legitimately returns nothing under this traffic. Not in it:
# ShadowlensSidecarDown (`up == bool 0` has the up series), ShadowlensCohortOverflow (the counter has one
# series per cohort label, 0, from the start), ShadowlensSilent (`increase(...) == bool 0` has data).
ALERT_EMPTY = {
    # shadowlens_spans_rejected_total{reason} is born with the first rejected span; the generator sends none.
    "ShadowlensIngestRejections",
    # used > 0.9 * budget compares two series, which unthreshold leaves as a filter: empty unless the store is
    # near store.max_bytes (10 GiB here). deploy/prometheus/tests and tests/test_store_budget.py fire it.
    "ShadowlensStoreNearBudget",
}
# Dashboard targets (by metric name in the expression) that legitimately return nothing under this traffic:
# each is a labelled counter whose series is born with its first event (reason, receiver or model is only
# known then), and the generator causes none of these events. Unlabelled counters (duplicates, late spans,
# evictions) and shadowlens_cohort_overflow_total{label} (one series per cohort label from the start) have data.
PANEL_EMPTY = {
    "shadowlens_log_records_received_total": "the generator sends spans only, no OTLP log records",
    "shadowlens_log_records_rejected_total": "no log records, so none rejected",
    "shadowlens_spans_rejected_total": "the SDK sends only valid spans",
    "shadowlens_requests_refused_total": "the ingest queue never fills at 250 requests/s",
    "shadowlens_unpriced_spans_total": "every generated LLM span reports its cost (llm.cost.total)",
}


# -- Prometheus with the shipped configuration ---------------------------------------------------------
def fast_rule_copies(workdir: Path) -> list[Path]:
    """Copies of the shipped rule files with every alert's ``for:`` set to ``FOR`` and no group ``interval:``
    of its own (the fleet's recording rules keep 1m; here every group runs at the test's evaluation interval
    so the test can wait for one evaluation of each); nothing else changes."""
    shipped = yaml.safe_load(PROMETHEUS_YML.read_text())
    out = []
    for rel in shipped["rule_files"]:
        doc = yaml.safe_load((PROMETHEUS_YML.parent / rel).read_text())
        for group in doc["groups"]:
            group.pop("interval", None)
            for rule in group["rules"]:
                if "alert" in rule and "for" in rule:
                    rule["for"] = FOR
        path = workdir / Path(rel).name
        path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
        out.append(path)
    return out




class ShippedPrometheus(PrometheusServer):
    """deploy/prometheus/prometheus.yml with its target, intervals and rule paths rewritten for a test."""

    def _write_config(self) -> Path:
        cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
        cfg["global"].update(scrape_interval=self.scrape_interval, evaluation_interval=self.scrape_interval)
        cfg["rule_files"] = [str(p) for p in fast_rule_copies(self.workdir)]
        (job,) = cfg["scrape_configs"]
        assert job["job_name"] == self.job, "the alert rules expect job=\"shadowlens\""
        job.update(scrape_interval=self.scrape_interval, scrape_timeout=self.scrape_interval)
        (static,) = job["static_configs"]
        static["targets"] = [self.target]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path


def shipped_rules() -> list[dict]:
    """Every rule of the shipped rule files (with its group name)."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    rules = []
    for rel in cfg["rule_files"]:
        for group in yaml.safe_load((PROMETHEUS_YML.parent / rel).read_text())["groups"]:
            rules += [{**r, "group": group["name"]} for r in group["rules"]]
    return rules


_THRESHOLD = re.compile(r"(==|!=|>=|<=|>|<)(\s+)(?=[0-9])")


def unthreshold(expr: str) -> str:
    """``expr`` with each comparison against a number turned into a ``bool`` comparison.

    ``a > 1.3`` keeps only the series above 1.3; ``a > bool 1.3`` keeps every series of ``a`` (valued 0 or 1),
    and ``and`` / ``unless`` / ``or`` still match on labels as they do in the shipped rule. So the result has
    data exactly when the alert's inputs do, whatever their values.
    """
    return _THRESHOLD.sub(r"\1 bool\2", expr)


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every Prometheus target of every panel, nested rows included."""
    out = []

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for path in DASHBOARDS:
        for panel in walk(json.loads(path.read_text())["panels"]):
            for t in panel.get("targets", []):
                if t.get("expr"):
                    out.append((path.name, panel.get("title", ""), t["expr"]))
    return out


def substitute(expr: str) -> str:
    """Grafana's template variables (``$x``, ``${x}``, ``${x:regex}``, ``[[x]]``) -> ``GRAFANA_VARIABLES``."""
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3) or m.group(4)
        return GRAFANA_VARIABLES[name]
    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(__\w+)|\$(\w+)", repl, expr)
    assert "$" not in out, out
    return out


# -- shadowlens ----------------------------------------------------------------------------------------
def get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:          # 409 on block
        return json.loads(exc.read())


def wait_for_gate(server, traces: int, timeout: float = 60.0) -> dict:
    """/gate once its evaluation covers every sent trace."""
    last: list[dict] = [{}]

    def covered():
        last[0] = get_json(server.metrics_url + "/gate")
        return sum(last[0].get("traces", {}).values()) >= traces and last[0]
    return wait_for(covered, timeout, 0.25, what=f"the gate covering {traces} traces",
                    detail=lambda: f"{last[0].get('traces')}\n{server.log()[-3000:]}")


def active_alerts(prom: PrometheusServer, name: str) -> list[dict]:
    return [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == name]


def rule_groups(prom: PrometheusServer) -> dict[str, dict]:
    return {g["name"]: g for g in prom.api("rules")["groups"]}


def wait(what: str, fn, timeout: float, prom: PrometheusServer, interval: float = 0.25):
    return wait_for(fn, timeout, interval, what=what, detail=lambda: f"alerts: {prom.api('alerts')['alerts']}\n"
                    f"targets: {prom.targets()}\nlog:\n{prom.log()}")


def test_unthreshold_turns_filters_into_bool_comparisons():
    assert unthreshold("max by (job) (x{state=\"block\"}) == 1") == "max by (job) (x{state=\"block\"}) == bool 1"
    assert unthreshold("a > 1.3\nand b >= 100") == "a > bool 1.3\nand b >= bool 100"
    assert unthreshold('up{job!="x"} == 0 or absent(up)') == 'up{job!="x"} == bool 0 or absent(up)'
    assert unthreshold("q > 0.8 * 262144") == "q > bool 0.8 * 262144"
    assert substitute('rate(x{a=~"$intent|__all__"}[$__rate_interval])') == 'rate(x{a=~".*|__all__"}[1m])'


# -- the test ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_shipped_rules_and_dashboards_against_real_prometheus(scenario, serve_factory, tmp_path):
    prometheus_binary()                             # skip (or fail under CI) before doing any work
    t0 = time.monotonic()
    requests, seed = SCENARIOS[scenario]
    # a disk budget, as the shipped Kubernetes config sets one, so the budget's panels have data
    server = serve_factory(env={**FAST, "SHADOWLENS_STORE__MAX_BYTES": "10GiB"})
    with ShippedPrometheus(target=f"127.0.0.1:{server.metrics_port}", workdir=tmp_path / "prometheus") as prom:
        rules = shipped_rules()
        loaded = {r["name"] for g in rule_groups(prom).values() for r in g["rules"]}
        assert loaded == {r.get("alert") or r["record"] for r in rules}, "Prometheus did not load every rule"

        sent = run_generate(GenerateOptions(endpoint=server.grpc_endpoint, rate=RATE, requests=requests,
                                            scenario=scenario, seed=seed), out=None)
        assert sent.failed_spans == 0 and sent.requests == requests
        doc = wait_for_gate(server, sent.traces)
        expected = "block" if scenario == "regression" else "promote"
        assert doc["verdict"] == expected, [r for r in doc["rules"] if r["state"] != "pass"]

        # Prometheus has scraped the final gate state and the complete counters
        prom.wait_for(f'shadowlens_gate_state{{state="{expected}"}} == 1', lambda r: len(r) == 1, timeout=15)
        prom.wait_for("sum(shadowlens_traces_total)", lambda r: r and value(r[0]) == sent.traces, timeout=15)
        t_seen = time.time()
        # ... and every rule group has been evaluated since (so recording rules and alerts reflect it)
        wait("a rule evaluation of every group after the gate settled",
             lambda: all(_ts(g["lastEvaluation"]) > t_seen for g in rule_groups(prom).values()), 15, prom)

        # 1. every rule evaluated without error
        for group in rule_groups(prom).values():
            for r in group["rules"]:
                assert r["health"] == "ok", (group["name"], r["name"], r.get("lastError"))

        # 2. recording rules: the expression returns data (and so does the recorded series)
        empty = []
        for r in rules:
            if "record" in r:
                if not prom.query(r["expr"]):
                    empty.append(r["record"])
                assert prom.query(r["record"]), f"{r['record']} was never recorded"
        assert empty == [], f"recording rules without data: {empty}"

        # 3. alerting rules: as shipped, no error; without their thresholds, data except ALERT_EMPTY
        empty = []
        for r in rules:
            if "alert" in r:
                prom.query(r["expr"])                       # raises on a PromQL error
                bare = unthreshold(r["expr"])
                assert bare != r["expr"], f"{r['alert']}: no threshold found to remove"
                if not prom.query(bare):
                    empty.append(r["alert"])
        assert sorted(empty) == sorted(ALERT_EMPTY), f"alert expressions without data: {empty}"

        # 4. every dashboard target: no error, data except PANEL_EMPTY
        empty = []
        for dashboard, title, expr in dashboard_targets():
            if not prom.query(substitute(expr)):
                empty.append((dashboard, title, expr))
        unexplained = [e for e in empty if not any(m in e[2] for m in PANEL_EMPTY)]
        assert unexplained == [], f"dashboard targets without data: {unexplained}"
        explained = {m for e in empty for m in PANEL_EMPTY if m in e[2]}
        assert explained == set(PANEL_EMPTY), f"PANEL_EMPTY is stale: {set(PANEL_EMPTY) - explained} have data"

        # 5. the alerts
        if scenario == "regression":
            wait("ShadowlensGateBlocked firing",
                 lambda: any(a["state"] == "firing" for a in active_alerts(prom, "ShadowlensGateBlocked")), 15, prom)

            def failing_cohorts():
                got = set()
                for a in active_alerts(prom, "ShadowlensCohortRuleFailing"):
                    if a["state"] == "firing":
                        lab = a["labels"]
                        for label in ("intent", "language", "tier"):
                            if lab[label] != "__all__" and all(lab[o] == "__all__" for o in ("intent", "language",
                                                                                             "tier") if o != label):
                                got.add((lab["rule"], label, lab[label]))
                return failing <= got and got
            failing = {(r["rule"], *r["cohort"].split("=", 1)) for r in doc["rules"]
                       if r["state"] == "fail" and r["cohort"] != "all" and "," not in r["cohort"]}
            assert PLANTED <= failing, sorted(failing)
            wait(f"ShadowlensCohortRuleFailing firing for {sorted(failing)}", failing_cohorts, 15, prom)
        else:
            assert value(prom.query('shadowlens_gate_state{state="promote"}')[0]) == 1
            assert active_alerts(prom, "ShadowlensGateBlocked") == []
            # nor does any other gate or comparison alert: the candidate draws from the baseline's distributions
            quiet = {r["alert"] for r in rules if "alert" in r and r["group"] in ("shadowlens-gate",
                                                                                  "shadowlens-comparison")}
            noisy = [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] in quiet]
            assert noisy == [], noisy
        firing = sorted({a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"})
    print(f"{scenario}: {sent.requests} requests, {sent.traces} traces, {time.monotonic() - t0:.1f} s; firing: {firing}")


def _ts(rfc3339: str) -> float:
    """Prometheus' ``lastEvaluation`` (RFC 3339, nanoseconds, ``Z`` or an offset) as a Unix time."""
    m = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert m, rfc3339
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + zone).timestamp() + float(m.group(2) or 0)
