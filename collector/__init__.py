"""shadowlens collector: OTLP receivers -> decode/normalize -> durable DuckDB store.

Data flows one way: ``receivers`` -> ``decode`` -> ``store``; ``analyzers`` read the
store and ``exporters`` publish what the analyzers computed. Only ``serve.py`` and
``cli.py`` wire the stages together.
"""
