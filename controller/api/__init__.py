"""The JSON management API (agents, models, jobs, requests) and its OpenAPI description."""
