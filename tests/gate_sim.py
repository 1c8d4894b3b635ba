"""Seeded shadow-traffic simulations for the gate's statistical tests (no product code inside).

Each request has a latent difficulty shared by its baseline and candidate trace, so pairs are
correlated as they are in real shadow traffic. ``Effect`` plants a regression on the candidate,
optionally only in one cohort.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Effect:
    pass_drop: float = 0.0        # absolute drop of the task_completion pass probability
    refusal_x: float = 1.0        # refusal probability multiplier
    latency_x: float = 1.0        # multiplies every duration (so p99 too)
    cost_x: float = 1.0
    steps_x: float = 1.0          # multiplies the Poisson mean of extra steps
    cohort: tuple[str, str] | None = None    # only requests with this (label, value)


def simulate(n_requests: int, seed: int, effect: Effect = Effect(), n_values: int = 5, labels=("intent",),
             base_pass: float = 0.85, discordance: float = 0.10, base_refusal: float = 0.02,
             latency_sigma: float = 0.5, request_ids: bool = True) -> pl.DataFrame:
    """A trace frame (analyzers/compare.py's input) of n_requests baseline + n_requests candidate traces."""
    rng = np.random.default_rng(seed)
    n = n_requests
    cohorts = {label: rng.integers(0, n_values, n) for label in labels}
    hit = np.ones(n, dtype=bool)
    if effect.cohort is not None:
        label, value = effect.cohort
        hit = np.array([f"v{i}" for i in cohorts[label]]) == value
    z = rng.normal(size=n)

    # Pass/fail: a shared uniform makes the routes agree unless one flips. With flip probability f
    # on each route the discordance is ~2f(1-f)... set f from the requested discordance at no effect.
    flip = (1 - np.sqrt(1 - 2 * discordance)) / 2
    u = rng.random(n)
    base_ok = u < base_pass
    def outcome(p_drop):
        ok = base_ok.copy()
        f = rng.random(n) < flip
        ok[f] = ~ok[f]
        # a drop of the pass probability: turn passes into fails with the matching probability
        if np.any(p_drop):
            turn = rng.random(n) < p_drop / base_pass
            ok = ok & ~turn
        return ok
    pass_b = outcome(0.0)
    pass_c = outcome(np.where(hit, effect.pass_drop, 0.0))

    ur = rng.random(n)
    ref_b = ur < base_refusal
    p_ref_c = np.where(hit, base_refusal * effect.refusal_x, base_refusal)
    ref_c = ur < p_ref_c
    ur2 = rng.random(n) < 0.002          # a little independent noise on both
    ref_b, ref_c = ref_b ^ ur2, ref_c ^ (rng.random(n) < 0.002)

    lat_b = np.exp(np.log(4.0) + 0.3 * z + latency_sigma * rng.normal(size=n))
    lat_c = np.exp(np.log(4.0) + 0.3 * z + latency_sigma * rng.normal(size=n)) * np.where(hit, effect.latency_x, 1.0)
    steps_b = 1 + rng.poisson(2.0 * np.exp(0.25 * z))
    steps_c = 1 + rng.poisson(2.0 * np.exp(0.25 * z) * np.where(hit, effect.steps_x, 1.0))
    cost_b = steps_b * 0.004 * np.exp(0.3 * rng.normal(size=n))
    cost_c = steps_c * 0.004 * np.exp(0.3 * rng.normal(size=n)) * np.where(hit, effect.cost_x, 1.0)

    start = np.arange(n, dtype=float) * 0.05
    rid = [f"r{seed}-{i}" for i in range(n)] if request_ids else [None] * n

    def side(route, passed, refused, lat, steps, cost):
        cols = {
            "route": [route] * n, "request_id": rid, "start_s": start,
            **{label: [f"v{i}" for i in vals] for label, vals in cohorts.items()},
            "duration": lat, "cost": cost, "steps": steps.astype(float), "tokens": steps * 900.0,
            "refused": refused.astype(float), "escalated": np.zeros(n),
            "eval_pass:task_completion": passed.astype(float), "eval_fail:task_completion": (~passed).astype(float),
        }
        return pl.DataFrame(cols, schema_overrides={"request_id": pl.Utf8})
    return pl.concat([side("baseline", pass_b, ref_b, lat_b, steps_b, cost_b),
                      side("candidate", pass_c, ref_c, lat_c, steps_c, cost_c)])
