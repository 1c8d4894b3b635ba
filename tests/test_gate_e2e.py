"""The gate end to end: synthetic shadow traffic through the OTel SDK into a real ``serve``, then
``shadowlens gate`` (store and URL), ``GET /gate``, the gate metrics and ``shadowlens report``."""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from harness import REPO, SHADOWLENS, wait_for

from shadowlens.generate import GenerateOptions, run_generate

FAST = {"SHADOWLENS_TRACES__IDLE_SECONDS": "1", "SHADOWLENS_GATE__REFRESH": "1s",
        "SHADOWLENS_ANALYZERS__WINDOW_REFRESH": "1s"}


def send(server, scenario: str, requests: int, rate: float = 250.0, seed: int = 1):
    result = run_generate(GenerateOptions(endpoint=server.grpc_endpoint, rate=rate, requests=requests,
                                          scenario=scenario, seed=seed), out=None)
    assert result.failed_spans == 0 and result.requests == requests   # exactly, however slow the machine
    return result


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for_gate(server, traces: int, timeout: float = 60.0) -> dict:
    """/gate once its evaluation covers every sent trace."""
    last: list[dict] = [{}]

    def covered():
        last[0] = get(server.metrics_url + "/gate")[1]
        return sum(last[0].get("traces", {}).values()) >= traces
    wait_for(covered, timeout, 0.5, what=f"the gate covering {traces} traces", detail=lambda: str(last[0].get("traces")))
    time.sleep(1.2)                      # one more refresh, so the counters below are settled too
    return get(server.metrics_url + "/gate")[1]


def get(url: str, method: str = "GET") -> tuple[int, dict]:
    req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def cli(server, *args, timeout=120):
    return subprocess.run(SHADOWLENS + list(args), env=server.env, capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_regression_is_blocked_and_the_planted_cohorts_are_named(serve_factory, tmp_path):
    server = serve_factory(env=FAST)
    sent = send(server, "regression", 3000)
    doc = wait_for_gate(server, sent.traces)
    assert doc["verdict"] == "block"
    failing = {(r["rule"], r["cohort"]) for r in doc["rules"] if r["state"] == "fail"}
    # the generator's planted effects (shadowlens/traffic.py SCENARIOS["regression"]). A result fails only
    # once its interval is wholly past the margin (issue 16): at 3,000 requests steps x1.4 (margin x1.2)
    # in billing does; refusals x3 (x2) in de and p99 x1.5 (x1.3) in enterprise are past it or on their way
    assert ("steps", "intent=billing") in failing
    by_key = {(r["rule"], r["cohort"]): r for r in doc["rules"]}
    for key in (("refusal_rate", "language=de"), ("p99_latency", "tier=enterprise")):
        assert by_key[key]["state"] in ("fail", "inconclusive") and by_key[key]["effect"] > 1.0, by_key[key]
    for r in doc["rules"]:
        assert set(r) >= {"rule", "cohort", "state", "effect", "lower", "upper", "n_baseline", "n_candidate",
                          "margin", "reason"}

    # HTTP: non-2xx on block (Flagger), 200 on request (Argo Rollouts), POST as webhooks send it
    assert get(server.metrics_url + "/gate")[0] == 409
    assert get(server.metrics_url + "/gate", "POST")[0] == 409
    assert get(server.metrics_url + "/gate?always_ok=1")[0] == 200

    # the CLI asks the running sidecar, or reads the store through its socket: exit 1 = block
    by_url = cli(server, "gate", "--url", server.metrics_url)
    assert by_url.returncode == 1, by_url.stderr
    assert "steps fails for intent=billing" in by_url.stdout
    by_store = cli(server, "gate", "--data-dir", str(server.data_dir), "--format", "json")
    assert by_store.returncode == 1, by_store.stderr
    assert ("steps", "intent=billing") in {(r["rule"], r["cohort"]) for r in json.loads(by_store.stdout)["rules"]
                                           if r["state"] == "fail"}

    # metrics: gate state, the verdict per rule and cohort, effects, pairs
    text = server.metrics_text()
    assert metric(text, "shadowlens_gate_state", state="block") == 1.0
    assert metric(text, "shadowlens_gate_state", state="promote") == 0.0
    assert metric(text, "shadowlens_verdict", rule="steps", intent="billing", language="__all__", tier="__all__",
                  state="fail") == 1.0
    assert metric(text, "shadowlens_compare_effect", rule="refusal_rate", language="de", bound="lower") > 1.0
    assert metric(text, "shadowlens_pairs_total", status="matched") == sent.requests

    # the mergeable counters equal sums computed from the stored traces
    rows = server.query("SELECT b.refused::INT AS b, c.refused::INT AS c FROM traces b JOIN traces c"
                        " USING (request_id) WHERE b.route = 'baseline' AND c.route = 'candidate' AND b.language = 'de'")
    expected = {"pairs": len(rows), "sum_baseline": sum(r["b"] for r in rows), "sum_candidate": sum(r["c"] for r in rows),
                "sum_product": sum(r["b"] * r["c"] for r in rows)}
    for stat, value in expected.items():
        assert metric(text, "shadowlens_compare_stat_total", rule="refusal_rate", intent="__all__", language="de",
                      tier="__all__", stat=stat) == value, stat

    # the report, in every format; html is one self-contained page
    table = cli(server, "report", "--data-dir", str(server.data_dir))
    assert table.returncode == 0 and "language=de" in table.stdout and "verdict: block" in table.stdout
    md = cli(server, "report", "--data-dir", str(server.data_dir), "--format", "markdown")
    assert md.stdout.startswith("## shadowlens gate: **block**") and "| steps | intent=billing | fail |" in md.stdout
    js = json.loads(cli(server, "report", "--data-dir", str(server.data_dir), "--format", "json").stdout)
    assert {c["cohort"] for c in js["cohorts"]} >= {"all", "language=de", "tier=enterprise", "intent=billing"}
    page = tmp_path / "report.html"
    out = cli(server, "report", "--data-dir", str(server.data_dir), "--format", "html", "--out", str(page))
    assert out.returncode == 0, out.stderr
    html = page.read_text()
    assert "<svg" in html and "language=de" in html and "block" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html) and "<script" not in html


def test_healthy_traffic_is_promoted(serve_factory):
    server = serve_factory(env=FAST)
    sent = send(server, "healthy", 3500, seed=5)
    doc = wait_for_gate(server, sent.traces)
    assert doc["verdict"] == "promote", json.dumps([r for r in doc["rules"] if r["cohort"] == "all"], indent=1)
    assert get(server.metrics_url + "/gate")[0] == 200
    assert cli(server, "gate", "--url", server.metrics_url).returncode == 0
    assert server.stop() == 0
    offline = cli(server, "gate", "--data-dir", str(server.data_dir))      # no server: opens the store itself
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert offline.stdout.startswith("gate: promote")


def test_tiny_samples_exit_3_and_usage_errors_exit_2(serve_factory, tmp_path):
    server = serve_factory(env=FAST)
    sent = send(server, "regression", 40)
    wait_for_gate(server, sent.traces)
    tiny = cli(server, "gate", "--url", server.metrics_url)
    assert tiny.returncode == 3, tiny.stdout
    assert "insufficient_data" in tiny.stdout
    strict = get(server.metrics_url + "/gate?strict=1")[0]
    assert strict >= 400                                   # inconclusive is not a promotion

    bad_rules = tmp_path / "rules.yaml"
    bad_rules.write_text("- {name: x, measure: latency, max_ratio: 1.2}\n")
    for args, message in (
        (["gate", "--url", server.metrics_url, "--rules", str(bad_rules)], "do not combine"),
        (["gate", "--data-dir", str(server.data_dir), "--rules", str(bad_rules)], "measure 'latency'"),
        (["gate", "--data-dir", str(tmp_path / "nothing")], "no store"),
        (["gate", "--url", "http://127.0.0.1:1"], "--url"),
        (["gate", "--data-dir", str(server.data_dir), "--window", "soon"], "--window"),
    ):
        out = cli(server, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("rules, verdict", [("- {name: cost, measure: cost, max_ratio: 3.0}\n", 0)])
def test_gate_rules_file_replaces_the_configured_rules(serve_factory, tmp_path, rules, verdict):
    server = serve_factory(env=FAST)
    sent = send(server, "healthy", 600, seed=9)
    wait_for_gate(server, sent.traces)
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    out = cli(server, "gate", "--data-dir", str(server.data_dir), "--rules", str(path), "--format", "json")
    assert out.returncode == verdict, out.stdout + out.stderr
    assert {r["rule"] for r in json.loads(out.stdout)["rules"]} == {"cost"}
