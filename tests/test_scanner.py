"""The C wire scanner and the pure-Python reference agree on every request, and bad bytes never crash."""
from __future__ import annotations

import random

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from otlp_builders import T0, random_spans, set_attr, span_request

from shadowlens.collector.decode import normalize as nm
from shadowlens.collector.decode import scan
from shadowlens.collector.decode.normalize import Normalizer
from shadowlens.config import default_config

pytestmark = pytest.mark.skipif(scan._wirescan is None, reason="C extension not built")


def _norm_value(v):
    # composites come back as raw AnyValue bytes; compare them decoded
    return AnyValue.FromString(v) if isinstance(v, bytes) else v


def _canonical(out: dict) -> dict:
    out = dict(out)
    out["slots"] = [[i, [_norm_value(v) for v in vals]] for i, vals in out["slots"]]
    out["prefixed"] = [(i, k, _norm_value(v)) for i, k, v in out["prefixed"]]
    out["resources"] = [[(s, _norm_value(v)) for s, v in r] for r in out["resources"]]
    return out


def _both(payload: bytes):
    n = Normalizer(default_config().cohort_labels, default_config().evals)
    args = (n._key_slots, len(n._slot_hits), nm.PREFIXES, nm.EVENT_NAMES)
    return scan._wirescan.scan_traces(payload, *args), scan.python_scan(payload, *args)


def _rich_request(rng: random.Random):
    spans = random_spans(40, rng)
    for d in spans:
        d["attrs"].update({
            "gen_ai.response.finish_reasons": ["stop", "content_filter"][: rng.randint(0, 2)],
            "llm.token_count.prompt": rng.choice([5, "17", 3.0, True]),
            "agent.trajectory.step": rng.randint(-3, 40),
            "evaluations.0.evaluation.name": "hallucination", "evaluations.0.evaluation.score": rng.random(),
            "metadata": '{"cohort.language": "de"}', "llm.cost.total": rng.random(),
            "unicode.ключ": "значение ✓",
        })
        d["events"] = [("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "task_completion",
                                                      "gen_ai.evaluation.score.value": rng.random()}),
                       ("exception", {"exception.message": "x"})]
        d["kind"] = rng.randint(0, 5)
    req = span_request(spans, resource={"service.name": "svc", "shadow.route": "candidate"})
    kv = req.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="llm.model_name")
    kv.value.kvlist_value.values.add(key="nested").value.int_value = -5
    req.resource_spans[0].scope_spans[0].spans[0].status.code = 2
    req.resource_spans[0].scope_spans[0].spans[0].status.message = "failed"
    second = req.resource_spans.add()
    set_attr(second.resource.attributes, "cohort.tier", "free")
    second.scope_spans.add().spans.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name="other",
                                       start_time_unix_nano=T0, end_time_unix_nano=T0 + 5)
    return req


@pytest.mark.parametrize("seed", range(5))
def test_c_scanner_equals_python_reference(seed):
    payload = _rich_request(random.Random(seed)).SerializeToString()
    c_out, py_out = _both(payload)
    assert _canonical(c_out) == _canonical(py_out)
    assert c_out["n"] == 41 and len(c_out["events"]) == 40


def test_normalized_batches_equal_under_both_scanners():
    payload = _rich_request(random.Random(9)).SerializeToString()
    cfg = default_config()
    fast = Normalizer(cfg.cohort_labels, cfg.evals, scanner_choice="c").normalize_traces(payload)
    slow = Normalizer(cfg.cohort_labels, cfg.evals, scanner_choice="python").normalize_traces(payload)
    assert fast.spans.equals(slow.spans) and fast.evals.equals(slow.evals) and (fast.keys == slow.keys).all()


def test_truncated_and_mutated_bytes_raise_value_error_or_scan_never_crash():
    rng = random.Random(1)
    payload = bytearray(_rich_request(rng).SerializeToString())
    n = Normalizer(default_config().cohort_labels, default_config().evals)
    args = (n._key_slots, len(n._slot_hits), nm.PREFIXES, nm.EVENT_NAMES)
    for cut in range(0, len(payload), max(1, len(payload) // 300)):
        try:
            scan._wirescan.scan_traces(bytes(payload[:cut]), *args)
        except ValueError as exc:
            assert "malformed protobuf" in str(exc)
    for _ in range(3000):
        mutated = bytearray(payload)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            scan._wirescan.scan_traces(bytes(mutated), *args)
        except ValueError:
            pass
    with pytest.raises(ValueError, match="length past end"):
        scan._wirescan.scan_traces(b"\x0a\xff\x01", *args)
    with pytest.raises(ValueError, match="wire type"):
        scan._wirescan.scan_traces(b"\x0b", *args)


def _with_invalid_spans(rng: random.Random):
    spans = random_spans(20, rng)
    spans[3]["trace_id"] = b"\x01" * 15
    spans[5]["span_id"] = bytes(8)
    spans[8]["start"], spans[8]["end"] = T0 + 10, T0
    spans[11]["parent"] = b"\x02" * 7
    return span_request(spans).SerializeToString()


@pytest.mark.parametrize("make", [_with_invalid_spans, lambda rng: _rich_request(rng).SerializeToString()])
def test_the_receivers_dry_run_check_agrees_with_normalizing(make):
    """What a receiver acknowledges (count, rejections, message) is what the decoder will store."""
    payload = make(random.Random(4))
    cfg = default_config()
    normalizer = Normalizer(cfg.cohort_labels, cfg.evals)
    batch = normalizer.normalize_traces(payload)
    check = normalizer.check_traces(payload)
    assert (check.received, check.rejected, dict(check.reasons), check.message) == \
        (batch.received, batch.rejected, dict(batch.reasons), batch.message)
    assert check.accepted == batch.accepted


def test_the_dry_run_fails_exactly_where_the_scan_fails():
    """A request the receiver accepts must decode later: same errors on cut and mutated bytes."""
    rng = random.Random(2)
    payload = bytearray(_rich_request(rng).SerializeToString())
    n = Normalizer(default_config().cohort_labels, default_config().evals)
    args = (n._key_slots, len(n._slot_hits), nm.PREFIXES, nm.EVENT_NAMES)

    def outcome(fn, data):
        try:
            fn(data)
            return "ok"
        except ValueError as exc:
            return str(exc)
    for i in range(600):
        data = bytearray(payload)
        if i % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
        assert outcome(lambda d: scan._wirescan.validate_traces(d, args[0], args[2], args[3]), data) == \
            outcome(lambda d: scan._wirescan.scan_traces(d, *args), data)


def _first_readable(n, pairs, exact, convert):
    # the rule, spelled out per span: best key first, and within a key the last occurrence first
    out = []
    for i in range(n):
        chosen = None
        for idxs, vals in pairs:
            for j in reversed(range(len(idxs))):
                if idxs[j] != i:
                    continue
                v = vals[j] if type(vals[j]) is exact else convert(vals[j])
                if v is not None:
                    chosen = v
                    break
            if chosen is not None:
                break
        out.append(chosen)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_column_merge_takes_the_best_readable_key_in_c_and_python(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    values = [None, 0, 7, -2, 1.5, float("nan"), "12", "x", "", True, False, [1, 2], b"\x08\x01"]
    pairs = []
    for _ in range(rng.randint(1, 4)):
        idxs = sorted(rng.choices(range(n), k=rng.randint(0, 2 * n)))      # repeats: a key sent twice
        pairs.append([idxs, [rng.choice(values) for _ in idxs]])
    calls = []

    def to_int(v):           # an INT concept's converter: readable strings and floats, not bools
        calls.append(v)
        if type(v) is float:
            return int(v) if v == v else None
        return int(v) if type(v) is str and v.isdigit() else None

    expected = _first_readable(n, pairs, int, to_int)
    got_c = scan._wirescan.merge_column(n, pairs, int, to_int)
    got_py = scan.python_merge_column(n, pairs, int, to_int)
    if not any(idxs for idxs, _ in pairs):
        assert got_c is None and got_py is None
    else:
        assert got_c == expected and got_py == expected
    # no exact type and a cache of converter answers for strings
    upper = {"x": "X-cached"}
    got_c = scan._wirescan.merge_column(n, pairs, None, lambda v: v.upper() if type(v) is str and v else None, upper)
    expected = _first_readable(n, pairs, None, lambda v: upper.get(v) or (v.upper() if type(v) is str and v else None)
                               if type(v) is str else None)
    assert got_c == (expected if any(idxs for idxs, _ in pairs) else None)


def test_column_merge_rejects_malformed_pairs():
    with pytest.raises(IndexError):
        scan._wirescan.merge_column(2, [[[5], ["a"]]], str, str)
    with pytest.raises(ValueError):
        scan._wirescan.merge_column(2, [[[0, 1], ["a"]]], str, str)
    with pytest.raises(TypeError):
        scan._wirescan.merge_column(2, [("a", "b")], str, str)


def test_repeated_values_may_share_objects_but_arrays_never_do():
    # the C scanner reuses the object of a value repeated from the previous span (a memo per key);
    # arrays are lists, which a consumer may change, so each span gets its own
    spans = random_spans(3, random.Random(4))
    for d in spans:
        d["attrs"].update({"gen_ai.response.finish_reasons": ["stop"], "llm.model_name": "gpt-4o"})
    c_out, py_out = _both(span_request(spans).SerializeToString())
    assert _canonical(c_out) == _canonical(py_out)
    n = Normalizer(default_config().cohort_labels, default_config().evals)
    lists = c_out["slots"][n._key_slots[b"gen_ai.response.finish_reasons"]][1]
    models = c_out["slots"][n._key_slots[b"llm.model_name"]][1]
    assert lists == [["stop"]] * 3 and len({id(v) for v in lists}) == 3
    assert models == ["gpt-4o"] * 3


def test_composite_arrays_and_mistyped_value_fields_read_alike_in_c_and_python():
    # An array holding an array stays raw AnyValue bytes in both (C made nested lists of it, recursing without a
    # bound); a value field of the wrong wire type is an unknown field to protobuf, and so to C.
    from opentelemetry.proto.common.v1.common_pb2 import ArrayValue
    from wire_bytes import attribute, string_value, with_span_extras
    spans = random_spans(3, random.Random(6))
    req = span_request(spans)
    kv = req.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="gen_ai.response.finish_reasons")
    inner = ArrayValue(values=[AnyValue(string_value="stop")])
    kv.value.array_value.values.add().array_value.CopyFrom(inner)
    mistyped = b"\x08\x05"                                  # field 1 (string_value) sent as a varint
    payload = with_span_extras(req, {(0, 0, 1): attribute(b"llm.model_name", mistyped),
                                     (0, 0, 2): attribute(b"shadow.route", mistyped + string_value(b"cand"))})
    c_out, py_out = _both(payload)
    assert _canonical(c_out) == _canonical(py_out)
    n = Normalizer(default_config().cohort_labels, default_config().evals)
    reasons = c_out["slots"][n._key_slots[b"gen_ai.response.finish_reasons"]][1]
    assert reasons == [kv.value.SerializeToString()]
    assert c_out["slots"][n._key_slots[b"llm.model_name"]][1] == [None]
    assert c_out["slots"][n._key_slots[b"shadow.route"]][1][-1] == "cand"
