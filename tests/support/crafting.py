"""Broken variants of real PEFT adapters and bases, for compatibility tests.

Each helper rewrites a copy of a folder the way a real-world mistake would: renamed or dropped
tensor keys, sliced tensors, another dtype, an edited ``adapter_config.json`` or base
``config.json``, or a safetensors header written by hand (for dtypes torch cannot produce).
Tensor files are written back with ``{"format": "pt"}`` metadata, as PEFT writes them.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "copy_folder",
    "edit_json",
    "make_seq_cls_adapter",
    "rename_keys",
    "rewrite_tensors",
    "write_raw_safetensors",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ZEROS = bytes(1 << 16)


def copy_folder(source: Path, destination: Path) -> Path:
    """A writable copy of a (read-only, cached) adapter or base folder."""
    shutil.copytree(source, destination)
    return destination


def edit_json(path: Path, **changes: Any) -> dict[str, Any]:
    """Set (or, with the value ``None`` under a ``drop_`` prefix, delete) keys of a JSON file.

    ``edit_json(p, r=8)`` sets r; ``edit_json(p, drop_lora_alpha=None)`` removes lora_alpha.
    Returns the new content.
    """
    data: dict[str, Any] = json.loads(path.read_text())
    for key, value in changes.items():
        if key.startswith("drop_"):
            data.pop(key[len("drop_") :], None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return data


def rewrite_tensors(
    folder: Path,
    change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    filename: str = ADAPTER_WEIGHTS,
) -> dict[str, torch.Tensor]:
    """Load every tensor of ``folder/filename``, pass them through ``change``, save the result."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / filename
    tensors = change(dict(load_file(str(path))))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), {"format": "pt"})
    return tensors


def rename_keys(folder: Path, old: str, new: str) -> list[str]:
    """Replace ``old`` with ``new`` in every adapter tensor name; return the new names."""

    def rename(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key.replace(old, new): value for key, value in tensors.items()}

    return sorted(rewrite_tensors(folder, rename))


def write_raw_safetensors(
    path: Path, tensors: dict[str, tuple[str, list[int], int]], fill: bytes = _ZEROS
) -> None:
    """Write a safetensors file by hand: name -> (dtype string, shape, bytes per element).

    The header is laid out exactly as the format requires (contiguous offsets), so only what the
    test changes on purpose (e.g. a dtype no reader knows) is wrong. Each tensor's data is
    ``fill`` (zeros by default) repeated and cut to its size, written tensor by tensor and chunk
    by chunk: a file far larger than ``fill`` never is in memory whole.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, itemsize) in tensors.items():
        size = itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for name in tensors:
            start, end = header[name]["data_offsets"]
            for chunk in range(start, end, len(fill)):
                handle.write(fill[: min(len(fill), end - chunk)])


def make_seq_cls_adapter(
    base_dir: Path, out_dir: Path, target_modules: list[str], num_labels: int = 2
) -> Path:
    """A real SEQ_CLS LoRA adapter trained the usual way: the task model is built from a base
    checkpoint that has no classification head, so the head (``score``/``classifier``) is new
    and PEFT saves it whole (modules_to_save)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=num_labels, local_files_only=True
        )
        config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=target_modules)
        get_peft_model(model, config).save_pretrained(str(out_dir))
    return Path(out_dir)
