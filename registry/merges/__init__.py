"""Merge jobs: requests, worker claims with leases, merged artifacts (DESIGN.md §9)."""
