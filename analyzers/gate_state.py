"""The gate's state kept incrementally: mergeable sums and sketches per minute of trace start, so a refresh in
``serve`` merges a few dozen small arrays instead of rescanning the window (docs/gate.md, "How serve keeps the
gate's state").

What is kept, per *time bucket* (``bucket_s``, a minute by default, of the trace's start):

* per (route, cohort label, raw value) and per route for all traffic: traces, the first start, and for every
  mean/rate measure n, Σx, Σx², and for every quantile measure the count of values > 0;
* per (cohort label, the baseline trace's raw value) and for all traffic, over the *pairs*: pairs, and per
  measure n, Σb, Σc, Σb², Σc², Σbc (each measure counted only where both traces know it, as stats_sql masks);
* request ids seen per route (the pair statuses' denominators);
* per (route, label, value) and quantile measure a QuantileSketch (analyzers/sketch.py), kept as a running
  total over the window (bucket counts are integers: adding a minute and taking it away again is exact), with
  each bucket's own counts kept to take away when it leaves the window.

Everything is a sum, so pooling the values with fewer than ``gate.min_samples`` traces on either route into
``__other__`` happens at refresh time on the sums (the pooled sums are the sums of the small values' sums),
exactly as stats_sql pools before aggregating. ``statistics(now)`` returns the dict sufficient_stats returns,
so compare.judge gives the verdict with the same code as ``shadowlens gate --data-dir``.

Pairing is streaming: a keyed trace waits (``pending_s``, by trace start) for the other route's trace of its
request id; a pair counts in the bucket of its earlier start, so it leaves the window with its first trace, when
the SQL stops seeing it too. The window holds the buckets that end after ``now - gate.window``: up to one bucket
more than the SQL's exact edge (equal when the edge falls on a bucket boundary, as in the tests).

A restart fills the state from the store's window with one DuckDB statement (``rebuild_sql`` / ``load``): the
same sums and sketch counts, summed per bucket in the database, and the keyed traces still waiting for a partner;
its pairing is the SQL path's (one trace kept per request id and route).

Differences from the SQL path, by design: a trace revised by a late span keeps its first completion's values
here (sinks see a trace once); a request id seen twice on one route counts its second trace as unmatched here,
where the SQL keeps one of the two. p99 reads off the sketch, within its relative error ``alpha`` (1 %).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .buckets import compact_counts, compact_rows, pack, unpack
from .effects import quantile_grid
from .rules import GateSettings
from .sketch import DEFAULT_ALPHA, QuantileSketch
from .sufficient import ALL, OTHER, measure_column, sql_ident, sql_literal

ROUTES = ("baseline", "candidate")
PAIR_STATS = ("n", "sb", "sc", "sbb", "scc", "sbc")


@dataclass
class _Bucket:
    """One bucket's contributions: (slots, rows) chunks of route and pair sums, keyed counts, first starts,
    and the sketch counts to take away from the running totals when the bucket leaves the window."""
    route: list = field(default_factory=list)      # (slot ids, float rows)
    pair: list = field(default_factory=list)
    keyed: np.ndarray = field(default_factory=lambda: np.zeros(2))
    first: list = field(default_factory=lambda: [math.inf, math.inf])     # min start per route
    sketch: dict = field(default_factory=dict)     # quantile column index -> [(codes, counts)], see buckets.pack


# rebuild_sql's sketch rows: ((bucket * 2 + candidate) << _SKETCH_SHIFT) + key + _SKETCH_BIAS; a double's key
# (alpha 1 %) is within +-36,000 of 0, and a minute bucket of any date fits in the 42 bits left
_SKETCH_SHIFT = 21
_SKETCH_BIAS = 1 << 20


class GateState:
    """Thread-safe: ``add_frame`` from the assembler's thread, ``statistics`` from the gate's."""

    def __init__(self, settings: GateSettings, labels, *, bucket_s: float = 60.0, pending_s: float | None = None,
                 alpha: float = DEFAULT_ALPHA):
        self.settings = settings
        self.labels = tuple(labels)
        self.bucket_s = float(bucket_s)
        # how long a keyed trace waits for its partner, by start time: the pairing window plus the longest a
        # partner can take to complete (serve passes traces.max_seconds + idle)
        self.pending_s = float(pending_s if pending_s is not None else settings.pairing_window_s + 3600.0)
        self.alpha = alpha
        self.moment_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is None})
        self.quantile_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is not None})
        # route row: traces, (n, Σ, Σ²) per moment column, count > 0 per quantile column
        self.route_width = 1 + 3 * len(self.moment_cols) + len(self.quantile_cols)
        self.pair_width = 1 + 6 * len(self.moment_cols)
        # as stats_sql: the last quantile rule on a column sets the probabilities read off its sketches
        self._grids = {measure_column(r): quantile_grid(r) for r in settings.rules if r.quantile is not None}
        self._route_slots: dict[tuple, int] = {}      # (route, label or None, value) -> slot
        self._pair_slots: dict[tuple, int] = {}       # (label or None, value) -> slot
        self._buckets: dict[int, _Bucket] = {}
        self._sketches: list[dict[int, QuantileSketch]] = [{} for _ in self.quantile_cols]   # running totals
        self._pending: pl.DataFrame | None = None
        self._newest = -math.inf           # the newest trace start seen: pending traces expire against it
        self._oldest_bucket = -math.inf    # buckets before it have left the window
        self._lock = threading.Lock()
        self.traces_added = 0

    # ------------------------------------------------------------ adding traces
    def add_frame(self, frame: pl.DataFrame) -> None:
        """Trace-frame rows (route, request_id, start_s, the labels, the measure columns) of newly completed
        traces; rows of other routes, without a start, or older than the window are skipped."""
        needed = ["route", "request_id", "start_s", *self.labels, *self.moment_cols, *self.quantile_cols]
        missing = [c for c in needed if c not in frame.columns]
        frame = frame.with_columns([pl.lit(None, dtype=pl.Float64).alias(c) for c in missing]).select(needed)
        frame = frame.with_columns(
            [pl.col(lab).cast(pl.Utf8).fill_null("unknown") for lab in self.labels]
            + [pl.col(c).cast(pl.Float64) for c in (*self.moment_cols, *self.quantile_cols)]
            + [pl.col("start_s").cast(pl.Float64), pl.col("request_id").cast(pl.Utf8)]
        ).filter(pl.col("route").is_in(ROUTES) & pl.col("start_s").is_not_null())
        frame = frame.with_columns((pl.col("start_s") / self.bucket_s).floor().cast(pl.Int64).alias("_bucket"))
        with self._lock:
            frame = frame.filter(pl.col("_bucket") >= self._oldest_bucket)
            if frame.height == 0:
                return
            self.traces_added += frame.height
            self._newest = max(self._newest, float(frame["start_s"].max()))
            self._add_routes(frame)
            self._add_sketches(frame)
            self._add_pairs(frame.filter(pl.col("request_id").is_not_null()))

    def _bucket(self, b: int) -> _Bucket:
        got = self._buckets.get(b)
        if got is None:
            got = self._buckets[b] = _Bucket()
        return got

    def _route_slot(self, key: tuple) -> int:
        slot = self._route_slots.get(key)
        if slot is None:
            slot = self._route_slots[key] = len(self._route_slots)
        return slot

    def _pair_slot(self, key: tuple) -> int:
        slot = self._pair_slots.get(key)
        if slot is None:
            slot = self._pair_slots[key] = len(self._pair_slots)
        return slot

    def _rollup(self, fine: pl.DataFrame, keys: list[str], value_cols: list[str]):
        """Rows of ``fine`` (grouped by keys + labels) summed for all traffic and for each label:
        yields (label or None, frame with keys, "_value", value_cols)."""
        sums = [pl.col(c).sum() for c in value_cols]
        yield None, fine.group_by(keys).agg(sums).with_columns(pl.lit(None, dtype=pl.Utf8).alias("_value"))
        for lab in self.labels:
            yield lab, fine.group_by([*keys, lab]).agg(sums).rename({lab: "_value"})

    def _add_routes(self, frame: pl.DataFrame) -> None:
        aggs = [pl.len().alias("_traces").cast(pl.Float64)]
        for c in self.moment_cols:
            aggs += [pl.col(c).count().cast(pl.Float64).alias(c + "|n"), pl.col(c).sum().alias(c + "|s"),
                     (pl.col(c) * pl.col(c)).sum().alias(c + "|ss")]
        aggs += [(pl.col(c) > 0).sum().cast(pl.Float64).alias(c + "|qn") for c in self.quantile_cols]
        values = [a.meta.output_name() for a in aggs]
        fine = frame.group_by(["_bucket", "route", *self.labels]).agg(aggs)
        for b, route, first in frame.group_by(["_bucket", "route"]).agg(pl.col("start_s").min()).iter_rows():
            bucket = self._bucket(b)
            i = ROUTES.index(route)
            bucket.first[i] = min(bucket.first[i], first)
        for lab, rows in self._rollup(fine, ["_bucket", "route"], values):
            self._store(rows, values, lambda r, v, lab=lab: self._route_slot((r, lab, v)), "route")

    @staticmethod
    def _slots(rows: pl.DataFrame, route_col: str | None, slot_of) -> np.ndarray:
        """Each row's slot: looked up once per distinct (route, value), then mapped back by integer codes (rows
        can be a million sketch counts at a restart)."""
        if rows.height == 0:
            return np.zeros(0, dtype=np.int64)
        values = rows["_value"]
        if values.dtype.is_integer() and not values.null_count():     # rebuild_sql's value ids: already codes
            codes = values.to_numpy().astype(np.int64)
            names = list(range(int(codes.max()) + 1))
        elif values.null_count() == values.len():            # all traffic: one value, None
            codes, names = np.zeros(rows.height, dtype=np.int64), [None]
        else:
            names = values.unique(maintain_order=True)
            codes = values.replace_strict(names, pl.Series(np.arange(names.len()))).to_numpy()
            names = names.to_list()
        if route_col is None:
            routes = np.zeros(rows.height, dtype=np.int64)
        elif rows[route_col].dtype.is_integer():      # already 1 for the candidate (rebuild_sql's sketch rows)
            routes = rows[route_col].to_numpy().astype(np.int64)
        else:
            routes = (rows[route_col] == "candidate").cast(pl.Int64).to_numpy()
        combined = routes * len(names) + codes
        # a lookup table over the few (route, value) codes: no sort of a million rows
        table = np.full(2 * len(names), -1, dtype=np.int64)
        for c in np.flatnonzero(np.bincount(combined, minlength=table.size)):
            table[c] = slot_of(ROUTES[int(c) // len(names)] if route_col else None, names[int(c) % len(names)])
        return table[combined]

    def _store(self, rows: pl.DataFrame, values: list[str], slot_of, kind: str, route_col: str | None = "route"):
        matrix = rows.select(values).fill_null(0.0).to_numpy().astype(np.float64, copy=False)
        self._store_matrix(rows, matrix, slot_of, kind, route_col)

    def _store_matrix(self, rows: pl.DataFrame, matrix: np.ndarray, slot_of, kind: str, route_col: str | None):
        slots = self._slots(rows, route_col, slot_of)
        buckets = rows["_bucket"].to_numpy()
        for b in np.unique(buckets):
            sel = buckets == b
            getattr(self._bucket(int(b)), kind).append((slots[sel], matrix[sel]))

    def _add_sketches(self, frame: pl.DataFrame) -> None:
        for qi, col in enumerate(self.quantile_cols):
            pos = frame.filter(pl.col(col) > 0)
            if pos.height == 0:
                continue
            keys = QuantileSketch(self.alpha).keys(pos[col].to_numpy())
            pos = pos.select(["_bucket", "route", *self.labels]).with_columns(pl.Series("_key", keys))
            fine = pos.group_by(["_bucket", "route", *self.labels, "_key"]).len().with_columns(
                pl.col("len").cast(pl.Float64))
            for lab, rows in self._rollup(fine, ["_bucket", "route", "_key"], ["len"]):
                self._store_sketch(qi, lab, rows)

    def _store_sketch(self, qi: int, lab: str | None, rows: pl.DataFrame, name=None) -> None:
        """Rows of (_bucket, route, _value, _key, len): sketch counts of one label's values (None: all traffic);
        ``name(lab, v)`` turns a value id into the value (load)."""
        slots = self._slots(rows, "route",
                            lambda r, v: self._route_slot((r, lab, v if name is None else name(lab, v))))
        rkeys = rows["_key"].to_numpy()
        counts = rows["len"].to_numpy().astype(np.float64)
        buckets = rows["_bucket"].to_numpy()
        codes = pack(slots, rkeys)
        order = _stable_order(buckets)       # one slice per bucket, not a mask per bucket
        buckets, codes_o, counts_o = buckets[order], codes[order], counts[order]
        cuts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        for s, e in zip(cuts, np.r_[cuts[1:], buckets.size]):
            self._bucket(int(buckets[s])).sketch.setdefault(qi, []).append(
                (codes_o[s:e], counts_o[s:e].astype(np.int32)))
        self._apply_sketch(qi, slots, rkeys, counts, 1)

    def _apply_sketch(self, qi: int, slots: np.ndarray, keys: np.ndarray, counts: np.ndarray, sign: int) -> None:
        totals = self._sketches[qi]
        order = _stable_order(slots)
        slots, keys, counts = slots[order], keys[order], counts[order]
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        ends = np.r_[starts[1:], slots.size]
        for s, e in zip(starts, ends):
            sk = totals.get(int(slots[s]))
            if sk is None:
                sk = totals[int(slots[s])] = QuantileSketch(self.alpha)
            sk.add_keys(keys[s:e], counts[s:e], sign)

    def _add_pairs(self, keyed: pl.DataFrame) -> None:
        """Join the keyed traces with those waiting for their partner; count new request ids per route."""
        if keyed.height == 0 and self._pending is None:
            return
        keyed = keyed.unique(["request_id", "route"], keep="first", maintain_order=True)
        if self._pending is not None and self._pending.height:
            # a request id already waiting on this route: a second trace, not a new request id
            keyed = keyed.join(self._pending.select("request_id", "route"), on=["request_id", "route"], how="anti")
        for b, route, n in keyed.group_by(["_bucket", "route"]).len().iter_rows():
            self._bucket(b).keyed[ROUTES.index(route)] += n
        pool = keyed if self._pending is None else pl.concat([self._pending, keyed], how="vertical_relaxed")
        b = pool.filter(pl.col("route") == "baseline")
        c = pool.filter(pl.col("route") == "candidate")
        met = b.join(c, on="request_id", how="inner", suffix="_c")
        rest = pool.filter(~pl.col("request_id").is_in(met["request_id"].implode())) if met.height else pool
        horizon = max(self._newest - self.pending_s, self._oldest_bucket * self.bucket_s)
        self._pending = rest.filter(pl.col("start_s") >= horizon)
        pairs = met.filter((pl.col("start_s") - pl.col("start_s_c")).abs() <= self.settings.pairing_window_s)
        if pairs.height:
            self._add_pair_sums(pairs)

    def _add_pair_sums(self, pairs: pl.DataFrame) -> None:
        aggs = [pl.len().cast(pl.Float64).alias("_pairs")]
        for col in self.moment_cols:
            ok = pl.col(col).is_not_null() & pl.col(col + "_c").is_not_null()
            vb, vc = pl.when(ok).then(pl.col(col)), pl.when(ok).then(pl.col(col + "_c"))
            aggs += [ok.sum().cast(pl.Float64).alias(f"{col}|n"), vb.sum().alias(f"{col}|sb"),
                     vc.sum().alias(f"{col}|sc"), (vb * vb).sum().alias(f"{col}|sbb"),
                     (vc * vc).sum().alias(f"{col}|scc"), (vb * vc).sum().alias(f"{col}|sbc")]
        values = [a.meta.output_name() for a in aggs]
        pairs = pairs.with_columns(
            (pl.min_horizontal("start_s", "start_s_c") / self.bucket_s).floor().cast(pl.Int64).alias("_bucket"))
        fine = pairs.group_by(["_bucket", *self.labels]).agg(aggs)
        for lab, rows in self._rollup(fine, ["_bucket"], values):
            self._store(rows, values, lambda _, v, lab=lab: self._pair_slot((lab, v)), "pair", route_col=None)

    # ------------------------------------------------------------ the restart: sums computed in DuckDB
    def rebuild_sql(self, source: str) -> str:
        """One statement over ``source`` (gate.trace_frame_sql with ``completed``) giving everything add_frame
        would have stored for those traces, already summed per bucket: serve's restart then costs about one SQL
        evaluation of the window, not a Python pass over every trace. Rows by ``kind``: route and pair sums
        (``vals`` in add_frame's column order, per label and value by GROUPING SETS), sketch counts per bucket
        key (``ceil(ln(x) / ln(gamma))``, QuantileSketch.keys' formula), new request ids per route, the keyed
        traces still waiting for their partner, and the newest start / completion."""
        q, labels = sql_ident, self.labels
        bs, lg = repr(self.bucket_s), repr(QuantileSketch(self.alpha)._log_gamma)
        fill = "".join(f", coalesce(CAST({q(lab)} AS VARCHAR), 'unknown') AS {q(lab)}" for lab in labels)
        measures = "".join(f", CAST({q(c)} AS DOUBLE) AS {q(c)}" for c in (*self.moment_cols, *self.quantile_cols))
        t0 = (f"t0 AS (SELECT route, request_id, start_s, CAST(floor(start_s / {bs}) AS BIGINT) AS _bucket"
              f"{fill}{measures}, _completed_us FROM ({source}) AS s"
              " WHERE route IN ('baseline', 'candidate') AND start_s IS NOT NULL)")
        # each label's values as small integers (0, 1, ...; the dict rows name them): grouping a million rows by
        # integers is about 3x cheaper than by text
        ctes = [t0] + [f"{q('d_' + lab)} AS MATERIALIZED (SELECT v, (row_number() OVER () - 1)::INTEGER AS id"
                       f" FROM (SELECT DISTINCT {q(lab)} AS v FROM t0))" for lab in labels]
        ids = "".join(f", {q('d_' + lab)}.id AS {q(lab)}" for lab in labels)
        joins = "".join(f" JOIN {q('d_' + lab)} ON t0.{q(lab)} = {q('d_' + lab)}.v" for lab in labels)
        plain = ", ".join(f"t0.{q(c)}" for c in ("route", "request_id", "start_s", "_bucket", *self.moment_cols,
                                                   *self.quantile_cols, "_completed_us"))
        ctes.append(f"t AS MATERIALIZED (SELECT {plain}{ids} FROM t0{joins})")

        def by_label(keys: list[str]) -> tuple[str, str, str]:
            """(label column, value column, GROUPING SETS) for each label, or for all traffic when there are no
            labels (with labels, load() sums all traffic from the first label's rows: every trace has exactly one
            value of it, and a grouping set over millions of rows costs more than summing a few thousand)."""
            if not labels:
                return "NULL", "NULL", f"({', '.join(keys)})"
            sets = ", ".join(f"({', '.join(keys + [q(lab)])})" for lab in labels)
            lab = " ".join(f"WHEN GROUPING({q(x)}) = 0 THEN {sql_literal(x)}" for x in labels)
            val = " ".join(f"WHEN GROUPING({q(x)}) = 0 THEN {q(x)}" for x in labels)
            return f"CASE {lab} END", f"CASE {val} END", sets

        route_vals = ["count(*)::DOUBLE"]
        for c in self.moment_cols:
            route_vals += [f"count({q(c)})::DOUBLE", f"sum({q(c)})", f"sum({q(c)} * {q(c)})"]
        route_vals += [f"(count(*) FILTER (WHERE {q(c)} > 0))::DOUBLE" for c in self.quantile_cols]
        route_vals.append("min(start_s)")            # the bucket's first start (read on all traffic's rows)
        lab, val, sets = by_label(["_bucket", "route"])
        selects = [f"SELECT 'route' AS kind, _bucket, route, {lab} AS _label, {val} AS _value,"
                   f" [{', '.join(route_vals)}] AS vals FROM t GROUP BY GROUPING SETS ({sets})"]
        # bucket, route and key grouped as one integer (_SKETCH_CODE): a narrower hash key, fewer columns back
        code = (f"((_bucket * 2 + (route = 'candidate')::BIGINT) << {_SKETCH_SHIFT})"
                f" + CAST(ceil(ln({{c}}) / {lg}) AS BIGINT) + {_SKETCH_BIAS}")
        lab, val, sets = by_label(["_code"])
        for qi, c in enumerate(self.quantile_cols):
            selects.append(
                f"SELECT 'sketch' AS kind, {qi} AS _qi, {lab} AS _label, {val} AS _value, _code, count(*) AS _n"
                f" FROM (SELECT *, {code.format(c=q(c))} AS _code FROM t WHERE {q(c)} > 0)"
                f" GROUP BY GROUPING SETS ({sets})")
        # pairing as the SQL path does (sufficient._pair_ctes): one row per request id, one trace kept per route
        # (the candidate's labels are not needed: a pair counts under its baseline trace's values)
        per_route = ", ".join(f"any_value({q(c)}) FILTER (WHERE route = '{r}') AS {q(c + sfx)}"
                              for r, sfx, keep in (("baseline", "", [*labels, "start_s", *self.moment_cols]),
                                                   ("candidate", "_c", ["start_s", *self.moment_cols])) for c in keep)
        k = ("k AS MATERIALIZED (SELECT hash(request_id) AS rid, count(*) FILTER (WHERE route = 'baseline') AS nb,"
             f" count(*) FILTER (WHERE route = 'candidate') AS nc, {per_route}"
             " FROM t WHERE request_id IS NOT NULL GROUP BY rid)")
        masked = "".join(f", CASE WHEN {q(c)} IS NOT NULL AND {q(c + '_c')} IS NOT NULL THEN {q(c + sfx)} END"
                         f" AS {q(c + sfx)}" for c in self.moment_cols for sfx in ("", "_c"))
        p = (f"p AS (SELECT CAST(floor(least(start_s, start_s_c) / {bs}) AS BIGINT) AS _bucket"
             f"{''.join(', ' + q(x) for x in labels)}{masked} FROM k WHERE nb > 0 AND nc > 0"
             f" AND abs(start_s - start_s_c) <= {float(self.settings.pairing_window_s)!r})")
        pair_vals = ["count(*)::DOUBLE"]
        for c in self.moment_cols:
            b, cc = q(c), q(c + "_c")
            pair_vals += [f"count({b})::DOUBLE", f"sum({b})", f"sum({cc})", f"sum({b} * {b})", f"sum({cc} * {cc})",
                          f"sum({b} * {cc})"]
        lab, val, sets = by_label(["_bucket"])
        selects.append(f"SELECT 'pair' AS kind, _bucket, {lab} AS _label, {val} AS _value,"
                       f" [{', '.join(pair_vals)}] AS vals FROM p GROUP BY GROUPING SETS ({sets})")
        for r, mine, sfx in (("baseline", "nb", ""), ("candidate", "nc", "_c")):
            selects.append(f"SELECT 'keyed' AS kind, CAST(floor({q('start_s' + sfx)} / {bs}) AS BIGINT) AS _bucket,"
                           f" '{r}' AS route, [count(*)::DOUBLE] AS vals FROM k WHERE {mine} > 0 GROUP BY 2")
        # a request id seen on one route only waits for its partner, as add_frame's pending traces do (read
        # back from t: usually few, and k then needs neither the request id's text nor the candidate's labels)
        labs = f"[{', '.join(map(q, labels))}]::INTEGER[]" if labels else "[]::INTEGER[]"
        vals = f"[{', '.join(map(q, self.moment_cols))}]::DOUBLE[]"
        selects.append(
            f"SELECT 'pending' AS kind, _bucket, route, request_id, start_s, {labs} AS labs, {vals} AS vals FROM t"
            " WHERE request_id IS NOT NULL AND hash(request_id) IN (SELECT rid FROM k WHERE (nb = 0) <> (nc = 0))"
            f" AND start_s >= (SELECT max(start_s) FROM t) - {self.pending_s!r}"
            " QUALIFY row_number() OVER (PARTITION BY route, request_id ORDER BY start_s) = 1")
        selects.append("SELECT 'meta' AS kind, max(_completed_us) AS _done, [max(start_s), count(*)::DOUBLE] AS vals"
                       " FROM t")
        selects += [f"SELECT 'dict' AS kind, {sql_literal(lab)} AS _label, v AS _name, id AS _value FROM {q('d_' + lab)}"
                    for lab in labels]
        return f"WITH {', '.join(ctes)}, {k}, {p} " + " UNION ALL BY NAME ".join(selects)

    def load(self, rows: pl.DataFrame) -> int:
        """rebuild_sql's rows into an empty state; returns the newest completed_at (epoch us) among them."""
        kinds = rows["kind"]
        parts = {kind: rows.filter(kinds == kind) for kind in ("meta", "route", "pair", "keyed", "pending", "dict")}
        # the sketch counts are most of the rows: only their columns, without the list column
        parts["sketch"] = rows.select("kind", "_qi", "_label", "_value", "_code", "_n").filter(kinds == "sketch")
        empty = rows.head(0)
        with self._lock:
            meta = parts["meta"]
            done = meta["_done"][0]
            newest, traces = (meta["vals"].to_list()[0] if meta.height else None) or [None, 0.0]
            if not traces:
                return -1
            self._newest = max(self._newest, float(newest))
            self.traces_added += int(traces)
            names = {lab: pl.Series([], dtype=pl.Utf8) for lab in self.labels}    # label -> values by id
            for lab, part in parts["dict"].sort("_value").group_by("_label", maintain_order=True):
                names[lab[0]] = part["_name"].cast(pl.Utf8)

            named_ = {lab: names[lab].to_list() for lab in self.labels}
            name = (lambda lab, v: None if lab is None else named_[lab][v])     # value id -> the label's value

            def named(part: pl.DataFrame, lab: str | None) -> pl.DataFrame:
                """The rows with their value ids kept (slots map them), all traffic's as null."""
                if lab is None:
                    return part.with_columns(pl.lit(None, dtype=pl.Utf8).alias("_value"))
                return part

            route = parts.get("route", empty)
            matrix = _matrix(route["vals"], self.route_width + 1)
            route_parts = {lab: (named(route.filter(sel), lab), matrix[sel])
                           for lab in self.labels for sel in [(route["_label"] == lab).fill_null(False).to_numpy()]}
            if self.labels:       # all traffic: the first label's rows summed per (bucket, route)
                rows, m = route_parts[self.labels[0]]
                code = rows["_bucket"].to_numpy() * 2 + (rows["route"] == "candidate").cast(pl.Int64).to_numpy()
                uniq, sums = _sum_by(code, m[:, :-1])
                first = np.full(uniq.size, math.inf)
                np.minimum.at(first, np.searchsorted(uniq, code), m[:, -1])
                route_parts[None] = (pl.DataFrame({"_bucket": uniq >> 1, "route": np.array(ROUTES)[uniq & 1],
                                                   "_value": pl.Series([None] * uniq.size, dtype=pl.Utf8)}),
                                     np.column_stack([sums, first]))
            else:
                route_parts[None] = (route, matrix)
            rows, m = route_parts[None]
            for b, r, f in zip(rows["_bucket"].to_list(), rows["route"].to_list(), m[:, -1].tolist()):
                bucket = self._bucket(b)
                j = ROUTES.index(r)
                bucket.first[j] = min(bucket.first[j], f)
            for lab in (None, *self.labels):
                rows, m = route_parts[lab]
                self._store_matrix(rows, m[:, :-1], lambda r, v, lab=lab: self._route_slot((r, lab, name(lab, v))),
                                   "route", "route")
            pair = parts.get("pair", empty)
            matrix = _matrix(pair["vals"], self.pair_width)
            pair_parts = {lab: (named(pair.filter(sel), lab), matrix[sel])
                          for lab in self.labels for sel in [(pair["_label"] == lab).fill_null(False).to_numpy()]}
            if self.labels:
                rows, m = pair_parts[self.labels[0]]
                uniq, sums = _sum_by(rows["_bucket"].to_numpy(), m)
                pair_parts[None] = (pl.DataFrame({"_bucket": uniq, "_value": pl.Series([None] * uniq.size,
                                                                                        dtype=pl.Utf8)}), sums)
            else:
                pair_parts[None] = (pair, matrix)
            for lab in (None, *self.labels):
                rows, m = pair_parts[lab]
                self._store_matrix(rows, m, lambda _, v, lab=lab: self._pair_slot((lab, name(lab, v))), "pair", None)
            sketch = parts.get("sketch", empty)
            for qi in range(len(self.quantile_cols)):
                mine = sketch.filter(pl.col("_qi") == qi)
                by_label = {lab: mine.filter(pl.col("_label") == lab) for lab in self.labels}
                if self.labels:
                    first_label = by_label[self.labels[0]]
                    uniq, counts = _sum_by(first_label["_code"].to_numpy(),
                                           first_label["_n"].to_numpy().astype(np.float64)[:, None])
                    by_label[None] = pl.DataFrame({"_code": uniq, "_n": counts[:, 0],
                                                   "_value": pl.Series([None] * uniq.size, dtype=pl.Int64)})
                else:
                    by_label[None] = mine
                for lab in (None, *self.labels):
                    part = by_label[lab]
                    if part.height:
                        codes = part["_code"].to_numpy()
                        self._store_sketch(qi, lab, pl.DataFrame({
                            "_bucket": codes >> (_SKETCH_SHIFT + 1), "route": (codes >> _SKETCH_SHIFT) & 1,
                            "_value": named(part, lab)["_value"], "_key": (codes & ((1 << _SKETCH_SHIFT) - 1)) - _SKETCH_BIAS,
                            "len": part["_n"]}), name)
            for b, r, v in parts.get("keyed", empty).select("_bucket", "route", "vals").iter_rows():
                self._bucket(b).keyed[ROUTES.index(r)] += v[0]
            pending = parts.get("pending")
            if pending is not None and pending.height:
                cols = [pl.col("route"), pl.col("request_id").cast(pl.Utf8), pl.col("start_s").cast(pl.Float64)]
                cols += [pl.col("labs").list.get(i).map_batches(names[lab].gather, return_dtype=pl.Utf8).alias(lab)
                         for i, lab in enumerate(self.labels)]
                cols += [pl.col("vals").list.get(i).cast(pl.Float64).alias(c) for i, c in enumerate(self.moment_cols)]
                cols += [pl.lit(None, dtype=pl.Float64).alias(c) for c in self.quantile_cols]
                frame = pending.select(*cols, pl.col("_bucket").cast(pl.Int64))
                self._pending = frame if self._pending is None else pl.concat([self._pending, frame],
                                                                              how="vertical_relaxed")
            return int(done) if done is not None else -1

    # ------------------------------------------------------------ the window
    def _slide(self, now: float) -> None:
        """Buckets that end at or before now - window leave: their sketch counts are taken away."""
        first = math.floor((now - self.settings.window_s) / self.bucket_s)    # the bucket holding the edge
        if first <= self._oldest_bucket:
            return
        self._oldest_bucket = first
        for b in [b for b in self._buckets if b < first]:
            for qi, chunks in self._buckets.pop(b).sketch.items():
                for codes, counts in chunks:
                    self._apply_sketch(qi, *unpack(codes), counts.astype(np.float64), -1)
        if self._pending is not None:
            self._pending = self._pending.filter(pl.col("_bucket") >= first)

    def statistics(self, now: float) -> dict:
        """The window's sufficient statistics, as sufficient.sufficient_stats returns them."""
        with self._lock:
            self._slide(now)
            route_tot = np.zeros((len(self._route_slots), self.route_width))
            pair_tot = np.zeros((len(self._pair_slots), self.pair_width))
            keyed = np.zeros(2)
            first = [math.inf, math.inf]
            for bucket in self._buckets.values():
                bucket.route = compact_rows(bucket.route, self.route_width)
                bucket.pair = compact_rows(bucket.pair, self.pair_width)
                for qi, chunks in bucket.sketch.items():
                    bucket.sketch[qi] = compact_counts(chunks)
                for slots, rows in bucket.route:
                    route_tot[slots] += rows
                for slots, rows in bucket.pair:
                    pair_tot[slots] += rows
                keyed += bucket.keyed
                first = [min(a, x) for a, x in zip(first, bucket.first)]
            route_slots, pair_slots = dict(self._route_slots), dict(self._pair_slots)
            sketches = [dict(s) for s in self._sketches]
            return self._assemble(route_tot, pair_tot, keyed, first, route_slots, pair_slots, sketches)

    def _pooled(self, route_tot: np.ndarray, route_slots: dict) -> dict[tuple[str, str], str]:
        """(label, raw value) -> the cohort value it is judged under: itself, or __other__ when it has fewer
        than gate.min_samples traces on either route in the window."""
        counts: dict[tuple[str, str], list[float]] = {}
        traces = route_tot[:, 0].tolist()
        for (route, lab, value), slot in route_slots.items():
            if lab is not None:
                counts.setdefault((lab, value), [0.0, 0.0])[route == "candidate"] += traces[slot]
        n = self.settings.min_samples
        return {key: (OTHER if min(cb, cc) < n else key[1]) for key, (cb, cc) in counts.items() if cb + cc > 0}

    def _assemble(self, route_tot, pair_tot, keyed, first, route_slots, pair_slots, sketches) -> dict:
        pooled = self._pooled(route_tot, route_slots)
        names: dict[tuple, str] = {}      # (label, raw value) -> "label=value" or "label=__other__"

        def cohort(lab: str | None, value: str) -> str:
            if lab is None:
                return ALL
            name = names.get((lab, value))
            if name is None:
                name = names[(lab, value)] = f"{lab}={pooled[(lab, value)]}"
            return name

        # route sums per (route, cohort): a pooled cohort adds up its values' rows (and sketches)
        live = (route_tot[:, 0] > 0).tolist()
        route_keys, route_rows, members = _pool_rows(
            route_tot, [(route, cohort(lab, value)) if live[slot] else None
                        for (route, lab, value), slot in route_slots.items()])
        out: dict = {"paired": {}, "unpaired": {}, "quantiles": {}, "routes": {}, "keyed": {}, "first_candidate": None,
                     "cohort_traces": {}}
        routes, cohort_traces = out["routes"], out["cohort_traces"]
        sides: dict[str, list] = {}       # cohort -> [baseline row, candidate row] (None: no trace on that route)
        for (route, name), row in zip(route_keys, route_rows):
            cohort_traces[name] = cohort_traces.get(name, 0) + int(row[0])
            if name == ALL:
                routes[route] = int(row[0])
            sides.setdefault(name, [None, None])[route == "candidate"] = row
        self._unpaired(sides, out["unpaired"])
        self._quantiles(route_keys, route_rows, members, sketches, out["quantiles"])
        if first[1] < math.inf and "candidate" in routes:
            out["first_candidate"] = first[1]
        out["keyed"] = {"baseline": int(keyed[0]), "candidate": int(keyed[1])}
        # pairs per cohort of the baseline trace's value
        live = (pair_tot[:, 0] > 0).tolist()
        pair_keys, pair_rows, _ = _pool_rows(
            pair_tot, [cohort(lab, value) if live[slot] else None for (lab, value), slot in pair_slots.items()])
        paired = out["paired"]
        cols = [(col, 1 + 6 * i, 7 + 6 * i) for i, col in enumerate(self.moment_cols)]
        for name, row in zip(pair_keys, pair_rows):      # ~200 cohorts x 4 columns a refresh: one slice each
            paired[(None, name)] = int(row[0])
            for col, j, end in cols:
                n, sb, sc, sbb, scc, sbc = row[j:end]
                paired[(col, name)] = {"n": int(n), "sb": sb, "sc": sc, "sbb": sbb, "scc": scc, "sbc": sbc}
        return out

    def _unpaired(self, sides: dict[str, list], unpaired: dict) -> None:
        """Per moment column and cohort, the two routes' n, sum and sum of squares (0 for a route without
        traces, as sufficient_stats gives)."""
        cols = [(col, 1 + 3 * i, 4 + 3 * i) for i, col in enumerate(self.moment_cols)]
        for name, (b, c) in sides.items():
            for col, j, end in cols:
                nb, sb, sbb = b[j:end] if b else (0, 0, 0)
                nc, sc, scc = c[j:end] if c else (0, 0, 0)
                unpaired[(col, name)] = {"nb": int(nb), "nc": int(nc), "sb": sb, "sc": sc, "sbb": sbb, "scc": scc}

    def _quantiles(self, keys: list, rows: list, members: list, sketches: list, quantiles: dict) -> None:
        """Per quantile column and (route, cohort): the count of values > 0 and the grid read off the sketch
        (the members' sketches merged for a pooled cohort), every grid of a column in one numpy pass."""
        m = len(self.moment_cols)
        for qi, col in enumerate(self.quantile_cols):
            wanted: list = []         # ((col, cohort), route, sketch) whose grid is read
            at, have = 1 + 3 * m + qi, sketches[qi]
            for (route, name), row, slots in zip(keys, rows, members):
                qn = int(row[at])
                quantiles.setdefault((col, name), {})[route] = (qn, None)
                if qn:
                    parts = [have[s] for s in slots if s in have]
                    wanted.append(((col, name), route, parts[0] if len(parts) == 1 else _merged(parts, self.alpha)))
            grids = QuantileSketch.quantiles_many([sk for _, _, sk in wanted], self._grids[col])
            for (key, route, _), grid in zip(wanted, grids):
                quantiles[key][route] = (quantiles[key][route][0], grid)

    def memory(self) -> dict:
        """What the state holds, for the bench: buckets, slots, waiting traces, sketch buckets."""
        with self._lock:
            return {"buckets": len(self._buckets), "route_slots": len(self._route_slots),
                    "pair_slots": len(self._pair_slots), "pending": 0 if self._pending is None else self._pending.height,
                    "sketch_entries": sum(c.size for b in self._buckets.values() for chunks in b.sketch.values()
                                          for c, _ in chunks),
                    "sketch_totals_bins": sum(sk.bins.size for per in self._sketches for sk in per.values())}


def _pool_rows(totals: np.ndarray, keys: list) -> tuple[list, list[list[float]], list[list[int]]]:
    """Rows of ``totals`` (by slot) summed per key (None leaves the slot out): the keys in the order of their
    first slot, their sums as plain lists (a few hundred short rows read element by element are much cheaper
    than numpy scalars) and their slots. A key's rows are added in slot order, ((r1 + r2) + r3), as a running
    sum over the slots would."""
    index: dict = {}
    firsts: list[int] = []
    members: list[list[int]] = []
    rest_slots: list[int] = []
    rest_groups: list[int] = []
    for slot, key in enumerate(keys):
        if key is None:
            continue
        g = index.get(key)
        if g is None:
            index[key] = len(firsts)
            firsts.append(slot)
            members.append([slot])
        else:
            rest_slots.append(slot)
            rest_groups.append(g)
            members[g].append(slot)
    sums = totals[firsts]
    if rest_slots:
        np.add.at(sums, rest_groups, totals[rest_slots])     # unbuffered: in slot order within each key
    return list(index), sums.tolist(), members


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable"); small key ranges (minutes of a window, slots) as int16, which numpy
    sorts by radix in one linear pass instead of a merge sort of a million int64."""
    if keys.size and int(keys.max()) - int(keys.min()) < 32767:
        return np.argsort((keys - keys.min()).astype(np.int16), kind="stable")
    return np.argsort(keys, kind="stable")


def _sum_by(keys: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``matrix`` summed per distinct key (keys sorted), each column in row order."""
    uniq, inv = np.unique(keys, return_inverse=True)
    out = np.empty((uniq.size, matrix.shape[1]))
    for j in range(matrix.shape[1]):
        out[:, j] = np.bincount(inv, weights=matrix[:, j], minlength=uniq.size)
    return uniq, out


def _matrix(lists: pl.Series, width: int) -> np.ndarray:
    """A column of equal-length lists of floats (nulls: 0) as a (rows, width) array."""
    if lists.len() == 0:
        return np.zeros((0, width))
    return lists.list.to_array(width).arr.to_struct().struct.unnest().fill_null(0.0).to_numpy().astype(np.float64)


def _merged(parts: list[QuantileSketch], alpha: float) -> QuantileSketch:
    out = QuantileSketch(alpha)
    for p in parts:
        out.merge(p)
    return out


class GateStateSink:
    """A sink of the TraceAssembler (as PairingSink is): completed traces, as the trace-frame columns the SQL
    reads (pairing.completed_frame), into the GateState.

    A round only appends to a list: the state is read once per ``gate.refresh``, so rounds are added in bulk
    (``drain``) when ``batch_rows`` traces have gathered, and by the refresh before it merges; per-round
    polars work would cost more than the rescan it replaces at low rates. Until the state has been rebuilt from
    the store (GateRefresher's first refresh) rounds wait; afterwards only traces completed after the rebuild's
    newest ``completed_at`` are added, so none is counted twice."""

    def __init__(self, state: GateState, batch_rows: int = 5_000):
        self.state = state
        self.batch_rows = batch_rows
        self.after_us: int | None = None          # set by ready()
        self._rounds: list = []
        self._rows = 0
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()       # one drain at a time: rounds are added in order

    def __call__(self, done) -> None:
        if done.traces.height == 0:
            return
        with self._lock:
            self._rounds.append(done)
            self._rows += done.traces.height
            full = self.after_us is not None and self._rows >= self.batch_rows
        if full:
            self.drain()

    def frame(self, rounds: list) -> pl.DataFrame:
        """Rounds of CompletedTraces -> one trace frame with start_s and _completed_us."""
        from .assembly import CompletedTraces
        from .pairing import completed_frame
        s = self.state
        if len(rounds) == 1:
            done = rounds[0]
        else:
            evals = [r.evals for r in rounds if r.evals is not None and r.evals.height]
            done = CompletedTraces(pl.concat([r.traces for r in rounds], how="diagonal_relaxed"),
                                   pl.concat(evals, how="diagonal_relaxed") if evals else rounds[0].evals, None, 0, 0)
        t = done.traces
        start = pl.col("start_time")
        start_s = (start.dt.epoch("us") / 1e6) if t.schema["start_time"].is_temporal() else start.cast(pl.Float64)
        done_us = (pl.col("completed_at").dt.epoch("us") if "completed_at" in t.columns
                   else pl.lit(None, dtype=pl.Int64))
        extra = t.select(pl.col("trace_id"), start_s.alias("start_s"), done_us.alias("_completed_us"))
        return completed_frame(done, s.settings, s.labels).join(extra, on="trace_id", how="left")

    def drain(self) -> None:
        """Add the rounds gathered so far to the state (a no-op before ready())."""
        with self._drain_lock:
            with self._lock:
                if self.after_us is None or not self._rounds:
                    return
                rounds, self._rounds, self._rows = self._rounds, [], 0
                after = self.after_us
            frame = self.frame(rounds)
            self.state.add_frame(frame.filter(pl.col("_completed_us").is_null() | (pl.col("_completed_us") > after)))

    def ready(self, after_us: int) -> None:
        """The rebuild saw every trace completed up to ``after_us``: add the rounds that waited, past it."""
        with self._lock:
            self.after_us = after_us
        self.drain()
