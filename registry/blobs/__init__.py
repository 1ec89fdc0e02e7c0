"""Blobs: content-addressed bytes, their rows, and the endpoints that move them."""
