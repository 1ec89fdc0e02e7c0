"""Reading and validating safetensors headers without touching tensor data.

File layout: an 8-byte little-endian u64 N, N bytes of UTF-8 JSON, then the data buffer. The JSON
maps tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (relative to byte 8 + N),
plus an optional "__metadata__" of string to string. Callers read the first 8 bytes, ask
`header_length` how many more to read, then call `parse_header` with the file size so that offsets
can be checked against it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from registry.core.errors import InvalidSafetensors

# Largest header accepted; huggingface_hub's remote reader uses the same cap.
MAX_HEADER_BYTES = 25_000_000

# Bits per element; sub-byte types (F4, F6) must pack into whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_length: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_length


def header_length(prefix: bytes, *, file_size: int | None = None, name: str = "file") -> int:
    """N from the first 8 bytes, checked against the size limit and the file size."""
    if len(prefix) < 8:
        raise InvalidSafetensors(f"{name}: too short to be a safetensors file (under 8 bytes)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise InvalidSafetensors(
            f"{name}: safetensors header of {length} bytes is larger than the "
            f"{MAX_HEADER_BYTES}-byte limit; the file is corrupt or not safetensors",
            path=name,
        )
    if file_size is not None and 8 + length > file_size:
        raise InvalidSafetensors(
            f"{name}: header length {length} runs past the end of the {file_size}-byte file",
            path=name,
        )
    return int(length)


def parse_header(raw: bytes, *, file_size: int, name: str = "file") -> SafetensorsHeader:
    """Validate a header: JSON shape, known dtypes, and offsets that tile the data exactly.

    `raw` is the N header bytes (without the 8-byte length prefix). Offsets must be sorted,
    contiguous from 0, each span must equal numel x dtype size, and the last must end at the end
    of the file.
    """

    def bad(why: str, **details: object) -> InvalidSafetensors:
        return InvalidSafetensors(
            f"{name}: invalid safetensors header: {why}", path=name, **details
        )

    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad(f"not UTF-8 JSON ({exc})") from None
    if not isinstance(document, dict):
        raise bad("the header must be a JSON object")

    metadata_raw = document.pop("__metadata__", None)
    if metadata_raw is None:
        metadata_raw = {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise bad("__metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    for tensor_name, spec in document.items():
        if not isinstance(spec, dict):
            raise bad(f"entry {tensor_name!r} is not an object", tensor=tensor_name)
        dtype = spec.get("dtype")
        shape = spec.get("shape")
        offsets = spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad(
                f"tensor {tensor_name!r} has unknown dtype {dtype!r} "
                f"(known: {', '.join(sorted(DTYPE_BITS))})",
                tensor=tensor_name,
            )
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {tensor_name!r} has an invalid shape {shape!r}", tensor=tensor_name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise bad(
                f"tensor {tensor_name!r} has invalid data_offsets {offsets!r}", tensor=tensor_name
            )
        info = TensorInfo(str(dtype), tuple(shape), offsets[0], offsets[1])
        bits = info.numel * DTYPE_BITS[info.dtype]
        if bits % 8 or bits // 8 != info.nbytes:
            raise bad(
                f"tensor {tensor_name!r} spans {info.nbytes} bytes but {info.dtype}{list(shape)} "
                f"needs {bits / 8:g}",
                tensor=tensor_name,
            )
        tensors[tensor_name] = info

    data_size = file_size - 8 - len(raw)
    position = 0
    for tensor_name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < position:
            raise bad(f"tensor {tensor_name!r} overlaps the previous tensor", tensor=tensor_name)
        if info.begin > position:
            raise bad(
                f"gap before tensor {tensor_name!r} (spans must be contiguous)", tensor=tensor_name
            )
        if info.end > data_size:
            raise bad(
                f"tensor {tensor_name!r} ends at byte {info.end}, outside the {data_size}-byte "
                "data buffer",
                tensor=tensor_name,
            )
        position = info.end
    if position != data_size:
        raise bad(f"{data_size - position} bytes after the last tensor (file size mismatch)")
    return SafetensorsHeader(tensors, dict(metadata_raw), len(raw))


def read_header_from_file(path: str, *, name: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of a local file, reading only the header bytes."""
    import os

    label = name or path
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        length = header_length(handle.read(8), file_size=size, name=label)
        raw = handle.read(length)
    return parse_header(raw, file_size=size, name=label)
