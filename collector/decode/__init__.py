"""Decode OTLP requests (protobuf or JSON) and normalize spans into store columns."""
