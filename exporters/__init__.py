"""Exporters: publish what the store and analyzers hold (Prometheus, gate JSON, reports). Never write the store."""
