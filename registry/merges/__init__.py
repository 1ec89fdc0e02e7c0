"""Merge jobs: requests, worker claims with leases, merged artifacts (docs/architecture.md §9)."""
