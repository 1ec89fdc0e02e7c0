"""Adapters and their immutable, numbered versions."""
