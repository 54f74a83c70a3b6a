"""Admission control: per-agent capacity, the fleet-wide per-model queue, priorities and per-key limits."""
