"""The reference verdict: does PEFT itself load an adapter folder cleanly onto a base folder?

This module owns ``peft_load_report``, the ground truth that the header-only compatibility checker
(``cli.bases.local_check`` / ``registry.core.compat``) is tested against in
``tests/test_compat_oracle.py``: the checker must call an adapter compatible exactly where PEFT
loads it without complaint.

The load follows ``PeftModel.from_pretrained`` step by step (config from ``adapter_config.json``,
the task-specific ``PeftModel`` class wrapping the base, then ``PeftModel.load_adapter``), because
``from_pretrained`` itself throws away the load result: it never reports unexpected keys, and it
only warns about missing ones. ``load_adapter`` returns the ``load_state_dict`` result, whose
missing keys PEFT has already narrowed to the adapter's own LoRA parameters (``lora_A``,
``lora_B``, ``lora_embedding_*``, ``lora_magnitude_vector``, lora biases). Entries for
``modules_to_save`` copies and trainable tokens are looked up by PEFT before that (a missing one
raises ``KeyError``); they are checked here first so they show up as missing keys.

"Clean" means: no exception (size mismatches, target modules not found, a broken config...), no
missing adapter keys and no unexpected keys (tensors in the file that PEFT had nowhere to put).
Warnings raised by transformers or PEFT while loading are recorded, never raised (the suite runs
with ``-W error``), and are quoted in ``reason``; they do not by themselves make a load unclean.
Size mismatches (the adapter was trained on a base of another shape) are listed per tensor.
``peft_scalings`` gives the scale PEFT applies per module, to hold the checker's reported scale to.
Everything is read from the two local folders; nothing touches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LoadOutcome", "peft_load_report", "peft_scalings"]

ADAPTER_NAME = "default"
_SHOWN_KEYS = 5
# Noise from the installed versions, not about the adapter: PEFT 0.21 calls a transformers 5
# property deprecated in favour of is_activation_checkpointing.
_IGNORED_WARNINGS = ("is_gradient_checkpointing",)
# One line per tensor in torch's load_state_dict error: "size mismatch for <model key>: ...".
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?):")


@dataclass(frozen=True)
class LoadOutcome:
    """What PEFT made of an adapter: ``clean`` with an explanation in ``reason``.

    Keys are given as they are named in ``adapter_model.safetensors`` (without the adapter name).
    """

    clean: bool
    reason: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    # Tensors PEFT refused because the model's parameter has another shape.
    size_mismatches: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face offline mode for the duration (for libraries that read it lazily)."""
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _checkpoint_key(model_key: str, adapter_name: str = ADAPTER_NAME) -> str:
    """``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight`` (as PEFT saves it)."""
    suffix = f".{adapter_name}"
    if model_key.endswith(suffix):  # a bare nn.Parameter (e.g. trainable_tokens_delta.default)
        return model_key.removesuffix(suffix)
    head, _, last = model_key.rpartition(".")
    key = f"{head.removesuffix(suffix)}.{last}"
    # DoRA magnitudes live in a module (``lora_magnitude_vector.default.weight``) but are saved
    # without the ``.weight``, as before PEFT's DoRA refactor.
    return key.removesuffix(".weight") if key.endswith(".lora_magnitude_vector.weight") else key


def _task_type(adapter_dir: Path) -> str | None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    task_type = config.get("task_type") if isinstance(config, dict) else None
    return task_type if isinstance(task_type, str) else None


def _file_keys(adapter_dir: Path) -> set[str]:
    safetensors_file = adapter_dir / "adapter_model.safetensors"
    if safetensors_file.exists():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as handle:
            return set(handle.keys())
    import torch

    state: dict[str, Any] = torch.load(
        adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True
    )
    return set(state)


def _missing_auxiliary_keys(peft_model: Any, file_keys: set[str]) -> list[str]:
    """modules_to_save / trainable-token entries the file lacks (PEFT would raise KeyError)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    missing = []
    for name, module in peft_model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            wrapper: Any = module  # PEFT leaves this method unannotated
            for key in wrapper.adapter_state_dict_load_map(ADAPTER_NAME):
                if f"{name}.{key}" not in file_keys:
                    missing.append(f"{name}.{key}")
    return missing


def _base_model(base_dir: Path, adapter_dir: Path) -> Any:
    """The base in float32, with the model class the adapter's task_type asks for."""
    import torch
    import transformers

    model_cls: Any = {
        "CAUSAL_LM": transformers.AutoModelForCausalLM,
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
    }.get(_task_type(adapter_dir) or "", transformers.AutoModel)
    return model_cls.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)


def _load(base_dir: Path, adapter_dir: Path) -> tuple[list[str], list[str]]:
    """Load as ``PeftModel.from_pretrained`` does; return (missing, unexpected) checkpoint keys."""
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig, PeftModel

    base = _base_model(base_dir, adapter_dir)

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    # Same key mapping as from_pretrained: renames for checkpoints of an older architecture.
    key_mapping = getattr(base, "_checkpoint_conversion_mapping", None) or None
    peft_model = peft_cls(base, config, ADAPTER_NAME)

    missing = _missing_auxiliary_keys(peft_model, _file_keys(adapter_dir))
    if missing:
        return missing, []
    result = peft_model.load_adapter(
        str(adapter_dir), ADAPTER_NAME, torch_device="cpu", key_mapping=key_mapping
    )
    missing = [_checkpoint_key(key) for key in result.missing_keys]
    return missing, list(result.unexpected_keys)


def _describe(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} {label}: {shown}{more}"


def peft_load_report(base_dir: Path, adapter_dir: Path) -> LoadOutcome:
    """Load ``base_dir`` (float32, model class from the adapter's task_type) and put the adapter
    in ``adapter_dir`` on it with PEFT; say whether that went cleanly, and if not, why."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    error: str | None = None
    missing: list[str] = []
    unexpected: list[str] = []
    with _offline(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            missing, unexpected = _load(base_dir, adapter_dir)
        except Exception as exc:  # the verdict, not a test failure: any refusal counts
            error = f"{type(exc).__name__}: {exc}"

    notes = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not any(text in str(w.message) for text in _IGNORED_WARNINGS)
    ]
    mismatched = sorted(_checkpoint_key(key) for key in _SIZE_MISMATCH.findall(error or ""))
    problems = [error] if error else []
    if missing:
        problems.append(_describe("missing adapter keys", sorted(missing)))
    if unexpected:
        problems.append(_describe("unexpected keys", sorted(unexpected)))
    reason = "; ".join(problems) if problems else "loaded cleanly"
    if notes:
        reason += " | warnings: " + " / ".join(dict.fromkeys(notes))
    return LoadOutcome(
        clean=not problems,
        reason=reason,
        missing_keys=sorted(missing),
        unexpected_keys=sorted(unexpected),
        size_mismatches=mismatched,
    )


def peft_scalings(base_dir: Path, adapter_dir: Path) -> dict[str, float]:
    """The scale PEFT applies per LoRA module (``LoraLayer.scaling``: alpha/r, alpha/sqrt(r) with
    rsLoRA, per-module values from rank_pattern / alpha_pattern), after
    ``PeftModel.from_pretrained`` of ``adapter_dir`` onto ``base_dir``. Modules are named as in
    adapter_model.safetensors, without ``base_model.model.``.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    with _offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported by peft_load_report; not this function's job
        model = PeftModel.from_pretrained(_base_model(base_dir, adapter_dir), str(adapter_dir))
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): float(module.scaling[ADAPTER_NAME])
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.scaling
    }
