"""IngestSupervisor: starts, watches and stops the frontend and decoder processes, a Component.

It runs in serve's process beside the StoreWriter: it hands the decoder's Batches to the writer
and answers each record to the frontend with an Ack once committed, or a Nack that says where the
record is (the rule for records that cannot be decoded or inserted: ``shadowlens.collector.ingest``).
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import pickle
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from ..counters import sum_snapshots
from ..errors import SetAside
from . import decoder, frontend, memory
from .messages import Ack, Barrier, Batch, Counters, Failed, IngestSettings, Nack, Ready, Stop, Stopped, Undecodable

log = logging.getLogger("shadowlens.ingest")

# Decoded spans this process holds for the writer: two of its largest groups (writer.MAX_GROUP_SPANS).
DECODED_MAX_SPANS = 65536
CHILDREN = ("frontend", "decoder")

# A child reads its role, its pipes' descriptors and its arguments, then runs the role's main.
_BOOT = "from shadowlens.collector.ingest.supervisor import _child_main; _child_main()"


class ChildProcess:
    """A child process as a fresh interpreter (subprocess), holding the ends of ``multiprocessing`` pipes.

    Not multiprocessing's spawn: it also starts multiprocessing's resource tracker, a third Python
    process (~8 MB) that these children, which share no semaphores or shared memory, never use, and
    it re-imports serve's main module (the CLI: click, yaml) into each child before its work begins.
    The pipes' descriptors are inherited (pass_fds); the other arguments are pickled on stdin."""

    def __init__(self, role: str, conns: tuple, args: tuple):
        self.role, self.conns, self.args = role, conns, args
        self._popen: subprocess.Popen | None = None

    def start(self) -> None:
        spec = [f"{c.fileno()}:{int(c.readable)}{int(c.writable)}" for c in self.conns]
        cmd = [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", _BOOT, self.role, *spec]
        self._popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=[c.fileno() for c in self.conns])
        try:
            self._popen.stdin.write(pickle.dumps(self.args))
            self._popen.stdin.close()
        except OSError:
            pass    # it died at once; the supervisor sees it as not alive

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def is_alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()


def _child_main() -> None:
    """The child's side of ChildProcess: rebuild the pipe ends, read the arguments, run the role."""
    role, *spec = sys.argv[1:]
    conns = [Connection(int(fd), readable=rw[0] == "1", writable=rw[1] == "1")
             for fd, rw in (s.split(":") for s in spec)]
    args = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    target = {"frontend": frontend.main, "decoder": decoder.main}[role]
    target(*conns, *args)


class IngestSupervisor:
    """Owns the two ingest processes; ``sync`` gives read-your-acks. Commits through ``store``."""

    def __init__(self, store, settings: IngestSettings, child_counters: dict, start_timeout: float = 60.0):
        """``store``: the StoreWriter of this process. ``child_counters`` is kept equal to the sum of
        the two children's counters (the Prometheus collector reads it)."""
        self.store = store
        self.settings = settings
        self.child_counters = child_counters
        self.start_timeout = start_timeout
        self.ready = False
        self._procs: dict[str, ChildProcess] = {}
        self._fe_conn = None
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._stopped = {name: threading.Event() for name in CHILDREN}
        self._counters: dict[str, dict] = {name: {} for name in CHILDREN}
        self._failure: str | None = None
        self._barriers: dict[int, threading.Event] = {}
        self._barrier_ids = itertools.count(1)
        self._stopping = False
        self._child_died = False
        self.on_child_exit = None     # called once if a child process ends without being asked to

    def start(self) -> None:
        # glibc gives each thread that allocates its own malloc arena (up to 8 per core); with
        # 30-odd receiver threads holding 1 MB requests that was ~150 MB of RSS in the frontend.
        # The children inherit the environment (memory.py: also the decoder's Arrow buffers from malloc).
        memory.set_environment()
        fe_parent, fe_child = multiprocessing.Pipe(duplex=True)
        dec_in, fe_to_dec = multiprocessing.Pipe(duplex=False)        # frontend -> decoder
        dec_parent, dec_out = multiprocessing.Pipe(duplex=False)      # decoder -> supervisor
        self._fe_conn = fe_parent
        self._procs["decoder"] = ChildProcess("decoder", (dec_in, dec_out), (self.settings,))
        self._procs["frontend"] = ChildProcess("frontend", (fe_child, fe_to_dec), (self.settings, self.store.first_segment))
        for p in self._procs.values():
            p.start()
        for c in (fe_child, fe_to_dec, dec_in, dec_out):
            c.close()
        for name, conn in (("frontend", fe_parent), ("decoder", dec_parent)):
            threading.Thread(target=self._read, args=(name, conn), name=f"shadowlens-ingest-{name}", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.1):
            dead = [n for n, p in self._procs.items() if not p.is_alive()]
            if self._failure or dead or time.monotonic() > deadline:
                self._kill()
                raise OSError(self._failure or f"the ingest {' and '.join(dead) or 'frontend'} did not start")
        log.info("ingest processes: frontend pid %d, decoder pid %d", self._procs["frontend"].pid,
                 self._procs["decoder"].pid)
        self.ready = True
        # Exported queue depth: the frontend's (acknowledged, not committed; what admission bounds),
        # not this process's writer queue, which holds only what the decoder has passed on so far.
        self.store.stats.gauges["ingest_queue_spans"] = lambda: float(self.child_counters.get("ingest_queue_spans", 0))

    def pid(self, child: str) -> int | None:
        """The process id of ``frontend`` or ``decoder`` while it runs."""
        p = self._procs.get(child)
        return p.pid if p is not None else None

    def _send(self, msg) -> None:
        with self._send_lock:
            try:
                self._fe_conn.send(msg)
            except (OSError, EOFError, BrokenPipeError):
                pass   # the frontend is gone; its clients get no more acks

    def _read(self, name: str, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._stopped[name].set()
                if self.ready and not self._stopping:
                    log.error("the ingest %s process exited unexpectedly", name)
                    self._child_died = True
                    if self.on_child_exit is not None:
                        self.on_child_exit()
                return
            self._dispatch(name, msg)

    def _dispatch(self, name: str, msg) -> None:
        if isinstance(msg, Batch):
            # Decoded batches wait in the decoder's pipe, not here, while DuckDB is behind: the
            # records are durable already, and a full queue of decoded columns cost ~90 MB.
            while not self.store.wait_for_room(DECODED_MAX_SPANS, 1.0):
                pass
            self._submit(msg)
        elif isinstance(msg, Undecodable):
            self._send(Nack(msg.rid, self.set_aside(msg)))
        elif isinstance(msg, Barrier):
            ev = self._barriers.pop(msg.token, None)
            if ev is not None:
                ev.set()
        elif isinstance(msg, Counters):
            self._counters[name] = msg.values
            merged = sum_snapshots(self._counters["frontend"], self._counters["decoder"])
            self.child_counters.clear()
            self.child_counters.update(merged)
        elif isinstance(msg, Ready):
            self._ready.set()
        elif isinstance(msg, Failed):
            self._failure = msg.message
        elif isinstance(msg, Stopped):
            self._stopped[name].set()

    def set_aside(self, msg: Undecodable) -> str:
        """Keep a record the decoder could not decode (quarantine file, row, counter, log line); where it is."""
        try:
            where = f"set aside in {self.store.set_aside(msg.ref, msg.signal, 'decode', msg.reason)}"
        except Exception as exc:  # the record stays in the segment log either way; say so
            log.exception("could not set aside record %d (segment %d, offset %d)", msg.rid, msg.ref[0], msg.ref[1])
            where = f"left in the segment log, segment {msg.ref[0]} offset {msg.ref[1]} ({exc})"
        return f"the decoder could not read it ({msg.reason}); {where}"

    def _submit(self, msg: Batch) -> None:
        fut = self.store.submit(msg.batch, msg.ref, msg.low_segment)    # acknowledged already: the store takes it
        rid = msg.rid

        def done(f) -> None:
            exc = f.exception()
            if exc is None:
                self._send(Ack(rid))
            elif isinstance(exc, SetAside):
                self._send(Nack(rid, str(exc)))
            else:
                self._send(Nack(rid, f"{exc}; it stays in the segment log and is inserted on the next start"))
        fut.add_done_callback(done)

    def sync(self, timeout: float = 10.0) -> bool:
        """Read-your-acks: wait until every record the frontend acknowledged so far is committed."""
        if not self.ready:
            return self.store.flush(timeout)
        token = next(self._barrier_ids)
        ev = self._barriers[token] = threading.Event()
        deadline = time.monotonic() + timeout
        self._send(Barrier(token))
        if not ev.wait(timeout):
            self._barriers.pop(token, None)
            return False
        return self.store.flush(max(0.0, deadline - time.monotonic()))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Ask the frontend to stop accepting and drain; the decoder follows when its input closes."""
        if not self._procs:
            return
        self._stopping = True
        self.ready = False
        if self._child_died:       # nothing will drain: what was acknowledged is in the payload log
            timeout = 2.0
        self._send(Stop())
        for name in ("frontend", "decoder"):
            self._stopped[name].wait(timeout)
            self._procs[name].join(timeout)
        self._kill()

    def _kill(self) -> None:
        for p in self._procs.values():
            if p.is_alive():
                p.kill()
            p.join(1)
        self._procs = {}
