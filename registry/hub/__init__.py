"""The Hugging Face protocol: a read-only, Hub-compatible HTTP API under /hf/ (docs/architecture.md
§14), so that huggingface_hub, transformers, PEFT, vLLM and LoRAX load adapter versions, stored
bases and merged artifacts with `HF_ENDPOINT=http://registry:8000/hf` and no plugin.

- `protocol`: pure wire rules: commit ids, LFS pointers, the JSON of repository info and tree
  listings, and how a registry error maps onto the headers huggingface_hub turns into its own
  exceptions.
- `service`: the use cases (a repository at a revision, one file of it, where its bytes are),
  built on the adapter, base and merge services.
- `api`: the routes and the `HUB` surface (its credential rule and error renderer).
"""
