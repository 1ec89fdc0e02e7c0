"""The streaming merge engine: base checkpoint + one LoRA adapter -> merged checkpoint folder.

Weights are never loaded through transformers. The engine reads safetensors headers, asks
`worker.plan` what happens to each tensor, writes every output shard's header up front (shapes
and dtypes are known from the plan) and then streams tensor data through three stages:

    reader thread  --(tensor bytes)-->  compute (this thread)  --(bytes)-->  writer thread
    ranged reads of the next tensors    float32 on the device            writes + sha256

A byte budget of 1.5x the largest tensor bounds what is in flight, so peak memory depends
on the largest tensor, not on the model; merged tensors are computed in row blocks and written
back into their input buffer. The math is PEFT's `merge_and_unload` (PEFT_FORMAT.md §3), in the
same float32 order, so CPU output is bit-identical to PEFT's. Same inputs give byte-identical
files: the headers, metadata, config and model card depend on nothing but the inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from registry.core.basemodel import (
    CONFIG_JSON,
    INDEX_JSON,
    BaseSignature,
    parse_json_object,
    read_checkpoint,
)
from registry.core.compat import CompatReport
from registry.core.errors import InvalidInput, NonFiniteResult, OutputExists
from registry.core.jobs import Progress
from registry.core.manifest import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FileEntry,
    hash_stream,
    manifest_digest,
)
from registry.core.safetensors_header import SafetensorsHeader, read_header_from_file
from worker.plan import MergePlan, TensorPlan, plan_merge
from worker.sources import WEIGHT_SUFFIXES, FolderSource, Source, read_bytes

ENGINE_VERSION = "lora-registry-merge/1"
# Rows of a merged tensor are processed in blocks of about this many float32 elements.
BLOCK_ELEMENTS = 4 << 20
TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# Not copied from the base: weights (rewritten), the index (rewritten), the model card (ours).
SKIPPED_FILES = (INDEX_JSON, "README.md")


@dataclass(frozen=True)
class MergeOptions:
    dtype: str | None = None  # "bfloat16" | "float16" | "float32"; None keeps each base dtype
    untie: bool = False  # write a separate lm_head when the adapter touches tied embeddings
    device: str = "auto"  # auto | cpu | cuda; not part of the result's identity

    def identity(self) -> dict[str, Any]:
        """The options that change the output bytes (memoization, provenance)."""
        return {"dtype": self.dtype, "untie": self.untie}


@dataclass
class MergeResult:
    files: list[FileEntry]
    report: CompatReport
    tensors_total: int
    tensors_merged: int
    device: str
    config_changes: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        return manifest_digest(self.files)


class MergeCancelled(Exception):
    """Raised inside a merge when its `cancelled` callback says so."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("--device cuda was asked for, but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise InvalidInput(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def merge(
    adapter: Path,
    base: Path | Source,
    out: Path,
    *,
    options: MergeOptions | None = None,
    provenance: Mapping[str, str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_file: Callable[[FileEntry], None] | None = None,
    base_id: str | None = None,
    base_revision: str | None = None,
) -> MergeResult:
    """Merge the PEFT adapter folder `adapter` into `base`, writing the result into `out`.

    `out` must be missing or empty; callers stage and publish it (`merge_to_folder`). Raises
    `Incompatible` (with the report) before reading any weight when the merge is not well
    defined, and `NonFiniteResult` naming the tensor when a result holds NaN or inf.
    `on_file` sees each output file (relative to `out`) as soon as it is complete, so uploads
    can start before the merge ends.
    """
    options = options or MergeOptions()
    source = FolderSource(base) if isinstance(base, Path) else base
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise OutputExists(f"{out} is not empty")
    adapter = Path(adapter)
    adapter_config, adapter_header = _read_adapter(adapter)
    signature, headers = _read_base(source)
    order = {
        shard: sorted(header.tensors, key=lambda k, h=header: h.tensors[k].begin)  # type: ignore[misc]
        for shard, header in headers.items()
    }
    plan = plan_merge(
        adapter_config,
        adapter_header.tensors,
        signature,
        order,
        dtype=options.dtype,
        untie=options.untie,
        base_id=base_id,
        base_revision=base_revision,
    )
    device = pick_device(options.device)
    stamp = {
        "format": "pt",
        "lora_registry.engine": ENGINE_VERSION,
        "lora_registry.options": json.dumps(options.identity(), sort_keys=True),
        **{f"lora_registry.{k}": str(v) for k, v in sorted((provenance or {}).items())},
    }
    if "lora_registry.adapter_digest" not in stamp:
        stamp["lora_registry.adapter_digest"] = manifest_digest(folder_entries(adapter))
    written: list[FileEntry] = []

    def publish(entry: FileEntry) -> None:
        written.append(entry)
        if on_file:
            on_file(entry)

    with safe_open(str(adapter / WEIGHTS_FILE), framework="pt") as weights:
        pipeline = _Pipeline(
            source, headers, plan.shards, out, stamp, weights, device, progress, cancelled
        )
        pipeline.run(publish)
    for entry in _write_small_files(source, out, plan, signature, stamp):
        publish(entry)
    return MergeResult(
        files=sorted(written, key=lambda f: f.path),
        report=plan.report,
        tensors_total=len(plan.tensors),
        tensors_merged=sum(1 for t in plan.tensors if t.changed),
        device=str(device),
        config_changes=plan.config_changes,
    )


def merge_to_folder(
    adapter: Path, base: Path | Source, out: Path, *, force: bool = False, **kwargs: Any
) -> MergeResult:
    """`merge` into a staging folder next to `out`, renamed into place only when complete.

    A crash leaves at most a `.NAME.partial-*` folder beside `out`, never a partial `out`.
    """
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExists(f"{out} already exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{threading.get_ident()}"
    _remove_tree(staging)
    try:
        result = merge(adapter, base, staging, **kwargs)
        _fsync_dir(staging)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            staging.rename(out)
            _remove_tree(old)
        else:
            staging.rename(out)
        _fsync_dir(out.parent)
    finally:
        _remove_tree(staging)
    return result


# --- reading the inputs ------------------------------------------------------------------------


def _read_adapter(adapter: Path) -> tuple[dict[str, Any], SafetensorsHeader]:
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter / required).is_file():
            raise InvalidInput(f"{adapter} has no {required}: is it a PEFT adapter folder?")
    config = parse_json_object((adapter / CONFIG_FILE).read_bytes(), CONFIG_FILE)
    return config, read_header_from_file(str(adapter / WEIGHTS_FILE), name=WEIGHTS_FILE)


def _read_base(source: Source) -> tuple[BaseSignature, dict[str, SafetensorsHeader]]:
    """The base's signature and shard headers, read and validated as `base add` reads them."""

    def read(path: str, start: int, length: int) -> bytes:
        buffer = bytearray(length)
        source.read_into(path, start, memoryview(buffer))
        return bytes(buffer)

    signature, headers, _ = read_checkpoint(source.files(), read)
    return signature, headers


def folder_entries(folder: Path) -> list[FileEntry]:
    """(path, size, sha256) of every file in a folder, all of them as `lora-reg push` takes
    them, so a folder's `manifest_digest` is the digest it has (or would have) in the registry."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            size, sha256 = hash_stream(handle)
        entries.append(FileEntry(path.relative_to(folder).as_posix(), size, sha256))
    return entries


# --- the pipeline ------------------------------------------------------------------------------


class _Budget:
    """Bytes in flight between the reader and the writer, bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.stopped = False
        self._cond = threading.Condition()

    def acquire(self, amount: int) -> bool:
        with self._cond:
            while self.used and self.used + amount > self.limit and not self.stopped:
                self._cond.wait()
            self.used += amount
            return not self.stopped

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


_DONE = object()


class _Pipeline:
    def __init__(
        self,
        source: Source,
        headers: Mapping[str, SafetensorsHeader],
        shards: Mapping[str, list[TensorPlan]],
        out: Path,
        metadata: Mapping[str, str],
        weights: Any,
        device: torch.device,
        progress: Callable[[Progress], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> None:
        self.source = source
        self.headers = headers
        self.shards = shards
        self.out = out
        self.metadata = dict(metadata)
        self.weights = weights
        self.device = device
        self.progress = progress
        self.cancelled = cancelled
        self.items = [plan for plans in shards.values() for plan in plans]
        self.shard_of = {key: shard for shard, h in headers.items() for key in h.tensors}
        # In flight at once: the largest tensor plus half as much again (at least 64 MiB), so
        # reading, compute and writing overlap while peak memory stays ~1.5x the largest tensor.
        largest = max((self._cost(p) for p in self.items), default=0)
        self.budget = _Budget(largest + max(largest // 2, 64 << 20))
        self.to_compute: queue.Queue[Any] = queue.Queue()
        self.to_write: queue.Queue[Any] = queue.Queue()
        self.errors: list[BaseException] = []
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _cost(self, plan: TensorPlan) -> int:
        """Bytes a tensor holds while in flight: its input or its output, the larger."""
        source = 0
        if plan.source is not None:
            source = self.headers[self.shard_of[plan.source]].tensors[plan.source].nbytes
        return max(source, plan.nbytes)

    def run(self, publish: Callable[[FileEntry], None]) -> None:
        reader = threading.Thread(target=self._guard, args=(self._read,), name="merge-reader")
        writer = threading.Thread(
            target=self._guard, args=(self._write, publish), name="merge-writer"
        )
        reader.start()
        writer.start()
        try:
            while True:
                item = self.to_compute.get()
                if item is _DONE or self.errors:
                    break
                plan, buffer = item
                if self.cancelled and self.cancelled():
                    raise MergeCancelled()
                self.to_write.put((plan, self._compute(plan, buffer)))
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.to_write.put(_DONE)
            self.budget.stop()
            reader.join()
            writer.join()
        if self.errors:
            raise self.errors[0]

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            self.errors.append(exc)
            self.budget.stop()
            self.to_compute.put(_DONE)

    def _read(self) -> None:
        for plan in self.items:
            if not self.budget.acquire(self._cost(plan)) or self.errors:
                break
            buffer = None
            if plan.source is not None:
                shard = self.shard_of[plan.source]
                header = self.headers[shard]
                info = header.tensors[plan.source]
                buffer = bytearray(info.nbytes)
                self.source.read_into(shard, header.data_start + info.begin, memoryview(buffer))
            self.to_compute.put((plan, buffer))
        self.to_compute.put(_DONE)

    def _write(self, publish: Callable[[FileEntry], None]) -> None:
        """Write shard by shard, in plan order (the order the reader and compute follow)."""
        total = len(self.items)
        total_bytes = sum(p.nbytes for p in self.items)
        done = done_bytes = 0
        for shard, plans in self.shards.items():
            digest = hashlib.sha256()
            with open(self.out / shard, "wb") as handle:
                header = self._header(plans)
                handle.write(header)
                digest.update(header)
                for expected in plans:
                    item = self.to_write.get()
                    if item is _DONE:
                        return  # compute stopped (an error or a cancel): leave the rest
                    plan, data = item
                    assert plan is expected
                    view = memoryview(data)
                    handle.write(view)
                    digest.update(view)
                    del data, view
                    self.budget.release(self._cost(plan))
                    done += 1
                    done_bytes += plan.nbytes
                    if self.progress:
                        self.progress(
                            Progress(
                                tensors_done=done,
                                tensors_total=total,
                                bytes_done=done_bytes,
                                bytes_total=total_bytes,
                            )
                        )
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            publish(FileEntry(shard, size, digest.hexdigest()))

    def _header(self, plans: list[TensorPlan]) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for plan in plans:
            header[plan.key] = {
                "dtype": plan.dtype,
                "shape": plan.shape,
                "data_offsets": [offset, offset + plan.nbytes],
            }
            offset += plan.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    # --- compute -------------------------------------------------------------------------------

    def _compute(self, plan: TensorPlan, buffer: bytearray | None) -> bytes | bytearray:
        if not plan.changed:
            assert buffer is not None
            if plan.dtype == plan.source_dtype:
                return buffer
            return _cast(buffer, plan)
        model_dtype = TORCH_DTYPES[plan.source_dtype or plan.dtype]
        out_dtype = TORCH_DTYPES[plan.dtype]
        if plan.replace:
            weight = self._adapter(plan.replace).to(model_dtype).reshape(plan.shape).contiguous()
        else:
            assert buffer is not None
            weight = _view(buffer, model_dtype, plan.shape)
        # Results land in a buffer of the output dtype: the input buffer itself when it fits.
        if buffer is not None and model_dtype == out_dtype and not plan.replace:
            result, target = buffer, weight
        else:
            result = bytearray(plan.nbytes)
            target = _view(result, out_dtype, plan.shape)
            if not plan.lora:
                target.copy_(weight)
        if plan.lora:
            self._apply_lora(plan, weight, target)
        if plan.bias:
            key, scale = plan.bias
            merged = target.float() + self._adapter(key).float() * scale
            target.copy_(merged)
        if plan.tokens:
            key, indices = plan.tokens
            index = torch.tensor(indices, dtype=torch.long)
            target.copy_(target.index_copy(0, index, self._adapter(key).to(target.dtype)))
        if plan.replace or plan.bias or plan.tokens or (plan.lora and plan.lora.magnitude):
            _check_finite(target, plan.key)  # LoRA blocks were checked as they were computed
        return result

    def _adapter(self, key: str) -> torch.Tensor:
        tensor: torch.Tensor = self.weights.get_tensor(key)
        return tensor

    def _apply_lora(self, plan: TensorPlan, weight: torch.Tensor, target: torch.Tensor) -> None:
        lora = plan.lora
        assert lora is not None
        dev = self.device
        a = self._adapter(lora.a).to(dev, torch.float32)
        b = self._adapter(lora.b).to(dev, torch.float32)
        if lora.magnitude and lora.kind != "linear":
            target.copy_(self._dora_transposed(weight, a, b, lora.scale, lora.magnitude, lora.kind))
            return
        magnitude = self._adapter(lora.magnitude).to(dev, torch.float32) if lora.magnitude else None
        # A power-of-two scale is exact whichever factor it multiplies: fold it into B (small)
        # instead of a pass over every block. Otherwise scale each block as PEFT does.
        folded = lora.kind != "embedding" and math.frexp(lora.scale)[0] == 0.5
        if folded:
            b = b * lora.scale
        rows, width = weight.shape[0], weight.shape[1]
        step = max(1, BLOCK_ELEMENTS // max(1, width))
        delta_space, base_space = self._workspaces(step * width)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            count = (stop - start) * width
            # Reused float32 blocks: fresh allocations would page-fault on every block.
            if lora.kind == "linear":
                delta = delta_space[:count].view(stop - start, width)
                torch.matmul(b[start:stop], a, out=delta)
            else:  # conv1d (in, out) and embedding (vocab, dim): rows are columns of B·A
                delta = delta_space[:count].view(width, stop - start)
                torch.matmul(b, a[:, start:stop], out=delta)
                delta = delta.T
            if not folded:
                delta.mul_(lora.scale)
            if lora.kind == "embedding":  # PEFT rounds ΔW to the weight's dtype first
                delta.copy_(delta.to(weight.dtype))
            base = base_space[:count].view(stop - start, width)
            base.copy_(weight[start:stop])  # upcast (on the device, when there is one)
            merged = delta.add_(base)  # ΔW + W: the same float32 sum as PEFT's W + ΔW
            if magnitude is not None:  # DoRA: rows rescaled to the trained magnitude
                norm = torch.linalg.norm(merged, dim=1)
                merged = (magnitude[start:stop] / norm).view(-1, 1) * merged
            _check_finite(merged, plan.key)
            if merged.device != target.device:
                merged = merged.to(target.dtype).to(target.device)
            target[start:stop].copy_(merged)
            if target.dtype == torch.float16:  # a finite float32 can overflow float16
                _check_finite(target[start:stop], plan.key)

    def _workspaces(self, elements: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float32 scratch blocks on the device, grown on demand and reused."""
        if self._scratch is None or self._scratch[0].numel() < elements:
            self._scratch = (
                torch.empty(elements, dtype=torch.float32, device=self.device),
                torch.empty(elements, dtype=torch.float32, device=self.device),
            )
        return self._scratch

    def _dora_transposed(
        self,
        weight: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        magnitude_key: str,
        kind: str,
    ) -> torch.Tensor:
        """DoRA on a Conv1D or embedding weight: norms run over the stored rows (PEFT's
        fan_in_fan_out path), so the whole tensor is computed at once, in PEFT's order."""
        dev = self.device
        magnitude = self._adapter(magnitude_key).to(dev, torch.float32)
        w = weight.to(dev)
        delta = (b @ a).T * scale
        norm = torch.linalg.norm(w.T + delta.T, dim=1)
        factor = (magnitude / norm).view(-1, 1).T
        result: torch.Tensor = (factor * (w + delta)).to("cpu")
        return result


def _check_finite(values: torch.Tensor, key: str) -> None:
    """NaN/inf in a merged tensor is an error naming it. One fast reduction first: a finite
    sum proves every value finite; only a non-finite sum pays for the element-wise check."""
    total = values.sum(dtype=torch.float32) if values.dtype != torch.float64 else values.sum()
    if torch.isfinite(total) or torch.isfinite(values).all():
        return
    raise NonFiniteResult(
        f"merging produced NaN or inf in {key}: the adapter's tensors for it (lora_A, lora_B, "
        "magnitude, bias or saved weights) hold non-finite values; retrain or re-save the adapter",
        tensor=key,
    )


def _view(buffer: bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def _cast(buffer: bytearray, plan: TensorPlan) -> bytearray:
    assert plan.source_dtype is not None
    result = bytearray(plan.nbytes)
    if result:
        source = _view(buffer, TORCH_DTYPES[plan.source_dtype], plan.shape)
        _view(result, TORCH_DTYPES[plan.dtype], plan.shape).copy_(source)
    return result


# --- small files -------------------------------------------------------------------------------


def _write_small_files(
    source: Source,
    out: Path,
    plan: MergePlan,
    signature: BaseSignature,
    stamp: Mapping[str, str],
) -> Iterator[FileEntry]:
    """The index, config and tokenizer files, and the model card (everything but shards)."""
    files = source.files()

    def write(name: str, data: bytes) -> FileEntry:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return FileEntry(name, len(data), hashlib.sha256(data).hexdigest())

    if INDEX_JSON in files or len(plan.shards) > 1:
        weight_map = {t.key: t.shard for t in plan.tensors}
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan.tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        yield write(INDEX_JSON, _json_file(index))
    for name in sorted(files):
        if name in SKIPPED_FILES or name.endswith(WEIGHT_SUFFIXES) or name.startswith("."):
            continue
        if name.startswith("adapter_"):
            continue
        data = read_bytes(source, name)
        if name == CONFIG_JSON and plan.config_changes:
            config = dict(signature.config)
            config.update(plan.config_changes)
            data = _json_file(config)
        yield write(name, data)
    yield write("README.md", _model_card(signature, stamp, plan).encode("utf-8"))


def _json_file(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _model_card(signature: BaseSignature, stamp: Mapping[str, str], plan: MergePlan) -> str:
    base = stamp.get("lora_registry.base", "")
    adapter = stamp.get("lora_registry.adapter", "")
    base_id = base.split("@", 1)[0] if base else signature.config.get("_name_or_path", "")
    changed = sum(1 for t in plan.tensors if t.changed)
    lines = [
        "---",
        *([f"base_model: {base_id}"] if base_id else []),
        "library_name: transformers",
        "tags:",
        "- lora-registry",
        "- merged-lora",
        "---",
        "",
        f"# {adapter or 'LoRA adapter'} merged into {base or 'its base model'}",
        "",
        "This checkpoint is a base model with a LoRA adapter merged into its weights by "
        "lora-registry's streaming merge engine (W' = W + scale·B·A per tensor, as PEFT's "
        "merge_and_unload). Load it like the base model; no PEFT is needed.",
        "",
        "| | |",
        "|---|---|",
        f"| adapter | `{adapter or '(local folder)'}` |",
        f"| adapter digest | `{stamp.get('lora_registry.adapter_digest', '')}` |",
        f"| base model | `{base or '(local folder)'}` |",
        f"| merge options | `{stamp.get('lora_registry.options', '')}` |",
        f"| engine | `{stamp.get('lora_registry.engine', '')}` |",
        f"| tensors changed | {changed} of {len(plan.tensors)} |",
        "",
        "Every safetensors shard carries the same provenance in its `__metadata__`; "
        "`lora-reg identify PATH` tells which registry merge a folder is.",
        "",
    ]
    return "\n".join(lines)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
