"""Durable store: one writer thread (group commit), segment files for raw payloads, read-only queries."""
