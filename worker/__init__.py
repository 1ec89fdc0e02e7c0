"""Merge workers: the streaming merge engine and the job runner (arrives with the merge issue).

May import `registry.core`, the `cli` client, torch, safetensors and huggingface_hub; never the
server, the database or FastAPI.
"""
