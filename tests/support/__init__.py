"""Shared test helpers: a throwaway SeaweedFS S3 server and real tiny PEFT adapter factories."""
