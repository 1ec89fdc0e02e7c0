"""Integrations with serving engines (`cli.integrations.vllm`: the vLLM LoRA resolver plugin).

Each module imports its engine only inside itself, so this package installs and imports without
any engine present.
"""
