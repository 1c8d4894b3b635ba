"""The `>>>` examples in the product modules run here, so a docstring that stops telling the truth fails `make test`.

Every module under the installed ``shadowlens`` package (the application and the three layers, imported by their
installed names) is searched; a module without examples is skipped. pytest's ``--doctest-modules`` would import the
layer folders by their on-disk names (``collector.x``), which is exactly what the layer test forbids.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import shadowlens

# The modules whose examples the docs point readers at: if the search stops finding them, this test says so.
EXPECTED = {"shadowlens.config", "shadowlens.analyzers.rules", "shadowlens.analyzers.sequential"}


LAYERS = ("collector", "analyzers", "exporters")


def product_modules() -> list[str]:
    """The application's modules, then each layer's: the editable install maps the layers in by name, outside
    ``shadowlens.__path__``, so they are walked one by one."""
    names = {"shadowlens"}
    for package in [shadowlens] + [importlib.import_module(f"shadowlens.{layer}") for layer in LAYERS]:
        names.add(package.__name__)
        names.update(info.name for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."))
    return sorted(names)


def examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    return [t for t in tests if t.examples]


MODULES_WITH_EXAMPLES = [name for name in product_modules() if examples(name)]


def test_doctests_found_in_the_documented_modules() -> None:
    missing = EXPECTED - set(MODULES_WITH_EXAMPLES)
    assert not missing, f"no >>> examples found in {sorted(missing)}: the doctest search missed them"


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_doctests_pass(name: str) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name} (output above)"
