"""Read-only SQL over the store, whether or not ``serve`` runs.

DuckDB lets one process open a file for writing, and a running ``serve`` holds it; so
``serve`` answers queries on a Unix socket in the data directory (owner-only permissions),
and without a server the file is opened read-only directly. Results travel as Arrow IPC.
On both paths the connection is sandboxed (database.sandbox): SQL reads the store and no other file.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow as pa

from ..errors import ShadowlensError
from .database import SOCKET_FILE, SegmentPayloads, db_path, register_functions, sandbox
from .files import PRIVATE_FILE

log = logging.getLogger("shadowlens.query")


class QueryError(ShadowlensError):
    """The SQL was refused or failed; the message says why."""


def duckdb_message(exc: BaseException) -> str:
    """DuckDB's error on one line: its first line plus its suggestions ("Did you mean "spans"?",
    "Candidate bindings: ..."), without the multi-line caret picture."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    hints = [line for line in lines[1:] if line.startswith(("Did you mean", "Candidate bindings"))]
    return " ".join(lines[:1] + hints)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(duckdb_message(exc)) from None
    if not statements:
        raise QueryError("no SQL statement given")
    for st in statements:
        if st.type != duckdb.StatementType.SELECT:
            raise QueryError(f"only read-only SELECT queries are allowed here, not {st.type.name}")


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """``sql`` if it is a SELECT, in a read-only transaction: DuckDB itself refuses any write
    (one hidden where the statement check cannot see it, too)."""
    check_read_only(con, sql)
    try:
        con.execute("BEGIN TRANSACTION READ ONLY")
        try:
            return con.sql(sql).to_arrow_table()
        finally:
            con.execute("ROLLBACK")       # a read-only transaction has nothing to keep
    except duckdb.Error as exc:
        raise QueryError(duckdb_message(exc)) from None


def query(data_dir: Path, sql: str, timeout: float = 300.0) -> pa.Table:
    """Run read-only SQL: through a running server's socket, else straight from the file."""
    data_dir = Path(data_dir)
    sock_path = data_dir / SOCKET_FILE
    if sock_path.exists():
        try:
            return _query_socket(sock_path, sql, timeout)
        except (ConnectionRefusedError, FileNotFoundError):
            pass   # a stale socket of a server that died; the file is ours to open
    path = db_path(data_dir)
    if not path.exists():
        raise QueryError(f"no store at {path}: start `shadowlens serve --data-dir {data_dir}` first "
                         "or pass the right --data-dir")
    try:
        # External access is off from the start (not only once sandbox() runs below).
        con = duckdb.connect(str(path), read_only=True, config={"enable_external_access": False})
    except duckdb.IOException as exc:
        raise QueryError(f"cannot open {path} read-only ({str(exc).splitlines()[0]}); is a server running "
                         f"without its socket at {sock_path}?") from None
    decoder = SegmentPayloads(data_dir)
    try:
        con.execute("SET enable_progress_bar = false")     # a command's output is its answer, nothing else
        sandbox(con)
        register_functions(con, decoder)
        return run_query(con, sql)
    finally:
        con.close()
        decoder.close()


def call_server(data_dir: Path, request: dict, timeout: float = 300.0) -> pa.Table | None:
    """Send a request (``{"op": name, ...}``) to a running server; None when no server is running."""
    sock_path = Path(data_dir) / SOCKET_FILE
    if not sock_path.exists():
        return None
    try:
        return _call_socket(sock_path, request, timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        return None


def _query_socket(path: Path, sql: str, timeout: float) -> pa.Table:
    return _call_socket(path, {"sql": sql}, timeout)


def _call_socket(path: Path, request: dict, timeout: float) -> pa.Table:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        f = s.makefile("rb")
        head = json.loads(f.readline() or b'{"ok": false, "error": "server closed the connection"}')
        if not head.get("ok"):
            raise QueryError(head.get("error", "query failed"))
        return pa.ipc.open_stream(f).read_all()


class QueryServer:
    """Serves read-only SQL on ``<data_dir>/serve.sock`` from a running ``serve``.

    Queries run on the cursors of ``cursor_factory`` in read-only transactions. A request other than
    a query (``requests``: op name -> fn(request) -> pa.Table, e.g. ``reprice``) gets no connection:
    what it changes it hands to the store's writer."""

    def __init__(self, data_dir: Path, cursor_factory, requests: dict[str, Callable[[dict], pa.Table]] | None = None,
                 sync=None):
        """``sync``: called before each query so that it sees every span acknowledged before it."""
        self.path = Path(data_dir) / SOCKET_FILE
        self.cursor_factory = cursor_factory
        self.sync = sync
        self.requests = dict(requests or {})
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.path.exists():
            self.path.unlink()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    req = json.loads(self.rfile.readline() or b"{}")
                    if outer.sync is not None:
                        outer.sync()
                    table = outer.answer(req)
                except Exception as exc:  # the client gets every failure as a message
                    msg = str(exc) if isinstance(exc, QueryError) else f"{type(exc).__name__}: {exc}"
                    self.wfile.write(json.dumps({"ok": False, "error": msg}).encode() + b"\n")
                    return
                self.wfile.write(b'{"ok": true}\n')
                with pa.ipc.new_stream(self.wfile, table.schema) as w:
                    w.write_table(table)

        old = os.umask(0o077)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
            os.chmod(self.path, PRIVATE_FILE)       # connecting needs write permission: the owner's only
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="query-socket", daemon=True)
        self._thread.start()

    def answer(self, req: dict) -> pa.Table:
        op = req.get("op", "query")
        if op in self.requests:
            return self.requests[op](req)
        if op != "query":
            raise QueryError(f"unknown request {op!r}: send a query ({{\"sql\": ...}}) or one of {sorted(self.requests)}")
        con = self.cursor_factory()
        try:
            return run_query(con, str(req.get("sql", "")))
        finally:
            con.close()

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
