"""Pure logic shared by the server, the CLI and the workers.

No I/O frameworks here: no FastAPI, no SQL, no boto3, no torch. Functions take bytes and plain
values and return values or raise `registry.core.errors.RegistryError` subclasses.
"""
