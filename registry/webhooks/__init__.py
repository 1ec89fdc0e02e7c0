"""Webhooks: endpoints that get every event they subscribe to, signed, at least once, from a
background loop that never blocks a request (docs/architecture.md §12)."""
