"""What the registry reads out of a PEFT LoRA adapter: its config and its tensor layout.

`parse_adapter_config` turns `adapter_config.json` bytes into `AdapterConfigSummary` (the columns
the registry indexes on) and `check_lora_tensors` checks the safetensors header for consistent
lora_A/lora_B pairs. Unknown config keys are kept, never refused: newer PEFT versions add keys.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from registry.core.errors import InvalidAdapterConfig, InvalidLoraTensors, UnsupportedPeftType
from registry.core.safetensors_header import SafetensorsHeader

MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AdapterConfigSummary:
    peft_type: str
    task_type: str | None
    base_model_name_or_path: str | None
    revision: str | None
    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    use_dora: bool
    use_rslora: bool
    raw: dict[str, Any] = field(repr=False)


def check_config_size(size: int, *, name: str = "adapter_config.json") -> None:
    """Refuse an oversized config before anyone reads it into memory."""
    if size > MAX_CONFIG_BYTES:
        raise InvalidAdapterConfig(f"{name} is larger than {MAX_CONFIG_BYTES} bytes")


def parse_adapter_config(data: bytes, *, name: str = "adapter_config.json") -> AdapterConfigSummary:
    """Parse and validate adapter_config.json; only LoRA is accepted."""
    check_config_size(len(data), name=name)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapterConfig(
            f"{name} is not valid JSON ({exc}); write it with PEFT's save_pretrained"
        ) from None
    if not isinstance(raw, dict):
        raise InvalidAdapterConfig(f"{name} must hold a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise InvalidAdapterConfig(f"{name} has no peft_type; write it with PEFT's save_pretrained")
    if peft_type != "LORA":
        raise UnsupportedPeftType(
            f"{name}: peft_type {peft_type!r} is not supported; only LoRA adapters "
            '(peft_type "LORA") can be pushed',
            peft_type=str(peft_type),
        )

    def field_of(key: str, kinds: tuple[type, ...], default: Any = None, max_len: int = 200) -> Any:
        value = raw.get(key, default)
        if value is None:
            return None
        # bool is an int subclass: accept it only where a bool is expected.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise InvalidAdapterConfig(
                f"{name}: {key} has the wrong type ({type(value).__name__})", key=key
            )
        if isinstance(value, str) and len(value) > max_len:
            raise InvalidAdapterConfig(
                f"{name}: {key} is longer than {max_len} characters; shorten it (the registry "
                "indexes it), e.g. use the Hugging Face id instead of a local path",
                key=key,
            )
        return value

    r = field_of("r", (int,), 8)
    if r is None or r < 1:
        raise InvalidAdapterConfig(f"{name}: r must be a positive integer, got {r!r}", key="r")
    alpha = field_of("lora_alpha", (int, float), 8)
    if alpha is None or not math.isfinite(alpha):
        raise InvalidAdapterConfig(f"{name}: lora_alpha must be a finite number", key="lora_alpha")
    target = raw.get("target_modules")
    if isinstance(target, list):
        if not all(isinstance(t, str) for t in target):
            raise InvalidAdapterConfig(
                f"{name}: target_modules must be a list of strings", key="target_modules"
            )
        target = sorted(target)
    elif target is not None and not isinstance(target, str):
        raise InvalidAdapterConfig(
            f"{name}: target_modules must be a list, a regex string or null", key="target_modules"
        )
    return AdapterConfigSummary(
        peft_type=peft_type,
        task_type=field_of("task_type", (str,), max_len=64),
        base_model_name_or_path=field_of("base_model_name_or_path", (str,)),
        revision=field_of("revision", (str,)),
        r=r,
        lora_alpha=float(alpha),
        target_modules=target,
        use_dora=bool(field_of("use_dora", (bool,), False)),
        use_rslora=bool(field_of("use_rslora", (bool,), False)),
        raw=raw,
    )


_PAIR_RE = re.compile(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)*")


@dataclass(frozen=True)
class LoraModule:
    name: str
    rank: int
    embedding: bool


def check_lora_tensors(header: SafetensorsHeader, *, name: str) -> list[LoraModule]:
    """Check every lora_A has its lora_B with the same rank; return the modules found.

    A down-projection A is (r, in, ...) and B is (out, r, ...); embedding LoRA stores A as
    (r, vocab) and B as (dim, r). Only the `.weight` entries carry ranks (`lora_B.bias` does not).
    """
    halves: dict[tuple[str, bool], dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, info in header.tensors.items():
        match = _PAIR_RE.fullmatch(key)
        if not match or key.endswith(".bias"):
            continue
        module, kind = match.group(1), match.group(2)
        embedding = kind.startswith("lora_embedding")
        halves.setdefault((module, embedding), {})[kind[-1]] = (key, info.shape)

    modules: list[LoraModule] = []
    for (module, embedding), parts in sorted(halves.items()):
        if set(parts) != {"A", "B"}:
            have = next(iter(parts.values()))[0]
            missing = "B" if "A" in parts else "A"
            raise InvalidLoraTensors(
                f"{name}: {have} has no matching lora_{missing} tensor; the adapter file is "
                "incomplete, save it again with PEFT",
                module=module,
            )
        key_a, shape_a = parts["A"]
        key_b, shape_b = parts["B"]
        if len(shape_a) < 2 or len(shape_b) < 2:
            raise InvalidLoraTensors(
                f"{name}: {key_a} {list(shape_a)} / {key_b} {list(shape_b)} are not matrices",
                module=module,
            )
        rank_a, rank_b = shape_a[0], shape_b[1]
        if rank_a != rank_b:
            raise InvalidLoraTensors(
                f"{name}: module {module}: lora_A has rank {rank_a} {list(shape_a)} but lora_B "
                f"has rank {rank_b} {list(shape_b)}; they must agree",
                module=module,
                rank_a=rank_a,
                rank_b=rank_b,
            )
        modules.append(LoraModule(module, rank_a, embedding))
    if not modules:
        raise InvalidLoraTensors(
            f"{name} holds no lora_A/lora_B tensors; is it really a LoRA adapter?"
        )
    return modules
