"""Observation: statistics and Prometheus metrics, drift, feedback, request logs, the after-answer hooks."""
