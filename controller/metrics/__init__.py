"""Observability: Prometheus metrics of the proxy and the fleet, and the figures the dashboard shows."""
