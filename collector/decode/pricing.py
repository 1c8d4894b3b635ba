"""Price table and computed span cost (CONTRACT §4 "computed cost" and "Prices").

Pure: no DuckDB, no metrics. The ingest path calls :func:`price_columns` once per batch (a dict
lookup per LLM span once a model has been seen); ``shadowlens reprice`` calls it over stored rows.

Entries
    ``{match, input, output, cache_read?, cache_write?, since?, note?}``; prices in USD per 1M tokens.
    ``match`` is a regex matched against the *whole* model string (``re.fullmatch``, so it is
    anchored whether or not it has ``^``/``$``), case-insensitively: model ids are case-insensitive in
    practice (``meta-llama/Llama-3.3-70B-...`` vs. lower-cased ids in some SDKs) and an anchored
    pattern cannot leak into an unrelated name that merely differs in case. ``since`` (a UTC date)
    makes an entry apply to spans that started on or after that day, so a price change is a new entry
    with the *same* ``match`` and a later ``since``, and old spans keep their old price on ``reprice``.
    (Specificity outranks ``since``: a dated entry under a broader pattern cannot override an undated
    entry under a narrower one.)

Which entry prices a span — the first rule that decides, in order:
    1. only entries whose pattern matches the model and whose ``since`` is on or before the span's
       UTC start day (no ``since`` = always) are candidates;
    2. a user entry (config ``prices:``) beats every shipped entry (``prices.yaml``), whatever its
       specificity: the operator knows their negotiated price, and a broad user override such as
       ``gpt-4o.*`` deliberately covers ``gpt-4o-mini`` too;
    3. the most specific pattern wins. **Specificity = the number of literal characters every match
       of the pattern must contain**: a literal counts 1, a character class, ``.``, or anything inside
       an optional/zero-minimum repeat counts 0, ``x{n}`` counts n×, an alternation counts its weakest
       branch. So ``gpt-4o-mini(-\\d{4}-\\d{2}-\\d{2})?`` (11) beats ``gpt-4o.*`` (6), the exact
       snapshot ``gpt-4o-2024-05-13`` (17) beats the family ``gpt-4o(-\\d{4}-\\d{2}-\\d{2})?`` (6), and
       an optional provider prefix ``(?:openai/)?`` neither helps nor hurts. Unlike "longest literal
       prefix" this is not defeated by a leading optional group, and unlike "fewest metacharacters"
       it does not reward writing less;
    4. the latest ``since`` (for the same pattern: the price in force on that day);
    5. the earlier entry in its list (user list, then shipped file).

A model no entry matches is *unpriced*: its cost stays NULL and the span is counted (by the caller)
in ``shadowlens_unpriced_spans_total{model}`` — never priced at zero.

Cost (non-overlapping buckets; input is inclusive of cache reads and writes, output inclusive of
reasoning): ``uncached = max(input - cache_read - cache_write, 0)``;
``cost = (uncached·input + cache_read·cache_read_price + cache_write·cache_write_price + output·output) / 1e6``,
where a missing cache price falls back to the input price. Reasoning tokens are never added: they are
already inside output, and are billed at the output price. So no token is priced twice.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

try:  # the stdlib regex parser; named sre_parse before 3.11
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as _sre  # type: ignore[no-redef]

SHIPPED_PATH = Path(__file__).with_name("prices.yaml")
NS_PER_DAY = 86_400 * 1_000_000_000
UNKNOWN_MODEL = "unknown"  # the `model` label of unpriced spans that carry no model name at all
_KEYS = frozenset({"match", "input", "output", "cache_read", "cache_write", "since", "note"})
_PRICE_KEYS = ("input", "output", "cache_read", "cache_write")
_EPOCH = _dt.date(1970, 1, 1)
_NO_SINCE = -(10**9)        # sorts before every real day
_CACHE_MAX_MODELS = 8192    # model strings are client-controlled: bound the memo, don't grow forever
_UNSEEN = object()


@dataclass(frozen=True)
class PriceEntry:
    """One price row; prices are USD per 1M tokens, ``None`` cache prices mean "as input"."""

    match: str
    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    since: _dt.date | None = None
    note: str = ""
    source: str = "shipped"    # "user" or "shipped"
    index: int = 0             # position in its list (last tie-break, and for error messages)
    specificity: int = field(default=0, compare=False)
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @property
    def since_day(self) -> int:
        """``since`` as days since the epoch (UTC); entries without ``since`` always apply."""
        return _NO_SINCE if self.since is None else (self.since - _EPOCH).days


_REPEATS = tuple(getattr(_sre, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre, n))


def specificity(pattern: str) -> int:
    """Number of literal characters every match of ``pattern`` must contain (see module doc)."""
    return _min_literals(_sre.parse(pattern))


def _min_literals(items: Any) -> int:
    n = 0
    for op, av in items:
        if op == _sre.LITERAL:
            n += 1
        elif op == _sre.SUBPATTERN:
            n += _min_literals(av[-1])
        elif op == _sre.BRANCH:
            n += min(_min_literals(alt) for alt in av[1])
        elif op in _REPEATS:
            lo, _hi, sub = av
            n += lo * _min_literals(sub)
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            n += _min_literals(av)
        # IN, ANY, NOT_LITERAL, CATEGORY, AT, ASSERT*, GROUPREF*: no guaranteed literal
    return n


def _price(raw: Mapping[str, Any], key: str, where: str, required: bool) -> float | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}: missing '{key}' (USD per 1M tokens)")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: '{key}' must be a non-negative number (USD per 1M tokens), got {value!r}")
    return float(value)


def _since(value: Any, where: str) -> _dt.date | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):  # YAML turns an unquoted timestamp into datetime
        return value.date()
    if isinstance(value, _dt.date):      # ... and an unquoted date into date
        return value
    try:
        return _dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{where}: 'since' must be a date YYYY-MM-DD, got {value!r}") from None


def parse_entry(raw: Any, source: str, index: int, label: str) -> PriceEntry:
    """Validate one raw entry; ``label`` (e.g. ``prices[2]``) is how error messages name it."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: must be a mapping {{match, input, output, ...}}, got {raw!r}")
    match = raw.get("match")
    where = f"{label} (match {match!r})" if isinstance(match, str) else label
    unknown = sorted(str(k) for k in raw if k not in _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_KEYS))})")
    if not isinstance(match, str) or not match:
        raise ConfigError(f"{where}: 'match' must be a non-empty regex string, got {match!r}")
    try:
        pattern = re.compile(match, re.IGNORECASE)
        spec = specificity(match)
    except (re.error, RecursionError) as exc:
        raise ConfigError(f"{where}: 'match' is not a valid regex ({exc})") from None
    note = raw.get("note") or ""
    return PriceEntry(
        match=match,
        input=_price(raw, "input", where, True),  # type: ignore[arg-type]
        output=_price(raw, "output", where, True),  # type: ignore[arg-type]
        cache_read=_price(raw, "cache_read", where, False),
        cache_write=_price(raw, "cache_write", where, False),
        since=_since(raw.get("since"), where),
        note=str(note),
        source=source,
        index=index,
        specificity=spec,
        pattern=pattern,
    )


def _rank(e: PriceEntry) -> tuple[int, int, int, int]:
    """Sort key, best first (rules 2–5 of the module doc; rule 1 is applied at lookup)."""
    return (0 if e.source == "user" else 1, -e.specificity, -e.since_day, e.index)


class PriceTable:
    """Shipped + user price entries with a per-model memo of the candidate entries."""

    def __init__(self, entries: Sequence[PriceEntry]):
        self.entries: tuple[PriceEntry, ...] = tuple(entries)
        # model -> ((since_day, entry), ...) best first; the first with since_day <= day is the price.
        self._candidates: dict[str, tuple[tuple[int, PriceEntry], ...]] = {}

    @classmethod
    def load(cls, user_entries: Sequence[Mapping[str, Any]] = (), shipped: Path | str | None = SHIPPED_PATH) -> PriceTable:
        """Shipped table (``shipped=None`` skips it) plus the config's ``prices:`` list.

        Raises :class:`ConfigError` naming the entry (``prices[i]``) and key for any bad entry.
        """
        entries: list[PriceEntry] = []
        if shipped is not None:
            path = Path(shipped)
            try:
                raw = yaml.safe_load(path.read_text(encoding="utf-8")) or []
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"price table {str(path)!r} cannot be read: {str(exc).splitlines()[0]}") from None
            if not isinstance(raw, list):
                raise ConfigError(f"price table {str(path)!r} must be a list of entries")
            entries += [parse_entry(r, "shipped", i, f"{path.name}[{i}]") for i, r in enumerate(raw)]
        if user_entries is None:
            user_entries = ()
        if isinstance(user_entries, (str, bytes, Mapping)) or not isinstance(user_entries, Sequence):
            raise ConfigError("prices must be a list of {match, input, output, ...} entries")
        entries += [parse_entry(r, "user", i, f"prices[{i}]") for i, r in enumerate(user_entries)]
        return cls(entries)

    def _candidates_for(self, model: str) -> tuple[tuple[int, PriceEntry], ...]:
        cands = self._candidates.get(model)
        if cands is None:
            hits = sorted((e for e in self.entries if e.pattern is not None and e.pattern.fullmatch(model)), key=_rank)
            cands = tuple((e.since_day, e) for e in hits)
            if len(self._candidates) >= _CACHE_MAX_MODELS:
                self._candidates.clear()
            self._candidates[model] = cands
        return cands

    def lookup(self, model: str | None, at_ns: int | None = None) -> PriceEntry | None:
        """The entry pricing ``model`` for a span starting at ``at_ns`` (Unix ns; None = now)."""
        if not model:
            return None
        day = (time.time_ns() if at_ns is None else at_ns) // NS_PER_DAY
        for since_day, entry in self._candidates_for(model):
            if since_day <= day:
                return entry
        return None

    def price_columns(self, models: Sequence[str | None], starts_ns: Sequence[int | None],
                      input_tokens: Sequence[int | None], output_tokens: Sequence[int | None],
                      cache_read: Sequence[int | None], cache_write: Sequence[int | None],
                      reported: Sequence[float | None], rows: Sequence[int] | None = None
                      ) -> tuple[list[float | None], Counter[str]]:
        """See :func:`price_columns`."""
        return price_columns(self, models, starts_ns, input_tokens, output_tokens, cache_read, cache_write, reported,
                             rows)


def cost_usd(entry: PriceEntry, input_tokens: int | None, output_tokens: int | None,
             cache_read_tokens: int | None = None, cache_write_tokens: int | None = None) -> float | None:
    """USD cost of one span in non-overlapping buckets; None when neither input nor output is known."""
    if input_tokens is None and output_tokens is None:
        return None
    cr = cache_read_tokens or 0
    cw = cache_write_tokens or 0
    uncached = max((input_tokens or 0) - cr - cw, 0)
    cr_price = entry.input if entry.cache_read is None else entry.cache_read
    cw_price = entry.input if entry.cache_write is None else entry.cache_write
    return (uncached * entry.input + cr * cr_price + cw * cw_price + (output_tokens or 0) * entry.output) / 1e6


def price_columns(table: PriceTable, models: Sequence[str | None] | None, starts_ns: Sequence[int | None],
                  input_tokens: Sequence[int | None] | None, output_tokens: Sequence[int | None] | None,
                  cache_read: Sequence[int | None] | None, cache_write: Sequence[int | None] | None,
                  reported: Sequence[float | None] | None,
                  rows: Sequence[int] | None = None) -> tuple[list[float | None], Counter[str]]:
    """Per-span cost for a batch, and the unpriced spans per model (for ``shadowlens_unpriced_spans_total``).

    A reported cost (``llm.cost.total``) is used as is. Otherwise a span with neither input nor output
    tokens has unknown cost (None, not counted: there is nothing to price); a span with tokens but no
    matching price is None and counted under its model (``unknown`` when it names none).
    ``rows``: the spans to price (default: all); the others keep only their reported cost. A column
    may be None (no span has it).
    """
    n = len(starts_ns)
    none = [None] * n
    models, input_tokens, output_tokens, cache_read, cache_write = (c if c is not None else none for c in (
        models, input_tokens, output_tokens, cache_read, cache_write))
    costs: list[float | None] = list(reported if reported is not None else none)
    unpriced: Counter[str] = Counter()
    entries: dict = {}        # (model, day) -> entry: a batch has few models and days
    for i in (range(n) if rows is None else rows):
        if costs[i] is not None:
            continue
        inp, out = input_tokens[i], output_tokens[i]
        if inp is None and out is None:
            continue
        model, at = models[i], starts_ns[i]
        key = (model, None if at is None else at // NS_PER_DAY)
        entry = entries.get(key, _UNSEEN)
        if entry is _UNSEEN:
            entry = entries[key] = table.lookup(model, at) if model else None
        if entry is None:
            unpriced[model or UNKNOWN_MODEL] += 1
            continue
        costs[i] = cost_usd(entry, inp, out, cache_read[i], cache_write[i])
    return costs, unpriced
