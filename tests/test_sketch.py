"""analyzers/sketch.py: the stated relative error against DuckDB's quantile_cont, merging, and the interval's coverage."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest

from shadowlens.analyzers.sketch import QuantileSketch

QS = [0.5, 0.9, 0.98, 0.985, 0.99, 0.995, 0.999]


@pytest.mark.parametrize("alpha", [0.005, 0.01, 0.05])
@pytest.mark.parametrize("seed", [1, 2])
def test_quantiles_within_alpha_of_quantile_cont(alpha, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.exp(rng.normal(1.4, 0.8, 20_000)), rng.uniform(0.001, 0.01, 500)])
    con = duckdb.connect()
    con.register("t", {"x": x})
    exact = con.execute(f"SELECT quantile_cont(x, {QS}) FROM t").fetchone()[0]
    s = QuantileSketch(alpha)
    s.add_many(x)
    for got, want in zip(s.quantiles(QS), exact):
        assert abs(got / want - 1) <= alpha * (1 + 1e-9), (got, want)


def test_merge_equals_one_pass_and_subtraction_undoes_it():
    rng = np.random.default_rng(3)
    parts = [np.exp(rng.normal(0, 2, 1000)) for _ in range(5)]
    whole = QuantileSketch()
    whole.add_many(np.concatenate(parts))
    merged = QuantileSketch()
    for p in parts:
        one = QuantileSketch()
        one.add_many(p)
        merged.merge(one)
    assert merged.counts() == whole.counts() and merged.count == 5000
    last = QuantileSketch()
    last.add_many(parts[-1])
    merged.merge(last, sign=-1)
    first4 = QuantileSketch()
    first4.add_many(np.concatenate(parts[:4]))
    assert {k: v for k, v in merged.counts().items() if v} == first4.counts()
    assert QuantileSketch.from_counts(whole.counts()).counts() == whole.counts()
    with pytest.raises(ValueError, match="different relative error"):
        whole.merge(QuantileSketch(0.02))


def test_zeros_are_counted_apart():
    s = QuantileSketch()
    s.add_many([0.0, -1.0, 2.0, float("nan")])
    assert (s.count, s.zeros) == (1, 2)


def test_interval_covers_the_true_p99_at_its_level():
    # lognormal(0, 1): the true p99 is exp(2.3263); 200 samples of 2,000 values
    true = float(np.exp(2.326348))
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(200):
        s = QuantileSketch(0.01)
        s.add_many(np.exp(rng.normal(0, 1, 2000)))
        lo, hi = s.interval(0.99, 0.9)
        covered += lo <= true <= hi
    assert covered >= 0.9 * 200 - 8      # at least the level (binomial slack of ~2 sd)
