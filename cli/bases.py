"""Reading base models and adapters on the client side, headers only.

`folder_signature` reads a local checkpoint folder, `hub_signature` a Hugging Face repository
through huggingface_hub's ranged header reads (honouring HF_TOKEN and HF_ENDPOINT), and
`local_check` runs the pure checker on a local adapter folder. Nothing here reads tensor data;
`bytes_read` in every result says how much was read. Used by the CLI and the `Registry` client.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.folders import walk_files
from registry.core.basemodel import (
    CONFIG_JSON,
    BaseSignature,
    BaseTensor,
    parse_json_object,
    read_signature,
)
from registry.core.compat import CompatReport, check_compatibility
from registry.core.errors import InvalidBase, InvalidInput, Unavailable
from registry.core.manifest import CONFIG_FILE, WEIGHTS_FILE
from registry.core.peft import check_config_size, parse_adapter_config
from registry.core.profiles import bind
from registry.core.safetensors_header import SafetensorsHeader, header_length, parse_header


@dataclass
class LocalBase:
    signature: BaseSignature
    bytes_read: int
    revision: str | None = None  # resolved commit (Hub)


class FolderReader:
    """Ranged reads of the files in a folder, counting every byte read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bytes_read = 0

    def files(self) -> dict[str, int]:
        """Relative path -> size of the files `cli.folders.walk_files` takes (links included
        only where a push would follow them)."""
        return {
            path.relative_to(self.root).as_posix(): path.stat().st_size
            for path in walk_files(self.root)
        }

    def read(self, path: str, start: int, length: int) -> bytes:
        with open(self.root / path, "rb") as handle:
            handle.seek(start)
            data = handle.read(length)
        self.bytes_read += len(data)
        return data


def folder_signature(directory: Path) -> LocalBase:
    """The signature of a checkpoint folder (config.json + safetensors), headers only."""
    reader = FolderReader(Path(directory))
    signature, _ = read_signature(reader.files(), reader.read)
    return LocalBase(signature, reader.bytes_read)


def read_adapter(directory: Path) -> tuple[dict[str, Any], SafetensorsHeader, int]:
    """(adapter_config.json, weights header, bytes read) of a local adapter folder."""
    reader = FolderReader(Path(directory))
    files = reader.files()
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise InvalidInput(f"{directory} has no {required}: is it a PEFT adapter folder?")
    check_config_size(files[CONFIG_FILE])
    summary = parse_adapter_config(reader.read(CONFIG_FILE, 0, files[CONFIG_FILE]))
    size = files[WEIGHTS_FILE]
    length = header_length(reader.read(WEIGHTS_FILE, 0, 8), file_size=size, name=WEIGHTS_FILE)
    header = parse_header(reader.read(WEIGHTS_FILE, 8, length), file_size=size, name=WEIGHTS_FILE)
    return summary.raw, header, reader.bytes_read


def local_check(
    adapter_dir: Path,
    base: BaseSignature,
    *,
    base_id: str | None = None,
    base_revision: str | None = None,
    profile: str | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[CompatReport, int]:
    """(report, adapter bytes read) for a local adapter folder against a base signature."""
    bound, values = bind(profile, options)
    config, header, read = read_adapter(adapter_dir)
    report = check_compatibility(
        config,
        header.tensors,
        base,
        base_id=base_id,
        base_revision=base_revision,
        profile=bound,
        options=values,
    )
    return report, read


def hub_signature(repo_id: str, revision: str | None) -> LocalBase:
    """A Hub repository's signature: config.json plus safetensors headers by ranged GETs.

    The revision is resolved to its commit so the registry records exactly what was read.
    """
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise InvalidInput(
            "--from hf needs huggingface_hub: pip install 'lora-registry[worker]'"
        ) from exc
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=os.environ.get("HF_TOKEN"))
    with hub_read_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision)
        commit = info.sha or revision
        config_path = hf_hub_download(
            repo_id, CONFIG_JSON, revision=commit, token=os.environ.get("HF_TOKEN")
        )
        metadata = api.get_safetensors_metadata(repo_id, revision=commit)
    config_bytes = Path(config_path).read_bytes()
    config = parse_json_object(config_bytes, CONFIG_JSON)
    tensors: dict[str, BaseTensor] = {}
    read = len(config_bytes)
    for shard, file_meta in sorted(metadata.files_metadata.items()):
        for name, tensor in file_meta.tensors.items():
            tensors[name] = BaseTensor(dtype=tensor.dtype, shape=list(tensor.shape), shard=shard)
    if not tensors:
        raise InvalidBase(f"{repo_id} has no safetensors weights on the Hub")
    return LocalBase(BaseSignature(config=config, tensors=tensors), read, commit)


@contextmanager
def hub_read_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Reading a model from the Hub: its errors as registry errors. An id the library rejects or
    a repository it will not show (401/403/404) is `InvalidBase`; anything else `Unavailable`."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        yield
    except HFValidationError as exc:
        raise InvalidBase(f"{repo_id!r} is not a Hugging Face repository id: {exc}") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403, 404):
            raise InvalidBase(
                f"{repo_id}@{revision or 'main'} is not readable on the Hub (HTTP {status}); check "
                "the id and revision, and set HF_TOKEN for private or gated models"
            ) from exc
        raise Unavailable(f"the Hugging Face Hub did not answer for {repo_id}: {exc}") from exc
    except hub_network_errors() as exc:
        raise Unavailable(f"cannot reach the Hugging Face Hub for {repo_id}: {exc}") from exc


def hub_network_errors() -> tuple[type[Exception], ...]:
    """Connection failures as the installed huggingface_hub raises them: httpx2 (2.x) or httpx
    (1.x) transport errors, or OSError (requests in 0.x; a cache miss while offline)."""
    errors: list[type[Exception]] = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)
