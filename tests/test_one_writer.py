"""One writer: every DuckDB write goes through the store's writer thread; the query socket only reads.

Three checks: the derived-write path itself (ordered, counted, errors raised), a static scan of every
product module for SQL that writes outside the writer's modules, and a run of the assembler,
retention, reprice and quarantine against a store whose reading cursors refuse any write.
"""
from __future__ import annotations

import ast
import random
import re
import threading
import time
from pathlib import Path

import duckdb
import pytest
from harness import REPO, wait_for
from otlp_builders import random_spans, span_request

from shadowlens.analyzers.assembly import TraceAssembler
from shadowlens.analyzers.reprice import reprice_write
from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.decode.normalize import Normalizer
from shadowlens.collector.decode.pricing import PriceTable
from shadowlens.collector.errors import Overloaded, ShuttingDown
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.derived import DerivedQueue, DerivedWrite
from shadowlens.collector.store.reader import QueryError, QueryServer, run_query
from shadowlens.collector.store.retention import Retention
from shadowlens.collector.store.segments import SegmentLog
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config

LAYERS = ("collector", "analyzers", "exporters", "shadowlens")
# The modules that may hold SQL that writes, and why:
WRITERS = {
    "collector/store/writer.py": "the writer: span commits, its own bookkeeping, the file's attachment",
    "collector/store/derived.py": "the derived writes the writer runs (traces, retention, reprice)",
    "collector/schema.py": "the tables' DDL and the span insert, executed by the writer and migrations",
    "collector/store/database.py": "migrations and a crash's torn-tail repair, run by the writer when it opens the store",
    "collector/store/group.py": "a group commit's inserts, run by the writer",
    "collector/store/quarantine.py": "the quarantine row, inserted only with the writer's connection",
}
WRITE_WORDS = r"INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s|DROP\s|ALTER\s|COPY\s|TRUNCATE\s"
WRITE_SQL = re.compile(rf"(^|[\s(;])({WRITE_WORDS})")                  # SQL written in capitals, anywhere
WRITE_SQL_ANY_CASE = re.compile(rf"^\s*({WRITE_WORDS})", re.IGNORECASE)  # what is handed to execute() / sql()
SQL_CALLS = {"execute", "executemany", "sql", "query", "frame"}


# -- helpers -------------------------------------------------------------------------------------

class ReadOnlyCursor:
    """A store cursor that fails the test on any statement but a read (or a transaction's begin/end)."""
    READS = {duckdb.StatementType.SELECT, duckdb.StatementType.TRANSACTION, duckdb.StatementType.EXPLAIN}

    def __init__(self, con: duckdb.DuckDBPyConnection, refused: list[str]):
        self._con, self._refused = con, refused

    def _check(self, sql: str) -> None:
        for st in self._con.extract_statements(sql):
            if st.type not in self.READS:
                self._refused.append(sql)
                raise AssertionError(f"a {st.type.name} on a reading cursor, outside the writer: {sql[:80]}")

    def execute(self, sql, *args, **kwargs):
        self._check(sql)
        return self._con.execute(sql, *args, **kwargs)

    def sql(self, sql, *args, **kwargs):
        self._check(sql)
        return self._con.sql(sql, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._con, name)


class GuardedStore(StoreWriter):
    """The real writer; only the cursors it lends to readers refuse writes."""
    refused: list[str]

    def cursor(self):
        return ReadOnlyCursor(super().cursor(), self.refused)


def _store(tmp_path: Path, cls=StoreWriter, now=time.time) -> StoreWriter:
    store = cls(tmp_path, default_config().cohort_labels, IngestCounters(), now=now)
    store.refused = []
    store.start()
    return store


def _commit(store: StoreWriter, spans: list[dict]):
    """Append the request to the segment log as the ingest frontend does, then hand it to the writer."""
    payload = span_request(spans).SerializeToString()
    cfg = default_config()
    log = SegmentLog(store.data_dir / SEGMENTS_DIR, store.first_segment)
    try:
        seg, off, _ = log.append(payload, "traces")
        log.sync()
    finally:
        log.close()
    batch = Normalizer(cfg.cohort_labels, cfg.evals, PriceTable.load([])).normalize_traces(payload)
    store.submit(batch, (seg, off, len(payload))).result(30)
    return seg, off, len(payload)


def consumed(store: StoreWriter, assembler: TraceAssembler) -> None:
    """Wait until the assembler has seen every commit (it stamps arrival with the test's clock)."""
    wait_for(lambda: assembler._seq >= store.committed_seq, 30, what="the assembler to consume the commits")


def _count(store: StoreWriter, sql: str) -> int:
    con = store.cursor()
    try:
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


# -- the derived-write path ----------------------------------------------------------------------

def test_a_derived_write_runs_on_the_writer_thread_after_the_commits_before_it(tmp_path):
    store = _store(tmp_path)
    try:
        _commit(store, random_spans(8, random.Random(1)))
        seen = store.write(DerivedWrite("probe", lambda con: (
            threading.current_thread().name, con.execute("SELECT count(*) FROM spans_core").fetchone()[0]))).result(10)
        assert seen == ("shadowlens-store-writer", 8)
        assert store.derived.done["probe"] == 1 and not store.derived.failed
    finally:
        store.shutdown()


def test_a_failed_derived_write_is_rolled_back_raised_to_its_caller_and_counted(tmp_path):
    store = _store(tmp_path)

    def half_then_fail(con):
        con.execute("INSERT INTO shadowlens_meta VALUES ('probe', 'half')")
        raise ValueError("the second half failed")
    try:
        with pytest.raises(ValueError, match="second half"):
            store.write(DerivedWrite("probe", half_then_fail)).result(10)
        assert store.derived.failed["probe"] == 1
        assert _count(store, "SELECT count(*) FROM shadowlens_meta WHERE key = 'probe'") == 0   # rolled back
        _commit(store, random_spans(4, random.Random(2)))          # the writer goes on
        assert store.write(DerivedWrite("probe", lambda con: 1)).result(10) == 1
    finally:
        store.shutdown()


def test_the_writer_refuses_a_derived_write_unless_it_runs(tmp_path):
    store = StoreWriter(tmp_path, default_config().cohort_labels, IngestCounters())
    with pytest.raises(ShuttingDown, match="not running"):
        store.write(DerivedWrite("probe", lambda con: 1))
    store.start()
    store.shutdown()
    with pytest.raises(ShuttingDown, match="not running"):
        store.write(DerivedWrite("probe", lambda con: 1))
    with pytest.raises(TypeError, match="DerivedWrite"):
        store.derived.put(lambda con: 1)


def test_derived_writes_are_counted_on_metrics_by_write_and_result(tmp_path):
    """What the writer spends between span commits is visible: each derived write by name and result, and its
    time, on /metrics' families (the shipped names are shown at zero from the start)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from shadowlens.exporters.prometheus import IngestCollector

    store = StoreWriter(tmp_path, default_config().cohort_labels, IngestCounters())
    store.start()
    try:
        assert store.write(DerivedWrite("retention", lambda con: con.execute("SELECT 1").fetchone())).result(10)
        store.write(DerivedWrite("retention", lambda con: None)).result(10)

        def broken(con):
            raise ValueError("a derived write that fails")
        with pytest.raises(ValueError, match="fails"):
            store.write(DerivedWrite("reprice", broken)).result(10)
    finally:
        store.shutdown()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(IngestCounters(), lambda: 0.0, derived=store.derived.snapshot))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(registry).decode())
               for s in fam.samples if s.name.startswith("shadowlens_store_derived")}
    writes = {labels: v for (name, labels), v in samples.items() if name == "shadowlens_store_derived_writes_total"}
    assert writes[(("result", "done"), ("write", "retention"))] == 2
    assert writes[(("result", "failed"), ("write", "reprice"))] == 1
    assert writes[(("result", "done"), ("write", "reprice"))] == 0
    assert writes[(("result", "done"), ("write", "traces"))] == 0          # shown before the first one
    seconds = {labels: v for (name, labels), v in samples.items()
               if name == "shadowlens_store_derived_write_seconds_total"}
    assert seconds[(("write", "retention"),)] > 0 and seconds[(("write", "quarantine"),)] == 0


def test_the_derived_queue_is_bounded():
    queue = DerivedQueue(max_pending=2)
    for _ in range(2):
        queue.put(DerivedWrite("probe", lambda con: 1))
    with pytest.raises(Overloaded, match="2 derived writes wait"):
        queue.put(DerivedWrite("probe", lambda con: 1))
    assert queue.failed["probe"] == 1


# -- the query socket only reads -----------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "DELETE FROM spans_core", "UPDATE traces SET cost_usd = 0", "INSERT INTO shadowlens_meta VALUES ('k', 'v')",
    "CREATE TABLE x (a INT)", "DROP TABLE traces", "SELECT 1; DELETE FROM spans_core", "CHECKPOINT",
])
def test_the_query_socket_refuses_a_write(tmp_path, sql):
    store = _store(tmp_path)
    try:
        server = QueryServer(tmp_path, store.cursor)
        with pytest.raises(QueryError, match="read-only"):
            server.answer({"sql": sql})
        assert server.answer({"sql": "SELECT count(*) AS n FROM traces"}).to_pylist() == [{"n": 0}]
        with pytest.raises(QueryError, match="unknown request 'reprice'"):
            server.answer({"op": "reprice"})      # only what serve wires in, and that gets no connection
    finally:
        store.shutdown()


def test_a_query_runs_in_a_read_only_transaction(tmp_path):
    """A write the statement check cannot see (a sequence advanced inside a SELECT) is refused by DuckDB."""
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    con.execute("CREATE SEQUENCE s")
    with pytest.raises(QueryError, match="read-only"):
        run_query(con, "SELECT nextval('s')")
    assert con.execute("SELECT nextval('s')").fetchone()[0] == 1      # it never advanced


# -- no module writes outside the writer ---------------------------------------------------------

def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _strings(node: ast.AST, names: dict[str, ast.AST]) -> list[str]:
    """The string pieces of an expression; a plain name is followed to what the module assigns it."""
    if isinstance(node, ast.Name) and node.id in names:
        node = names[node.id]
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def write_sql_outside_the_writer(root: Path) -> list[str]:
    """``path:line: sql`` for each piece of SQL that writes, in a product module that is not one of WRITERS."""
    found = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in WRITERS:
                continue
            tree = ast.parse(path.read_text(), rel)
            docs = _docstrings(tree)
            names = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                    if WRITE_SQL.search(node.value):
                        found.append(f"{rel}:{node.lineno}: {node.value.strip()[:60]}")
                elif isinstance(node, ast.Call) and node.args:
                    func = node.func
                    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    sql_arg = node.args[1] if name == "frame" and len(node.args) > 1 else node.args[0]
                    if name in SQL_CALLS and any(WRITE_SQL_ANY_CASE.search(s) for s in _strings(sql_arg, names)):
                        found.append(f"{rel}:{node.lineno}: {name}() of SQL that writes")
    return sorted(set(found))


def test_no_product_module_writes_to_duckdb_outside_the_writer():
    found = write_sql_outside_the_writer(REPO)
    assert not found, ("SQL that writes outside the store's writer (hand it over as a DerivedWrite: "
                       "collector/store/derived.py):\n" + "\n".join(found))


@pytest.mark.parametrize("injected", [
    'def f(con):\n    con.execute("DELETE FROM traces WHERE trace_id = ?", ["x"])\n',
    'SQL = "update traces set cost_usd = 0"\n\ndef f(cur):\n    cur.sql(SQL)\n',
    'def f(con, t):\n    con.execute(f"INSERT INTO traces SELECT * FROM {t}")\n',
    'DDL = "CREATE TABLE IF NOT EXISTS x (a INT)"\n',
])
def test_the_scan_finds_a_write_injected_into_an_analyzer(tmp_path, injected):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "analyzers" / "sneaky.py").write_text('"""Delete from the table: prose is no SQL."""\n' + injected)
    assert {f.split(":")[0] for f in write_sql_outside_the_writer(tmp_path)} == {"analyzers/sneaky.py"}


# -- at run time: the assembler, retention, reprice and quarantine write only through the writer --

def test_trace_rows_retention_reprice_and_quarantine_write_through_the_writer(tmp_path):
    clock = [time.time()]
    store = _store(tmp_path, GuardedStore, now=lambda: clock[0])
    assembler = TraceAssembler(store, default_config().cohort_labels, idle_s=0.2, max_s=60.0, routes={}, poll_s=0.05,
                               now=lambda: clock[0])
    assembler.start()
    try:
        spans = random_spans(8, random.Random(5))                # two traces of four spans
        _commit(store, spans[:3] + spans[4:])
        consumed(store, assembler)
        clock[0] += 1.0
        wait_for(lambda: _count(store, "SELECT count(*) FROM traces") == 2, 30, what="two trace rows")
        ref = _commit(store, spans[3:4])                         # a late span: its trace's row is replaced
        consumed(store, assembler)
        clock[0] += 1.0
        wait_for(lambda: _count(store, "SELECT max(revision) FROM traces") == 1, 30, what="a revised trace row")
        assert _count(store, "SELECT count(*) FROM traces") == 2
        assert store.write(reprice_write(PriceTable.load([]))).result(30).spans == 6
        store.set_aside(ref, "traces", "decode", "a test sets it aside")
        clock[0] += 3 * 86400
        retention = Retention(tmp_path, store.write, retention_s=86400, interval_s=3600,
                              current_segment=store.current_segment, now=lambda: clock[0])
        assert retention.run_once() == 8
    finally:
        assembler.shutdown()
        store.shutdown()
    assert store.refused == []
    done = store.derived.done
    assert done["traces"] >= 2 and done["reprice"] == 1 and done["quarantine"] == 1 and done["retention"] == 1
    assert not store.derived.failed
