"""Price table and computed cost (CONTRACT §4). Every expected number is worked out by hand here."""
from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from shadowlens.collector.decode.pricing import SHIPPED_PATH, PriceEntry, PriceTable, cost_usd, price_columns, specificity
from shadowlens.collector.errors import ConfigError


def ns(y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0) -> int:
    """Unix nanoseconds of a UTC wall-clock time."""
    return int(dt.datetime(y, m, d, hh, mm, ss, tzinfo=dt.timezone.utc).timestamp()) * 1_000_000_000


def table_from(tmp_path: Path, shipped: list[dict], user: list[dict] = ()) -> PriceTable:
    """A table whose 'shipped' file is ``shipped`` (so tests don't depend on real list prices)."""
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(shipped))
    return PriceTable.load(list(user), shipped=path)


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return PriceTable.load([])


# ------------------------------------------------------------------ specificity


def test_specificity_counts_literals_every_match_must_contain():
    assert specificity("gpt-4o") == 6
    assert specificity("gpt-4o.*") == 6                                  # wildcard adds nothing
    assert specificity(r"gpt-4o-mini(-\d{4}-\d{2}-\d{2})?") == 11        # optional group adds nothing
    assert specificity(r"(?:openai/)?gpt-4o") == 6                       # optional prefix adds nothing
    assert specificity(r"gpt-4o-2024-05-13") == 17
    assert specificity(r"claude-3[-.]5-sonnet") == 16                    # a class is not a literal
    assert specificity(r"gpt-4o|gpt-4o-mini") == 6                       # weakest branch
    assert specificity(r"gpt-4\.1") == 7                                 # an escaped dot is a literal
    assert specificity(r"x{3}y+") == 4                                   # x three times, y at least once


def test_gpt_4o_mini_is_not_priced_as_gpt_4o(shipped):
    mini = shipped.lookup("gpt-4o-mini-2024-07-18", ns(2025, 3, 1))
    assert (mini.input, mini.cache_read, mini.output) == (0.15, 0.075, 0.60)
    assert shipped.lookup("gpt-4o-mini", ns(2025, 3, 1)).input == 0.15
    assert shipped.lookup("openai/gpt-4o-mini", ns(2025, 3, 1)).input == 0.15
    big = shipped.lookup("gpt-4o-2024-08-06", ns(2025, 3, 1))
    assert (big.input, big.cache_read, big.output) == (2.50, 1.25, 10.00)
    # the first snapshot has its own, exact entry, which outranks the family pattern
    first = shipped.lookup("gpt-4o-2024-05-13", ns(2025, 3, 1))
    assert (first.input, first.output) == (5.00, 15.00)


def test_shipped_patterns_cover_snapshots_and_provider_ids(shipped):
    when = ns(2025, 11, 1)
    expect = {  # model id as seen in spans -> (input, output) list price
        "gpt-4.1-mini-2025-04-14": (0.40, 1.60),
        "gpt-4.1-2025-04-14": (2.00, 8.00),
        "o4-mini-2025-04-16": (1.10, 4.40),
        "claude-3-5-sonnet-20241022": (3.00, 15.00),
        "anthropic.claude-3-5-sonnet-20241022-v2:0": (3.00, 15.00),        # Bedrock
        "us.anthropic.claude-3-7-sonnet-20250219-v1:0": (3.00, 15.00),     # Bedrock cross-region
        "claude-sonnet-4@20250514": (3.00, 15.00),                         # Vertex
        "anthropic/claude-3.5-sonnet": (3.00, 15.00),                      # OpenRouter
        "claude-opus-4-1-20250805": (15.00, 75.00),
        "claude-3-5-haiku-20241022": (0.80, 4.00),
        "models/gemini-1.5-pro-002": (1.25, 5.00),
        "gemini-2.0-flash-001": (0.10, 0.40),
        "gemini-2.0-flash-lite": (0.075, 0.30),
        "GPT-4o-Mini": (0.15, 0.60),                                       # case-insensitive
    }
    got = {m: (e.input, e.output) if (e := shipped.lookup(m, when)) else None for m in expect}
    assert got == expect


def test_patterns_are_anchored_at_both_ends(shipped):
    assert shipped.lookup("my-gpt-4o", ns(2025, 3, 1)) is None
    assert shipped.lookup("gpt-4o-audio-preview", ns(2025, 3, 1)) is None  # different price, not guessed
    assert shipped.lookup("llama-3.3-70b", ns(2025, 3, 1)) is None         # host unknown: not guessed


def test_most_specific_wins_whatever_the_file_order(tmp_path):
    broad = {"match": "gpt-4o.*", "input": 2.5, "output": 10}
    narrow = {"match": "gpt-4o-mini.*", "input": 0.15, "output": 0.6}
    for order in ([broad, narrow], [narrow, broad]):
        t = table_from(tmp_path, order)
        assert t.lookup("gpt-4o-mini-2024-07-18", ns(2025, 1, 1)).input == 0.15
        assert t.lookup("gpt-4o-2024-08-06", ns(2025, 1, 1)).input == 2.5


def test_equal_specificity_first_listed_wins(tmp_path):
    t = table_from(tmp_path, [{"match": "m-[ab]", "input": 1, "output": 1},
                              {"match": "m-[a-z]", "input": 2, "output": 2}])
    assert t.lookup("m-a", None).input == 1


# ------------------------------------------------------------------ since


def test_since_selects_the_price_in_force_on_the_span_day(shipped):
    # o3 list price: 10/40 at launch, 2/8 from 2025-06-10 (UTC day, inclusive)
    assert shipped.lookup("o3-2025-04-16", ns(2025, 5, 1)).input == 10.00
    assert shipped.lookup("o3", ns(2025, 6, 9, 23, 59, 59)).input == 10.00
    assert shipped.lookup("o3", ns(2025, 6, 10, 0, 0, 0)).input == 2.00
    assert shipped.lookup("o3", ns(2025, 8, 1)).output == 8.00
    # the memo is per model, not per day: asking an earlier day again still gets the old price
    assert shipped.lookup("o3", ns(2025, 5, 1)).output == 40.00


def test_latest_applicable_since_among_the_same_pattern(tmp_path):
    pat = "m1"
    t = table_from(tmp_path, [
        {"match": pat, "input": 3, "output": 3, "since": "2025-01-01"},
        {"match": pat, "input": 1, "output": 1},
        {"match": pat, "input": 2, "output": 2, "since": "2024-06-01"},
    ])
    assert t.lookup("m1", ns(2024, 1, 1)).input == 1
    assert t.lookup("m1", ns(2024, 6, 1)).input == 2
    assert t.lookup("m1", ns(2024, 12, 31, 23)).input == 2
    assert t.lookup("m1", ns(2025, 1, 1)).input == 3


def test_entry_not_yet_in_force_falls_back_or_is_unpriced(tmp_path):
    t = table_from(tmp_path, [
        {"match": "fam-.*", "input": 1, "output": 1},
        {"match": "fam-x", "input": 9, "output": 9, "since": "2025-01-01"},
        {"match": "new-model", "input": 5, "output": 5, "since": "2025-01-01"},
    ])
    assert t.lookup("fam-x", ns(2024, 12, 31)).input == 1     # narrow entry not in force yet
    assert t.lookup("fam-x", ns(2025, 1, 2)).input == 9
    assert t.lookup("new-model", ns(2024, 12, 31)) is None    # nothing in force: unpriced, not 0


def test_unquoted_yaml_date_is_accepted():
    (entry,) = yaml.safe_load("- {match: m, input: 1, output: 2, since: 2025-02-03}")
    assert isinstance(entry["since"], dt.date)
    t = PriceTable.load([entry], shipped=None)
    assert t.lookup("m", ns(2025, 2, 2)) is None
    assert t.lookup("m", ns(2025, 2, 3)).output == 2


# ------------------------------------------------------------------ user entries


def test_user_entry_beats_shipped_even_when_less_specific():
    t = PriceTable.load([{"match": "gpt-4o.*", "input": 1.0, "output": 2.0, "note": "negotiated"}])
    for model in ("gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4o-2024-05-13"):
        e = t.lookup(model, ns(2025, 3, 1))
        assert (e.input, e.output, e.source) == (1.0, 2.0, "user"), model
    assert t.lookup("gpt-4.1", ns(2025, 3, 1)).input == 2.00  # untouched models keep the shipped price


def test_user_entries_rank_by_specificity_among_themselves():
    t = PriceTable.load([{"match": "acme-.*", "input": 1, "output": 1},
                         {"match": "acme-large-v2", "input": 4, "output": 4}], shipped=None)
    assert t.lookup("acme-large-v2", None).input == 4
    assert t.lookup("acme-small", None).input == 1


def test_user_entry_not_yet_in_force_leaves_the_shipped_price():
    t = PriceTable.load([{"match": "gpt-4o-mini", "input": 0.10, "output": 0.40, "since": "2030-01-01"}])
    assert t.lookup("gpt-4o-mini", ns(2025, 3, 1)).input == 0.15
    assert t.lookup("gpt-4o-mini", ns(2030, 1, 1)).input == 0.10


# ------------------------------------------------------------------ cost buckets

SONNET = PriceEntry(match="s", input=3.00, output=15.00, cache_read=0.30, cache_write=3.75)


def test_cached_and_reasoning_tokens_are_priced_once():
    # 10,000 input tokens of which 6,000 were read from cache and 2,000 written to it;
    # 1,000 output tokens of which 400 were reasoning (reasoning is not an argument: it is inside output).
    #   uncached input   10,000 - 6,000 - 2,000 = 2,000 × $3.00  = $6,000 / 1M
    #   cache read                          6,000 × $0.30  = $1,800 / 1M
    #   cache write                         2,000 × $3.75  = $7,500 / 1M
    #   output (incl. reasoning)            1,000 × $15.00 = $15,000 / 1M
    #   total                                               = $30,300 / 1M = $0.0303
    assert cost_usd(SONNET, 10_000, 1_000, 6_000, 2_000) == pytest.approx(0.0303)
    # pricing cached tokens twice would give (10,000×3 + 6,000×0.3 + 2,000×3.75 + 1,000×15)/1M = 0.0543
    assert cost_usd(SONNET, 10_000, 1_000, 6_000, 2_000) != pytest.approx(0.0543)


def test_missing_cache_prices_fall_back_to_input_price():
    e = PriceEntry(match="m", input=2.00, output=8.00)
    # 1,000 input (400 cache read, 100 cache write) all at $2 = $2,000/1M; 500 output × $8 = $4,000/1M
    assert cost_usd(e, 1_000, 500, 400, 100) == pytest.approx(0.006)
    half = PriceEntry(match="m", input=2.00, output=8.00, cache_read=0.50)
    # uncached 500 × 2 = 1,000; read 400 × 0.5 = 200; write 100 × 2 = 200; out 500 × 8 = 4,000 → $5,400/1M
    assert cost_usd(half, 1_000, 500, 400, 100) == pytest.approx(0.0054)


def test_unknown_token_counts():
    assert cost_usd(SONNET, None, None, 5, 5) is None                     # nothing to price
    assert cost_usd(SONNET, None, 1_000) == pytest.approx(0.015)          # 1,000 × 15 / 1M
    assert cost_usd(SONNET, 1_000, None) == pytest.approx(0.003)          # 1,000 × 3 / 1M
    assert cost_usd(SONNET, 1_000, 0, None, None) == pytest.approx(0.003)


def test_inconsistent_cache_counts_clamp_uncached_input_at_zero():
    # 100 input but 150 reported as cache reads: uncached is 0, not -50; the 150 cache reads are priced
    assert cost_usd(SONNET, 100, 0, 150, 0) == pytest.approx(150 * 0.30 / 1e6)


# ------------------------------------------------------------------ columnar helper


def test_price_columns_reported_priced_unpriced_and_unknown(tmp_path):
    t = table_from(tmp_path, [{"match": "cheap", "input": 1.0, "output": 2.0}])
    day = ns(2025, 3, 1)
    costs, unpriced = price_columns(
        t,
        models=["cheap", "cheap", "mystery", "mystery", None, "cheap", "mystery"],
        starts_ns=[day] * 7,
        input_tokens=[1_000, None, 10, None, 7, 1_000, 5],
        output_tokens=[500, None, 10, None, 1, 0, 5],
        cache_read=[None] * 7,
        cache_write=[None] * 7,
        reported=[None, None, None, None, None, 0.5, 0.25],
    )
    assert costs == [
        pytest.approx((1_000 * 1.0 + 500 * 2.0) / 1e6),  # priced: $0.002
        None,                                             # no tokens: unknown, not counted
        None,                                             # tokens, no price: counted
        None,                                             # no tokens: not counted
        None,                                             # tokens, no model at all: counted as unknown
        0.5,                                              # reported cost wins over the table
        0.25,                                             # reported cost: priced, so not counted
    ]
    assert unpriced == Counter({"mystery": 1, "unknown": 1})
    # the method form is the same computation
    assert t.price_columns(["cheap"], [day], [1_000], [500], [None], [None], [None])[0] == [pytest.approx(0.002)]
    # only `rows` are priced (the ingest path passes its LLM spans); every span keeps a reported cost;
    # a column no span has may be None
    costs, unpriced = t.price_columns(["cheap", "cheap", "mystery", None], [day] * 4, [1_000, 1_000, 10, 5], None,
                                      None, None, [None, None, None, 0.75], rows=[1, 2])
    assert costs == [None, pytest.approx(1_000 * 1.0 / 1e6), None, 0.75]
    assert unpriced == Counter({"mystery": 1})


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("entry, words", [
    ({"match": "m", "input": 1}, ["prices[1]", "'m'", "output"]),
    ({"input": 1, "output": 1}, ["prices[1]", "match"]),
    ({"match": "gpt-(4o", "input": 1, "output": 1}, ["prices[1]", "gpt-(4o", "regex"]),
    ({"match": "m", "input": -1, "output": 1}, ["prices[1]", "input", "-1"]),
    ({"match": "m", "input": "cheap", "output": 1}, ["prices[1]", "input", "cheap"]),
    ({"match": "m", "input": True, "output": 1}, ["prices[1]", "input"]),
    ({"match": "m", "input": 1, "output": 1, "cache_read": float("nan")}, ["prices[1]", "cache_read"]),
    ({"match": "m", "input": 1, "output": 1, "cached": 0.5}, ["prices[1]", "unknown key 'cached'"]),
    ({"match": "m", "input": 1, "output": 1, "since": "last tuesday"}, ["prices[1]", "since", "last tuesday"]),
    ("gpt-4o: 2.5", ["prices[1]", "mapping"]),
])
def test_invalid_user_entry_names_entry_and_key(entry, words):
    ok = {"match": "fine", "input": 1, "output": 1}
    with pytest.raises(ConfigError) as err:
        PriceTable.load([ok, entry])
    for w in words:
        assert w in str(err.value)


def test_prices_must_be_a_list():
    with pytest.raises(ConfigError, match="prices must be a list"):
        PriceTable.load({"match": "m", "input": 1, "output": 1})  # type: ignore[arg-type]
    assert PriceTable.load(None).lookup("gpt-4o", None) is not None  # `prices:` left empty in YAML


def test_broken_shipped_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"prices\.yaml\[0\].*output"):
        table_from(tmp_path, [{"match": "m", "input": 1}])


# ------------------------------------------------------------------ the shipped file itself


def test_every_shipped_entry_is_valid():
    raw = yaml.safe_load(SHIPPED_PATH.read_text())
    assert isinstance(raw, list) and len(raw) >= 30
    seen = set()
    for i, e in enumerate(raw):
        where = f"prices.yaml[{i}] {e.get('match')!r}"
        re.compile(e["match"])
        assert isinstance(e.get("input"), (int, float)) and e["input"] >= 0, where
        assert isinstance(e.get("output"), (int, float)) and e["output"] >= 0, where
        for k in ("cache_read", "cache_write"):
            if k in e:
                assert 0 <= e[k] <= e["input"] * 1.25, where  # a cache price above a 5-min write is a typo
        assert specificity(e["match"]) > 0, where                # no catch-all in the shipped table
        key = (e["match"], str(e.get("since")))
        assert key not in seen, f"duplicate {where}"
        seen.add(key)
    assert len(PriceTable.load([]).entries) == len(raw)


def test_shipped_families_do_not_overlap_by_accident():
    """Where two shipped patterns match one model, their specificity must differ (rule 3 decides)."""
    t = PriceTable.load([])
    probes = ["gpt-4o", "gpt-4o-mini", "gpt-4o-2024-05-13", "gpt-4.1", "gpt-4.1-mini", "gpt-4", "gpt-4-turbo",
              "o1", "o1-mini", "o1-pro", "o3", "o3-mini", "o3-pro", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-pro",
              "claude-opus-4-5", "claude-opus-4-1", "claude-sonnet-4-5", "gemini-2.0-flash-lite",
              "gemini-2.5-flash-lite", "gemini-1.5-flash-8b", "grok-3-mini", "deepseek-reasoner"]
    for model in probes:
        hits = [e for e in t.entries if e.pattern.fullmatch(model)]
        assert hits, model
        top = max(e.specificity for e in hits)
        assert len({e.match for e in hits if e.specificity == top}) == 1, (model, [e.match for e in hits])
