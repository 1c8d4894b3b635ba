"""The receiver's check against the decoder, on mutated requests (issue 14 part 3).

For every input, one of two things must hold:
- the check rejects the request as a whole (PermanentError: INVALID_ARGUMENT, nothing acknowledged), or
- the decoder's batch has exactly the check's counts (received, rejected, reasons, message) and
  ``check.accepted`` span rows, without an exception; its rows go into DuckDB's real tables without an
  error; and every accepted span's ``attributes``, ``events`` and resource read back as JSON.
Anything else is a disagreement: an acknowledged span that would be lost.

Seeds: requests cut from the ingest bench's generated traffic (the shapes of OpenInference, the GenAI
semantic conventions and an app's own spans), tests' richer requests, and requests carrying the values
that were lost before (bad UTF-8, deep nesting, corrupt event bytes, times past int64, NaN).
Mutations: byte flips, inserts, deletes, truncation, splices between seeds, and poisoned fields appended
to a random span. Used by tests/test_decode_agreement.py (seconds) and bench/fuzz.py (millions).
"""
from __future__ import annotations

import functools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from otlp_builders import T0, random_spans, span_request
from wire_bytes import attribute, event, key_value, ld, nested_array, nested_kvlist, span_event, string_value, varint

REPO = Path(__file__).resolve().parents[1]
EVAL = b"gen_ai.evaluation.result"
ALIAS_KEYS = (b"llm.model_name", b"gen_ai.request.model", b"gen_ai.usage.input_tokens", b"llm.cost.total",
              b"gen_ai.response.finish_reasons", b"metadata", b"llm.invocation_parameters", b"eval.score",
              b"eval.name", b"shadow.route", b"evaluations.0.evaluation.name", b"evaluations.0.evaluation.score")


@functools.lru_cache(maxsize=None)
def _deep_kvlist(depth: int) -> bytes:
    return nested_kvlist(depth)


@functools.lru_cache(maxsize=None)
def _deep_array(depth: int) -> bytes:
    return nested_array(depth)


def _double(v: float) -> bytes:
    import struct
    return b"\x21" + struct.pack("<d", v)


def _poison_values(rng: random.Random) -> bytes:
    """One AnyValue of the kinds that broke the decoder or the store."""
    pick = rng.randrange(12)
    if pick == 0:
        return _deep_kvlist(rng.choice([19, 20, 21, 40, 120, 300, 3000]))
    if pick == 1:
        return _deep_array(rng.choice([2, 21, 200, 5000]))
    if pick == 2:
        return string_value(rng.choice([b"\xff", b"caf\xe9", b"\xed\xa0\x80", b"ok\xc3", b"\x80\x80x"]))
    if pick == 3:
        return _double(rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0]))
    if pick == 4:
        return b"\x18" + varint(rng.choice([2**63, 2**64 - 1, 2**63 - 1, 5]))          # int64 as a raw varint
    if pick == 5:
        return string_value(rng.choice([b"1e30", b"nan", b"-inf", b"-7", b"9223372036854775808", b"1e400"]))
    if pick == 6:
        return string_value(rng.choice([b'{"session.id": "\\ud800"}', b'{"model": "\\udfff"}', b'["x\\ud83d"]',
                                        b'{"shadow": {"route": "\\ud800"}}']))
    if pick == 7:
        return ld(6, b"\x0a\x09ab")                       # a kvlist whose KeyValue runs past its end
    if pick == 8:
        return ld(5, ld(1, string_value(b"\xfe")) + ld(1, _deep_kvlist(30)))
    if pick == 9:
        return ld(7, rng.randbytes(rng.randrange(0, 20)))   # bytes_value
    if pick == 10:
        return string_value(b"x" * rng.choice([199, 200, 201, 5000]))
    return rng.randbytes(rng.randrange(1, 12))          # whatever bytes


def _poison_field(rng: random.Random) -> bytes:
    """Raw fields to append to a span: an attribute under an alias key or not, or an eval event."""
    pick = rng.randrange(6)
    if pick <= 1:
        key = rng.choice(ALIAS_KEYS) if pick == 0 else rng.choice([b"tool.args", b"input.value", b"\xff\xfekey"])
        return attribute(key, _poison_values(rng))
    if pick <= 3:
        attrs = ld(3, key_value(b"gen_ai.evaluation.name", rng.choice([string_value(b"q"), _poison_values(rng)])))
        attrs += ld(3, key_value(rng.choice([b"gen_ai.evaluation.score.value", b"gen_ai.evaluation.score.label",
                                             b"x"]), _poison_values(rng)))
        if pick == 3:
            attrs += rng.choice([b"\x1a\x09ab", b"\x1a", rng.randbytes(5)])      # corrupt bytes after the attributes
        return span_event(event(EVAL, attrs, rng.choice([0, T0, 2**64 - 1])))
    if pick == 4:                                         # a time field: start (7) or end (8)
        t = rng.choice([0, 1, T0, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1])
        return bytes([(rng.choice([7, 8]) << 3) | 1]) + t.to_bytes(8, "little")
    return ld(15, ld(2, rng.choice([b"\xff\xfe", b"fine"])) + b"\x18" + varint(rng.choice([0, 2, 7, 300])))   # status


def seed_corpus(n_pool_spans: int = 512, seed: int = 7) -> list[bytes]:
    """Small requests (1-6 spans) cut from the ingest bench's traffic (shadowlens.traffic_pool), plus tests' richer requests."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from shadowlens.traffic_pool import agent_pool
    rng = random.Random(seed)
    pool = ExportTraceServiceRequest.FromString(agent_pool(1, seed).payloads[0])
    out = []
    for rs in pool.resource_spans:
        for ss in rs.scope_spans:
            spans = list(ss.spans)[:n_pool_spans]
            i = 0
            while i < len(spans):
                k = rng.randint(1, 6)
                req = ExportTraceServiceRequest()
                new_rs = req.resource_spans.add()
                new_rs.resource.CopyFrom(rs.resource)
                new_ss = new_rs.scope_spans.add()
                new_ss.scope.CopyFrom(ss.scope)
                for sp in spans[i:i + k]:
                    s = new_ss.spans.add()
                    s.CopyFrom(sp)
                    for kv in s.attributes:       # the prompts are long; their length is not what is tested
                        if kv.value.HasField("string_value") and len(kv.value.string_value) > 64:
                            kv.value.string_value = kv.value.string_value[:64]
                out.append(req.SerializeToString())
                i += k
    for s in range(20):
        r = random.Random(s)
        spans = random_spans(r.randint(1, 8), r)
        for d in spans:
            d["attrs"].update({"gen_ai.response.finish_reasons": ["stop"], "llm.cost.total": r.random(),
                               "metadata": '{"cohort.language": "de", "session.id": "s1"}'})
            d["events"] = [("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "task", "gen_ai.evaluation.score.value":
                                                         r.random()})]
            for key in d["attrs"]:
                if key == "input.value":
                    d["attrs"][key] = "x" * 40
        out.append(span_request(spans).SerializeToString())
    return out


def _append_to_a_span(rng: random.Random, payload: bytes, extra: bytes) -> bytes | None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from wire_bytes import with_span_extras
    try:
        req = ExportTraceServiceRequest.FromString(payload)
    except Exception:  # a mutated seed: append nothing
        return None
    where = [(r, s, p) for r, rs in enumerate(req.resource_spans) for s, ss in enumerate(rs.scope_spans)
             for p in range(len(ss.spans))]
    if not where:
        return None
    return with_span_extras(req, {rng.choice(where): extra})


def mutate(rng: random.Random, seeds: list[bytes], poisoned: list[bytes]) -> bytes:
    """A poisoned seed as it is (a third of the inputs: valid protobuf framing, bad values), or a seed or
    poisoned seed with 1-6 byte-level mutations (mostly broken framing, which the check must refuse whole)."""
    if rng.random() < 0.35:
        return rng.choice(poisoned)
    data = bytearray(rng.choice(poisoned if rng.random() < 0.5 else seeds))
    for _ in range(rng.choice([1, 1, 1, 2, 3, 6])):
        op = rng.randrange(7)
        if not data:
            break
        i = rng.randrange(len(data))
        if op <= 2:
            data[i] = rng.randrange(256) if op else data[i] ^ (1 << rng.randrange(8))
        elif op == 3:
            data[i:i] = rng.randbytes(rng.randint(1, 4))
        elif op == 4:
            del data[i:i + rng.randint(1, 16)]
        elif op == 5:
            other = rng.choice(seeds)
            j = rng.randrange(len(other))
            data[i:i + rng.randint(0, 32)] = other[j:j + rng.randint(1, 64)]
        else:
            data = data[:i]
    return bytes(data)


def poisoned_corpus(rng: random.Random, seeds: list[bytes], n: int) -> list[bytes]:
    out = []
    while len(out) < n:
        base = rng.choice(seeds)
        for _ in range(rng.randint(1, 3)):
            nxt = _append_to_a_span(rng, base, _poison_field(rng))
            if nxt is None:
                break
            base = nxt
        out.append(base)
    return out


@dataclass
class Tally:
    inputs: int = 0
    rejected_whole: int = 0
    accepted: int = 0                 # requests acknowledged (OK, maybe with a partial rejection)
    spans_accepted: int = 0
    spans_rejected: int = 0
    disagreements: int = 0
    reasons: Counter = field(default_factory=Counter)
    samples: list = field(default_factory=list)     # (what, input bytes) of the first disagreements
    python_checked: int = 0
    python_verdict_differs: int = 0   # the pure-Python check refuses whole what the C one acknowledges (info)


class Oracle:
    """Runs one input through check, normalize, DuckDB and the read side; counts into ``tally``."""

    def __init__(self, scanner: str = "auto", duckdb_every: int = 64, group_size: int = 1, solo_every: int = 8,
                 read_every: int = 4):
        """``group_size`` > 1: acknowledged inputs are decoded ``group_size`` at a time (``settle``), but
        every ``solo_every``-th alone, with its message compared and read back; a group is read back every
        ``read_every``-th time. 1 (the suite's default): every input alone, every one read back."""
        import duckdb

        from shadowlens.collector import schema
        from shadowlens.collector.decode.normalize import Normalizer
        from shadowlens.config import default_config
        cfg = default_config()
        self.labels = cfg.cohort_labels
        self.norm = Normalizer(cfg.cohort_labels, cfg.evals, scanner_choice=scanner)
        self.python = Normalizer(cfg.cohort_labels, cfg.evals, scanner_choice="python") if scanner != "python" else None
        self.con = duckdb.connect(config={"threads": 1})
        self.con.execute(schema.spans_core_ddl(self.labels))
        self.con.execute(schema.EVALS_DDL)
        self.insert = schema.spans_insert_select(self.labels, "new_spans")
        self.pending: list = []
        self.group: list = []
        self.group_size, self.solo_every, self.read_every = group_size, solo_every, read_every
        self._groups = 0
        self.duckdb_every = duckdb_every
        self.tally = Tally()

    def _disagree(self, what: str, data: bytes) -> None:
        self.tally.disagreements += 1
        if len(self.tally.samples) < 20:
            self.tally.samples.append((what, data))

    def run(self, data: bytes, python_too: bool = False) -> None:
        from shadowlens.collector.errors import PermanentError
        t = self.tally
        t.inputs += 1
        try:
            check = self.norm.check_traces(data)
        except PermanentError:
            t.rejected_whole += 1
            return
        t.accepted += 1
        t.spans_accepted += check.accepted
        t.spans_rejected += check.rejected
        t.reasons.update(check.reasons)
        if python_too and self.python is not None:
            t.python_checked += 1
            try:
                self.python.check_traces(data)
            except PermanentError:
                t.python_verdict_differs += 1
        if self.group_size <= 1 or t.accepted % self.solo_every == 0:
            self._verify(data, check, read=True)
            return
        self.group.append((data, check))
        if len(self.group) >= self.group_size:
            self.settle()

    def settle(self) -> None:
        """The grouped acknowledged inputs, decoded as one request: an ExportTraceServiceRequest's fields
        may be concatenated, so their bytes joined are the request holding all their ResourceSpans, whose
        counts are the sums of theirs. One normalize call then carries the fixed cost of building ~45
        Arrow columns for the group. On any difference, each input is decoded alone to name it."""
        group, self.group = self.group, []
        if not group:
            return
        joined = b"".join(d for d, _ in group)
        want = (sum(c.received for _, c in group), sum(c.rejected for _, c in group),
                dict(sum((c.reasons for _, c in group), Counter())), sum(c.accepted for _, c in group))
        self._groups += 1
        try:
            batch = self.norm.normalize_traces(joined)
            rows = batch.spans.num_rows if batch.spans is not None else 0
            ok = (batch.received, batch.rejected, dict(batch.reasons), rows) == want
        except Exception:  # found below, input by input
            ok = False
        if ok and rows and self._groups % self.read_every == 0:
            ok = self._readable(batch, joined) is None
        if not ok:
            for data, check in group:
                self._verify(data, check, read=True)
            return
        if rows:
            self._pend(batch, joined)

    def _verify(self, data: bytes, check, read: bool) -> None:
        """One acknowledged input: the decoder's batch against the check, then the read side."""
        try:
            batch = self.norm.normalize_traces(data)
        except Exception as exc:  # the disagreement being looked for
            self._disagree(f"normalize raised {type(exc).__name__}: {exc}"[:300], data)
            return
        rows = batch.spans.num_rows if batch.spans is not None else 0
        got = (batch.received, batch.rejected, dict(batch.reasons), batch.message, batch.accepted, rows)
        want = (check.received, check.rejected, dict(check.reasons), check.message, check.accepted, check.accepted)
        if got != want:
            self._disagree(f"check {want} != normalize {got}"[:300], data)
            return
        if not rows:
            return
        problem = self._readable(batch, data) if read else None
        if problem:
            self._disagree(problem, data)
            return
        self._pend(batch, data)

    @staticmethod
    def _readable(batch, data: bytes) -> str | None:
        """None if every stored span's attributes, events and resource read back as JSON (the view's way)."""
        from shadowlens.collector.store.database import decode_payload, span_part_json
        try:
            req = decode_payload(data)
            seen_rs = set()
            for r in batch.spans.select(["rs_idx", "ss_idx", "sp_idx"]).to_pylist():
                parts = ("attributes", "events") + (("resource",) if r["rs_idx"] not in seen_rs else ())
                seen_rs.add(r["rs_idx"])
                for part in parts:
                    text = span_part_json(req, r["rs_idx"], r["ss_idx"], r["sp_idx"], part)
                    if text is None:
                        raise ValueError(f"no {part} for accepted span {r}")
                    json.loads(text)
        except Exception as exc:
            return f"read side: {type(exc).__name__}: {exc}"[:300]
        return None

    def _pend(self, batch, data: bytes) -> None:
        self.pending.append((batch, data))
        if len(self.pending) >= self.duckdb_every:
            self.flush()

    def flush(self) -> None:
        """Inserts the pending batches into DuckDB's real tables (as the store's commit does); on an
        error, one by one, to name the input whose values DuckDB refused."""
        self.settle()
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        try:
            self._insert([b for b, _ in pending])
        except Exception:
            for batch, data in pending:
                try:
                    self._insert([batch])
                except Exception as exc:
                    self._disagree(f"DuckDB refused: {type(exc).__name__}: {exc}"[:300], data)
        self.con.execute("DELETE FROM spans_core")
        self.con.execute("DELETE FROM evals")

    def _insert(self, batches) -> None:
        import pyarrow as pa
        spans = pa.Table.from_batches([b.spans for b in batches]).combine_chunks()
        self.con.register("new_spans", spans.append_column("payload_id", pa.array([1] * spans.num_rows, pa.int64())))
        try:
            self.con.execute(self.insert, {"seq": 1, "now": "2026-01-01 00:00:00"})
        finally:
            self.con.unregister("new_spans")
        evals = [b.evals for b in batches if b.evals is not None]
        if evals:
            self.con.register("new_evals", pa.Table.from_batches(evals))
            try:
                self.con.execute("INSERT INTO evals SELECT *, 1, 1 FROM new_evals")
            finally:
                self.con.unregister("new_evals")


def run(n: int, seed: int = 0, scanner: str = "auto", python_every: int = 0, progress=None,
        seeds: list[bytes] | None = None, deadline: float | None = None, progress_every: int = 10_000,
        group_size: int = 1) -> Tally:
    """``n`` mutated inputs, or fewer if ``time.monotonic()`` passes ``deadline``; every
    ``python_every``-th also through the pure-Python check (0: never)."""
    rng = random.Random(seed)
    seeds = seeds or seed_corpus()
    poisoned = poisoned_corpus(rng, seeds, 400)
    oracle = Oracle(scanner, group_size=group_size)
    t0 = time.monotonic()
    for i in range(n):
        if deadline is not None and i % 100 == 0 and time.monotonic() > deadline:
            break
        if i and i % 5000 == 0:
            poisoned = poisoned_corpus(rng, seeds, 400)        # new poison on new bases
        data = mutate(rng, seeds, poisoned)
        oracle.run(data, python_too=bool(python_every) and i % python_every == 0)
        if progress and i and i % progress_every == 0:
            progress(oracle.tally, time.monotonic() - t0)
    oracle.flush()
    return oracle.tally
