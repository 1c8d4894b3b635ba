"""Data flows one way: receivers -> decode -> store -> analyzers -> exporters (imports follow it).

Only the composition roots (shadowlens/serve.py, collector/frontend.py, shadowlens/cli.py) wire stages
together; everything else imports only from earlier layers.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"shadowlens/serve.py", "collector/frontend.py", "shadowlens/cli.py"}
# layer -> module prefixes it must not import
FORBIDDEN = {
    "collector/decode": ("collector.store", "collector.receivers", "analyzers", "exporters"),
    "collector/store": ("collector.receivers", "analyzers", "exporters"),
    "collector/receivers": ("collector.store", "analyzers", "exporters"),
    "analyzers": ("collector.receivers", "exporters"),
    "exporters": ("collector.receivers",),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module or "")
    return out


def test_imports_follow_the_data_flow():
    problems = []
    for layer, banned in FORBIDDEN.items():
        for path in sorted((REPO / layer).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            if rel in ROOTS:
                continue
            for mod in _imports(path):
                if any(mod == b or mod.startswith(b + ".") for b in banned):
                    problems.append(f"{rel} imports {mod}")
    assert not problems, "\n".join(problems)
