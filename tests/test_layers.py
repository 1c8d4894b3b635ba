"""Layers import one way: schema/errors -> decode -> store (receivers, ingest) -> analyzers -> exporters -> app.

`check_layers` reads every module of the four folders (imports inside functions included, relative imports
resolved against the installed names: folder ``collector/`` is ``shadowlens.collector``) and reports each
import that points up the stack, each import of a bare layer name, and each import cycle between modules,
with file:line. The two fake-tree tests show that it fails on an injected cycle and on an upward import.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder on disk -> installed package (setup.py package_dir)
FOLDERS = {"collector": "shadowlens.collector", "analyzers": "shadowlens.analyzers",
           "exporters": "shadowlens.exporters", "shadowlens": "shadowlens"}

# module prefix -> layer rank; the longest matching prefix decides, and a module may import only its own
# rank or lower. Within collector the order is schema/errors -> settings -> decode -> store, receivers, ingest.
RANKS = {
    "shadowlens.collector.schema": 0,
    "shadowlens.collector.errors": 0,
    "shadowlens.collector.settings": 1,     # the collector's settings dataclasses and their defaults
    "shadowlens.collector.security": 1,     # TLS files and tokens: settings the receivers and /metrics share
    "shadowlens.collector.counters": 1,
    "shadowlens.collector.decode": 2,
    "shadowlens.collector.store": 3,
    "shadowlens.collector.receivers": 3,
    "shadowlens.collector.ingest": 3,       # the supervisor and its children's entry points
    "shadowlens.analyzers": 4,
    "shadowlens.exporters": 5,
    "shadowlens": 6,                        # the application: cli, config, serve, demo, traffic, startup
}
# package __init__ modules ranked on their own (a prefix match would also place unlisted siblings)
EXACT = {"shadowlens.collector": 0}
NAMES = {0: "collector schema/errors", 1: "collector settings", 2: "collector.decode",
         3: "collector store/receivers/ingest", 4: "analyzers", 5: "exporters", 6: "the application"}
# importer prefix -> imported prefix that is out of bounds although the ranks allow it, and why
APART = {
    ("shadowlens.collector.receivers", "shadowlens.collector.store"):
        "receivers hand requests to ingest and never reach into the store",
}
BARE = ("collector", "analyzers", "exporters")


@dataclass(frozen=True)
class Import:
    source: str        # importing module
    target: str        # imported module (the longest known module the import names)
    where: str         # file:line


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the four folders under ``root``, by installed name."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(known: set[str], name: str) -> str:
    """The longest known module that ``name`` starts with (``a.b.func`` -> ``a.b``), else ``name``."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return name


def read_imports(root: Path) -> tuple[list[Import], list[str]]:
    """Every import between the modules under ``root`` (anywhere in the file), and imports of bare layer names."""
    files = module_files(root)
    known = set(files)
    imports, bare = [], []
    for name, path in files.items():
        rel = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package(name, path).split(".")
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in BARE:
                    bare.append(f"{rel}:{node.lineno} imports {target}: write shadowlens.{target} or a relative import")
                elif target.split(".")[0] == "shadowlens":
                    imports.append(Import(name, _resolve(known, target), f"{rel}:{node.lineno}"))
    return imports, bare


def rank(module: str) -> int | None:
    if module in EXACT:
        return EXACT[module]
    best = max((p for p in RANKS if _under(module, p)), key=len, default=None)
    layer = next((p for p in FOLDERS.values() if p != "shadowlens" and _under(module, p)), "shadowlens")
    return None if best is None or not _under(best, layer) else RANKS[best]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def upward(imports: list[Import]) -> list[str]:
    out = []
    for imp in imports:
        have, want = rank(imp.source), rank(imp.target)
        if have is not None and want is not None and want > have:
            out.append(f"{imp.where}: {imp.source} ({NAMES[have]}) imports {imp.target} ({NAMES[want]}), "
                       "a later layer: move the shared piece down, or pass it in from the caller")
        for (a, b), why in APART.items():
            if _under(imp.source, a) and _under(imp.target, b):
                out.append(f"{imp.where}: {imp.source} imports {imp.target}: {why}")
    return sorted(set(out))


def cycles(imports: list[Import]) -> list[str]:
    """One line per strongly connected group of modules, listing the imports that close it."""
    graph: dict[str, dict[str, str]] = {}
    for imp in imports:
        if imp.source != imp.target:
            graph.setdefault(imp.source, {}).setdefault(imp.target, imp.where)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:          # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        edges = [f"{graph[a][b]} imports {b}" for a in group for b in graph.get(a, {}) if b in group]
        out.append(f"import cycle between {', '.join(group)}: " + "; ".join(sorted(edges)))
    return out


def check_layers(root: Path) -> list[str]:
    """Every problem with the imports under ``root``: upward imports, bare layer names, cycles."""
    unplaced = [f"{path.relative_to(root)}: module {name} is in no layer (add it to RANKS in tests/test_layers.py)"
                for name, path in module_files(root).items() if rank(name) is None]
    imports, bare = read_imports(root)
    return unplaced + bare + upward(imports) + cycles(imports)


def test_imports_follow_the_layers_without_cycles():
    problems = check_layers(REPO)
    assert not problems, "\n".join(problems)


def test_check_layers_sees_every_module():
    files = module_files(REPO)
    seen = {p.relative_to(REPO).as_posix() for p in files.values()}
    on_disk = {p.relative_to(REPO).as_posix() for f in FOLDERS for p in (REPO / f).rglob("*.py")}
    assert seen == on_disk
    # spot checks: top-level collector modules, a nested package, the application
    assert {"shadowlens.collector.errors", "shadowlens.collector.decode.normalize", "shadowlens.config",
            "shadowlens.analyzers", "shadowlens.exporters.catalog"} <= set(files)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"collector/__init__.py": "", "collector/decode/__init__.py": "", "analyzers/__init__.py": "",
                      "exporters/__init__.py": "", "shadowlens/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


CLEAN = {
    "collector/errors.py": "class ConfigError(ValueError): ...\n",
    "collector/decode/normalize.py": "from ..errors import ConfigError\n",
    "analyzers/rules.py": "from shadowlens.collector.errors import ConfigError\n",
    "shadowlens/config.py": "from .analyzers import rules\nfrom .collector.decode import normalize\n",
}


def test_check_layers_passes_a_clean_fake_tree(tmp_path):
    assert check_layers(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("files, expected", [
    # an upward import hidden inside a function, written relative: `from .. import x` is the parent package + x
    ({"collector/decode/normalize.py": "def f():\n    from ... import config\n"},
     "collector/decode/normalize.py:2: shadowlens.collector.decode.normalize (collector.decode) imports "
     "shadowlens.config (the application)"),
    ({"collector/errors.py": "from .decode import normalize\n"},
     "collector/errors.py:1: shadowlens.collector.errors (collector schema/errors) imports "
     "shadowlens.collector.decode.normalize (collector.decode)"),
    ({"collector/receivers/http.py": "from ..store.writer import StoreWriter\n", "collector/store/writer.py": ""},
     "collector/receivers/http.py:1: shadowlens.collector.receivers.http imports shadowlens.collector.store.writer"),
    ({"analyzers/rules.py": "import collector.errors\n"}, "analyzers/rules.py:1 imports collector.errors"),
    ({"collector/newthing.py": ""}, "module shadowlens.collector.newthing is in no layer"),
], ids=["upward-relative-in-function", "leaf-imports-decode", "receivers-into-store", "bare-name", "unplaced"])
def test_check_layers_fails_on_an_upward_import(tmp_path, files, expected):
    problems = check_layers(_tree(tmp_path, {**CLEAN, **files}))
    assert any(expected in p for p in problems), problems


def test_check_layers_fails_on_an_injected_cycle(tmp_path):
    # same layer both ways, so only the cycle check can catch it; one side imports inside a function
    files = {**CLEAN, "analyzers/a.py": "from . import b\n", "analyzers/b.py": "def f():\n    from .a import X\n"}
    problems = check_layers(_tree(tmp_path, files))
    assert problems == ["import cycle between shadowlens.analyzers.a, shadowlens.analyzers.b: "
                        "analyzers/a.py:1 imports shadowlens.analyzers.b; "
                        "analyzers/b.py:2 imports shadowlens.analyzers.a"], problems
