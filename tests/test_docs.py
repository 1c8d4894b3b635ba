"""The README documents every metric, config key and command the code declares."""
from __future__ import annotations

from pathlib import Path

from collector.config import DEFAULTS, FREE_FORM
from exporters.catalog import ALL_METRICS, exposed_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _keys(tree: dict, path=()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        here = path + (k,)
        if isinstance(v, dict) and here not in FREE_FORM:
            out += _keys(v, here)
        else:
            out.append(here)
    return out


def test_every_metric_is_in_the_readme():
    documented = [exposed_names(s)[0] if s.type == "counter" else s.name for s in ALL_METRICS]
    missing = [n for n in documented if f"`{n}" not in README]
    assert not missing, f"metrics missing from README.md: {missing}"


def test_every_config_key_is_in_the_readme():
    missing = [".".join(k) for k in _keys(DEFAULTS) if f"{k[-1]}:" not in README and f"{k[-1]}: " not in README]
    assert not missing, f"config keys missing from README.md: {missing}"


def test_every_command_is_in_the_readme():
    from collector.cli import main
    missing = [name for name in main.commands if f"shadowlens {name}" not in README]
    assert not missing, f"commands missing from README.md: {missing}"
