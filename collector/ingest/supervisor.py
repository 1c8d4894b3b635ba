"""IngestSupervisor: starts, watches and stops the frontend and decoder processes, a Component.

It runs in serve's process beside the StoreWriter: it decodes the frontend's records itself or passes
them to the decoder process (DecodePolicy), hands the Batches to the writer and answers each record to
the frontend with an Ack once committed, or a Nack that says where the record is (the rule for records
that cannot be decoded or inserted: ``shadowlens.collector.ingest``).
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
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection

from ..counters import IngestCounters, sum_snapshots
from ..errors import SetAside
from . import decoder, frontend, memory
from .messages import Ack, Barrier, Batch, Counters, Failed, IngestSettings, Nack, Ready, Record, Stop, Stopped, Undecodable

log = logging.getLogger("shadowlens.ingest")

# Decoded spans this process holds for the writer: two of its largest groups (writer.MAX_GROUP_SPANS).
DECODED_MAX_SPANS = 65536
CHILDREN = ("frontend", "decoder")
DECODER_COUNTERS = ("unpriced_spans", "mixed_spans")    # what a decoder counts (decoder.RecordDecoder)


@dataclass(frozen=True)
class DecodePolicy:
    """When ``receivers.decoder_process: auto`` starts and stops the decoder process.

    Decoding in serve's process saves a process (~50 MB: an interpreter with its own pyarrow, numpy and
    protobuf) and the pickling of every batch across a pipe. But decoding holds the GIL, and DuckDB's
    inserts in this process need it back many times each (see ``shadowlens.collector.ingest``): past a
    small share of a core it would slow the writer, so the decoder process takes over. It stops once
    what it decodes would take under ``stop_busy`` of a core here (estimated from this process's own
    seconds per payload byte) for ``stop_after_s``: a burst does not keep a process for good."""
    start_busy: float = 0.25      # share of a core spent decoding here, over ``window_s``, that starts it
    stop_busy: float = 0.05
    window_s: float = 5.0
    stop_after_s: float = 300.0


class _DecoderChild:
    """A running decoder process: its input pipe, its last counters, whether it was asked to stop."""

    def __init__(self, proc: "ChildProcess", conn: Connection) -> None:
        self.proc, self.conn = proc, conn
        self.counted: dict = {}             # its last Counters (cumulative)
        self.stopping = False
        self.gone = threading.Event()       # its output pipe closed

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
    """Owns the ingest processes; ``sync`` gives read-your-acks. Commits through ``store``."""

    def __init__(self, store, settings: IngestSettings, child_counters: dict, start_timeout: float = 60.0,
                 policy: DecodePolicy = DecodePolicy()):
        """``store``: the StoreWriter of this process. ``child_counters`` is kept equal to the sum of what
        the frontend and the decoders counted (the Prometheus collector reads it)."""
        self.store = store
        self.settings = settings
        self.mode = settings.receivers.decoder_process
        self.policy = policy
        self.child_counters = child_counters
        self.start_timeout = start_timeout
        self.ready = False
        self._procs: dict[str, ChildProcess] = {}
        self._decoder: _DecoderChild | None = None     # the decoder process while it runs
        self._fe_conn = None
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._stopped = {name: threading.Event() for name in CHILDREN}
        self._frontend_counted: dict = {}
        # what every decoder counted (this process's, and each decoder process's folded in): one capped set
        self._decoded = IngestCounters(max_models=settings.metrics_max_models)
        self._counters_lock = threading.Lock()
        self._failure: str | None = None
        self._barriers: dict[int, threading.Event] = {}
        self._barrier_ids = itertools.count(1)
        self._stopping = False
        self._child_died = False
        self.records_passed = 0       # records decoded by a decoder process, not here
        self.on_child_exit = None     # called once if a child process ends without being asked to

    def start(self) -> None:
        # glibc gives each thread that allocates its own malloc arena (up to 8 per core); with
        # 30-odd receiver threads holding 1 MB requests that was ~150 MB of RSS in the frontend.
        # The children inherit the environment (memory.py: also the decoder's Arrow buffers from malloc).
        memory.set_environment()
        fe_parent, fe_child = multiprocessing.Pipe(duplex=True)
        records_in, fe_records = multiprocessing.Pipe(duplex=False)        # frontend -> records
        self._fe_conn = fe_parent
        self._procs["frontend"] = ChildProcess("frontend", (fe_child, fe_records), (self.settings, self.store.first_segment))
        self._procs["frontend"].start()
        for c in (fe_child, fe_records):
            c.close()
        if self.mode == "always":
            self._start_decoder()
        threading.Thread(target=self._read, args=("frontend", fe_parent), name="shadowlens-ingest-frontend",
                         daemon=True).start()
        threading.Thread(target=self._route, args=(records_in,), name="shadowlens-ingest-decode", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.1):
            dead = [n for n, p in self._procs.items() if not p.is_alive()]
            if self._failure or dead or time.monotonic() > deadline:
                self._kill()
                raise OSError(self._failure or f"the ingest {' and '.join(dead) or 'frontend'} did not start")
        if self._decoder is not None:
            log.info("ingest processes: frontend pid %d, decoder pid %d", self._procs["frontend"].pid,
                     self._decoder.proc.pid)
        else:
            log.info("ingest processes: frontend pid %d; records are decoded in this process "
                     "(receivers.decoder_process: %s)", self._procs["frontend"].pid, self.mode)
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
                self._exited(name)
                return
            self._dispatch(name, msg)

    def _exited(self, name: str) -> None:
        if self.ready and not self._stopping:
            log.error("the ingest %s process exited unexpectedly", name)
            self._child_died = True
            if self.on_child_exit is not None:
                self.on_child_exit()

    # -- decoding: here, or in the decoder process ----------------------------------------------------

    def _route(self, conn) -> None:
        """The frontend's records and barriers, in order: each record decoded here, or passed to the
        decoder process while it runs; DecodePolicy starts and stops it (``receivers.decoder_process``)."""
        from .decoder import RecordDecoder
        local = None          # built at the first record decoded here
        idle = memory.IdleRelease()
        policy = self.policy
        window_start, busy, passed = time.monotonic(), 0.0, 0
        seconds_per_byte = None
        quiet_since = None
        while True:
            msg = None
            try:
                # an idle sidecar does not wake, but to give back the library code only startup ran
                # (memory.py); with the decoder process running, it wakes to judge its load
                wait = idle.wait_s()
                if self._decoder is not None and self.mode == "auto":
                    wait = policy.window_s if wait is None else min(wait, policy.window_s)
                if conn.poll(wait):
                    msg = conn.recv()
                else:
                    idle.maybe()
            except (EOFError, OSError):
                break
            if isinstance(msg, Record):
                idle.busy()         # a reader's barrier (read-your-acks) is not work
                if self._decoder is not None:
                    self._pass(msg)
                    passed += msg.length
                    self.records_passed += 1
                else:
                    if local is None:
                        local = RecordDecoder(self.settings, self._decoded)
                    t0 = time.perf_counter()
                    out, counted = local(msg)
                    took = time.perf_counter() - t0
                    busy += took
                    per_byte = took / max(msg.length, 1)
                    seconds_per_byte = per_byte if seconds_per_byte is None else 0.9 * seconds_per_byte + 0.1 * per_byte
                    if counted:
                        self._merge_counters()
                    self._dispatch("decoder", out)
            elif isinstance(msg, Barrier):
                if self._decoder is not None:
                    self._pass(msg)        # it comes back behind every record passed before it
                else:
                    self._dispatch("decoder", msg)
            now = time.monotonic()
            elapsed = now - window_start
            if self.mode != "auto":
                continue
            if self._decoder is None:
                # at once when this window's decoding already exceeds the share of a whole window: under a
                # sudden load the process starts after ~start_busy * window_s of decoding, not a window later
                if busy > policy.start_busy * max(elapsed, policy.window_s):
                    log.info("decoding took %.1f s of %.1f s in this process: starting the decoder process",
                             busy, elapsed)
                    self._start_decoder()
                    quiet_since = None
                elif elapsed < policy.window_s:
                    continue
            else:
                if elapsed < policy.window_s:
                    continue
                share = passed * (seconds_per_byte or 0.0) / elapsed
                if share >= policy.stop_busy:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = window_start
                elif now - quiet_since >= policy.stop_after_s:
                    log.info("decoding would take %.0f%% of a core in this process: stopping the decoder process",
                             100 * share)
                    self._stop_decoder()
            window_start, busy, passed = now, 0.0, 0
        if self._decoder is not None:        # the frontend closed its end: pass on what is left, then stop
            self._stop_decoder()
        self._stopped["decoder"].set()

    def _start_decoder(self) -> None:
        to_child, from_route = multiprocessing.Pipe(duplex=False)
        from_child, to_parent = multiprocessing.Pipe(duplex=False)
        proc = ChildProcess("decoder", (to_child, to_parent), (self.settings,))
        proc.start()
        to_child.close()
        to_parent.close()
        child = _DecoderChild(proc, from_route)
        self._procs["decoder"] = proc
        self._decoder = child
        threading.Thread(target=self._read_decoder, args=(child, from_child), name="shadowlens-ingest-decoder",
                         daemon=True).start()
        if self.ready:
            log.info("decoder pid %d started", proc.pid)

    def _pass(self, msg) -> None:
        try:
            self._decoder.conn.send(msg)
        except (OSError, EOFError):
            pass        # it died: its reader says so (and serve stops); the records stay in the segment log

    def _stop_decoder(self, timeout: float = 60.0) -> None:
        """Close the decoder process's input and wait until it has passed on everything and exited."""
        child, self._decoder = self._decoder, None
        child.stopping = True
        child.conn.close()
        child.gone.wait(timeout)
        child.proc.join(timeout)
        if self._procs.get("decoder") is child.proc:
            self._procs.pop("decoder", None)

    def _read_decoder(self, child: _DecoderChild, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                child.gone.set()
                if not child.stopping:
                    self._stopped["decoder"].set()
                    self._exited("decoder")
                return
            if isinstance(msg, Counters):
                self._fold(child, msg.values)
            elif not isinstance(msg, Stopped):
                self._dispatch("decoder", msg)

    def _fold(self, child: _DecoderChild, values: dict) -> None:
        """A decoder process's cumulative counters: what is new since its last ones joins this process's."""
        for name in DECODER_COUNTERS:
            new = Counter(values.get(name) or {})
            new.subtract(child.counted.get(name) or {})
            grown = Counter({k: n for k, n in new.items() if n > 0})
            if grown:
                self._decoded.add_many(name, grown)
        child.counted = values
        self._merge_counters()

    def _merge_counters(self) -> None:
        with self._counters_lock:
            merged = sum_snapshots(self._frontend_counted, self._decoded.snapshot())
            self.child_counters.clear()
            self.child_counters.update(merged)

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
            self._frontend_counted = msg.values
            self._merge_counters()
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
        for name in CHILDREN:       # the frontend drains, then closes the records' pipe: decoding follows
            self._stopped[name].wait(timeout)
            p = self._procs.get(name)
            if p is not None:
                p.join(timeout)
        self._kill()

    def _kill(self) -> None:
        for p in list(self._procs.values()):     # the decoding thread may stop its process meanwhile
            if p.is_alive():
                p.kill()
            p.join(1)
        self._procs = {}
        self._decoder = None
