"""Aliases (production, staging...), their history, and the audit log."""
