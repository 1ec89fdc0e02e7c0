"""Base models as the compatibility checker sees them: `config.json` plus a tensor signature.

A signature maps every tensor of the base checkpoint to its dtype, shape and shard file, read from
safetensors headers only. `read_signature` builds one from any file source through a `read`
callback (local folder, S3 prefix, registry blobs): it reads `config.json`, the optional
`model.safetensors.index.json` and the header bytes of each shard, never tensor data. Pure: the
callers own the I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from registry.core.errors import InvalidBase
from registry.core.safetensors_header import SafetensorsHeader, header_length, parse_header

CONFIG_JSON = "config.json"
INDEX_JSON = "model.safetensors.index.json"
MAX_JSON_BYTES = 16 * 1024 * 1024  # an index of a very large model is a few MiB

# read(path, start, length) -> bytes; fewer bytes only at the end of the file.
ReadRange = Callable[[str, int, int], bytes]


class BaseTensor(BaseModel):
    dtype: str
    shape: list[int]
    shard: str | None = None


class BaseSignature(BaseModel):
    """What the checker knows about a base: its config.json and tensor headers."""

    config: dict[str, Any]
    tensors: dict[str, BaseTensor]

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    @property
    def shards(self) -> list[str]:
        return sorted({t.shard for t in self.tensors.values() if t.shard})


def parse_json_object(data: bytes, name: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise InvalidBase(f"{name} is larger than {MAX_JSON_BYTES} bytes", path=name)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidBase(f"{name} is not valid JSON ({exc})", path=name) from None
    if not isinstance(value, dict):
        raise InvalidBase(f"{name} must hold a JSON object", path=name)
    return value


def shard_files(files: Mapping[str, int], index: dict[str, Any] | None) -> list[str]:
    """The safetensors files that make up the checkpoint, in order.

    With an index, exactly the files its weight_map names (each must exist); without one, every
    top-level `*.safetensors` file.
    """
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise InvalidBase(f"{INDEX_JSON} has no valid weight_map", path=INDEX_JSON)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in files]
        if missing:
            raise InvalidBase(
                f"{INDEX_JSON} names shard(s) that are not in the folder: "
                f"{', '.join(missing[:3])}; copy the whole checkpoint",
                path=missing[0],
            )
        return shards
    shards = sorted(p for p in files if p.endswith(".safetensors") and "/" not in p)
    if not shards:
        raise InvalidBase(
            "no safetensors weights found (model.safetensors or shards with "
            f"{INDEX_JSON}); convert the checkpoint with save_pretrained(safe_serialization=True)"
        )
    return shards


def read_signature(files: Mapping[str, int], read: ReadRange) -> tuple[BaseSignature, int]:
    """(signature, bytes read) of a checkpoint given its file sizes and a ranged reader.

    Reads config.json, the index if any, and for each shard 8 bytes plus its header.
    """
    signature, _, bytes_read = read_checkpoint(files, read)
    return signature, bytes_read


def read_checkpoint(
    files: Mapping[str, int], read: ReadRange
) -> tuple[BaseSignature, dict[str, SafetensorsHeader], int]:
    """`read_signature` plus each shard's parsed header (tensor offsets: what a merge streams)."""
    bytes_read = 0

    def read_all(path: str) -> bytes:
        nonlocal bytes_read
        size = files[path]
        if size > MAX_JSON_BYTES:
            raise InvalidBase(f"{path} is larger than {MAX_JSON_BYTES} bytes", path=path)
        data = read(path, 0, size)
        bytes_read += len(data)
        return data

    if CONFIG_JSON not in files:
        raise InvalidBase(
            f"{CONFIG_JSON} is missing: a base model folder is what save_pretrained writes "
            "(config.json + safetensors weights)",
            path=CONFIG_JSON,
        )
    config = parse_json_object(read_all(CONFIG_JSON), CONFIG_JSON)
    index = parse_json_object(read_all(INDEX_JSON), INDEX_JSON) if INDEX_JSON in files else None
    tensors: dict[str, BaseTensor] = {}
    headers: dict[str, SafetensorsHeader] = {}
    for shard in shard_files(files, index):
        prefix = read(shard, 0, 8)
        length = header_length(prefix, file_size=files[shard], name=shard)
        raw = read(shard, 8, length)
        bytes_read += len(prefix) + len(raw)
        header = headers[shard] = parse_header(raw, file_size=files[shard], name=shard)
        for name, info in header.tensors.items():
            if name in tensors:
                raise InvalidBase(
                    f"tensor {name} is in both {tensors[name].shard} and {shard}", tensor=name
                )
            tensors[name] = BaseTensor(dtype=info.dtype, shape=list(info.shape), shard=shard)
    if index is not None:
        mapped = index["weight_map"]
        stray = sorted(set(mapped) ^ set(tensors))
        if stray:
            raise InvalidBase(
                f"{INDEX_JSON} and the shard headers disagree on {len(stray)} tensor(s), e.g. "
                f"{stray[0]}; the checkpoint is incomplete or mixed",
                tensor=stray[0],
            )
    return BaseSignature(config=config, tensors=tensors), headers, bytes_read
