"""Compatibility checks read headers, never tensor data: counted by the OS and by the store.

- A local check (`lora-reg check DIR --base DIR`) reads config files and safetensors headers only:
  measured with the kernel's per-process read counter (`/proc/self/io` rchar) in a subprocess,
  against a base with 64 MiB of weights.
- A check against a registered base reads no base bytes at all (its signature is in SQL) and only
  the adapter's config and header from the object store: counted by a store wrapper in the
  server, with the whole client flow (`base add --upload`, push, check) running in process.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cli.client import Registry
from registry.app import create_app
from registry.db import upgrade
from registry.settings import Settings
from registry.storage.folder import FolderStore
from tests.conftest import ROOT, unique_name

# A llama-shaped base whose embeddings hold 2 x 64 MiB of float32 weights.
BIG_VOCAB = 262_144


def header_bytes(folder: Path, configs: tuple[str, ...]) -> int:
    """The named JSON files plus 8 + N header bytes per safetensors file, computed here."""
    total = sum((folder / name).stat().st_size for name in configs if (folder / name).exists())
    for path in folder.glob("*.safetensors"):
        total += 8 + _header_length(path)
    return total


MEASURE = """
import json, sys
from pathlib import Path
from cli.bases import folder_signature, local_check

def rchar():
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(fields["rchar"])

adapter, small, big = map(Path, sys.argv[1:4])
local_check(adapter, folder_signature(small).signature)  # warm up imports and caches
before = rchar()
base = folder_signature(big)
report, adapter_read = local_check(adapter, base.signature)
after = rchar()
print(json.dumps({"rchar": after - before, "base_read": base.bytes_read,
                  "adapter_read": adapter_read, "compatible": report.compatible}))
"""


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_a_local_check_reads_only_headers(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]
) -> None:
    adapter = adapter_dir("llama")
    big = base_dir("llama", vocab_size=BIG_VOCAB)
    weights = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    assert weights > 128 * 1024 * 1024
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(adapter), str(base_dir("llama")), str(big)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(done.stdout)
    assert measured["compatible"] is True
    assert measured["base_read"] == header_bytes(
        big, ("config.json", "model.safetensors.index.json")
    )
    assert measured["adapter_read"] == header_bytes(adapter, ("adapter_config.json",))
    # What the kernel saw: the headers, and nothing near the size of the weights.
    assert measured["rchar"] < 1024 * 1024 < weights


class CountingStore(FolderStore):
    """The folder store, counting the bytes read from each blob."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.read: Counter[str] = Counter()

    def read_range(self, sha256: str, start: int, length: int) -> bytes:
        data = super().read_range(sha256, start, length)
        self.read[sha256] += len(data)
        return data

    def iter_blob(self, sha256: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        for chunk in super().iter_blob(sha256, chunk_size):
            self.read[sha256] += len(chunk)
            yield chunk


def test_checks_against_a_registered_base_read_no_base_bytes(
    tmp_path: Path, adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{tmp_path}/objects",
        auth=False,
    )
    upgrade(settings)
    app = create_app(settings)
    store = CountingStore(tmp_path / "objects")
    app.state.store = store
    source = base_dir("llama", max_shard_size="40KB")
    adapter = adapter_dir("llama", target_modules="all-linear")
    with (
        TestClient(app, base_url="http://127.0.0.1") as http,
        Registry("http://127.0.0.1", cache_dir=tmp_path / "c") as client,
    ):
        client.http = http  # the real client, talking to the in-process app
        added = client.add_base("org/tiny@v1", source, upload=True).base
        assert added.stored and added.files
        shards = {f.sha256: f for f in added.files if f.path.endswith(".safetensors")}
        # Registration read each stored shard's header, nothing more.
        assert {sha: store.read[sha] for sha in shards} == {
            sha: 8 + _header_length(source / f.path) for sha, f in shards.items()
        }

        store.read.clear()
        version = client.push(adapter, unique_name(), base="org/tiny@v1").version
        assert version.compat_status == "compatible"
        store.read.clear()
        report = client.check(f"{version.adapter}@1")
        assert report.compatible and len(report.modules) == 14

    files = {f.path: f for f in version.files or []}
    config, weights = files["adapter_config.json"], files["adapter_model.safetensors"]
    assert dict(store.read) == {
        config.sha256: config.size,
        weights.sha256: 8 + _header_length(adapter / "adapter_model.safetensors"),
    }
    assert not set(store.read) & set(shards)


def _header_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return int(struct.unpack("<Q", handle.read(8))[0])
