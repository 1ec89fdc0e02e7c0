"""registry.core.manifest: file paths, manifest validation and the version digest."""

from __future__ import annotations

import hashlib
import io
import itertools
import re
from collections.abc import Callable

import pytest

from registry.core.errors import (
    InvalidPath,
    MissingFile,
    PickleRefused,
    TooManyFiles,
    VersionTooLarge,
)
from registry.core.manifest import (
    CONFIG_FILE,
    DEFAULT_MAX_FILES,
    WEIGHTS_FILE,
    FileEntry,
    blob_key,
    canonical_manifest,
    check_manifest,
    check_path,
    hash_stream,
    manifest_digest,
)


def sha_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def entry(path: str, size: int = 10, sha256: str | None = None) -> FileEntry:
    return FileEntry(path, size, sha256 if sha256 is not None else sha_of(path))


def adapter_files(*extra: FileEntry) -> list[FileEntry]:
    """A minimal valid manifest (the two required files) plus `extra`."""
    return [entry(CONFIG_FILE, 300), entry(WEIGHTS_FILE, 4096), *extra]


# --- check_path --------------------------------------------------------------------------------

VALID_PATHS = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    ".gitattributes",
    "a/b/c.txt",
    "a/.hidden",
    "..a",
    "a..b",
    "a/b..",
    "sub dir/file name.txt",
    "\u00e9t\u00e9/caf\u00e9.txt",
    "a" * 255,
    "\u00e9" * 127 + "a",  # 255 bytes in UTF-8
    "x/" * 126 + "end",  # 255 bytes, many parts
]


@pytest.mark.parametrize("path", VALID_PATHS)
def test_check_path_accepts_relative_normalised_paths(path: str) -> None:
    assert check_path(path) == path


INVALID_PATHS = {
    "empty": "",
    "dot-dot": "..",
    "dot-dot-first": "../a",
    "dot-dot-middle": "a/../b",
    "dot-dot-last": "a/..",
    "absolute": "/etc/passwd",
    "root": "/",
    "double-leading-slash": "//a",
    "windows-drive-slash": "C:/Windows/x",
    "windows-drive-relative": "c:x",
    "windows-drive-backslash": "C:\\x",
    "backslash": "a\\b",
    "backslash-dot-dot": "..\\a",
    "nul": "a\x00b",
    "newline": "a\nb",
    "carriage-return": "a\rb",
    "tab": "a\tb",
    "unit-separator": "a\x1fb",
    "delete": "a\x7fb",
    "256-ascii-bytes": "a" * 256,
    "double-slash": "a//b",
    "dot-slash": "./a",
    "trailing-slash": "a/",
    "dot-part": "a/./b",
    "trailing-dot-part": "a/.",
    "dot-slash-only": "./",
}


@pytest.mark.parametrize("path", INVALID_PATHS.values(), ids=INVALID_PATHS.keys())
def test_check_path_refuses_unsafe_or_non_normalised_paths(path: str) -> None:
    with pytest.raises(InvalidPath) as excinfo:
        check_path(path)
    assert excinfo.value.details["path"] == path


def test_check_path_limit_counts_utf8_bytes_not_characters() -> None:
    path = "\u00e9" * 128  # 128 characters, 256 bytes
    assert len(path) < 255 < len(path.encode("utf-8"))
    with pytest.raises(InvalidPath, match="255 bytes"):
        check_path(path)


def test_check_path_accepts_exactly_255_bytes_of_multibyte_text() -> None:
    path = "\u20ac" * 85  # three bytes each
    assert len(path.encode("utf-8")) == 255
    assert check_path(path) == path


def test_check_path_refuses_a_lone_dot() -> None:
    with pytest.raises(InvalidPath):
        check_path(".")


# --- check_manifest ----------------------------------------------------------------------------


def test_check_manifest_accepts_the_two_required_files() -> None:
    files = adapter_files()
    assert check_manifest(files) == sorted(files)


def test_check_manifest_returns_entries_sorted_by_path() -> None:
    files = adapter_files(entry("z.txt"), entry("a/b.txt"), entry("README.md"))
    result = check_manifest(reversed(files))
    assert [e.path for e in result] == sorted(e.path for e in files)
    assert set(result) == set(files)


def test_check_manifest_accepts_a_generator() -> None:
    files = adapter_files(entry("README.md"))
    assert len(check_manifest(f for f in files)) == 3


@pytest.mark.parametrize(
    "path",
    [
        "pytorch_model.bin",
        "adapter_model.bin",
        "training_args.bin",
        "optimizer.pt",
        "scheduler.pth",
        "state.pkl",
        "state.pickle",
        "last.ckpt",
        "checkpoint-100/optimizer.pt",
        "ADAPTER_MODEL.BIN",
        "weights.Pt",
    ],
)
def test_check_manifest_refuses_pickle_files_pointing_to_safetensors(path: str) -> None:
    with pytest.raises(PickleRefused) as excinfo:
        check_manifest(adapter_files(entry(path)))
    assert "safetensors" in excinfo.value.message
    assert path in excinfo.value.message
    assert excinfo.value.details["path"] == path


@pytest.mark.parametrize("path", ["model.binary", "notes.bin.txt", "bin", "pt/readme.md"])
def test_check_manifest_accepts_names_that_only_contain_a_pickle_suffix(path: str) -> None:
    assert path in [e.path for e in check_manifest(adapter_files(entry(path)))]


def test_check_manifest_refuses_duplicate_paths() -> None:
    with pytest.raises(InvalidPath, match="duplicate") as excinfo:
        check_manifest(adapter_files(entry("README.md", 1), entry("README.md", 2)))
    assert excinfo.value.details["path"] == "README.md"


def test_check_manifest_refuses_identical_duplicate_entries() -> None:
    with pytest.raises(InvalidPath, match="duplicate"):
        check_manifest(adapter_files(entry("README.md"), entry("README.md")))


@pytest.mark.parametrize("path", ["../escape", "/abs", "a\\b", "a//b"])
def test_check_manifest_refuses_bad_paths(path: str) -> None:
    with pytest.raises(InvalidPath):
        check_manifest(adapter_files(entry(path)))


@pytest.mark.parametrize(
    "sha256", ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, "sha256:" + "0" * 64]
)
def test_check_manifest_refuses_malformed_sha256(sha256: str) -> None:
    with pytest.raises(InvalidPath, match="sha256"):
        check_manifest(adapter_files(entry("README.md", sha256=sha256)))


def test_check_manifest_refuses_negative_sizes() -> None:
    with pytest.raises(InvalidPath, match="negative"):
        check_manifest(adapter_files(entry("README.md", -1)))


def test_check_manifest_accepts_empty_files() -> None:
    assert check_manifest(adapter_files(entry("empty.txt", 0)))[-1].size == 0


def test_check_manifest_refuses_more_than_max_files() -> None:
    files = adapter_files(entry("a.txt"), entry("b.txt"))
    with pytest.raises(TooManyFiles) as excinfo:
        check_manifest(files, max_files=3)
    assert excinfo.value.details == {"count": 4, "limit": 3}


def test_check_manifest_accepts_exactly_max_files() -> None:
    assert len(check_manifest(adapter_files(entry("a.txt")), max_files=3)) == 3


def test_check_manifest_default_limit_is_1000_files() -> None:
    extra = [entry(f"f{i:04d}.txt", 1) for i in range(DEFAULT_MAX_FILES - 2)]
    assert len(check_manifest(adapter_files(*extra))) == DEFAULT_MAX_FILES
    with pytest.raises(TooManyFiles):
        check_manifest(adapter_files(*extra, entry("one-more.txt", 1)))


def test_check_manifest_refuses_versions_larger_than_max_bytes() -> None:
    files = [entry(CONFIG_FILE, 100), entry(WEIGHTS_FILE, 900), entry("README.md", 1)]
    with pytest.raises(VersionTooLarge) as excinfo:
        check_manifest(files, max_bytes=1000)
    assert excinfo.value.status == 413
    assert excinfo.value.details == {"size": 1001, "limit": 1000}
    assert "LORA_REG_MAX_VERSION_BYTES" in excinfo.value.message


def test_check_manifest_names_the_kind_of_manifest_and_its_limit() -> None:
    files = [entry("config.json", 100), entry("model.safetensors", 901)]
    with pytest.raises(VersionTooLarge, match=r"the base is 1001 bytes.*LORA_REG_MAX_BASE_BYTES"):
        check_manifest(
            files, max_bytes=1000, required=(), what="base", size_setting="LORA_REG_MAX_BASE_BYTES"
        )


def test_check_manifest_accepts_a_version_of_exactly_max_bytes() -> None:
    files = [entry(CONFIG_FILE, 100), entry(WEIGHTS_FILE, 900)]
    assert check_manifest(files, max_bytes=1000) == sorted(files)


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_check_manifest_refuses_a_missing_required_file(missing: str) -> None:
    files = [f for f in adapter_files(entry("README.md")) if f.path != missing]
    with pytest.raises(MissingFile) as excinfo:
        check_manifest(files)
    assert excinfo.value.details["path"] == missing
    assert missing in excinfo.value.message


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_required_files_in_a_subfolder_do_not_count(missing: str) -> None:
    files = [f if f.path != missing else entry(f"sub/{missing}") for f in adapter_files()]
    with pytest.raises(MissingFile):
        check_manifest(files)


def test_check_manifest_refuses_an_empty_manifest() -> None:
    with pytest.raises(MissingFile):
        check_manifest([])


# --- digests -----------------------------------------------------------------------------------


def spec_digest(files: list[FileEntry]) -> str:
    """The digest as docs/architecture.md §3 words it: sha256 of sorted `path size sha256` lines,
    each ending in a newline. (Sorting lines and sorting by path agree for paths without spaces.)"""
    lines = sorted(f"{f.path} {f.size} {f.sha256}\n" for f in files)
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


MANIFEST = adapter_files(entry("README.md", 5), entry("sub/x.json", 7), entry("\u00e9.txt", 3))


def test_manifest_digest_is_sha256_of_the_canonical_text() -> None:
    assert manifest_digest(MANIFEST) == spec_digest(MANIFEST)


def test_manifest_digest_has_the_sha256_prefix_and_64_hex() -> None:
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", manifest_digest(MANIFEST))


def test_canonical_manifest_is_one_line_per_file_sorted_by_path() -> None:
    files = [FileEntry("b.txt", 2, "b" * 64), FileEntry("a.txt", 10, "a" * 64)]
    assert canonical_manifest(files) == (
        b"a.txt 10 " + b"a" * 64 + b"\nb.txt 2 " + b"b" * 64 + b"\n"
    )


def test_canonical_manifest_encodes_paths_as_utf8() -> None:
    text = canonical_manifest([FileEntry("\u00e9", 1, "c" * 64)])
    assert text == "\u00e9 1 ".encode() + b"c" * 64 + b"\n"


def test_canonical_manifest_orders_by_path_when_paths_contain_spaces() -> None:
    # "a" sorts before "a 0" as a path, but "a 5 ..." sorts after "a 0 3 ..." as a line: the
    # implementation orders by path (the module docstring), as docs/architecture.md §3 says.
    files = [FileEntry("a 0", 3, "d" * 64), FileEntry("a", 5, "e" * 64)]
    assert canonical_manifest(files).startswith(b"a 5 ")


def test_manifest_digest_of_no_files_is_sha256_of_empty_text() -> None:
    assert manifest_digest([]) == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_manifest_digest_does_not_depend_on_order() -> None:
    digests = {manifest_digest(order) for order in itertools.permutations(MANIFEST)}
    assert len(digests) == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda e: FileEntry(e.path + "x", e.size, e.sha256), id="path"),
        pytest.param(lambda e: FileEntry(e.path, e.size + 1, e.sha256), id="size"),
        pytest.param(lambda e: FileEntry(e.path, e.size, sha_of("other")), id="sha256"),
    ],
)
@pytest.mark.parametrize("index", range(len(MANIFEST)))
def test_manifest_digest_changes_when_any_field_of_any_file_changes(
    change: Callable[[FileEntry], FileEntry], index: int
) -> None:
    changed = list(MANIFEST)
    changed[index] = change(changed[index])
    assert manifest_digest(changed) != manifest_digest(MANIFEST)


def test_manifest_digest_changes_when_a_file_is_added() -> None:
    assert manifest_digest([*MANIFEST, entry("new.txt")]) != manifest_digest(MANIFEST)


def test_file_entry_digest_has_the_sha256_prefix() -> None:
    assert entry("a", sha256="f" * 64).digest == "sha256:" + "f" * 64


# --- hashing and blob keys ---------------------------------------------------------------------


def test_hash_stream_returns_size_and_sha256_of_the_rest_of_the_stream() -> None:
    data = bytes(range(256)) * 100
    stream = io.BytesIO(b"skip" + data)
    stream.read(4)
    assert hash_stream(stream) == (len(data), hashlib.sha256(data).hexdigest())


def test_hash_stream_of_an_empty_stream() -> None:
    assert hash_stream(io.BytesIO()) == (0, hashlib.sha256(b"").hexdigest())


def test_blob_key_fans_out_by_the_first_two_hex_digits() -> None:
    sha = "ab" + "0" * 62
    assert blob_key(sha) == f"blobs/sha256/ab/{sha}"
