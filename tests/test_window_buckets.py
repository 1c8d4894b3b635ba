"""Quantiles read off the window's folded sketch counts (analyzers/window_buckets.py) against numpy's exact
quantiles of the same values: within the sketch's relative error, on both of its paths (a dense table of
(group, key) counts, and sorted pairs when the table would be large)."""
from __future__ import annotations

import numpy as np
import pytest

from shadowlens.analyzers import window_buckets
from shadowlens.analyzers.sketch import QuantileSketch
from shadowlens.analyzers.window_buckets import ZERO_KEY, quantiles_by_group

QS = [0.5, 0.9, 0.99]


@pytest.mark.parametrize("dense_cells", [1_000_000, 0], ids=["dense", "sorted"])
def test_group_quantiles_are_within_the_sketchs_error_of_numpys(monkeypatch, dense_cells):
    monkeypatch.setattr(window_buckets, "_DENSE_CELLS", dense_cells)
    rng = np.random.default_rng(3)
    sketch = QuantileSketch()
    for _ in range(100):
        groups = int(rng.integers(1, 20))
        n = int(rng.integers(1, 400))
        g = rng.integers(0, groups, n)
        values = rng.lognormal(0, 2, n) * (rng.random(n) > 0.1)      # a tenth are 0: one key, read as 0
        counts = rng.integers(1, 3, n)                                 # a key may count several values
        keys = np.where(values > 0, sketch.keys(np.where(values > 0, values, 1.0)), ZERO_KEY)
        got = quantiles_by_group(g, keys, counts, groups, QS, sketch.gamma)
        for group in range(groups):
            mine = g == group
            if not mine.any():
                assert np.isnan(got[group]).all()
                continue
            want = np.quantile(np.repeat(values[mine], counts[mine]), QS)
            # both ends of an interpolation within alpha (0 read as exactly 0): the interpolation is too
            assert list(got[group]) == pytest.approx(list(want), rel=sketch.alpha + 1e-9, abs=0)


def test_no_counts_give_nan():
    out = quantiles_by_group(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 3, QS, 1.02)
    assert out.shape == (3, 3) and np.isnan(out).all()
