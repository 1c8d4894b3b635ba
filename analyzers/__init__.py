"""Analyzers: committed spans -> completed traces -> per-cohort aggregates -> comparison -> verdict.

They read the store (never the receivers) and hand frozen results to ``exporters``.
"""
