"""shadowlens: the application on top of the three layers.

``shadowlens.collector`` (OTLP in -> durable store), ``shadowlens.analyzers`` (store -> traces -> cohorts ->
verdict) and ``shadowlens.exporters`` (results -> the world) are installed under this package from the
repository's top-level ``collector/``, ``analyzers/`` and ``exporters/`` folders. The modules here (CLI,
configuration, the ``serve`` composition root, demo, traffic generator) import those layers; nothing in them
imports the application.
"""
