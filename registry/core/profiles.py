"""Serving profiles: what a serving target (vLLM, a merge) adds to the base compatibility rules.

A profile is data (`registry.core.compat.Profile`): option defaults, severity overrides for base
findings, and a few rules of its own whose messages name the flag or action that fixes each
problem. Add a profile by adding an entry to `PROFILES`. `bind` validates a profile name and its
`key=value` options (from the CLI, the API or the client) and returns what `check_compatibility`
takes. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from registry.core.compat import Analysis, Profile, Severity
from registry.core.errors import InvalidProfile

# The vLLM rules below were read from vLLM 0.33.0 (vllm/lora/peft_helper.py validate_legal,
# vllm/lora/lora_model.py, vllm/lora/utils.py parse_fine_tuned_lora_name, vllm/config/lora.py).
VLLM_VERSION = "0.33"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_VOCAB = 258_048
_DECODER = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
# Module leaves each architecture accepts (packed_modules_mapping + embedding_modules); an
# architecture missing here is reported as unverified, not refused.
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "llama": _DECODER | {"embed_tokens", "lm_head"},
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "bert": frozenset({"query", "key", "value", "dense", "classifier"}),
}
# Architectures whose vLLM model class does not implement SupportsLoRA.
VLLM_NO_LORA = frozenset({"gpt2"})
# init_lora_weights strings vLLM accepts; other strings (pissa, olora, corda, loftq) need the
# adapter converted first.
VLLM_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
# modules_to_save vLLM loads (classification heads), and base_layer copies it skips.
VLLM_SAVED_MODULES = frozenset({"classifier", "score"})
VLLM_SKIPPED = (".embed_tokens.weight", ".lm_head.weight")


def _always(severity: Severity | None) -> Any:
    return lambda _options: severity


def _vllm_rank(a: Analysis, options: Mapping[str, Any]) -> None:
    """vLLM compares r and every rank_pattern value (not the tensors) with --max-lora-rank."""
    limit = int(options["max_lora_rank"])
    pattern = a.config.get("rank_pattern") or {}
    ranks = [a.config.get("r"), *pattern.values(), *(row.rank for row in a.rows)]
    rank = max((r for r in ranks if isinstance(r, int)), default=0)
    if rank <= limit:
        return
    needed = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
    a.add(
        "vllm_rank_too_large",
        "error",
        f"rank {rank} is greater than max_lora_rank {limit}",
        fix=f"needs --max-lora-rank {needed}"
        if needed
        else f"vLLM's largest --max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}: merge first",
    )


def _vllm_config(a: Analysis, options: Mapping[str, Any]) -> None:
    """peft_helper.py: required fields and the features validate_legal refuses."""
    config = a.config
    missing = [key for key in ("r", "lora_alpha", "target_modules") if config.get(key) is None]
    if missing:
        a.add(
            "vllm_config_incomplete",
            "error",
            f"vLLM requires {', '.join(missing)} in adapter_config.json",
            fix="save the adapter with PEFT's save_pretrained",
        )
    refused = [
        (bool(config.get("use_dora")), "DoRA", "merge first: DoRA"),
        (bool(config.get("lora_bias")), "LoRA bias (lora_bias)", "merge first: lora_bias"),
        ((config.get("bias") or "none") != "none", f"bias={config.get('bias')!r}", "merge first"),
        (bool(config.get("alora_invocation_tokens")), "activated LoRA (aLoRA)", "serve with PEFT"),
        (bool(config.get("layer_replication")), "layer_replication", "serve with PEFT"),
        (bool(config.get("use_qalora")), "QALoRA", "serve with PEFT"),
    ]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        refused.append((True, f"init_lora_weights={init!r}", "convert it to a plain LoRA first"))
    for hit, what, fix in refused:
        if hit:
            a.add("vllm_unsupported_feature", "error", f"vLLM does not support {what}", fix=fix)
    saved = sorted(m for m in config.get("modules_to_save") or [] if m not in VLLM_SAVED_MODULES)
    if saved:
        a.add(
            "vllm_modules_to_save",
            "error",
            f"vLLM loads modules_to_save only for classification heads (classifier, score), "
            f"not {', '.join(map(str, saved))}",
            fix="merge first (lora-reg merge), or retrain without modules_to_save",
        )
    if a.tokens:
        a.add(
            "vllm_unsupported_weight",
            "error",
            f"vLLM does not load trainable-token deltas ({', '.join(sorted(a.tokens))})",
            fix="merge first (lora-reg merge)",
        )
    for name in sorted(a.replaced):
        leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
        if ("." + name).endswith(VLLM_SKIPPED) or leaf in VLLM_SAVED_MODULES:
            continue  # full embedding copies are skipped; classifier heads are loaded
        if (config.get("bias") or "none") != "none" and name.endswith(".bias"):
            continue  # already refused as bias
        a.add(
            "vllm_unsupported_weight",
            "error",
            f"vLLM refuses {name}: it accepts only lora_A/lora_B and lora_embedding_A/B tensors",
            fix="merge first (lora-reg merge)",
        )


def _vllm_modules(a: Analysis, options: Mapping[str, Any]) -> None:
    model_type = a.model_type or "unknown"
    if model_type in VLLM_NO_LORA:
        a.add(
            "vllm_unsupported_model",
            "error",
            f"vLLM's {model_type} model does not implement LoRA (SupportsLoRA)",
            fix="merge first (lora-reg merge) and serve the merged model",
        )
        return
    supported = VLLM_LORA_MODULES.get(model_type)
    if supported is None:
        a.add(
            "vllm_unverified_model",
            "warning",
            f"the vllm profile has no module list for model_type {model_type!r}; module "
            "support was not checked",
            fix="compare the adapter's modules with packed_modules_mapping and "
            "embedding_modules in vLLM's model file for this architecture",
        )
    else:
        for row in a.rows:
            leaf = row.module.rsplit(".", 1)[-1]
            if leaf not in supported:
                a.add(
                    "vllm_unsupported_module",
                    "error",
                    f"{row.module}: vLLM's {model_type} does not support LoRA on {leaf}",
                    fix=f"retrain without {leaf} (supported: {', '.join(sorted(supported))}), "
                    "or merge first",
                    module=row.module,
                )
    vocab = a.vocab_rows
    for row in a.rows:
        if row.kind == "embedding" and vocab is not None and row.lora_a[-1] != vocab:
            a.add(
                "vllm_embedding_vocab",
                "error",
                f"{row.module}: the embedding LoRA size ({row.lora_a[-1]}) must be the base "
                f"vocabulary size ({vocab})",
                fix="merge first (lora-reg merge)",
                module=row.module,
            )
        if row.module.endswith("lm_head") and (vocab or 0) > VLLM_MAX_LORA_VOCAB:
            a.add(
                "vllm_embedding_vocab",
                "error",
                f"vLLM serves LoRA only for vocabularies up to {VLLM_MAX_LORA_VOCAB}",
                fix="merge first (lora-reg merge)",
                module=row.module,
            )


def _merge_rules(a: Analysis, options: Mapping[str, Any]) -> None:
    quantization = a.base.config.get("quantization_config")
    if isinstance(quantization, dict):
        a.add(
            "merge_quantized_base",
            "error",
            f"cannot merge into a {quantization.get('quant_method', 'quantized')} base exactly",
            fix="register the original bf16/fp16 base and merge into that",
        )


def _tied(options: Mapping[str, Any]) -> Severity | None:
    return None if options.get("untie") else "error"


PROFILES: dict[str, Profile] = {
    "vllm": Profile(
        name="vllm",
        description=f"vLLM {VLLM_VERSION}'s LoRA loader: config fields, ranks, modules, tensors",
        options={"max_lora_rank": VLLM_DEFAULT_MAX_LORA_RANK},
        # Reported by the vLLM rules with vLLM's own wording instead.
        overrides={"alora": _always(None), "layer_replication": _always(None)},
        rules=(_vllm_config, _vllm_rank, _vllm_modules),
    ),
    "merge": Profile(
        name="merge",
        description="a merge into the base weights (lora-reg merge) is well defined",
        options={"untie": False},
        overrides={
            "alora": _always("error"),
            "layer_replication": _always("error"),
            "lora_bias_without_base_bias": _always("error"),
            "tied_embeddings": _tied,
            # The merge writes the adapter's resized embedding and updates vocab_size.
            "resized_vocabulary": _always("warning"),
            "quantized_base": _always(None),
        },
        rules=(_merge_rules,),
    ),
}


def bind(
    name: str | None, raw: Mapping[str, Any] | None = None
) -> tuple[Profile | None, dict[str, Any]]:
    """A profile and its validated options (strings from the CLI are converted to the default's
    type); no name means the base rules only, which take no options."""
    raw = dict(raw or {})
    if name is None:
        if raw:
            raise InvalidProfile(f"options {sorted(raw)} need a --profile ({', '.join(PROFILES)})")
        return None, {}
    profile = PROFILES.get(name)
    if profile is None:
        raise InvalidProfile(
            f"unknown profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}",
            profile=name,
        )
    options = dict(profile.options)
    for key, value in raw.items():
        if key not in profile.options:
            raise InvalidProfile(
                f"profile {name} has no option {key!r}; options: "
                f"{', '.join(f'{k}={v}' for k, v in profile.options.items())}",
                profile=name,
                option=key,
            )
        options[key] = _convert(name, key, value, profile.options[key])
    if name == "vllm" and options["max_lora_rank"] not in VLLM_MAX_LORA_RANKS:
        raise InvalidProfile(
            f"max_lora_rank must be one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))} (vLLM's "
            f"--max-lora-rank choices), got {options['max_lora_rank']}",
            profile=name,
            option="max_lora_rank",
        )
    return profile, options


def _convert(profile: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
    raise InvalidProfile(
        f"profile {profile}: option {key}={value!r} must be a {type(default).__name__}",
        profile=profile,
        option=key,
    )
