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
    """True effects, exact in expectation so that "at the margin" means at it."""
    pass_drop: float = 0.0        # the task_completion pass rate is this much lower (absolute)
    refusal_x: float = 1.0        # refusal rate multiplier
    latency_x: float = 1.0        # multiplies every duration (so p99 too)
    cost_x: float = 1.0           # cost per trace multiplier (on top of steps_x: cost grows with steps)
    steps_x: float = 1.0          # mean steps multiplier
    cohort: tuple[str, str] | None = None    # only requests with this (label, value)


def half_margin(max_drop: float = 0.02, refusal: float = 2.0, p99: float = 1.3, cost: float = 1.1,
                steps: float = 1.2, scale: float = 0.5) -> Effect:
    """Every default rule's effect at ``scale`` of its margin's distance from no change (log scale for
    ratios): 0.5 is half the margin (cost x1.049), 1 at the margin, 2 twice as far (cost x1.21)."""
    return Effect(pass_drop=max_drop * scale, refusal_x=refusal ** scale, latency_x=p99 ** scale,
                  cost_x=(cost / steps) ** scale, steps_x=steps ** scale)


def _resampled(rng, u, share):
    """u, with a fresh uniform in place of each value with probability ``share``: still uniform."""
    fresh = rng.random(u.shape[0])
    return np.where(rng.random(u.shape[0]) < share, fresh, u)


def simulate(n_requests: int, seed: int, effect: Effect = Effect(), n_values: int = 5, labels=("intent",),
             base_pass: float = 0.85, discordance: float = 0.10, base_refusal: float = 0.02,
             latency_sigma: float = 0.5, request_ids: bool = True) -> pl.DataFrame:
    """A trace frame (analyzers/compare.py's input) of n_requests baseline + n_requests candidate traces.

    ``discordance``: the share of pairs whose task_completion outcomes differ when there is no effect.
    """
    rng = np.random.default_rng(seed)
    n = n_requests
    cohorts = {label: rng.integers(0, n_values, n) for label in labels}
    hit = np.ones(n, dtype=bool)
    if effect.cohort is not None:
        label, value = effect.cohort
        hit = np.array([f"v{i}" for i in cohorts[label]]) == value
    z = rng.normal(size=n)

    # Outcomes read one shared uniform per request, each route redrawing it with probability s: the
    # routes disagree only when a redraw lands on the other side, so pairs are correlated and each
    # route's rate is exactly its threshold. Discordance (no effect) = (1 - (1-s)^2) * 2p(1-p).
    s = 1 - np.sqrt(max(0.0, 1 - discordance / (2 * base_pass * (1 - base_pass))))
    u = rng.random(n)
    pass_b = _resampled(rng, u, s) < base_pass
    pass_c = _resampled(rng, u, s) < base_pass - np.where(hit, effect.pass_drop, 0.0)

    # refusals: the same construction, a tenth of the requests redrawn
    ur = rng.random(n)
    ref_b = _resampled(rng, ur, 0.1) < base_refusal
    ref_c = _resampled(rng, ur, 0.1) < base_refusal * np.where(hit, effect.refusal_x, 1.0)

    lat_b = np.exp(np.log(4.0) + 0.3 * z + latency_sigma * rng.normal(size=n))
    lat_c = np.exp(np.log(4.0) + 0.3 * z + latency_sigma * rng.normal(size=n)) * np.where(hit, effect.latency_x, 1.0)
    # steps: 1 + Poisson(lam); the candidate's lam is set so its mean is steps_x times the baseline's
    lam = 2.0 * np.exp(0.25 * z)
    steps_b = 1 + rng.poisson(lam)
    steps_c = 1 + rng.poisson(np.maximum(np.where(hit, effect.steps_x, 1.0) * (1 + lam) - 1, 0.0))
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
