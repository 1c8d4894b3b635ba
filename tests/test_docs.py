"""The README documents every metric, config key and command the code declares."""
from __future__ import annotations

from pathlib import Path

from shadowlens.config import DEFAULTS, FREE_FORM
from shadowlens.exporters.catalog import ALL_METRICS, exposed_names

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
    from shadowlens.cli import main
    missing = [name for name in main.commands if f"shadowlens {name}" not in README]
    assert not missing, f"commands missing from README.md: {missing}"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_the_commands_table_is_one_table_with_every_command():
    from shadowlens.cli import main
    lines = _section("Commands").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break                   # a blank line ends a Markdown table: rows after it render as text
        table.append(line)
    missing = [name for name in main.commands if not any(row.startswith(f"| `shadowlens {name}") for row in table)]
    assert not missing, f"commands outside the Commands table: {missing}"


def test_the_readme_cites_no_document_its_reader_does_not_have():
    # the contract and the issues live outside this repository
    for phrase in ("CONTRACT §", "the issue's", "issue's suggestions"):
        assert phrase not in README, phrase


def _query_examples() -> list[str]:
    """Every `shadowlens query ...` the README shows: in code blocks and inline (inline ones may wrap)."""
    import re
    found = [" ".join(m.group(1).split()) for m in re.finditer(r"`((?:\.venv/bin/)?shadowlens query \S[^`]*)`", README)]
    found += [line.split("  #")[0].strip() for line in README.splitlines()
              if re.match(r"\s*(\.venv/bin/)?shadowlens query \S", line)]
    return [c for c in dict.fromkeys(found) if "SQL" not in c.split()]


def test_every_readme_query_example_returns_something_on_the_demos_data(serve_factory):
    """The demo's traffic (the generator's regression scenario) into a real serve, then each example as
    written, plus --data-dir: at least one row, and no column that is NULL in every row."""
    import json
    import shlex
    import subprocess

    from harness import REPO, SHADOWLENS, wait_for

    from shadowlens.generate import GenerateOptions, run_generate
    server = serve_factory(env={"SHADOWLENS_TRACES__IDLE_SECONDS": "1"})
    sent = run_generate(GenerateOptions(endpoint=server.grpc_endpoint, rate=200, requests=400, scenario="regression",
                                        seed=1, service_name="shadowlens-demo"), out=None)
    assert sent.failed_spans == 0
    examples = _query_examples()
    assert len(examples) >= 3, examples
    wait_for(lambda: server.query("select count(*) AS n from traces")[0]["n"] >= sent.traces, 30, 0.5,
             what="the demo's traces completing")          # after traces.idle_seconds
    empty = []
    for example in examples:
        args = shlex.split(example)[2:]              # after "shadowlens query"
        if "--format" not in args:
            args = ["--format", "json", *args]
        out = subprocess.run(SHADOWLENS + ["query", "--data-dir", str(server.data_dir), *args], env=server.env,
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{example}\n{out.stderr}"
        rows = json.loads(out.stdout)
        if "from quarantine" in example:             # the demo sends nothing bad: no quarantined payload to show
            continue
        if not rows or any(all(r[c] is None for r in rows) for c in rows[0]):
            empty.append((example, rows[:2]))
    assert not empty, f"README examples that return nothing on the demo's data: {empty}"


def test_the_agent_example_sends_an_eval_result_with_its_span(serve_factory):
    """The Python of "Point an agent at it", run as printed (endpoint aside): its eval arrives and the
    gate has input for task_completion."""
    import re
    import subprocess
    import sys

    from harness import wait_for
    block = re.search(r"```python\n(.*?)```", _section("Point an agent at it"), re.S).group(1)
    server = serve_factory(env={"SHADOWLENS_TRACES__IDLE_SECONDS": "1"})
    code = block.replace('"127.0.0.1:4317"', repr(server.grpc_endpoint))
    assert code != block, "the example's endpoint changed: update this test"
    # a fresh interpreter: the example sets the process-wide tracer provider, which can be set only once
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = wait_for(lambda: server.query("select e.name, e.passed, t.route from evals e join traces t using (trace_id)"),
                    30, 0.5, what="the example's eval stored")
    assert rows == [{"name": "task_completion", "passed": True, "route": "candidate"}]
