"""registry.core.safetensors_header: headers read and checked without touching tensor data.

Files are built byte by byte here (u64 little-endian length + JSON + data, docs/peft-format.md
section 6) and also written by the real `safetensors` library.
"""

from __future__ import annotations

import builtins
import json
import struct
from pathlib import Path
from typing import IO, Any

import pytest

import registry.core.safetensors_header as module
from registry.core.errors import InvalidSafetensors
from registry.core.safetensors_header import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    header_length,
    parse_header,
    read_header_from_file,
)

# Bits per element, written out independently of the module (docs/peft-format.md section 6).
SPEC_DTYPE_BITS = {
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


def tensor(dtype: Any, shape: Any, begin: Any, end: Any = None) -> dict[str, Any]:
    offsets = begin if end is None else [begin, end]
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def file_bytes(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header, the data."""
    encoded = raw if raw is not None else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded + data


def parse(blob: bytes, name: str = "file") -> SafetensorsHeader:
    """What a caller does: read the length, then parse that many header bytes."""
    length = header_length(blob[:8], file_size=len(blob), name=name)
    return parse_header(blob[8 : 8 + length], file_size=len(blob), name=name)


# --- valid files built by hand -----------------------------------------------------------------


def test_parses_a_hand_built_file() -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "weight": tensor("F32", [2, 2], 0, 16),
        "ids": tensor("U8", [3], 16, 19),
    }
    blob = file_bytes(header, bytes(19))
    parsed = parse(blob)
    assert parsed.tensors == {
        "weight": TensorInfo("F32", (2, 2), 0, 16),
        "ids": TensorInfo("U8", (3,), 16, 19),
    }
    assert parsed.metadata == {"format": "pt"}
    assert parsed.header_length == len(json.dumps(header).encode())
    assert parsed.data_start == 8 + parsed.header_length


def test_tensor_info_reports_numel_and_nbytes() -> None:
    info = parse(file_bytes({"w": tensor("BF16", [3, 4], 0, 24)}, bytes(24))).tensors["w"]
    assert (info.numel, info.nbytes) == (12, 24)


def test_tensors_may_be_listed_in_any_order_in_the_json() -> None:
    header = {"b": tensor("U8", [2], 4, 6), "a": tensor("U8", [4], 0, 4)}
    assert set(parse(file_bytes(header, bytes(6))).tensors) == {"a", "b"}


def test_header_padded_with_trailing_spaces_is_accepted() -> None:
    raw = json.dumps({"a": tensor("U8", [1], 0, 1)}).encode() + b"      "
    assert parse(file_bytes(None, b"\x00", raw=raw)).header_length == len(raw)


def test_file_without_tensors_or_data_is_accepted() -> None:
    parsed = parse(file_bytes({}))
    assert (parsed.tensors, parsed.metadata) == ({}, {})


def test_metadata_null_is_read_as_no_metadata() -> None:
    # The reference implementation accepts `"__metadata__": null` too.
    assert parse(file_bytes({"__metadata__": None})).metadata == {}


def test_metadata_is_not_listed_as_a_tensor() -> None:
    parsed = parse(file_bytes({"__metadata__": {"k": "v"}, "a": tensor("U8", [1], 0, 1)}, b"1"))
    assert set(parsed.tensors) == {"a"}


@pytest.mark.parametrize(("dtype", "bits"), sorted(SPEC_DTYPE_BITS.items()))
def test_every_documented_dtype_is_accepted_with_its_element_size(dtype: str, bits: int) -> None:
    numel = 8  # whole bytes for every dtype, including the 4- and 6-bit ones
    nbytes = numel * bits // 8
    parsed = parse(file_bytes({"t": tensor(dtype, [2, 4], 0, nbytes)}, bytes(nbytes)))
    assert parsed.tensors["t"].nbytes == nbytes


@pytest.mark.parametrize("shape", [[0], [3, 0], [0, 0, 5]])
def test_empty_tensors_are_accepted(shape: list[int]) -> None:
    parsed = parse(file_bytes({"e": tensor("F32", shape, 0, 0)}))
    assert parsed.tensors["e"].numel == 0


def test_empty_tensor_between_other_tensors_is_accepted() -> None:
    header = {
        "a": tensor("U8", [4], 0, 4),
        "empty": tensor("F32", [0], 4, 4),
        "b": tensor("U8", [2], 4, 6),
    }
    assert len(parse(file_bytes(header, bytes(6))).tensors) == 3


def test_scalar_tensor_with_empty_shape_is_one_element() -> None:
    assert parse(file_bytes({"s": tensor("F64", [], 0, 8)}, bytes(8))).tensors["s"].numel == 1


def test_f4_with_even_numel_is_accepted() -> None:
    assert parse(file_bytes({"q": tensor("F4", [2, 3], 0, 3)}, bytes(3))).tensors["q"].numel == 6


@pytest.mark.parametrize("nbytes", [1, 2])
def test_f4_with_odd_numel_is_refused(nbytes: int) -> None:
    # 3 x 4 bits = 1.5 bytes: no whole number of bytes can hold it.
    with pytest.raises(InvalidSafetensors, match="'q'"):
        parse(file_bytes({"q": tensor("F4", [3], 0, nbytes)}, bytes(nbytes)))


def test_f6_must_pack_into_whole_bytes() -> None:
    assert parse(file_bytes({"q": tensor("F6_E2M3", [4], 0, 3)}, bytes(3))).tensors["q"]
    with pytest.raises(InvalidSafetensors):
        parse(file_bytes({"q": tensor("F6_E2M3", [2], 0, 2)}, bytes(2)))


# --- header_length -----------------------------------------------------------------------------


def test_header_length_reads_the_little_endian_u64() -> None:
    assert header_length(struct.pack("<Q", 258) + b"ignored") == 258


@pytest.mark.parametrize("prefix", [b"", b"\x00", b"\x00" * 7])
def test_files_shorter_than_8_bytes_are_refused(prefix: bytes) -> None:
    with pytest.raises(InvalidSafetensors, match="under 8 bytes"):
        header_length(prefix)


def test_header_length_at_the_cap_is_accepted() -> None:
    assert header_length(struct.pack("<Q", MAX_HEADER_BYTES)) == 25_000_000


@pytest.mark.parametrize("length", [25_000_001, 2**32, 2**64 - 1])
def test_header_length_over_25_000_000_is_refused(length: int) -> None:
    with pytest.raises(InvalidSafetensors, match="limit"):
        header_length(struct.pack("<Q", length))


def test_header_length_past_the_end_of_the_file_is_refused() -> None:
    blob = struct.pack("<Q", 100) + b"{}"
    with pytest.raises(InvalidSafetensors, match="past the end"):
        header_length(blob[:8], file_size=len(blob))


def test_header_length_exactly_to_the_end_of_the_file_is_accepted() -> None:
    blob = file_bytes({})
    assert header_length(blob[:8], file_size=len(blob)) == 2


# --- malformed headers -------------------------------------------------------------------------

NOT_JSON = "not UTF-8 JSON"
NOT_OBJECT = "must be a JSON object"
BAD_SHAPE = "invalid shape"
BAD_OFFSETS = "invalid data_offsets"
BAD_METADATA = "__metadata__ must map strings to strings"


def bad(header: Any, data: bytes, why: str) -> tuple[bytes, bytes, str]:
    return json.dumps(header).encode(), data, why


# id: (raw header bytes, data buffer, what the message must say)
MALFORMED: dict[str, tuple[bytes, bytes, str]] = {
    "not-utf8": (b'{"\xff\xfe": 1}', b"", NOT_JSON),
    "not-json": (b"{not json", b"", NOT_JSON),
    "truncated-json": (b'{"a": {"dtype": "U8"', b"", NOT_JSON),
    "empty-header": (b"", b"", NOT_JSON),
    "json-array": (b"[]", b"", NOT_OBJECT),
    "json-number": (b"1", b"", NOT_OBJECT),
    "json-string": (b'"x"', b"", NOT_OBJECT),
    "json-null": (b"null", b"", NOT_OBJECT),
    "entry-not-object": bad({"a": 1}, b"", "is not an object"),
    "entry-list": bad({"a": [0, 1]}, b"", "is not an object"),
    "unknown-dtype": bad({"a": tensor("F128", [1], 0, 16)}, bytes(16), "unknown dtype"),
    "lower-case-dtype": bad({"a": tensor("f32", [1], 0, 4)}, bytes(4), "unknown dtype"),
    "missing-dtype": bad({"a": {"shape": [1], "data_offsets": [0, 1]}}, b"1", "unknown dtype"),
    "negative-dim": bad({"a": tensor("U8", [-1], 0, 1)}, b"1", BAD_SHAPE),
    "float-dim": bad({"a": tensor("U8", [2.0], 0, 2)}, b"12", BAD_SHAPE),
    "bool-dim": bad({"a": tensor("U8", [True], 0, 1)}, b"1", BAD_SHAPE),
    "string-dim": bad({"a": tensor("U8", ["2"], 0, 2)}, b"12", BAD_SHAPE),
    "nested-dim": bad({"a": tensor("U8", [[2]], 0, 2)}, b"12", BAD_SHAPE),
    "shape-not-list": bad({"a": tensor("U8", 2, 0, 2)}, b"12", BAD_SHAPE),
    "missing-shape": bad({"a": {"dtype": "U8", "data_offsets": [0, 1]}}, b"1", BAD_SHAPE),
    "one-offset": bad({"a": tensor("U8", [1], [0])}, b"1", BAD_OFFSETS),
    "three-offsets": bad({"a": tensor("U8", [1], [0, 1, 1])}, b"1", BAD_OFFSETS),
    "begin-after-end": bad({"a": tensor("U8", [1], 1, 0)}, b"1", BAD_OFFSETS),
    "negative-offset": bad({"a": tensor("U8", [1], -1, 0)}, b"1", BAD_OFFSETS),
    "float-offsets": bad({"a": tensor("U8", [1], 0.0, 1.0)}, b"1", BAD_OFFSETS),
    "bool-offsets": bad({"a": tensor("U8", [1], False, True)}, b"1", BAD_OFFSETS),
    "string-offsets": bad({"a": tensor("U8", [1], "0,1")}, b"1", BAD_OFFSETS),
    "missing-offsets": bad({"a": {"dtype": "U8", "shape": [1]}}, b"1", BAD_OFFSETS),
    "span-too-small": bad({"a": tensor("F32", [2], 0, 4)}, bytes(4), "needs 8"),
    "span-too-large": bad({"a": tensor("F32", [2], 0, 12)}, bytes(12), "needs 8"),
    "overlap": bad(
        {"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 2, 6)}, bytes(6), "overlaps"
    ),
    "same-span": bad(
        {"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 0, 4)}, bytes(4), "overlaps"
    ),
    "gap-between": bad(
        {"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 6, 10)},
        bytes(10),
        "gap before tensor 'b'",
    ),
    "gap-at-start": bad({"a": tensor("U8", [4], 2, 6)}, bytes(6), "gap before tensor 'a'"),
    "data-outside-buffer": bad({"a": tensor("U8", [8], 0, 8)}, bytes(4), "outside the 4-byte"),
    "trailing-bytes": bad({"a": tensor("U8", [4], 0, 4)}, bytes(6), "2 bytes after the last"),
    "data-but-no-tensors": bad({}, b"junk", "4 bytes after the last"),
    "metadata-int-value": bad({"__metadata__": {"format": 1}}, b"", BAD_METADATA),
    "metadata-null-value": bad({"__metadata__": {"format": None}}, b"", BAD_METADATA),
    "metadata-list-value": bad({"__metadata__": {"format": ["pt"]}}, b"", BAD_METADATA),
    "metadata-object-value": bad({"__metadata__": {"f": {"a": "b"}}}, b"", BAD_METADATA),
    "metadata-string": bad({"__metadata__": "format=pt"}, b"", BAD_METADATA),
    "metadata-list": bad({"__metadata__": ["format", "pt"]}, b"", BAD_METADATA),
}


@pytest.mark.parametrize(("raw", "data", "why"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers_are_refused_saying_why(raw: bytes, data: bytes, why: str) -> None:
    with pytest.raises(InvalidSafetensors, match="invalid safetensors header") as excinfo:
        parse(file_bytes(None, data, raw=raw))
    assert why in excinfo.value.message


def test_refusals_name_the_file_and_the_tensor() -> None:
    header = {"ok": tensor("U8", [1], 0, 1), "broken": tensor("F32", [2], 1, 5)}
    with pytest.raises(InvalidSafetensors) as excinfo:
        parse(file_bytes(header, bytes(5)), name="adapter_model.safetensors")
    assert excinfo.value.message.startswith("adapter_model.safetensors: ")
    assert "'broken'" in excinfo.value.message
    assert excinfo.value.details == {"path": "adapter_model.safetensors", "tensor": "broken"}


@pytest.mark.parametrize("metadata", [[], "", 0, False], ids=["list", "string", "zero", "false"])
def test_falsy_non_object_metadata_is_refused(metadata: Any) -> None:
    with pytest.raises(InvalidSafetensors):
        parse(file_bytes({"__metadata__": metadata}))


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}], ids=["list", "object"])
def test_unhashable_dtype_is_refused_with_invalid_safetensors(dtype: Any) -> None:
    with pytest.raises(InvalidSafetensors):
        parse(file_bytes({"a": tensor(dtype, [1], 0, 4)}, bytes(4)))


def test_deeply_nested_json_is_refused_with_invalid_safetensors() -> None:
    with pytest.raises(InvalidSafetensors):
        parse(file_bytes(None, raw=b"[" * 100_000))


# --- files written by the safetensors library --------------------------------------------------


@pytest.fixture(scope="module")
def torch_module() -> Any:
    import torch  # imported lazily: only these tests need it

    return torch


def save(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def test_real_file_parses_with_matching_dtypes_and_shapes(
    torch_module: Any, tmp_path: Path
) -> None:
    torch = torch_module
    tensors = {
        "w": torch.randn(3, 4),
        "half": torch.zeros(5, dtype=torch.float16),
        "bf": torch.zeros(2, 3, dtype=torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "bytes": torch.zeros(7, dtype=torch.uint8),
        "flags": torch.zeros(3, dtype=torch.bool),
        "double": torch.zeros(1, dtype=torch.float64),
        "empty": torch.zeros(0),
    }
    torch_to_safetensors = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.float64: "F64",
    }
    path = save(tmp_path / "real.safetensors", tensors, {"format": "pt"})

    parsed = read_header_from_file(str(path))

    assert set(parsed.tensors) == set(tensors)
    for tensor_name, value in tensors.items():
        info = parsed.tensors[tensor_name]
        assert info.dtype == torch_to_safetensors[value.dtype], tensor_name
        assert info.shape == tuple(value.shape), tensor_name
        assert info.nbytes == value.numel() * value.element_size(), tensor_name
    assert parsed.metadata == {"format": "pt"}
    assert parsed.data_start + sum(i.nbytes for i in parsed.tensors.values()) == (
        path.stat().st_size
    )


def test_real_file_offsets_point_at_the_tensor_bytes(torch_module: Any, tmp_path: Path) -> None:
    torch = torch_module
    values = {"a": torch.arange(4, dtype=torch.int32), "b": torch.arange(3, dtype=torch.int16)}
    path = save(tmp_path / "x.safetensors", values)
    parsed = read_header_from_file(str(path))
    content = path.read_bytes()
    for tensor_name, value in values.items():
        info = parsed.tensors[tensor_name]
        raw = content[parsed.data_start + info.begin : parsed.data_start + info.end]
        assert raw == value.numpy().tobytes(), tensor_name


def test_truncated_real_file_is_refused_naming_the_label(torch_module: Any, tmp_path: Path) -> None:
    path = save(tmp_path / "t.safetensors", {"w": torch_module.zeros(16)})
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(InvalidSafetensors, match=r"^weights: ") as excinfo:
        read_header_from_file(str(path), name="weights")
    assert excinfo.value.details["path"] == "weights"


def test_read_header_from_file_labels_errors_with_the_path_by_default(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidSafetensors) as excinfo:
        read_header_from_file(str(path))
    assert excinfo.value.message.startswith(f"{path}: ")


def test_read_header_from_file_reads_only_the_header(
    torch_module: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(tmp_path / "big.safetensors", {"big": torch_module.zeros(256 * 1024)})  # 1 MiB
    size = path.stat().st_size
    assert size > 1024 * 1024

    handles: list[IO[bytes]] = []
    bytes_read: list[int] = []

    class CountingReader:
        """Unbuffered file whose reads are counted, so read-ahead cannot hide anything."""

        def __init__(self, file: str, mode: str = "r") -> None:
            self._file = builtins.open(file, mode, buffering=0)  # noqa: SIM115 (closed in __exit__)
            handles.append(self._file)

        def read(self, n: int = -1) -> bytes:
            chunk = self._file.read(n)
            bytes_read.append(len(chunk))
            return chunk

        def __enter__(self) -> CountingReader:
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.close()

    # The module calls the builtin `open`; a module global of that name shadows it.
    monkeypatch.setattr(module, "open", CountingReader, raising=False)

    parsed = read_header_from_file(str(path))

    assert len(handles) == 1
    assert sum(bytes_read) == 8 + parsed.header_length
    assert sum(bytes_read) < 1024
    assert parsed.tensors["big"].nbytes == 1024 * 1024
