"""The synthetic shadow-traffic model behind ``shadowlens generate`` and the demo (sent by generate.py).

Each simulated request yields two traces, one per route (``baseline`` and ``candidate``), with the same
``shadow.request_id`` and cohort. A per-request latent difficulty ``z`` is shared by both traces, so the pair
is correlated the way real shadow traffic is; a scenario (``SCENARIOS``) plants candidate effects in
chosen cohorts. Sampling (``sample_request``) is pure numpy and needs no network.

The family: this model; generate.py sends its requests through the OpenTelemetry SDK; traffic_pool.py builds
realistic agent spans in bulk for load; otlp.py holds the OTLP building blocks the tests use too.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np

ROUTES = ("baseline", "candidate")
MODELS = {"baseline": "gpt-4o-2024-08-06", "candidate": "my-rlaif-7b"}
# USD per token (input, output). The candidate is priced at the baseline's rate so that ``healthy`` compares
# like for like; every LLM span carries its cost as ``llm.cost.total`` so stored cost ignores the price table.
PRICE_PER_TOKEN = {"gpt-4o-2024-08-06": (2.5e-6, 10e-6), "my-rlaif-7b": (2.5e-6, 10e-6)}

# Cohort values and their fixed sampling weights. The cohorts that carry planted effects are 15-20 % of
# traffic, so a planted effect shows in its own cohort far more than in all traffic or in overlapping cohorts.
COHORTS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "intent": (("billing", "support", "search", "booking", "smalltalk"), (0.15, 0.35, 0.20, 0.15, 0.15)),
    "language": (("en", "de", "fr", "es", "ja"), (0.45, 0.20, 0.12, 0.13, 0.10)),
    "tier": (("free", "pro", "enterprise"), (0.55, 0.30, 0.15)),
}


@dataclass(frozen=True)
class Model:
    """The statistical model shared by every scenario (per request: z ~ N(0,1); per trace: eps ~ N(0,1))."""
    steps_lambda: float = 2.0          # steps = 1 + Poisson(steps_lambda * exp(steps_z * z))
    steps_z: float = 0.25
    duration_median_s: float = 4.0     # seconds = exp(ln(median) + dur_z * z + dur_eps * eps)
    dur_z: float = 0.30
    pass_intercept: float = 2.2        # task_completion passes with p = sigmoid(intercept - pass_z * z)
    pass_z: float = 0.6
    refusal_rate: float = 0.03
    escalation_rate: float = 0.02
    redraw: float = 0.03               # chance a trace draws its own uniform instead of the request's shared one
    tool_prob: float = 0.5             # chance a step calls a tool after its LLM call
    input_tokens: tuple[float, float] = (800.0, 200.0)   # mean, sd per LLM call
    output_tokens: tuple[float, float] = (150.0, 50.0)


MODEL = Model()


@dataclass(frozen=True)
class Effect:
    """A planted candidate effect: in cohort ``label=value`` multiply ``quantity`` by ``factor``."""
    label: str
    value: str
    quantity: str      # refusal_rate | duration | steps
    factor: float
    rule: str          # the gate rule (CONTRACT §7) expected to catch it


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    dur_eps: float = 0.35              # per-trace lognormal sigma of duration (total sigma with dur_z: ~0.46)
    effects: tuple[Effect, ...] = ()
    drop_candidate: float = 0.0        # share of candidate traces never sent (crashed candidate)
    drop_request_id: float = 0.0       # share of requests without shadow.request_id

    def factor(self, quantity: str, cohort: dict[str, str]) -> float:
        f = 1.0
        for e in self.effects:
            if e.quantity == quantity and cohort.get(e.label) == e.value:
                f *= e.factor
        return f


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("healthy", "the candidate draws from exactly the baseline's distributions"),
    Scenario("regression", "planted candidate regressions in three cohorts; everything else like healthy", effects=(
        Effect("language", "de", "refusal_rate", 3.0, "refusal_rate"),
        Effect("tier", "enterprise", "duration", 1.5, "p99_latency"),
        Effect("intent", "billing", "steps", 1.4, "trajectory_steps (and cost_per_trace)"),
    )),
    Scenario("noisy", "no true regression: heavier latency tail, crashed candidate traces, missing request ids",
             dur_eps=math.sqrt(0.7 ** 2 - MODEL.dur_z ** 2), drop_candidate=0.03, drop_request_id=0.05),
)}


@dataclass
class LLMCall:
    input_tokens: int
    output_tokens: int
    cost_usd: float
    tool: bool


@dataclass
class TracePlan:
    route: str
    duration_s: float
    steps: list[LLMCall]
    passed: bool
    refused: bool
    escalated: bool

    @property
    def model(self) -> str:
        return MODELS[self.route]


@dataclass
class RequestPlan:
    request_id: str | None
    cohort: dict[str, str]
    z: float
    traces: list[TracePlan]      # baseline first; the candidate is missing when it "crashed"


_CUMULATIVE = {label: np.cumsum(w) / np.sum(w) for label, (_, w) in COHORTS.items()}


def _cohort(rng: np.random.Generator) -> dict[str, str]:
    u = rng.random(len(COHORTS))
    return {label: values[min(int(np.searchsorted(_CUMULATIVE[label], x, side="right")), len(values) - 1)]
            for (label, (values, _)), x in zip(COHORTS.items(), u)}


def _shared(rng: np.random.Generator, u: float, m: Model) -> float:
    """The request's shared uniform, or (with probability ``m.redraw``) an independent one."""
    return float(rng.random()) if rng.random() < m.redraw else u


def sample_request(rng: np.random.Generator, scenario: Scenario, m: Model = MODEL) -> RequestPlan:
    """Draw one request: its cohort, latent difficulty and one trace plan per route."""
    cohort = _cohort(rng)
    z = float(rng.standard_normal())
    u_pass, u_refuse, u_escalate = rng.random(3).tolist()
    p_pass = 1.0 / (1.0 + math.exp(-(m.pass_intercept - m.pass_z * z)))
    request_id = None if rng.random() < scenario.drop_request_id else uuid.UUID(bytes=rng.bytes(16), version=4).hex
    traces = []
    for route in ROUTES:
        f = (lambda q: scenario.factor(q, cohort)) if route == "candidate" else (lambda q: 1.0)
        fs = f("steps")
        # 1 + Poisson(fs*lam*e^(bz) + fs - 1) has mean exactly fs × (1 + lam*e^(bz)).
        n_steps = 1 + int(rng.poisson(fs * m.steps_lambda * math.exp(m.steps_z * z) + fs - 1.0))
        eps = float(rng.standard_normal())
        # Duration does not scale with the step count: latency and trajectory length stay separate effects.
        duration = math.exp(math.log(m.duration_median_s) + m.dur_z * z + scenario.dur_eps * eps) * f("duration")
        price_in, price_out = PRICE_PER_TOKEN[MODELS[route]]
        tin = np.maximum(50, np.rint(rng.normal(*m.input_tokens, size=n_steps))).astype(int).tolist()
        tout = np.maximum(10, np.rint(rng.normal(*m.output_tokens, size=n_steps))).astype(int).tolist()
        tools = (rng.random(n_steps) < m.tool_prob).tolist()
        calls = [LLMCall(i, o, i * price_in + o * price_out, t) for i, o, t in zip(tin, tout, tools)]
        traces.append(TracePlan(
            route=route, duration_s=duration, steps=calls,
            passed=bool(_shared(rng, u_pass, m) < p_pass),
            refused=bool(_shared(rng, u_refuse, m) < m.refusal_rate * f("refusal_rate")),
            escalated=bool(_shared(rng, u_escalate, m) < m.escalation_rate * f("escalation_rate")),
        ))
    if rng.random() < scenario.drop_candidate:
        traces.pop()
    return RequestPlan(request_id, cohort, z, traces)
