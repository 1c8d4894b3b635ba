"""The window's in-memory state (analyzers/window_state.py) against the SQL path over a real store.

Rows reach the store through the store's own ``replace_traces`` write, as the assembler's do, and the state
through ``WindowState.on_write`` with the same frames: revisions, call units, rows at the window's edge,
cohort values and eval names past their caps, evals logged after their trace completed."""
from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

from shadowlens.analyzers.cohorts import OVERFLOW, CohortLimiter
from shadowlens.analyzers.window import WindowQuery, WindowSnapshot
from shadowlens.analyzers.window_state import WindowState
from shadowlens.collector.store.database import SegmentPayloads, frame, migrate, register_functions
from shadowlens.collector.store.derived import DerivedWrite, replace_traces, run_alone_on

LABELS = ("intent", "language", "tier")
WINDOW_S = 900.0
EVAL_NAMES = ("task_completion", "tone", "safety", "format", "grounded")


class Store:
    """A store file and what the assembler's writes do to it; ``seq`` is the commit sequence."""

    def __init__(self, path: Path):
        self.con = duckdb.connect(str(path / "store.duckdb"))
        register_functions(self.con, SegmentPayloads(path))
        migrate(self.con, LABELS)
        self.seq = 0
        self.done: dict[str, int] = {}       # StoreWriter.derived.done

    def cursor(self):
        return self.con.cursor()

    def derived(self, write: DerivedWrite):
        result = run_alone_on(self.con, write)
        self.done[write.name] = self.done.get(write.name, 0) + 1
        return result

    def log_evals(self, rows: list[tuple[str, str | None, bool | None]]) -> int:
        """One commit of eval rows (trace_id, name, passed); returns its ingest_seq."""
        self.seq += 1
        if rows:
            self.con.executemany("INSERT INTO evals (trace_id, name, passed, source, ingest_seq) VALUES (?, ?, ?, 'test', ?)",
                                 [(*r, self.seq) for r in rows])
        return self.seq


def _limiters(max_values=4, max_series=12, max_evals=3, now=time.time):
    limiter = CohortLimiter(LABELS, max_values, 2 * WINDOW_S, now=now)
    combos = CohortLimiter(("series",), max_series, 2 * WINDOW_S, now=now)
    names = CohortLimiter(("eval",), max_evals, 2 * WINDOW_S, now=now)
    return limiter, combos, names


def _prime(limiters, values: dict[str, list[str]]) -> None:
    """The streaming aggregates meet the values first in serve; which values overflow depends on the order
    they are met in, which a DISTINCT does not fix: both paths are given the same decided limiters."""
    limiter, combos, names = limiters
    values = {lab: ["unknown" if v is None else v for v in vs] for lab, vs in values.items()}     # NULL shows so
    for label in LABELS:
        limiter.map(label, values[label])
    shown = {label: dict(zip(values[label], limiter.map(label, values[label], count=False))) for label in LABELS}
    series = sorted({tuple(shown[lab][v] for lab, v in zip(LABELS, c))
                     for c in _product([values[lab] for lab in LABELS])})
    combos.map("series", series)
    names.map("eval", list(EVAL_NAMES))


def _product(lists):
    out = [()]
    for values in lists:
        out = [o + (v,) for o in out for v in values]
    return out


def _ts(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(round(epoch_s, 6), dt.timezone.utc).replace(tzinfo=None)


class Traffic:
    """Random rounds of the assembler: new traces, revisions of earlier ones, traces with call units."""

    def __init__(self, store: Store, state: WindowState | None, rng: random.Random, values: dict[str, list]):
        self.store, self.state, self.rng, self.values = store, state, rng, values
        self.traces: dict[str, dict] = {}      # trace_id -> its cohort values, first seq, units
        self.n = 0

    def round(self, completed_s: float, new: int, revise: int = 0, late_evals: int = 0,
              revise_from: int | None = None, revise_these: list[str] | None = None) -> None:
        """``revise_from``: revisions pick among the newest that many traces (the assembler's horizon);
        ``revise_these``: the traces to revise."""
        rng, store = self.rng, self.store
        ids = []
        for _ in range(new):
            self.n += 1
            tid = f"{rng.getrandbits(128):032x}"
            first = store.log_evals([])
            self.traces[tid] = {"cohort": {lab: rng.choice(self.values[lab]) for lab in LABELS}, "first": first,
                                "route": rng.choice(["baseline", "candidate", "candidate", "x", None]),
                                "units": rng.random() < 0.15, "revision": -1}
            ids.append(tid)
        known = [t for t in self.traces if t not in ids]
        known = known[-revise_from:] if revise_from else known
        revised = list(revise_these) if revise_these else rng.sample(known, min(revise, len(known)))
        for tid in revised:           # the newest written last, as the assembler remembers them
            self.traces[tid] = self.traces.pop(tid)
        # evals logged while the traces were open, in a few commits
        for _ in range(3):
            store.log_evals([(t, rng.choice(EVAL_NAMES + (None,)), rng.choice([True, False, False, None]))
                             for t in ids + revised for _ in range(rng.randint(0, 2))])
        upto = store.seq
        rows, evals = [], []
        for tid in ids + revised:
            tr = self.traces[tid]
            tr["revision"] += 1
            counted = frame(store.con, "SELECT trace_id, name, passed, count(*)::BIGINT AS n FROM evals "
                            "WHERE trace_id = $t AND ingest_seq BETWEEN $lo AND $hi GROUP BY ALL",
                            {"t": tid, "lo": tr["first"], "hi": upto})
            evals.append(counted)
            total = int(counted["n"].sum()) if counted.height else 0
            rows.extend(self._rows(tid, tr, completed_s, total))
        written = pl.DataFrame(rows, schema=_ROW_SCHEMA)
        evals_frame = pl.concat(evals) if evals else pl.DataFrame(schema=_EVAL_SCHEMA)
        since = None
        if revised:
            since = int(store.con.execute("SELECT min(epoch_us(completed_at)) FROM traces WHERE trace_id IN "
                                          f"({', '.join('?' * len(revised))})", revised).fetchone()[0])
        store.derived(replace_traces(written.to_arrow(), revised, since))
        if self.state is not None:
            self.state.on_write(written, evals_frame.cast(_EVAL_SCHEMA), revised)
        # evals logged after their trace completed: in no statistic of the trace until a revision
        store.log_evals([(t, rng.choice(EVAL_NAMES), False) for t in rng.sample(list(self.traces),
                                                                                min(late_evals, len(self.traces)))])

    def _rows(self, tid: str, tr: dict, completed_s: float, evals_total: int) -> list[dict]:
        rng = self.rng
        base = {"trace_id": tid, **tr["cohort"], "completed_at": _ts(completed_s), "min_ingest_seq": tr["first"],
                "max_ingest_seq": self.store.seq, "revision": tr["revision"], "incomplete": False}
        trace = {**base, "route": "calls" if tr["units"] else tr["route"], "request_id": None, "call_span_id": None,
                 "duration_seconds": rng.lognormvariate(0, 1), "steps": rng.choice([1, 2, 3, 5, 8, None]),
                 "cost_usd": rng.choice([None, rng.random() / 100]), "refused": rng.choice([True, False, None]),
                 "escalated": rng.choice([True, False, False]), "evals_total": evals_total}
        out = [trace]
        if tr["units"]:
            for span, route in (("a1", "baseline"), ("b2", "candidate")):
                out.append({**base, "route": route, "request_id": f"{tid}:p", "call_span_id": span,
                            "duration_seconds": rng.random(), "steps": 1, "cost_usd": rng.random() / 1000,
                            "refused": rng.random() < 0.1, "escalated": False, "evals_total": 0})
        return out


_ROW_SCHEMA = {"trace_id": pl.String, "route": pl.String, "request_id": pl.String, **{lab: pl.String for lab in LABELS},
               "duration_seconds": pl.Float64, "steps": pl.Int64, "cost_usd": pl.Float64, "refused": pl.Boolean,
               "escalated": pl.Boolean, "evals_total": pl.Int64, "incomplete": pl.Boolean,
               "completed_at": pl.Datetime("us"), "min_ingest_seq": pl.Int64, "max_ingest_seq": pl.Int64,
               "revision": pl.Int32, "call_span_id": pl.String}
_EVAL_SCHEMA = {"trace_id": pl.String, "name": pl.String, "passed": pl.Boolean, "n": pl.Int64}


def _values(rng: random.Random) -> dict[str, list]:
    return {"intent": [f"i{k}" for k in range(6)], "language": ["en", "de", "fr", None, "a:b", "a"],
            "tier": ["free", "pro"]}


def assert_same(got: WindowSnapshot, want: WindowSnapshot) -> None:
    """Equal frames once sorted: counts exactly, means and quantiles to the last few bits (DuckDB and
    polars sum and interpolate in their own order)."""
    keys = ["route", *LABELS]
    g, w = got.traces.sort(keys), want.traces.sort(keys)
    assert g.columns == w.columns and g.schema == w.schema
    assert g.select(keys, "n").rows() == w.select(keys, "n").rows()
    for col in ("steps_mean", "cost_mean", "refusal_ratio", "escalation_ratio"):
        _close(g[col].to_list(), w[col].to_list(), col)
    for a, b in zip(g["q"].to_list() if "q" in g.columns else [], w["q"].to_list() if "q" in w.columns else []):
        _close(a, b, "q")
    ge, we = got.evals.sort([*keys, "eval"]), want.evals.sort([*keys, "eval"])
    assert ge.columns == we.columns and ge.schema == we.schema
    assert ge.select(*keys, "eval", "n").rows() == we.select(*keys, "eval", "n").rows()
    _close(ge["fail_ratio"].to_list(), we["fail_ratio"].to_list(), "fail_ratio")
    assert got.oldest == want.oldest


def _close(got: list, want: list, what: str) -> None:
    assert [v is None for v in got] == [v is None for v in want], what
    assert [v for v in got if v is not None] == pytest.approx([v for v in want if v is not None], rel=1e-12), what


def _capped(tmp_path, rng: random.Random, now: list[float], **state_args):
    """A store, the SQL over it and the window's state with small caps (both paths given the same decided
    limiters, on the clock ``now``), and random traffic into both."""
    clock = lambda: now[0]
    store = Store(tmp_path)
    values = _values(rng)
    lims = _limiters(now=clock)
    _prime(lims, values)
    query = WindowQuery(store.cursor, lims[0], WINDOW_S, now=clock, combos=lims[1], eval_names=lims[2])
    state = WindowState(query, derived=store.done, **state_args)
    return store, query, state, Traffic(store, state, rng, values)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_state_gives_the_snapshot_the_sql_gives_over_the_same_writes(tmp_path, seed):
    rng = random.Random(seed)
    now = [time.time()]
    store, query, state, traffic = _capped(tmp_path, rng, now)
    t0 = now[0] - 1200
    for k in range(24):               # 24 rounds 50 s apart: the first ones leave the window
        traffic.round(t0 + 50 * k, new=rng.randint(5, 40), revise=rng.randint(0, 4) if k else 0,
                      late_evals=rng.randint(0, 5))
        if k % 6 == 5:
            assert_same(state.refresh(), query.refresh())
    snap = state.refresh()
    assert_same(snap, query.refresh())
    assert state.seeds == 1, "the state was read from the store again without a reason"
    # the caps were reached: overflowed combinations and eval names are in the comparison
    assert OVERFLOW in snap.traces["intent"].to_list()
    assert OVERFLOW in snap.evals["eval"].to_list()
    assert "other" in snap.traces["route"].to_list()
    # a new state seeded from the store agrees too (serve's start)
    assert_same(WindowState(query, derived=store.done).refresh(), snap)


def assert_close(got: WindowSnapshot, want: WindowSnapshot) -> None:
    """As assert_same, for a state with folded rows: the quantiles within the sketch's relative error (1 %),
    the rest as exactly; ``oldest`` is when the oldest bucket leaves, not its oldest trace."""
    strip = lambda snap: WindowSnapshot(snap.traces.drop("q"), snap.evals, snap.as_of, snap.seconds)
    assert_same(strip(got), strip(want))
    keys = ["route", *LABELS]
    for a, b in zip(got.traces.sort(keys)["q"].to_list(), want.traces.sort(keys)["q"].to_list()):
        assert a == pytest.approx(b, rel=0.01 + 1e-9)


BUCKET_S = 50.0


def _aligned_now() -> list[float]:
    """A clock on a bucket boundary: rounds 50 s apart then fill whole buckets, and the window's edge falls
    between them, where the folded sums' edge and the SQL's agree."""
    return [float(int(time.time()) // int(BUCKET_S) * int(BUCKET_S))]


def _folding(tmp_path, exact_traces: int, seed: int):
    """A clock on a bucket boundary, a store, the window's state over it folding all but the newest
    ``exact_traces`` traces into buckets of BUCKET_S, and traffic into both."""
    now = _aligned_now()
    store = Store(tmp_path)
    query = WindowQuery(store.cursor, _limiters(max_values=50, max_series=1000, max_evals=50)[0], WINDOW_S,
                        now=lambda: now[0])
    state = WindowState(query, derived=store.done, exact_traces=exact_traces, bucket_s=BUCKET_S)
    return now, store, query, state, Traffic(store, state, random.Random(seed), _values(None))


@pytest.mark.parametrize("seed", [4, 5])
def test_rows_past_the_newest_traces_fold_into_sums_that_give_the_sqls_snapshot(tmp_path, seed):
    rng = random.Random(seed)
    now = _aligned_now()
    store, query, state, traffic = _capped(tmp_path, rng, now, exact_traces=40, bucket_s=BUCKET_S)
    t0 = now[0] - 1200
    for k in range(24):               # the first rounds leave the window, most of the rest are folded
        traffic.round(t0 + 50 * k, new=rng.randint(5, 40), revise=rng.randint(0, 4) if k else 0,
                      late_evals=rng.randint(0, 5), revise_from=40)
        if k % 6 == 5:
            assert_close(state.refresh(), query.refresh())
            assert k < 11 or state.exact_rows() < state.rows()
    snap = state.refresh()
    assert_close(snap, query.refresh())
    assert state.seeds == 1, "the state was read from the store again without a reason"
    assert OVERFLOW in snap.traces["intent"].to_list() and OVERFLOW in snap.evals["eval"].to_list()
    # the quantiles of the groups with folded rows are read off the sketch: not all of them equal the SQL's
    exact = query.refresh().traces.sort("route", *LABELS)["q"].to_list()
    assert snap.traces.sort("route", *LABELS)["q"].to_list() != exact
    # serve's start: a state seeded from the store folds all but the newest traces too
    fresh = WindowState(query, derived=store.done, exact_traces=40, bucket_s=BUCKET_S)
    assert_close(fresh.refresh(), snap)
    assert fresh.exact_rows() < fresh.rows() == state.rows()


def test_the_rows_kept_are_bounded_by_the_newest_traces_whatever_the_window_holds(tmp_path):
    """A closed loop held for minutes filled the window with ~1M traces, all kept as rows (~180 bytes each in
    serve): the rows kept are now the newest exact_traces traces (and an eighth more before a fold)."""
    now, store, query, state, traffic = _folding(tmp_path, exact_traces=100, seed=8)
    held = []
    for k in range(16):
        traffic.round(now[0] - 800 + 50 * k, new=60)
        state.refresh()
        held.append(state._rows["trace_id"].n_unique())
        assert state.rows() == store.con.execute("SELECT count(*) FROM traces").fetchone()[0]
    assert max(held) <= 100 + 100 // 8 and held[-1] >= 100


def test_a_revision_of_a_folded_trace_reads_the_window_from_the_store(tmp_path):
    now, store, query, state, traffic = _folding(tmp_path, exact_traces=5, seed=12)
    for k in range(4):
        traffic.round(now[0] - 400 + 50 * k, new=10)
    state.refresh()
    assert state.exact_rows() < state.rows() and state.seeds == 1
    traffic.round(now[0] - 100, new=3, revise=2, revise_from=5)      # the newest: rows still
    assert_close(state.refresh(), query.refresh())
    assert state.seeds == 1
    traffic.round(now[0] - 50, new=0, revise_these=[next(iter(traffic.traces))])     # the oldest: folded
    snap = state.refresh()
    assert state.seeds == 2
    assert_close(snap, query.refresh())


def test_folded_rows_leave_with_their_bucket(tmp_path):
    now, store, query, state, traffic = _folding(tmp_path, exact_traces=0, seed=6)
    traffic.round(now[0] - 100, new=3)
    traffic.round(now[0] - 80, new=2)           # the same bucket of 50 s
    traffic.round(now[0] - 50, new=4)
    rows_at = lambda s: store.con.execute("SELECT count(*) FROM traces WHERE completed_at = ?",
                                          [_ts(s)]).fetchone()[0]
    first, second, third = rows_at(now[0] - 100), rows_at(now[0] - 80), rows_at(now[0] - 50)
    counted = lambda snap: int(snap.traces["n"].sum()) if snap.traces.height else 0
    snap = state.refresh()
    assert state.exact_rows() == 0 and counted(snap) == first + second + third
    assert snap.oldest == now[0] - 50           # the first bucket leaves when the edge passes its end
    now[0] += WINDOW_S - 80                     # the edge is past the first round's rows, not the bucket's end
    assert counted(state.refresh()) == first + second + third
    now[0] += 30                                # the edge at the bucket's end: both rounds leave
    snap = state.refresh()
    assert counted(snap) == third
    assert_close(snap, query.refresh())


def test_rows_leave_at_the_windows_edge(tmp_path):
    now = [float(int(time.time()))]      # whole seconds: the edge's arithmetic is exact
    store = Store(tmp_path)
    lims = _limiters(max_values=50, max_series=1000, max_evals=50)
    query = WindowQuery(store.cursor, lims[0], WINDOW_S, now=lambda: now[0])
    state = WindowState(query, derived=store.done)
    state.refresh()
    traffic = Traffic(store, state, random.Random(5), _values(None))
    traffic.round(now[0] - 100, new=3)
    traffic.round(now[0] - 50, new=2)
    counted = lambda snap: int(snap.traces["n"].sum()) if snap.traces.height else 0
    rows_at = lambda s: store.con.execute("SELECT count(*) FROM traces WHERE completed_at = ?",
                                          [_ts(s)]).fetchone()[0]
    first, second = rows_at(now[0] - 100), rows_at(now[0] - 50)
    snap = state.refresh()
    assert counted(snap) == first + second and snap.oldest == pytest.approx(now[0] - 100, abs=1e-6)
    now[0] += WINDOW_S - 100          # the first round's rows are exactly at the edge: still in
    snap = state.refresh()
    assert counted(snap) == first + second
    now[0] += 1e-5                    # just after, they are out
    snap = state.refresh()
    assert counted(snap) == second and snap.oldest == pytest.approx(now[0] - WINDOW_S + 50, abs=1e-4)
    assert_same(snap, query.refresh())
    now[0] += 50
    snap = state.refresh()
    assert snap.traces.height == 0 and snap.evals.height == 0 and snap.oldest is None
    assert state.rows() == 0


def _watched_store(tmp_path, seed: int):
    """A store, the window's state over it (told of the store's derived writes) and traffic into both."""
    store = Store(tmp_path)
    query = WindowQuery(store.cursor, _limiters(max_values=50, max_series=1000, max_evals=50)[0], WINDOW_S)
    state = WindowState(query, derived=store.done)
    return store, state, Traffic(store, state, random.Random(seed), _values(None))


def test_a_reprice_reseeds_and_the_new_costs_show(tmp_path):
    store, state, traffic = _watched_store(tmp_path, 9)
    traffic.round(time.time() - 30, new=20)
    before = state.refresh()
    assert state.seeds == 1
    store.derived(DerivedWrite("reprice", lambda con: con.execute("UPDATE traces SET cost_usd = 2.5")))
    snap = state.refresh()
    assert state.seeds == 2
    assert set(snap.traces["cost_mean"].to_list()) == {2.5}
    assert snap.traces.select("route", *LABELS, "n").sort("route", *LABELS).rows() == \
        before.traces.select("route", *LABELS, "n").sort("route", *LABELS).rows()


def test_retention_reseeds_only_when_it_deleted_rows_of_the_window(tmp_path):
    store, state, traffic = _watched_store(tmp_path, 11)
    traffic.round(time.time() - 60, new=10)
    traffic.round(time.time() - 30, new=10)
    state.refresh()
    store.derived(DerivedWrite("retention", lambda con: con.execute("DELETE FROM evals WHERE ingest_seq < 0")))
    state.refresh()
    assert state.seeds == 1, "a retention pass that deleted no trace row read the window again"
    oldest = store.con.execute("SELECT min(completed_at) FROM traces").fetchone()[0]
    store.derived(DerivedWrite("retention", lambda con: con.execute("DELETE FROM traces WHERE completed_at = ?",
                                                                    [oldest])))
    snap = state.refresh()
    assert state.seeds == 2
    assert int(snap.traces["n"].sum()) == store.con.execute("SELECT count(*) FROM traces").fetchone()[0]
    assert_same(snap, state.query.refresh())


def test_an_eval_logged_after_its_trace_completed_counts_only_once_a_revision_reads_it(tmp_path):
    """The window counts the evals a trace's row was written with, as the eval counters and the gate do.
    Before, the SQL joined every eval of the trace: the late one showed in the window's ratio alone."""
    store = Store(tmp_path)
    lims = _limiters(max_values=50, max_series=1000, max_evals=50)
    query = WindowQuery(store.cursor, lims[0], WINDOW_S)
    state = WindowState(query, derived=store.done)
    first, completed = store.log_evals([]), time.time() - 20
    store.log_evals([("t1", "tone", True), ("t1", "tone", True), ("t1", None, False)])
    row = {"trace_id": "t1", "route": "baseline", "request_id": None, "intent": "faq", "language": "en", "tier": "pro",
           "duration_seconds": 1.0, "steps": 2, "cost_usd": 0.01, "refused": False, "escalated": False,
           "evals_total": 3, "incomplete": False, "completed_at": _ts(completed), "min_ingest_seq": first,
           "max_ingest_seq": first, "revision": 0, "call_span_id": None}
    written = pl.DataFrame([row], schema=_ROW_SCHEMA)
    store.derived(replace_traces(written.to_arrow()))
    state.on_write(written, pl.DataFrame({"trace_id": ["t1", "t1"], "name": ["tone", None], "passed": [True, False],
                                          "n": [2, 1]}), [])
    store.log_evals([("t1", "tone", False), ("t1", "tone", False)])      # logged after it completed
    for snap in (state.refresh(), query.refresh()):
        assert snap.evals.select("eval", "fail_ratio", "n").rows() == [("tone", 0.0, 2)]
    # a late span revises the trace: its row now counts every eval, and so does the window
    revised = written.with_columns(pl.lit(5, pl.Int64).alias("evals_total"), pl.lit(1, pl.Int32).alias("revision"),
                                   pl.lit(_ts(time.time() - 5)).alias("completed_at"))
    store.derived(replace_traces(revised.to_arrow(), ["t1"], int(completed * 1e6) - 1))
    state.on_write(revised, pl.DataFrame({"trace_id": ["t1"] * 3, "name": ["tone", "tone", None],
                                          "passed": [True, False, False], "n": [2, 2, 1]}), ["t1"])
    for snap in (state.refresh(), query.refresh()):
        assert snap.evals.select("eval", "fail_ratio", "n").rows() == [("tone", 0.5, 4)]
        assert snap.traces.select("route", "n").rows() == [("baseline", 1)]


def test_serve_window_follows_the_assembler_and_a_reprice(serve_factory, tmp_path):
    """Live: serve's window comes from the in-memory state, and a reprice through the running server shows."""
    import subprocess

    from harness import REPO, SHADOWLENS, wait_for
    from test_analyzers import FAST, PRICE_CONFIG, make_traces, scrape, send_shuffled, total

    cfg = tmp_path / "prices.yaml"
    cfg.write_text(PRICE_CONFIG)
    server = serve_factory(env=FAST, args=["--config", str(cfg)])
    rng = random.Random(3)
    traces = make_traces(rng, 30)
    send_shuffled(server, [s for spans, _ in traces for s in spans], rng)
    wait_for(lambda: total(scrape(server), "shadowlens_window_traces") == 30)

    def window_costs() -> dict:
        return {lab: v for (name, lab), v in scrape(server).items() if name == "shadowlens_window_cost_per_trace_usd"}

    def store_costs() -> dict:
        rows = server.query("select route, intent, language, tier, avg(cost_usd) as c from traces group by all")
        return {frozenset({"route": r["route"], "intent": r["intent"], "language": r["language"],
                           "tier": r["tier"]}.items()): r["c"] for r in rows}

    def agree() -> bool:
        got, want = window_costs(), store_costs()
        return got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-9) for k in want)

    wait_for(agree, what="the window's costs are the store's")
    before = window_costs()
    new = tmp_path / "new.yaml"
    new.write_text("prices:\n  - {match: 'test-model-a', input: 2.0, output: 4.0, cache_read: 1.0}\n"
                   "  - {match: 'test-model-b', input: 6.0, output: 30.0}\n")
    out = subprocess.run(SHADOWLENS + ["reprice", "--data-dir", str(server.data_dir), "--config", str(new)],
                         capture_output=True, text=True, cwd=REPO, env=server.env, timeout=120)
    assert out.returncode == 0, out.stderr
    wait_for(agree, what="the window's costs are the repriced ones")
    after = window_costs()
    assert any(after[k] != pytest.approx(before[k], rel=1e-6) for k in before if before[k]), \
        "the reprice changed no cost the window shows"


def test_forgetting_combinations_and_names_keeps_the_folded_sums(tmp_path):
    """Cohort values and eval names come from clients: codes no row has any more are forgotten (renumbered),
    the folded sums' codes with them."""
    now, store, query, state, traffic = _folding(tmp_path, exact_traces=10, seed=14)
    for k in range(6):
        traffic.round(now[0] - 850 + 50 * k, new=15)
    state.refresh()
    now[0] += 200                      # the first rounds leave: their combinations and names with them
    before = state.refresh()
    combos, names = len(state._combos), len(state._names)
    state._recode()
    state._rename()
    assert len(state._combos) < combos and len(state._names) <= names
    assert_same(state.refresh(), before)
    assert_close(before, query.refresh())
