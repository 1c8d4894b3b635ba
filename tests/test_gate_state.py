"""The incremental gate state (analyzers/gate_state.py) gives the SQL path's verdict: on the traffic model's
planted scenarios (shadowlens/traffic.py) written into a store's ``traces`` table, the verdict judged from the
state (fed in completion-order rounds, after the window slides, and rebuilt from the store as on a restart)
has the same states and reasons per (rule, cohort) as ``evaluate`` (the one SQL statement), moment effects
equal to 1e-9 and p99 effects within the sketch's stated error."""
from __future__ import annotations

import dataclasses
import uuid

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from shadowlens import config as config_mod
from shadowlens.analyzers.assembly import CompletedTraces
from shadowlens.analyzers.compare import judge
from shadowlens.analyzers.gate import evaluate, rebuild, trace_frame_sql
from shadowlens.analyzers.gate_state import GateState, GateStateSink
from shadowlens.collector.schema import traces_ddl
from shadowlens.traffic import SCENARIOS, Effect, Scenario, sample_request

LABELS = ("intent", "language", "tier")
SETTINGS = config_mod.default_config().gate_settings()
EVERYTHING = dataclasses.replace(SETTINGS, window_s=1e9)      # reads every trace in the store
NOW = 1_800_000_000.0           # a multiple of 60 s: the window's edge falls on a bucket boundary
STRONG = Scenario("strong", "planted regressions large enough to fail", effects=(
    Effect("language", "de", "refusal_rate", 6.0, "refusal_rate"),
    Effect("tier", "enterprise", "duration", 2.5, "p99_latency"),
    Effect("intent", "billing", "steps", 3.0, "steps")))
# both routes' p99 read off the sketch, each within alpha: their ratio within (1 + a) / (1 - a)
P99_RATIO_ERROR = (1 + 0.01) / (1 - 0.01)


def traces(scenario: Scenario, n: int, seed: int, start: float, span_s: float) -> list[dict]:
    """n requests of the traffic model spread over [start, start + span_s) -> traces rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        plan = sample_request(rng, scenario)
        t = start + span_s * i / n
        for tp in plan.traces:
            # the candidate starts a little after the baseline (a shadow copy of the request)
            begin = t + (float(rng.uniform(0, 2)) if tp.route == "candidate" else 0.0)
            rows.append({"trace_id": uuid.UUID(bytes=rng.bytes(16)).hex, "route": tp.route,
                         "request_id": plan.request_id, **plan.cohort, "start_ns": int(begin * 1e9),
                         "duration_seconds": tp.duration_s, "steps": len(tp.steps),
                         "input_tokens": sum(c.input_tokens for c in tp.steps),
                         "output_tokens": sum(c.output_tokens for c in tp.steps),
                         "cost_usd": sum(c.cost_usd for c in tp.steps), "refused": tp.refused,
                         "escalated": tp.escalated, "eval_names": ["task_completion"],
                         "failed_evals": [] if tp.passed else ["task_completion"],
                         "completed_at_us": int((begin + tp.duration_s + 5) * 1e6)})
    return rows


def store(rows: list[dict]):
    con = duckdb.connect()
    con.execute(traces_ddl(LABELS))
    con.register("src", pa.Table.from_pylist(rows))
    con.execute("INSERT INTO traces BY NAME SELECT * EXCLUDE (start_ns, completed_at_us),"
                " make_timestamp_ns(start_ns) AS start_time, make_timestamp(completed_at_us) AS completed_at FROM src")
    con.unregister("src")
    return con


def feed_rounds(con, state: GateState, upto: float, rounds: int = 40) -> None:
    """Every trace (whatever the window), in order of completion, in rounds, as the assembler's sink sees them."""
    frame = pl.from_arrow(con.sql(trace_frame_sql(EVERYTHING, LABELS, upto, completed=True)).to_arrow_table())
    frame = frame.sort("_completed_us")
    for part in np.array_split(np.arange(frame.height), rounds):
        state.add_frame(frame[int(part[0]):int(part[-1]) + 1] if part.size else frame.head(0))


def assert_same(sql_verdict, inc_verdict) -> list:
    """Returns the borderline p99 results (see below), which the tests bound."""
    borderline = []
    assert inc_verdict.verdict == sql_verdict.verdict
    assert inc_verdict.traces == sql_verdict.traces and inc_verdict.pairs == sql_verdict.pairs
    assert inc_verdict.reasons == sql_verdict.reasons or inc_verdict.verdict != "promote"
    a = {(r.rule, r.cohort): r for r in sql_verdict.results}
    b = {(r.rule, r.cohort): r for r in inc_verdict.results}
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        assert (y.n_baseline, y.n_candidate, y.paired) == (x.n_baseline, x.n_candidate, x.paired), key
        if key[0] == "p99_latency":
            if x.effect is not None:
                assert 1 / P99_RATIO_ERROR <= y.effect / x.effect <= P99_RATIO_ERROR, (key, x.effect, y.effect)
            # the one allowed difference: a p99 result whose interval is past the margin on both paths, where
            # fail or not-yet-fail hinges on e-BH's cut among p-values that moved within the sketch's error
            if y.state != x.state:
                assert {x.state, y.state} == {"fail", "inconclusive"} and x.past_margin and y.past_margin, key
                borderline.append(key)
            continue
        assert y.state == x.state, key
        assert y.reason == x.reason, key
        for f in ("effect", "lower", "upper", "p_value"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None) == (v is None), (key, f)
            if u is not None:
                assert v == pytest.approx(u, rel=1e-9, abs=1e-300), (key, f)
    assert len(borderline) <= 2, borderline
    return borderline


@pytest.fixture(scope="module")
def regression():
    # 100 minutes of traffic; the 1 h window ends at NOW
    rows = traces(STRONG, 9000, seed=1, start=NOW - 6000, span_s=6000)
    return rows, store(rows)


def test_streamed_rounds_give_the_sql_verdict(regression):
    _, con = regression
    state = GateState(SETTINGS, LABELS)
    feed_rounds(con, state, NOW)
    sql = evaluate(lambda q: con.sql(q).to_arrow_table(), SETTINGS, LABELS, NOW)
    inc = judge(state.statistics(NOW), SETTINGS, NOW)
    assert sql.verdict == "block" and any(r.state == "fail" for r in sql.results if r.rule == "p99_latency")
    assert_same(sql, inc)


def test_the_window_slides_and_old_buckets_leave(regression):
    _, con = regression
    state = GateState(SETTINGS, LABELS)
    feed_rounds(con, state, NOW)
    run = lambda q: con.sql(q).to_arrow_table()
    for now in (NOW - 1200, NOW - 600, NOW):        # each look drops the buckets that left the window
        assert_same(evaluate(run, SETTINGS, LABELS, now), judge(state.statistics(now), SETTINGS, now))
    assert min(state._buckets) == (NOW - SETTINGS.window_s) // 60


def completed(rows: list[dict]) -> CompletedTraces:
    """Rows as the assembler hands them to its sinks: traces-table columns and one eval per trace."""
    traces = pl.DataFrame([{k: v for k, v in r.items() if k not in ("start_ns", "completed_at_us", "eval_names",
                                                                     "failed_evals")} for r in rows]).with_columns(
        pl.Series("start_time", [r["start_ns"] // 1000 for r in rows]).cast(pl.Datetime("us")),
        pl.Series("completed_at", [r["completed_at_us"] for r in rows]).cast(pl.Datetime("us")))
    evals = pl.DataFrame({"trace_id": [r["trace_id"] for r in rows], "name": ["task_completion"] * len(rows),
                          "passed": [not r["failed_evals"] for r in rows], "n": [1] * len(rows)})
    return CompletedTraces(traces, evals, None, 0, 0)


def test_restart_rebuild_then_rounds(regression):
    """Part of the traffic is in the store at the restart (one scan); the rest comes through the sink in
    assembly rounds, the first of which the scan already saw (counted once)."""
    rows, _ = regression
    cut = int((NOW - 1500) * 1e6)
    order = sorted(rows, key=lambda r: r["completed_at_us"])
    first = [r for r in order if r["completed_at_us"] <= cut]
    con = store(first)
    state = GateState(SETTINGS, LABELS)
    sink = GateStateSink(state, batch_rows=700)
    sink(completed(first[-300:]))                   # a round that completed before the scan: waits, then is dropped
    sink.ready(rebuild(con.cursor(), state, NOW - 1500))
    later = [r for r in order if r["completed_at_us"] > cut]
    for k in range(0, len(later), 250):
        sink(completed(later[k:k + 250]))
    sink.drain()
    con.register("src", pa.Table.from_pylist(later))
    con.execute("INSERT INTO traces BY NAME SELECT * EXCLUDE (start_ns, completed_at_us),"
                " make_timestamp_ns(start_ns) AS start_time, make_timestamp(completed_at_us) AS completed_at FROM src")
    run = lambda q: con.sql(q).to_arrow_table()
    assert_same(evaluate(run, SETTINGS, LABELS, NOW), judge(state.statistics(NOW), SETTINGS, NOW))


def test_noisy_traffic_unpaired_and_pooled_cohorts():
    """Missing request ids and crashed candidates (the unpaired paths), and few traces per cohort value
    (pooled into __other__ from the sums)."""
    rows = traces(SCENARIOS["noisy"], 3000, seed=5, start=NOW - 3600, span_s=3600)
    rng = np.random.default_rng(6)
    for r in rows:            # a long tail of rare intents: pooled into intent=__other__
        if rng.random() < 0.2:
            r["intent"] = f"rare-{int(rng.integers(0, 40))}"
        if rng.random() < 0.1:
            r["language"] = None
    con = store(rows)
    state = GateState(SETTINGS, LABELS)
    feed_rounds(con, state, NOW)
    run = lambda q: con.sql(q).to_arrow_table()
    sql = evaluate(run, SETTINGS, LABELS, NOW)
    assert any(r.cohort == "intent=__other__" for r in sql.results)
    assert any(r.cohort == "language=unknown" for r in sql.results)
    assert_same(sql, judge(state.statistics(NOW), SETTINGS, NOW))


def test_serve_refresh_reads_evidence_only_when_the_failing_set_changes(regression):
    """GateRefresher with a sink: the first refresh rebuilds (one scan) and reads evidence; the next ones judge
    the state and reuse the evidence until the failing set changes or evidence_every_s has passed."""
    from shadowlens.analyzers.gate import GateRefresher
    _, con = regression
    opened = []
    clock = [NOW]

    def cursor():
        opened.append(clock[0])
        return con.cursor()
    state = GateState(SETTINGS, LABELS)
    refresher = GateRefresher(cursor, SETTINGS, LABELS, now=lambda: clock[0], sink=GateStateSink(state),
                              evidence_every_s=300)
    first = refresher.refresh_now()
    # one cursor: the SQL evaluation with its evidence (what /gate answers while the state is rebuilt), then the
    # rebuild; the state's verdict has the same failing set, so it carries that evidence
    assert len(opened) == 1
    fails = {(r.rule, r.cohort) for r in first.results if r.state == "fail"}
    assert fails and set(first.examples) == fails and first.explained_by
    clock[0] = NOW + 10
    again = refresher.refresh_now()
    assert len(opened) == 1 and again.examples == first.examples and again.explained_by == first.explained_by
    assert again.as_of == NOW + 10
    clock[0] = NOW + 320                                  # evidence_every_s later: read again
    refresher.refresh_now()
    assert len(opened) == 2


def test_a_result_flipping_in_and_out_of_the_failing_set_reads_no_evidence(regression):
    """A borderline cohort that stops failing and fails again keeps the evidence the last read found for it
    (the results still failing carry theirs, a recovered one none); a result the last read did not explain
    is read at once."""
    import dataclasses

    from shadowlens.analyzers.gate import GateRefresher
    _, con = regression
    opened = []

    def cursor():
        opened.append(1)
        return con.cursor()
    refresher = GateRefresher(cursor, SETTINGS, LABELS, now=lambda: NOW, sink=GateStateSink(GateState(SETTINGS, LABELS)),
                              evidence_every_s=1e9)
    first = refresher.refresh_now()
    fails = [(r.rule, r.cohort) for r in first.results if r.state == "fail"]
    assert len(fails) >= 2 and len(opened) == 1
    flipped = fails[0]

    def with_states(change):
        results = tuple(dataclasses.replace(r, state=change.get((r.rule, r.cohort), r.state)) for r in first.results)
        return dataclasses.replace(first, results=results)
    fewer = refresher._with_evidence(with_states({flipped: "pass"}), NOW)
    assert len(opened) == 1
    assert set(fewer.examples) == set(fails) - {flipped} and flipped not in fewer.explained_by
    assert all(fewer.examples[k] == first.examples[k] for k in fewer.examples)
    back = refresher._with_evidence(with_states({}), NOW)
    assert len(opened) == 1 and back.examples == first.examples and back.explained_by == first.explained_by
    passing = next((r.rule, r.cohort) for r in first.results if r.state == "pass")
    refresher._with_evidence(with_states({passing: "fail"}), NOW)
    assert len(opened) == 2


def test_first_refresh_answers_from_sql_before_the_rebuild(regression):
    """While the restart's rebuild runs, ``latest`` already holds the SQL evaluation's verdict (serve's /gate
    reads it), not the "first gate evaluation is still running" placeholder."""
    from shadowlens.analyzers import gate as gate_mod
    _, con = regression
    state = GateState(SETTINGS, LABELS)
    refresher = gate_mod.GateRefresher(con.cursor, SETTINGS, LABELS, now=lambda: NOW, sink=GateStateSink(state))
    seen = []
    real = gate_mod.rebuild

    def watching(cursor, st, now):
        seen.append(refresher.latest)
        return real(cursor, st, now)
    gate_mod.rebuild = watching
    try:
        refresher.refresh_now()
    finally:
        gate_mod.rebuild = real
    sql = evaluate(lambda q: con.sql(q).to_arrow_table(), SETTINGS, LABELS, NOW)
    assert len(seen) == 1 and seen[0] is not None
    assert [(r.rule, r.cohort, r.state, r.reason) for r in seen[0].results] == [
        (r.rule, r.cohort, r.state, r.reason) for r in sql.results]


def _contents(state: GateState, now: float) -> tuple[dict, dict, list]:
    """Everything the state holds after sliding to ``now``: {(kind, bucket, slot key): sums}, {(column, slot key):
    sketch counts}, and the request ids waiting for a partner."""
    state.statistics(now)           # slides and compacts each bucket's chunks into one per kind
    sums = {}
    for kind, slots in (("route", state._route_slots), ("pair", state._pair_slots)):
        names = {v: k for k, v in slots.items()}
        for b, bucket in state._buckets.items():
            for ids, rows in getattr(bucket, kind):
                sums.update({(kind, b, names[int(i)]): row for i, row in zip(ids, rows)})
    for b, bucket in state._buckets.items():
        sums[("keyed", b)], sums[("first", b)] = bucket.keyed, np.array(bucket.first)
    names = {v: k for k, v in state._route_slots.items()}
    sketches = {(col, names[slot]): sk.counts() for col, per in zip(state.quantile_cols, state._sketches)
                for slot, sk in per.items() if sk.count}
    pending = sorted(state._pending["request_id"].to_list()) if state._pending is not None else []
    return sums, sketches, pending


def test_sql_rebuild_holds_what_the_streamed_rounds_hold():
    """The restart's one statement (GateState.rebuild_sql) and the window's traces streamed in completion order
    through add_frame leave equal sums per bucket and slot, equal sketch counts, and the same waiting traces
    (some candidates without a baseline, some requests without an id)."""
    rows = traces(STRONG, 3000, seed=3, start=NOW - 4000, span_s=4000)
    rng = np.random.default_rng(4)
    rows = [r for r in rows if not (r["route"] == "baseline" and rng.random() < 0.03)]
    for r in rows:
        if rng.random() < 0.02:
            r["request_id"] = None
    con = store(rows)
    streamed = GateState(SETTINGS, LABELS)
    window = pl.from_arrow(con.sql(trace_frame_sql(SETTINGS, LABELS, NOW, completed=True)).to_arrow_table())
    window = window.sort("_completed_us")
    for part in np.array_split(np.arange(window.height), 25):
        streamed.add_frame(window[int(part[0]):int(part[-1]) + 1])
    rebuilt = GateState(SETTINGS, LABELS)
    newest = rebuild(con.cursor(), rebuilt, NOW)
    assert newest == window["_completed_us"].max()
    assert rebuilt.traces_added == streamed.traces_added == window.height
    a_sums, a_sketch, a_pending = _contents(streamed, NOW)
    b_sums, b_sketch, b_pending = _contents(rebuilt, NOW)
    assert a_sums.keys() == b_sums.keys()
    for key, x in a_sums.items():      # summed in another order: equal to the last bits
        np.testing.assert_allclose(b_sums[key], x, rtol=1e-12, atol=0, err_msg=str(key))
    assert a_sketch == b_sketch and len(a_sketch) > 20
    assert a_pending == b_pending and len(a_pending) > 10
    a, b = judge(streamed.statistics(NOW), SETTINGS, NOW), judge(rebuilt.statistics(NOW), SETTINGS, NOW)
    assert (b.verdict, b.reasons, b.traces, b.pairs) == (a.verdict, a.reasons, a.traces, a.pairs)
    assert [(r.rule, r.cohort, r.state, r.reason) for r in b.results] == [
        (r.rule, r.cohort, r.state, r.reason) for r in a.results]


def test_sql_bucket_key_is_the_sketch_key():
    """rebuild_sql computes sketch keys as ceil(ln(x) / ln(gamma)) in DuckDB: the same keys as
    QuantileSketch.keys, on random values and on every bucket edge and its neighbouring doubles."""
    from shadowlens.analyzers.sketch import QuantileSketch
    sk = QuantileSketch(GateState(SETTINGS, LABELS).alpha)
    edges = sk.gamma ** np.arange(-1500, 1500, dtype=np.float64)
    values = np.concatenate([np.random.default_rng(0).lognormal(0, 3, 200_000), edges, np.nextafter(edges, 0),
                             np.nextafter(edges, np.inf)])
    con = duckdb.connect()
    con.register("v", pa.table({"x": values}))
    in_sql = con.sql(f"SELECT CAST(ceil(ln(x) / {sk._log_gamma!r}) AS BIGINT) AS k FROM v").fetchnumpy()["k"]
    assert np.array_equal(in_sql, sk.keys(values))


def test_evidence_is_read_again_once_traffic_settles(regression):
    """serve reuses the last example pairs while the failing set stays; once no new trace arrives between two
    refreshes, it reads them once more, so its examples are those `shadowlens gate --data-dir` prints."""
    from shadowlens.analyzers.gate import GateRefresher, evaluate_with_evidence
    rows, _ = regression
    order = sorted(rows, key=lambda r: r["completed_at_us"])
    con = store(order[:-60])
    opened = []

    def cursor():
        opened.append(1)
        return con.cursor()
    sink = GateStateSink(GateState(SETTINGS, LABELS))
    refresher = GateRefresher(cursor, SETTINGS, LABELS, now=lambda: NOW, sink=sink, evidence_every_s=1e9)
    first = refresher.refresh_now()
    fails = {(r.rule, r.cohort) for r in first.results if r.state == "fail"}
    assert fails and len(opened) == 1
    later = order[-60:]                               # the last traces: into the store and through the sink
    con.register("src", pa.Table.from_pylist(later))
    con.execute("INSERT INTO traces BY NAME SELECT * EXCLUDE (start_ns, completed_at_us),"
                " make_timestamp_ns(start_ns) AS start_time, make_timestamp(completed_at_us) AS completed_at FROM src")
    sink(completed(later))
    second = refresher.refresh_now()                  # traffic still arriving: the evidence is reused
    assert {(r.rule, r.cohort) for r in second.results if r.state == "fail"} == fails
    assert len(opened) == 1 and second.examples == first.examples
    third = refresher.refresh_now()                   # nothing new since: read once more
    assert len(opened) == 2
    sql = evaluate_with_evidence(lambda q: con.sql(q).to_arrow_table(), SETTINGS, LABELS, NOW)
    assert third.examples == sql.examples and third.explained_by == sql.explained_by
    refresher.refresh_now()                           # and not again while nothing changes
    assert len(opened) == 2
