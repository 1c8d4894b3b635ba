# Two entry points that work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ./data

.PHONY: run test lint bench footprint clean prometheus chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The project and its test extras; re-run when the dependency lists change.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(wildcard tests/requirements-*.txt)
	$(BIN)/pip install -q -e '.[test]'
	@for f in $(wildcard tests/requirements-*.txt); do echo "pip install -r $$f"; $(BIN)/pip install -q -r $$f || exit 1; done
	touch $@

run: $(VENV)/.installed
	$(BIN)/shadowlens serve --data-dir $(DATA)

# The suite includes tests/test_doctests.py, which runs every `>>>` example in the product modules.
test: lint prometheus chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

lint: $(VENV)/.installed
	$(BIN)/ruff check collector analyzers exporters shadowlens tests bench

# A real Prometheus server for tests/test_prometheus_e2e.py (Debian's package; a no-op when installed).
prometheus:
	@sh scripts/install-prometheus.sh

# A real headless browser for tests/test_report_html.py (Debian's chromium + chromium-driver; a no-op when installed).
chromium:
	@sh scripts/install-chromium.sh

# The ingest figures of record: results into bench/results/, rendered into docs/performance.md.
bench: $(VENV)/.installed
	$(BIN)/python bench/ingest.py --duration 20 --runs 3 --json bench/results/ingest-closed.json
	$(BIN)/python bench/ingest.py --duration 20 --runs 3 --rate 50000 --json bench/results/ingest-paced.json
	$(BIN)/python bench/figures.py

# The sidecar's footprint (memory idle / at 1,000 spans/s / at saturation, CPU, disk per span, the gate's
# refresh) as JSON in bench/results/footprint.json, rendered into the README's Footprint table (~6 min).
footprint: $(VENV)/.installed
	$(BIN)/python bench/footprint.py --json bench/results/footprint.json
	$(BIN)/python bench/figures.py

clean:
	rm -rf $(VENV) build *.egg-info
