"""The HTML report (``shadowlens report --format html``) as a person sees it: rendered by a real headless
Chromium (Debian's ``chromium`` + ``chromium-driver``, installed by ``make test`` through
scripts/install-chromium.sh) and measured in the browser.

The page is built from a realistic verdict: the demo's ``regression`` scenario (shadowlens/traffic.py's
own sampler, three planted cohorts) judged by analyzers.compare, 14 cohorts x 5 rules = 70 results.
Every expected position and number below is computed from that verdict's JSON, not from the renderer.

Without a browser the tests fail (CI must run them); SHADOWLENS_SKIP_BROWSER=1 turns that into a skip.
"""
from __future__ import annotations

import copy
import math
import os
import re
import shutil

import duckdb
import numpy as np
import polars as pl
import pytest

from shadowlens.analyzers.compare import compare, route_summary_sql
from shadowlens.analyzers.rules import parse_gate
from shadowlens.exporters.report import render
from shadowlens.exporters.verdict_json import verdict_to_json
from shadowlens.traffic import COHORTS, SCENARIOS, sample_request

TRACE_URL = "https://tempo.example/explore?trace={trace_id}&orgId=1"
PLANTED = {("refusal_rate", "language=de"), ("p99_latency", "tier=enterprise"), ("steps", "intent=billing"),
           ("cost_per_trace", "intent=billing")}


# ------------------------------------------------------------------------------------------ browser

def _browser_missing(reason: str):
    if os.environ.get("SHADOWLENS_SKIP_BROWSER") == "1":
        pytest.skip(f"SHADOWLENS_SKIP_BROWSER=1: {reason}")
    pytest.fail(f"{reason}; install it with `sh scripts/install-chromium.sh` (`make test` does), or set"
                " SHADOWLENS_SKIP_BROWSER=1 to skip the browser tests", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _browser_missing("the selenium package is missing (a test extra: pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        _browser_missing("the `chromium` browser or its `chromedriver` is not on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium           # the Debian binary, never a downloaded one
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--window-size=900,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, path, width: int, height: int = 800):
    browser.set_window_size(width, height)
    browser.get(path.as_uri())
    inner = browser.execute_script("return [innerWidth, innerHeight]")
    assert inner[0] == width, f"the window is {inner[0]} px wide, not {width}: the viewport would not be what is tested"
    return inner


# ------------------------------------------------------------------------------------------ the verdict

def _regression_frame(n_requests: int, seed: int = 7) -> pl.DataFrame:
    """The demo's regression scenario as a trace frame (what analyzers/gate.py reads from the store)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_requests):
        plan = sample_request(rng, SCENARIOS["regression"])
        for t in plan.traces:
            rows.append({"route": t.route, "request_id": plan.request_id, "start_s": 1.7e9 + i * 0.2, **plan.cohort,
                         "duration": t.duration_s, "cost": sum(c.cost_usd for c in t.steps), "steps": float(len(t.steps)),
                         "tokens": float(sum(c.input_tokens + c.output_tokens for c in t.steps)),
                         "refused": float(t.refused), "escalated": float(t.escalated),
                         "eval_pass:task_completion": float(t.passed), "eval_fail:task_completion": float(not t.passed)})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def verdict():
    frame = _regression_frame(8000)
    settings = parse_gate({})
    labels = tuple(COHORTS)
    doc = verdict_to_json(compare(frame, settings, labels, now=float(frame["start_s"].max())))
    con = duckdb.connect()
    try:
        con.register("t", frame.to_arrow())
        bars = con.sql(route_summary_sql(labels, settings.eval_names)).to_arrow_table().to_pylist()
    finally:
        con.close()
    assert len(doc["rules"]) == 70 and any(r["state"] == "fail" for r in doc["rules"])
    return doc, bars


@pytest.fixture(scope="module")
def attributed(verdict):
    """The verdict with the evidence and attribution fields of the /gate JSON (root_cause, explained_by,
    examples, trace_url): the planted cohorts as root causes, one more failure explained by intent=billing."""
    doc, bars = copy.deepcopy(verdict)
    doc["trace_url"] = TRACE_URL
    for r in doc["rules"]:
        r.update(root_cause=False, explained_by=None, examples=[])
        r.pop("examples_note", None)
        if r["state"] == "fail" and (r["rule"], r["cohort"]) not in PLANTED:
            r["state"] = "inconclusive"
        if (r["rule"], r["cohort"]) in PLANTED:
            r.update(state="fail", root_cause=True)
            r["examples"] = [{"request_id": f"req-{r['rule']}-{i}", "baseline_trace_id": f"{i:02d}" + "b" * 30,
                              "candidate_trace_id": f"{i:02d}" + "c" * 30, "baseline_value": 0.0123 + i / 1000,
                              "candidate_value": 0.031 + i / 1000, "unit": "usd"} for i in range(3)]
        if (r["rule"], r["cohort"]) == ("cost_per_trace", "language=ja"):
            r.update(state="fail", root_cause=False, explained_by="intent=billing")
    return doc, bars


@pytest.fixture(scope="module")
def page(verdict, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render(verdict[0], "html", verdict[1]))
    return path


# ------------------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("width", [900, 1400])
def test_no_horizontal_scrollbar_and_verdict_in_the_first_viewport(browser, page, verdict, width):
    _, inner_height = _open(browser, page, width)
    m = browser.execute_script("""
        // the innermost element that reads just the verdict, whatever the page calls it
        const v = [...document.body.querySelectorAll('*')].reverse()
            .find(e => e.textContent.trim().toLowerCase() === arguments[0]), r = v.getBoundingClientRect();
        return {scroll: document.documentElement.scrollWidth, inner: innerWidth,
                top: r.top, bottom: r.bottom, left: r.left, right: r.right, text: v.textContent,
                visible: getComputedStyle(v).visibility, widest: Math.max(...[...document.body.querySelectorAll('*')]
                    .map(e => e.getBoundingClientRect().right))};""", verdict[0]["verdict"])
    assert m["scroll"] <= m["inner"], f"horizontal scrollbar at {width} px: content is {m['scroll']} px wide"
    assert m["widest"] <= m["inner"], f"an element ends at {m['widest']:.0f} px, past the {width} px viewport"
    assert m["text"].strip().lower() == "block" and m["visible"] == "visible"
    assert 0 <= m["top"] and m["bottom"] <= inner_height and 0 <= m["left"] and m["right"] <= width


def test_reasons_read_as_lines_not_a_word_per_line(browser, page, verdict):
    """At 900 px every result's reason gets most of the page's width and at most a few lines."""
    _open(browser, page, 900)
    reasons = [r["reason"] for r in verdict[0]["rules"]]
    shapes = browser.execute_script("""
        // the last element whose text contains the reason (the per-result one, not the summary list);
        // its lines are the distinct tops of the text's client rects
        const all = [...document.body.querySelectorAll('*')].reverse();
        return arguments[0].map(reason => {
            const el = all.find(e => e.textContent.includes(reason));
            if (!el) return null;
            const range = document.createRange(); range.selectNodeContents(el);
            const rects = [...range.getClientRects()].filter(r => r.width > 0);
            return {width: el.getBoundingClientRect().width,
                    lines: new Set(rects.map(r => Math.round(r.top))).size};});""", reasons)
    for reason, shape in zip(reasons, shapes):
        assert shape is not None, f"reason not on the page: {reason}"
        assert shape["width"] >= 0.7 * 900, f"reason shown {shape['width']:.0f} px wide: {reason[:60]}"
        words = len(reason.split())
        assert shape["lines"] <= max(2, words // 6), f"{shape['lines']} lines for {words} words: {reason[:60]}"


def test_self_contained_no_fetch_no_script(browser, page):
    _open(browser, page, 900)
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched == []
    text = page.read_text()
    assert "<script" not in text and "<link" not in text and not re.search(r"""(src|href)=["']?(https?:)?//""", text)


# ------------------------------------------------------------------------------------------ charts

CHARTS_JS = """
const out = [];
for (const table of document.querySelectorAll('table.detail')) {
  const h2 = table.previousElementSibling.previousElementSibling;
  const axis = table.querySelector('svg.axis');
  const labels = [...axis.querySelectorAll('text.ticklabel')].map(t => {
      const r = t.getBoundingClientRect(); return {text: t.textContent, x: r.left + r.width / 2};});
  const rows = [...table.querySelectorAll('tr.res')].map(tr => {
      const svg = tr.querySelector('svg.chart'), x = e => e ? e.getBoundingClientRect().left : null;
      const c = svg.querySelector('circle.effect'), cr = c && c.getBoundingClientRect();
      const margin = svg.querySelector('line.margin'), none = svg.querySelector('line.nochange');
      return {id: tr.id, cohort: tr.querySelector('td.cohort').firstChild.textContent,
              effect_text: tr.querySelector('td.eff b') ? tr.querySelector('td.eff b').textContent : null,
              ticks: [...new Set([...svg.querySelectorAll('line.tick')].map(x))],
              effect_x: cr ? cr.left + cr.width / 2 : null, margin_x: x(margin), none_x: x(none),
              margin_w: margin ? parseFloat(getComputedStyle(margin).strokeWidth) : 0,
              none_w: none ? parseFloat(getComputedStyle(none).strokeWidth) : 0,
              chart_h: svg.getBoundingClientRect().height};});
  out.push({rule: h2.textContent, labels, rows});
}
return out;"""


def _tick_value(label: str) -> tuple[float, bool]:
    """'×1.2' -> (1.2, log scale); '−2 pt' -> (-0.02, linear); '0' -> (0, linear)."""
    text = label.replace("\u2212", "-").strip()
    if text.startswith("\u00d7"):
        return float(text[1:]), True
    if text.endswith("pt"):
        return float(text[:-2]) / 100, False
    return float(text.replace("$", "").split()[0]), False


def _expected_x(value: float, labels: list[dict]) -> float:
    """Where value sits on an axis given by its labelled ticks (least squares through them)."""
    pts = [(_tick_value(lab["text"]), lab["x"]) for lab in labels]
    log = pts[0][0][1]
    xs = np.array([math.log(v) if log else v for (v, _), _ in pts])
    ys = np.array([x for _, x in pts])
    slope, intercept = np.polyfit(xs, ys, 1)
    assert np.max(np.abs(slope * xs + intercept - ys)) < 1.0, f"tick labels are not evenly placed: {labels}"
    return slope * (math.log(value) if log else value) + intercept


@pytest.mark.parametrize("width", [900, 1400])
def test_every_chart_has_ticks_and_one_axis_per_rule(browser, page, verdict, width):
    _open(browser, page, width)
    tables = browser.execute_script(CHARTS_JS)
    doc = verdict[0]
    assert [t["rule"] for t in tables] == list(dict.fromkeys(r["rule"] for r in doc["rules"]))
    by = {(r["rule"], r["cohort"]): r for r in doc["rules"]}
    for t in tables:
        assert len(t["labels"]) >= 3, f"{t['rule']}: axis has {len(t['labels'])} tick labels"
        unit = "×" if by[(t["rule"], "all")]["kind"] == "ratio" else "pt"
        assert all(unit in lab["text"] or lab["text"] == "0" for lab in t["labels"]), t["labels"]
        first = t["rows"][0]["ticks"]
        for row in t["rows"]:
            r = by[(t["rule"], row["cohort"])]
            assert len(row["ticks"]) >= 3, f"{row['id']}: no ticks"
            assert row["ticks"] == first, f"{row['id']}: its ticks differ from the rule's first chart (not one axis)"
            # the margin and no-change lines are where the labelled axis puts them, and drawn boldly
            null = 1.0 if r["kind"] == "ratio" else 0.0
            assert row["margin_x"] == pytest.approx(_expected_x(r["margin"], t["labels"]), abs=1.5), row["id"]
            assert row["none_x"] == pytest.approx(_expected_x(null, t["labels"]), abs=1.5), row["id"]
            assert row["margin_w"] >= 2 and row["none_w"] >= 1.5 and row["chart_h"] >= 20
            if r["effect"] is not None:
                assert row["effect_x"] == pytest.approx(_expected_x(r["effect"], t["labels"]), abs=1.5), row["id"]


def test_effects_in_the_rules_unit_with_one_precision_per_rule(browser, page, verdict):
    _open(browser, page, 1400)
    tables = browser.execute_script(CHARTS_JS)
    by = {(r["rule"], r["cohort"]): r for r in verdict[0]["rules"]}
    assert sum(len(t["rows"]) for t in tables) == len(by)
    for t in tables:
        decimals = set()
        for row in t["rows"]:
            r = by[(t["rule"], row["cohort"])]
            if r["effect"] is None:
                continue
            text = row["effect_text"].replace("\u2212", "-")
            if r["kind"] == "ratio":
                m = re.fullmatch(r"×(\d+\.(\d+))", text)
                assert m, f"{row['id']}: ratio effect {text!r} is not written ×1.23"
                shown = float(m.group(1))
                expected = r["effect"]
            else:       # task completion: a difference of rates, in points (0.0027 -> +0.27 pt)
                m = re.fullmatch(r"([+-]\d+\.(\d+)) pt", text)
                assert m, f"{row['id']}: rate effect {text!r} is not written in points"
                shown = float(m.group(1))
                expected = r["effect"] * 100
            decimals.add(len(m.group(2)))
            assert abs(shown - expected) <= 0.5 * 10 ** -len(m.group(2)) + 1e-9, (row["id"], text, r["effect"])
            if r["state"] == "fail":       # a fail is visibly past its margin
                margin = r["margin"] if r["kind"] == "ratio" else r["margin"] * 100
                assert (shown > margin) if margin > (1 if r["kind"] == "ratio" else 0) else (shown < margin), text
        assert len(decimals) == 1 and decimals <= {2, 3, 4}, f"{t['rule']}: mixed precision {decimals}"


# ------------------------------------------------------------------------------------------ text

def test_header_is_plain_text(browser, page, verdict):
    _open(browser, page, 900)
    # what the page says before its first table: the verdict, the window, traces and pairs, the reasons
    text = browser.execute_script("return document.body.innerText")
    facts = text[:text.index(verdict[0]["reasons"][0])]
    doc = verdict[0]
    assert "{" not in facts and '"' not in facts, facts
    assert f"{doc['traces']['baseline']:,} baseline" in facts and f"{doc['traces']['candidate']:,} candidate" in facts
    assert f"{doc['pairs']['matched']:,} matched" in facts and "last 1 h" in facts
    reasons = browser.execute_script("return [...document.querySelectorAll('header .reasons li')].map(l => l.textContent)")
    assert reasons == doc["reasons"]


def test_grid_has_every_rule_and_cohort_with_its_state(browser, page, verdict):
    _open(browser, page, 900)
    grid = browser.execute_script("""
        const t = document.querySelector('table.grid');
        const rules = [...t.rows[0].cells].slice(1).map(c => c.textContent);
        return {rules, top: t.getBoundingClientRect().top, rows: [...t.rows].slice(1).map(tr => ({
            cohort: tr.cells[0].textContent, cells: [...tr.cells].slice(1).map(td => ({
                state: td.querySelector('.st').textContent, bg: getComputedStyle(td).backgroundColor,
                href: td.querySelector('a').getAttribute('href')}))}))};""")
    doc = verdict[0]
    rules = list(dict.fromkeys(r["rule"] for r in doc["rules"]))
    assert grid["rules"] == rules
    cohorts = [row["cohort"] for row in grid["rows"]]
    assert cohorts[0] == "all" and sorted(cohorts) == sorted({r["cohort"] for r in doc["rules"]})
    by = {(r["rule"], r["cohort"]): r for r in doc["rules"]}
    colours = {}
    for row in grid["rows"]:
        for rule, cell in zip(rules, row["cells"]):
            state = by[(rule, row["cohort"])]["state"]
            assert cell["state"] == state.replace("_", " ")
            colours.setdefault(state, set()).add(cell["bg"])
            target = cell["href"].lstrip("#")
            assert browser.execute_script("return !!document.getElementById(arguments[0])", target), target
    assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == len(colours)


def test_root_causes_explanations_and_example_links(browser, attributed, tmp_path):
    doc, bars = attributed
    path = tmp_path / "report.html"
    path.write_text(render(doc, "html", bars))
    _open(browser, path, 900)
    cells = browser.execute_script("""
        const t = document.querySelector('table.grid'), rules = [...t.rows[0].cells].slice(1).map(c => c.textContent);
        const out = {};
        for (const tr of [...t.rows].slice(1))
            [...tr.cells].slice(1).forEach((td, i) => out[rules[i] + ' ' + tr.cells[0].textContent] = td.innerText);
        return out;""")
    for rule, cohort in PLANTED:
        assert "root cause" in cells[f"{rule} {cohort}"]
    assert "explained by intent=billing" in cells["cost_per_trace language=ja"]
    assert sum("root cause" in c for c in cells.values()) == len(PLANTED)
    links = browser.execute_script("return [...document.querySelectorAll('table.examples a')].map(a => a.href)")
    expected = {TRACE_URL.replace("{trace_id}", r[f"{side}_trace_id"])
                for row in doc["rules"] for r in row.get("examples") or [] for side in ("baseline", "candidate")}
    assert set(links) == expected
    shown = browser.execute_script("return [...document.querySelectorAll('table.examples')].map(t => t.innerText)")
    assert len(shown) == len(PLANTED) and all("$0.0123" in s and "$0.031" in s for s in shown)
    m = browser.execute_script("return [document.documentElement.scrollWidth, innerWidth]")
    assert m[0] <= m[1]


def test_without_trace_url_ids_are_text(attributed):
    doc, bars = copy.deepcopy(attributed)
    del doc["trace_url"]
    text = render(doc, "html", bars)
    assert "tempo.example" not in text and "<a href='http" not in text and "bbbbbb" in text
