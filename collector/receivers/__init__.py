"""OTLP receivers (gRPC and HTTP) sharing one Export handler and one error->status table."""
