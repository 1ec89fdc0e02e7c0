"""Deployments: what serving engines report they loaded, and where that differs from what the
aliases mean (docs/architecture.md §13)."""
