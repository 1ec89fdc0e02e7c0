"""Base models: registration from a folder, S3 or the Hub, signatures, stored weights."""
