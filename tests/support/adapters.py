"""Real PEFT LoRA adapters built from tiny random transformers models, for tests.

This module owns the tiny model configurations used across the test suite and the factories that
turn them into on-disk artefacts: a base model folder (``config.json`` + ``model.safetensors``)
and a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``). Upload,
validation, inspection and merge tests use it to get genuine PEFT output without downloading any
weights.

Everything is deterministic: the same arguments give byte-identical files, and a different
``seed`` gives different adapter weights. Global RNG state is left untouched. torch, transformers
and PEFT are imported lazily, so importing this module is cheap for tests that never build a model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "ARCHES",
    "DEFAULT_TARGET_MODULES",
    "build_base_model",
    "make_adapter",
    "make_base",
    "tiny_config",
]

ARCHES = ("llama", "gpt2", "qwen2", "mistral", "bert")

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}

# Small enough to build in milliseconds, big enough to keep the real module layout (GQA for the
# llama-likes, fused c_attn for gpt2). Position tables are cut down because they dominate the
# parameter count at this size.
_LLAMA_LIKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}
_CONFIG_KWARGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    # GPT2Config's bos/eos default to 50256, outside this vocabulary (transformers warns).
    "gpt2": {
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 256,
        "n_positions": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "bert": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 256,
        "max_position_embeddings": 128,
    },
}

# Decoders get a causal-LM head, like the adapters people publish; bert is an encoder only.
_TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "qwen2": "CAUSAL_LM",
    "mistral": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "FEATURE_EXTRACTION",
}

# Offsets keep the LoRA init stream and the lora_B fill stream apart from the base model's stream.
_LORA_INIT_SEED_OFFSET = 1_000
_LORA_FILL_SEED_OFFSET = 2_000


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"not a torch dtype: {dtype!r}")
        return resolved
    return dtype


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Return the tiny transformers config used for ``arch``, with ``overrides`` applied (e.g.
    ``hidden_size=96`` for a base of another size)."""
    _check_arch(arch)
    import transformers

    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "gpt2": transformers.GPT2Config,
        "bert": transformers.BertConfig,
    }[arch]
    config: PretrainedConfig = config_cls(**{**_CONFIG_KWARGS[arch], **overrides})
    return config


def build_base_model(
    arch: str, dtype: torch.dtype | str | None = None, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """Build the tiny random base model for ``arch`` in memory (default dtype float32).

    The same ``arch``/``dtype``/``seed`` always gives the same weights, so a test can rebuild the
    base an adapter was made for instead of saving it.
    """
    import torch
    import transformers

    config = tiny_config(arch, **overrides)
    model_cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    # fork_rng: seeding the global generator must not leak into the calling test.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = model_cls.from_config(  # type: ignore[no-untyped-call]
            config, dtype=_resolve_dtype(dtype)
        )
    # gpt2 and bert default to dropout 0.1: eval mode keeps forward passes deterministic.
    model.eval()  # type: ignore[no-untyped-call]
    return model


def make_base(
    arch: str,
    out_dir: Path,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save the tiny base model for ``arch`` (config.json + model.safetensors) to ``out_dir``.

    ``max_shard_size`` (e.g. "20KB") writes shards and an index; ``overrides`` change the config.
    """
    out_dir = Path(out_dir)
    model = build_base_model(arch, dtype=dtype, seed=seed, **overrides)
    if max_shard_size:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(out_dir)
    return out_dir


def make_adapter(
    arch: str,
    out_dir: Path,
    *,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: list[str] | str | None = None,
    seed: int = 0,
    base_model_name_or_path: str | None = None,
    base_seed: int = 0,
    dtype: torch.dtype | str | None = None,
    base_config: dict[str, Any] | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Save a real PEFT LoRA adapter for the tiny ``arch`` base to ``out_dir``; return out_dir.

    ``seed`` drives the LoRA weights; ``base_seed``/``dtype`` pick the base it is built on (the
    same base ``make_base(arch, ..., dtype, base_seed)`` saves). Every lora_B (and both embedding
    LoRA matrices) gets seeded random values, since PEFT initialises them so that the adapter is a
    no-op. ``base_model_name_or_path`` is written to adapter_config.json (PEFT would otherwise
    write null for a model built from a config). Extra keyword arguments go to ``LoraConfig``,
    e.g. ``lora_dropout``, ``bias``, ``use_rslora`` or ``task_type``; ``base_config`` changes the
    base's config (as ``make_base(arch, ..., **base_config)`` does). Targeting an embedding
    layer (e.g. ``embed_tokens``) also saves that layer's full weights, as PEFT does by default.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    model = build_base_model(arch, dtype=dtype, seed=base_seed, **(base_config or {}))
    if base_model_name_or_path is not None:
        # get_peft_model copies the model's name_or_path into the config (overwriting any value
        # given to LoraConfig), and the generated README.md uses it too.
        model.name_or_path = base_model_name_or_path
    lora_kwargs.setdefault("task_type", _TASK_TYPES[arch])
    if arch == "gpt2":
        # gpt2's Conv1D stores weights transposed; PEFT corrects this itself but warns.
        lora_kwargs.setdefault("fan_in_fan_out", True)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=(
            target_modules if target_modules is not None else DEFAULT_TARGET_MODULES[arch]
        ),
        **lora_kwargs,
    )
    # LoRA A matrices are drawn from the global generator during get_peft_model.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT 0.21 calls a transformers 5 API deprecated in favour of is_activation_checkpointing;
        # not ours to fix, and it would trip suites that turn warnings into errors.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        _ignore_deliberate_warnings()
        torch.manual_seed(seed + _LORA_INIT_SEED_OFFSET)
        peft_model = get_peft_model(model, config)

    generator = torch.Generator().manual_seed(seed + _LORA_FILL_SEED_OFFSET)
    filled = 0
    targets_embedding = False
    with torch.no_grad():
        # named_parameters is ordered by module registration, so the fill order is stable.
        # Embedding LoRA is initialised the other way round (A zero, B random), so both get filled.
        for name, param in peft_model.named_parameters():
            if any(part in name for part in ("lora_B", "lora_embedding_A", "lora_embedding_B")):
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(values * 0.02)
                filled += 1
                targets_embedding |= "lora_embedding" in name
    if filled == 0:
        raise ValueError(f"no LoRA weights were created for target_modules={config.target_modules}")

    saved_config = peft_model.peft_config["default"]
    # PEFT writes set-valued fields (target_modules...) as list(set), whose order follows the
    # per-process string hash seed: sort them so adapter_config.json is byte-stable across runs.
    for key, value in vars(saved_config).items():
        if isinstance(value, set):
            setattr(saved_config, key, sorted(value))
    # "auto" would look base_model_name_or_path up on the Hugging Face Hub to detect a resized
    # vocabulary (a network call; we never resize). PEFT's auto rule otherwise saves the full
    # embedding matrices exactly when an embedding layer is targeted, so do the same offline.
    with warnings.catch_warnings():
        _ignore_deliberate_warnings()
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=targets_embedding)
    return out_dir


def _ignore_deliberate_warnings() -> None:
    """Fixtures make such adapters on purpose (tied lm_head LoRA, lora_bias without a base bias,
    GPT-2's lm_head next to Conv1D layers): the compatibility checker is what reports them."""
    for message in (
        ".*tie_word_embeddings=True.*",
        ".*lora_bias=True.*",
        ".*fan_in_fan_out is set to True but the target module is `torch.nn.Linear`.*",
        # PEFT 0.21 mistakes lora_B.bias (1-D by design) for a DeepSpeed shard on save.
        ".*LoRA tensor\\(s\\) have invalid shape.*lora_B\\.bias.*",
    ):
        warnings.filterwarnings("ignore", message=message)
