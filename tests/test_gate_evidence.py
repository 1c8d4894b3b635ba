"""Gate evidence (analyzers/evidence.py): example pairs of failing results, trace links, and the cohort
that explains a failure; on planted scenarios of the demo's own traffic model (shadowlens/traffic.py)
written into a store's ``traces`` table, and through the CLI.

Expected values are computed here from the sampled request plans (numpy), not by the product's SQL.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
import uuid

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from harness import REPO, SHADOWLENS

from shadowlens import config as config_mod
from shadowlens.analyzers.compare import compare
from shadowlens.analyzers.evidence import NO_TRACE_DATA, trace_link
from shadowlens.analyzers.gate import evaluate, evaluate_with_evidence
from shadowlens.collector.errors import ConfigError
from shadowlens.collector.schema import traces_ddl
from shadowlens.collector.store.database import SegmentPayloads, db_path, migrate, register_functions
from shadowlens.exporters.report import render
from shadowlens.exporters.verdict_json import verdict_to_json
from shadowlens.traffic import SCENARIOS, Effect, Scenario, sample_request

LABELS = ("intent", "language", "tier")
SETTINGS = config_mod.default_config().gate_settings()
PLANTED = {"language=de", "tier=enterprise", "intent=billing"}     # SCENARIOS["regression"]
# the demo's three regressions, strong enough that they also fail all traffic and the cohorts overlapping them
STRONG = Scenario("strong", "the regression scenario's cohorts, larger effects", effects=(
    Effect("language", "de", "refusal_rate", 6.0, "refusal_rate"),
    Effect("tier", "enterprise", "duration", 2.5, "p99_latency"),
    Effect("intent", "billing", "steps", 3.0, "steps")))


def sample(scenario: Scenario, n: int, seed: int, rate: float = 50.0) -> tuple[list[dict], float]:
    """n requests of the generator's model -> one row per trace (the store's traces columns) and `now`."""
    rng = np.random.default_rng(seed)
    now = time.time()
    t0 = now - n / rate - 30
    rows = []
    for i in range(n):
        plan = sample_request(rng, scenario)
        for tp in plan.traces:
            rows.append({"trace_id": uuid.UUID(bytes=rng.bytes(16)).hex, "route": tp.route,
                         "request_id": plan.request_id, **plan.cohort, "start_ns": int((t0 + i / rate) * 1e9),
                         "duration_seconds": tp.duration_s, "steps": len(tp.steps),
                         "input_tokens": sum(c.input_tokens for c in tp.steps),
                         "output_tokens": sum(c.output_tokens for c in tp.steps),
                         "cost_usd": sum(c.cost_usd for c in tp.steps), "refused": tp.refused,
                         "escalated": tp.escalated, "eval_names": ["task_completion"],
                         "failed_evals": [] if tp.passed else ["task_completion"]})
    return rows, now


def insert(con, rows: list[dict]) -> None:
    con.register("src", pa.Table.from_pylist(rows))
    con.execute("INSERT INTO traces BY NAME SELECT * EXCLUDE (start_ns), make_timestamp_ns(start_ns) AS start_time"
                " FROM src")
    con.unregister("src")


def memory_store(rows: list[dict]):
    con = duckdb.connect()
    con.execute(traces_ddl(LABELS))
    insert(con, rows)
    return lambda sql: con.sql(sql).to_arrow_table()


def pairs_of(rows: list[dict]) -> dict[str, tuple[dict, dict]]:
    by = {}
    for r in rows:
        by.setdefault(r["request_id"], {})[r["route"]] = r
    return {rid: (d["baseline"], d["candidate"]) for rid, d in by.items() if len(d) == 2}


@pytest.fixture(scope="module")
def strong():
    rows, now = sample(STRONG, 5000, seed=1)
    run = memory_store(rows)
    return rows, run, evaluate_with_evidence(run, SETTINGS, LABELS, now)


def failing(verdict) -> set[tuple[str, str]]:
    return {(r.rule, r.cohort) for r in verdict.results if r.state == "fail"}


# ---------------------------------------------------------------- example pairs

def test_rate_examples_are_discordant_pairs_of_the_cohort_in_the_worse_direction(strong):
    rows, _, v = strong
    assert ("refusal_rate", "language=de") in failing(v)
    pairs = pairs_of(rows)
    discordant = {rid: (b, c) for rid, (b, c) in pairs.items()
                  if b["language"] == "de" and not b["refused"] and c["refused"]}
    examples = v.examples[("refusal_rate", "language=de")]
    assert len(examples) == min(5, len(discordant)) == 5
    for e in examples:
        b, c = discordant[e["request_id"]]
        assert (e["baseline_trace_id"], e["candidate_trace_id"]) == (b["trace_id"], c["trace_id"])
        assert (e["baseline_value"], e["candidate_value"]) == (False, True)
        assert e["display"] == "baseline answered, candidate refused" and e["unit"] == "bool"
    # the latest first
    starts = [discordant[e["request_id"]][0]["start_ns"] for e in examples]
    assert starts == sorted(starts, reverse=True)
    assert starts[0] == max(b["start_ns"] for b, _ in discordant.values())


def test_mean_examples_are_the_largest_ratios_of_the_cohort(strong):
    rows, _, v = strong
    assert ("cost_per_trace", "intent=billing") in failing(v)
    ratios = sorted(((c["cost_usd"] / b["cost_usd"], rid, b, c) for rid, (b, c) in pairs_of(rows).items()
                     if b["intent"] == "billing"), key=lambda x: -x[0])
    examples = v.examples[("cost_per_trace", "intent=billing")]
    assert [e["request_id"] for e in examples] == [rid for _, rid, _, _ in ratios[:5]]
    for e, (ratio, _, b, c) in zip(examples, ratios):
        assert e["baseline_value"] == pytest.approx(b["cost_usd"], rel=1e-5)
        assert e["candidate_value"] == pytest.approx(c["cost_usd"], rel=1e-5)
        assert e["unit"] == "usd" and e["display"].startswith("cost $") and f"(x{ratio:.3g})" in e["display"]


def test_quantile_examples_are_candidate_traces_past_the_baselines_quantile(strong):
    rows, _, v = strong
    assert ("p99_latency", "tier=enterprise") in failing(v)
    pairs = [(b, c) for b, c in pairs_of(rows).values() if b["tier"] == "enterprise"]
    q = np.quantile([b["duration_seconds"] for b, _ in pairs], 0.99)      # linear, as quantile_cont
    tail = sorted(((c["duration_seconds"] / b["duration_seconds"], b["request_id"]) for b, c in pairs
                   if c["duration_seconds"] >= q and c["duration_seconds"] > b["duration_seconds"]), reverse=True)
    examples = v.examples[("p99_latency", "tier=enterprise")]
    assert len(tail) >= 5
    assert [e["request_id"] for e in examples] == [rid for _, rid in tail[:5]]
    assert all(e["candidate_value"] >= q for e in examples)


def test_only_failing_results_get_examples_and_the_json_says_why_none():
    rows, now = sample(SCENARIOS["healthy"], 1500, seed=3)
    v = evaluate_with_evidence(memory_store(rows), SETTINGS, LABELS, now)
    assert not failing(v) and v.examples == {} and v.explained_by == {}
    doc = verdict_to_json(v)
    assert all("examples" not in r and r["explained_by"] is None and r["root_cause"] is False for r in doc["rules"])


def test_without_trace_data_a_failing_result_says_so_and_nothing_fails():
    """A verdict judged without the store (a frame, as a fleet judged from Prometheus counters would be)
    has no traces to show: its failing results carry an empty list and the reason."""
    rows, now = sample(STRONG, 3000, seed=2)
    frame = pa.Table.from_pylist([{"route": r["route"], "request_id": r["request_id"], "start_s": r["start_ns"] / 1e9,
                                   **{k: r[k] for k in LABELS}, "steps": float(r["steps"])} for r in rows])
    steps_only = config_mod.load(None, env={}).gate_settings()
    from dataclasses import replace
    steps_only = replace(steps_only, rules=tuple(x for x in steps_only.rules if x.name == "steps"))
    v = compare(frame, steps_only, LABELS, now)
    doc = verdict_to_json(v)
    fails = [r for r in doc["rules"] if r["state"] == "fail"]
    assert fails
    assert all(r["examples"] == [] and r["examples_note"] == NO_TRACE_DATA for r in fails)
    for fmt in ("table", "markdown", "json", "html"):
        assert render(v, fmt)


# ---------------------------------------------------------------- attribution

def paired_ratio(rows, rule_col: str, keep) -> float:
    """Σc/Σb over the pairs whose baseline trace passes ``keep`` (the gate's paired ratio of means)."""
    sb = sc = 0.0
    for b, c in pairs_of(rows).values():
        if keep(b):
            sb, sc = sb + b[rule_col], sc + c[rule_col]
    return sc / sb


def test_strong_regressions_name_their_three_cohorts_and_explain_every_other_failure(strong):
    rows, _, v = strong
    fails = failing(v)
    roots = {cohort for (rule, cohort), by in v.explained_by.items() if by is None}
    assert roots == PLANTED
    explained = {key: by for key, by in v.explained_by.items() if by is not None}
    assert set(v.explained_by) == fails
    # overlapping cohorts and all traffic fail too: that is what attribution is for
    assert len(explained) >= 10 and ("cost_per_trace", "all") in explained and ("p99_latency", "all") in explained
    assert all(by in PLANTED for by in explained.values())
    # independently: without the explaining cohort's traces, the mean rules' effect is inside the margin
    margins = {"cost_per_trace": ("cost_usd", 1.10), "steps": ("steps", 1.2)}
    for (rule, cohort), by in explained.items():
        if rule in margins:
            col, margin = margins[rule]
            blab, bval = by.split("=")
            in_cohort = (lambda r: True) if cohort == "all" else (lambda r, lab=cohort.split("=")[0],
                                                                  val=cohort.split("=")[1]: r[lab] == val)
            assert paired_ratio(rows, col, lambda r: in_cohort(r) and r[blab] != bval) < margin, (rule, cohort)
            assert paired_ratio(rows, col, in_cohort) > margin, (rule, cohort)


def test_reasons_list_root_causes_first_and_their_explained_results_under_them(strong):
    _, _, v = strong
    fail_lines = [r for r in v.reasons if " fails for " in r]
    assert fail_lines[0].startswith("root cause: ")
    current = None
    for line in fail_lines:
        if line.startswith("root cause: "):
            current = line.removeprefix("root cause: ").split(" fails for ")
            current = (current[0], current[1].split(":")[0])
        else:
            assert line.startswith("explained by ")
            by, rest = line.removeprefix("explained by ").split(": ", 1)
            assert current is not None and by == current[1] and rest.startswith(f"{current[0]} fails for ")
    assert sum(line.startswith("root cause: ") for line in fail_lines) == sum(
        by is None for by in v.explained_by.values())
    assert len(fail_lines) == len(failing(v))


def test_the_demos_regression_scenario_has_exactly_its_three_planted_root_causes():
    rows, now = sample(SCENARIOS["regression"], 45000, seed=1)
    v = evaluate_with_evidence(memory_store(rows), SETTINGS, LABELS, now)
    roots = {cohort for (_, cohort), by in v.explained_by.items() if by is None}
    assert roots == PLANTED, v.reasons
    assert all(by in PLANTED for by in v.explained_by.values() if by is not None)
    assert set(v.explained_by) == failing(v)
    named = {line.removeprefix("root cause: ").split(" fails for ")[1].split(":")[0]
             for line in v.reasons if line.startswith("root cause: ")}
    assert named == PLANTED


def test_evidence_does_not_change_any_state_or_the_verdict(strong):
    rows, run, v = strong
    plain = evaluate(run, SETTINGS, LABELS, v.as_of)
    assert plain.verdict == v.verdict
    assert [(r.rule, r.cohort, r.state, r.reason) for r in plain.results] == \
           [(r.rule, r.cohort, r.state, r.reason) for r in v.results]
    assert sorted(plain.reasons) == sorted(x.split(": ", 1)[1] for x in v.reasons if " fails for " in x) + sorted(
        x for x in plain.reasons if " fails for " not in x)


# ---------------------------------------------------------------- links.trace_url

def test_trace_url_must_say_where_the_trace_id_goes():
    assert config_mod.default_config().links.trace_url is None
    url = 'https://grafana.example/explore?left={"queries":[{"query":"{trace_id}"}]}'
    assert config_mod.load(None, env={"SHADOWLENS_LINKS__TRACE_URL": url}).links.trace_url == url
    with pytest.raises(ConfigError) as err:
        config_mod.load(None, env={"SHADOWLENS_LINKS__TRACE_URL": "https://tempo.example/trace/"})
    assert "links.trace_url" in str(err.value) and "{trace_id}" in str(err.value) and "\n" not in str(err.value)
    # only the placeholder is replaced: the other braces of the UI's URL stay as they are
    assert trace_link(url, "ab12") == 'https://grafana.example/explore?left={"queries":[{"query":"ab12"}]}'


def test_bad_trace_url_is_a_one_line_usage_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("links: {trace_url: 'https://tempo.example/trace'}\n")
    out = subprocess.run(SHADOWLENS + ["gate", "--config", str(cfg), "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and "links.trace_url" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the CLI over a store

@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, strong):
    rows, _, _ = strong
    data = tmp_path_factory.mktemp("evidence") / "data"
    data.mkdir()
    con = duckdb.connect(str(db_path(data)))
    register_functions(con, SegmentPayloads(data))
    migrate(con, LABELS)
    insert(con, rows)
    con.execute("CHECKPOINT")
    con.close()
    return data


def cli(*args, env=None):
    return subprocess.run(SHADOWLENS + list(args), capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**__import__("os").environ, **(env or {})})


URL = "https://tempo.example/trace/{trace_id}?orgId=1"


def test_gate_json_and_every_report_format_carry_the_same_evidence(store_dir, strong):
    rows, _, _ = strong
    env = {"SHADOWLENS_LINKS__TRACE_URL": URL}
    gate = cli("gate", "--data-dir", str(store_dir), "--format", "json", env=env)
    assert gate.returncode == 1, gate.stderr
    doc = json.loads(gate.stdout)
    assert doc["trace_url"] == URL
    report = json.loads(cli("report", "--data-dir", str(store_dir), "--format", "json", env=env).stdout)
    key = lambda d: [(r["rule"], r["cohort"], r["state"], r["explained_by"], r["root_cause"],
                      [e["request_id"] for e in r.get("examples", [])]) for r in d["rules"]]
    assert key(doc) == key(report) and doc["reasons"] == report["reasons"]
    fails = [r for r in doc["rules"] if r["state"] == "fail"]
    assert fails and all(1 <= len(r["examples"]) <= 5 for r in fails)
    trace_ids = {r["trace_id"] for r in rows}
    for r in fails:
        for e in r["examples"]:
            assert {e["baseline_trace_id"], e["candidate_trace_id"]} <= trace_ids
            assert e["candidate_trace_url"] == f"https://tempo.example/trace/{e['candidate_trace_id']}?orgId=1"
    table = cli("report", "--data-dir", str(store_dir), env=env).stdout
    md = cli("report", "--data-dir", str(store_dir), "--format", "markdown", env=env).stdout
    html_path = store_dir.parent / "r.html"
    cli("report", "--data-dir", str(store_dir), "--format", "html", "--out", str(html_path), env=env)
    html = html_path.read_text()
    for r in fails:
        for e in r["examples"]:
            link = URL.replace("{trace_id}", e["baseline_trace_id"])
            assert link in table and f"]({link})" in md, e
            assert e["request_id"] in html
        assert f"{r['rule']} {r['cohort']} ({'fail'}" in table
    for reason in doc["reasons"]:
        assert reason in table and reason in md


def test_report_cohort_and_rule_list_that_results_pairs(store_dir, strong):
    rows, _, _ = strong
    out = cli("report", "--data-dir", str(store_dir), "--cohort", "language=de", "--rule", "refusal_rate",
              "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [(r["rule"], r["cohort"]) for r in doc["rules"]] == [("refusal_rate", "language=de")]
    discordant = {rid for rid, (b, c) in pairs_of(rows).items()
                  if b["language"] == "de" and not b["refused"] and c["refused"]}
    examples = doc["rules"][0]["examples"]
    assert len(examples) == min(20, len(discordant)) and {e["request_id"] for e in examples} <= discordant
    assert {c["cohort"] for c in doc["cohorts"]} == {"language=de"}
    text = cli("report", "--data-dir", str(store_dir), "--cohort", "language=de", "--rule", "refusal_rate").stdout
    assert all(e["request_id"] in text and e["candidate_trace_id"] in text for e in examples)
    for args, message in ((["--cohort", "language=xx"], "--cohort language=xx"), (["--rule", "latency"], "--rule latency")):
        bad = cli("report", "--data-dir", str(store_dir), *args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_examples_rank_is_stable_across_outputs():
    """The same window read twice picks the same pairs (ties broken by request id), so /gate, the CLI and
    the report agree."""
    rows, now = sample(STRONG, 2000, seed=4)
    run = memory_store(rows)
    a = evaluate_with_evidence(run, SETTINGS, LABELS, now)
    b = evaluate_with_evidence(run, SETTINGS, LABELS, now + 1)
    assert a.examples == b.examples and a.explained_by == b.explained_by
    assert not any(math.isnan(e["candidate_value"]) for ex in a.examples.values() for e in ex
                   if isinstance(e["candidate_value"], float))


# ---------------------------------------------------------------- a real serve

def test_serve_gate_the_cli_and_the_metrics_agree_and_gate_links_its_traces(serve_factory):
    from test_gate_e2e import FAST, get, metric, send, wait_for_gate

    from shadowlens.analyzers.compare import cohort_label_values
    server = serve_factory(env={**FAST, "SHADOWLENS_LINKS__TRACE_URL": URL})
    sent = send(server, "regression", 3000)
    doc = wait_for_gate(server, sent.traces)
    assert doc["verdict"] == "block" and doc["trace_url"] == URL
    fails = [r for r in doc["rules"] if r["state"] == "fail"]
    assert fails and all(r["examples"] for r in fails)
    assert sum(r["root_cause"] for r in fails) >= 1 and all(r["root_cause"] or r["explained_by"] for r in fails)
    stored = {(x["trace_id"], x["request_id"]) for x in server.query("SELECT trace_id, request_id FROM traces")}
    for r in fails:
        for e in r["examples"]:
            assert {(e["baseline_trace_id"], e["request_id"]), (e["candidate_trace_id"], e["request_id"])} <= stored
            assert e["baseline_trace_url"] == URL.replace("{trace_id}", e["baseline_trace_id"])
    # the metrics carry the same state for every result
    text = server.metrics_text()
    for r in doc["rules"]:
        labels = dict(zip(LABELS, cohort_label_values(r["cohort"], LABELS)))
        assert metric(text, "shadowlens_verdict", rule=r["rule"], **labels, state=r["state"]) == 1.0, r
    # the CLI, through the sidecar and over the store, says the same (the window holds the same traces)
    by_url = json.loads(cli("gate", "--url", server.metrics_url, "--format", "json", env=server.env).stdout)
    by_store = json.loads(cli("gate", "--data-dir", str(server.data_dir), "--format", "json",
                              env=server.env).stdout)
    report = json.loads(cli("report", "--data-dir", str(server.data_dir), "--format", "json", env=server.env).stdout)
    key = lambda d: ([(r["rule"], r["cohort"], r["state"], r["explained_by"], r["root_cause"],
                       [e["request_id"] for e in r.get("examples", [])]) for r in d["rules"]], d["reasons"])
    assert key(by_url) == key(doc) == key(by_store) == key(report)
    assert get(server.metrics_url + "/gate")[0] == 409
