"""Prometheus exporters written for labkit (see docs/monitoring.md)."""
