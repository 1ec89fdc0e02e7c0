"""The streaming merge engine: base checkpoint + one LoRA adapter -> merged checkpoint folder.

Weights are never loaded through transformers. The engine reads safetensors headers, asks
`worker.plan` what happens to each tensor, writes every output shard's header up front (shapes
and dtypes are known from the plan) and then streams tensor data through five threads:

    reader  --(pieces)-->  compute (this thread)  --(bytes)-->  writer  -->  flusher  -->  syncer
    ranged reads           float32 row blocks                   copy and     write()      fsync,
    into the ring          on the device                        sha256                    publish

Tensors move in pieces of at most about 16 MiB: runs of elements of those that are only copied or
cast, runs of whole rows of merged ones (computed in row blocks, written back into their input
buffer; DoRA on Conv1D and embedding weights, which normalises across rows, moves whole). Pieces
live in a ring of reused memory (the largest piece plus half as much again, at least 64 MiB more)
that bounds what is in flight: peak memory depends on the piece size, not on the model or its
largest tensor. Shards are written with O_DIRECT (see `_ShardFile`); a shard is published once it
is written, hashed and fsynced, while the next one is being written.

The math is PEFT's `merge_and_unload` (docs/peft-format.md §3), in the same float32 order, so CPU
output is bit-identical to PEFT's. Same inputs give byte-identical files: the headers, metadata,
config and model card depend on nothing but the inputs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import queue
import shutil
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

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

# The fused CPU kernels (worker/_kernels.c), where setup.py could build them.
kernels: ModuleType | None
try:
    from worker import _kernels as kernels
except ImportError:
    kernels = None

ENGINE_VERSION = "lora-registry-merge/1"
# Rows of a merged tensor are processed in blocks of about this many float32 elements (4 MiB).
# The best size depends on the machine (bench/README.md): 128 K-element blocks, which stay in
# the L2 cache, were faster on one VM and 2 M-element ones on another; 1 M was never far off.
BLOCK_ELEMENTS = 1 << 20
# Blocks are whole multiples of this many rows (columns of B·A for Conv1D and embeddings), and a
# thinner tail joins the block before it. BLAS computes very thin products with other kernels,
# in another float32 order: MKL's B[rows]·A for fewer than 12 rows differs in the last bit from
# the same rows of PEFT's one product over the whole tensor (a 2-row tail of a 2048-row weight
# did, in the 1.1B benchmark), while blocks of 12 rows and more agree with it at any thread count.
BLOCK_ROWS = 64
# Tensors move through the pipeline in pieces of about this size at most (merged ones in whole
# rows, see _merged_pieces), so a large model's embedding and lm_head never sit in memory whole.
PIECE_BYTES = 16 << 20
# The least room for pieces in flight, so that small tensors still overlap reads and writes.
RING_FLOOR = 64 << 20
# Pieces start at multiples of this in the ring (any dtype's alignment, a cache line).
ALIGN = 64
# O_DIRECT writes: memory, offsets and lengths in whole blocks of this (a page: any device's
# logical block), gathered in a staging buffer of this size.
DIRECT_ALIGN = 4096
DIRECT_STAGING = 8 << 20
# The writer hashes what it copies into the staging buffer in chunks of this, while in the cache.
HASH_CHUNK = 1 << 20
TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# What adapter tensors can hold: floats, and the integer and boolean types torch >= 2.2 knows.
ADAPTER_DTYPES = {
    **TORCH_DTYPES,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
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


@contextlib.contextmanager
def _compute_threads(device: torch.device) -> Iterator[None]:
    """Leave the pipeline's other threads a core of their own while merging on the CPU.

    The reader, the writer (which hashes) and the flusher keep about a core busy. torch's CPU ops
    run as an OpenMP team that spins while it waits for a member whose core is busy: on 2 cores,
    2 torch threads cost twice the CPU time of 1 and were not faster. With OpenMP the setting
    belongs to the calling thread (the one that computes, see _Pipeline.run), so each merge lowers
    and restores its own; merges side by side (--concurrency) do not disturb each other.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, min(before, (cores or 1) - 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    weights = _AdapterWeights(adapter, adapter_header)
    with _compute_threads(device):
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

    A crash leaves at most a `.NAME.partial-PID-*` folder beside `out`, never a partial `out`;
    the next merge into `out` removes those whose process is gone.
    """
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExists(f"{out} already exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out)
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


def _remove_abandoned_staging(out: Path) -> None:
    """Remove staging folders of merges into `out` whose process no longer runs (killed before
    they finished). One whose process lives (or whose PID was reused) is left alone."""
    prefix = f".{out.name}.partial-"
    for leftover in out.parent.iterdir():
        if not leftover.name.startswith(prefix):
            continue
        pid = leftover.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            _remove_tree(leftover)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


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


class _AdapterWeights:
    """The adapter's tensors, each read from its file when the merge asks for it.

    Not memory-mapped (safetensors' `safe_open` maps the file): mapped pages stay resident until
    the end of the merge, the whole adapter by then (50 MB for the benchmark's r=16 adapter,
    gigabytes for a large rank on a large model), where a tensor read here is freed once used.
    """

    def __init__(self, folder: Path, header: SafetensorsHeader) -> None:
        self.files = FolderSource(folder)
        self.header = header
        # Whole tensors read for the output tensor being merged: moving in pieces, it asks for
        # the same A, B or token rows once per piece (`forget` when it is done). Callers never
        # modify what they get.
        self._cache: dict[str, torch.Tensor] = {}

    def get_tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `key`, or only its rows [start, stop) (a contiguous stretch of the file)."""
        info = self.header.tensors[key]
        dtype = ADAPTER_DTYPES.get(info.dtype)
        if dtype is None:
            raise InvalidInput(f"{WEIGHTS_FILE}: {key} is {info.dtype}, which merges do not read")
        shape = list(info.shape)
        if rows is not None and shape and rows != (0, shape[0]):
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            buffer = bytearray((rows[1] - rows[0]) * row_bytes)
            start = self.header.data_start + info.begin + rows[0] * row_bytes
            self.files.read_into(WEIGHTS_FILE, start, memoryview(buffer))
            return _view(buffer, dtype, [rows[1] - rows[0], *shape[1:]])
        if key not in self._cache:
            buffer = bytearray(info.nbytes)
            start = self.header.data_start + info.begin
            self.files.read_into(WEIGHTS_FILE, start, memoryview(buffer))
            self._cache[key] = _view(buffer, dtype, shape)
        return self._cache[key]

    def forget(self) -> None:
        """Drop the whole tensors kept for the output tensor just merged."""
        self._cache.clear()


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


@dataclass(frozen=True)
class _Piece:
    """A stretch of one output tensor on its way through the pipeline, of about PIECE_BYTES at
    most: a run of elements of a tensor that is only copied or cast, a run of whole rows of a
    merged one (or all of it, see `_merged_pieces`)."""

    plan: TensorPlan
    offset: int  # where its input starts within the source tensor, in bytes
    source_bytes: int  # input bytes read from the base (0: nothing to read)
    nbytes: int  # output bytes
    last: bool  # the tensor's last piece
    rows: tuple[int, int] | None = None  # merged tensors: the rows [start, stop) it holds

    @property
    def cost(self) -> int:
        """Ring bytes it holds from its read until it is copied out: input or output, the larger."""
        return max(self.source_bytes, self.nbytes)


def _pieces(plan: TensorPlan, source_bytes: int) -> list[_Piece]:
    """How a tensor moves: copied or cast tensors in pieces of the same elements in and out,
    merged tensors as `_merged_pieces` says."""
    if plan.changed:
        return _merged_pieces(plan, source_bytes)
    assert plan.source_dtype is not None
    if plan.dtype == plan.source_dtype:
        in_size = out_size = 1  # copied as bytes, whatever the dtype
    else:
        in_size = TORCH_DTYPES[plan.source_dtype].itemsize
        out_size = TORCH_DTYPES[plan.dtype].itemsize
    elements = source_bytes // in_size
    step = PIECE_BYTES // max(in_size, out_size)
    pieces = []
    for first in range(0, max(elements, 1), step):
        count = min(step, elements - first)
        last = first + step >= elements
        pieces.append(_Piece(plan, first * in_size, count * in_size, count * out_size, last))
    return pieces


def _merged_pieces(plan: TensorPlan, source_bytes: int) -> list[_Piece]:
    """A merged tensor in runs of whole rows. Each row of W' depends only on its row of W and
    of B (Linear) or its column of A (Conv1D, embedding), and of the DoRA magnitude, bias and
    token deltas, so a large weight (an embedding with LoRA, a modules_to_save head) never sits
    in memory whole. Runs are whole multiples of BLOCK_ROWS rows, like the blocks computed inside
    them, so that every product agrees with PEFT's (see BLOCK_ROWS). DoRA on Conv1D and embedding
    weights normalises across rows: those move whole, as do vectors (biases).

    A tensor the adapter replaces starts from the adapter's value: nothing is read from the base
    (whose shape may differ: a resized vocabulary).
    """
    if plan.replace:
        source_bytes = 0
    rows = plan.shape[0] if plan.shape else 0
    lora = plan.lora
    across_rows = lora is not None and lora.magnitude is not None and lora.kind != "linear"
    if len(plan.shape) < 2 or rows == 0 or across_rows:
        return [_Piece(plan, 0, source_bytes, plan.nbytes, last=True, rows=(0, rows))]
    row_in, row_out = source_bytes // rows, plan.nbytes // rows
    runs = _split_rows(rows, PIECE_BYTES // max(row_in, row_out, 1))
    return [
        _Piece(plan, a * row_in, (b - a) * row_in, (b - a) * row_out, b == rows, rows=(a, b))
        for a, b in runs
    ]


class _Ring:
    """Memory for the pieces in flight, reused: taken and given back in the same order.

    The reader takes each piece's room and the writer gives it back once the piece is copied
    out; both follow plan order, so the free room is always one stretch of a ring. Its
    size bounds the bytes in flight. Reused pages cost no page faults: preadv filled a fresh
    mmap at ~1.4 GB/s here and a reused buffer at ~10 GB/s; a fresh bytearray per tensor came in
    between, from glibc's heap, which held on to the freed ones.
    """

    def __init__(self, size: int) -> None:
        self.size = -(-size // ALIGN) * ALIGN
        self._memory = mmap.mmap(-1, self.size)  # anonymous: pages appear when touched
        self.view = memoryview(self._memory)
        self.start = 0  # where the oldest region held begins (with the gap skipped before it)
        self.end = 0  # where the free room begins
        self.used = 0  # bytes held, gaps included
        self.held: deque[int] = deque()  # what each region held takes, oldest first
        self.stopped = False
        self._cond = threading.Condition()

    def take(self, length: int) -> memoryview | None:
        """`length` contiguous bytes, once older regions are given back; None once stopped."""
        room = -(-length // ALIGN) * ALIGN  # aligned starts for any dtype
        assert room <= self.size
        with self._cond:
            while not self.stopped:
                begin = self._fit(room)
                if begin is not None:
                    taken = (begin - self.end) % self.size + room  # the skipped tail counts
                    self.held.append(taken)
                    self.used += taken
                    self.end = (begin + room) % self.size
                    return self.view[begin : begin + length]
                self._cond.wait()
            return None

    def _fit(self, room: int) -> int | None:
        """Where `room` bytes fit, or None. While the held regions do not wrap, the free room is
        [end, size) and [0, start): a region that does not fit at the end skips to 0."""
        if not self.used:
            self.start = self.end = 0
        if self.used and self.start >= self.end:  # wrapped: free room is [end, start)
            return self.end if room <= self.start - self.end else None
        if room <= self.size - self.end:
            return self.end
        return 0 if room <= self.start else None

    def give_back(self) -> None:
        """Give back the oldest region taken."""
        with self._cond:
            taken = self.held.popleft()
            self.used -= taken
            self.start = (self.start + taken) % self.size
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()

    def close(self) -> None:
        """Unmap the memory now, not when the garbage collector finds the pipeline: a failed
        merge's exception keeps the pipeline alive through its traceback. A piece still viewed
        somewhere (BufferError) keeps the mapping alive until it is dropped, which is safe."""
        self.stop()
        with contextlib.suppress(BufferError):
            self.view.release()
            self._memory.close()


class _ShardFile:
    """An output shard: its bytes gathered in a staging buffer, hashed there while they are in the
    cache, and written by a flusher thread while the next ones are gathered.

    Hashing is the pipeline's longest serial step (2.2 GB of sha256 in the benchmark), and sha256
    over bytes that have left the cache ran at 1.3 GB/s on the benchmark's VM against 2.0 GB/s
    over bytes just copied: so the writer hashes each chunk (HASH_CHUNK) right after copying it.
    The staging buffer is two halves: while one is being written to the file, the other fills.

    The file is written around the page cache (O_DIRECT) where the file system allows it.
    Buffered writes of a whole checkpoint fill the page cache with pages nobody reads again
    (evicting the base being read), and each page costs an allocation and a copy: on the 2-core
    VM the benchmark runs on, plain write() calls of 2.2 GB took 3-8 s of CPU where O_DIRECT took
    0.2 s and ran at the disk's speed. Direct writes need block-aligned memory, offsets and
    lengths, which the staging halves are; the last block is padded with zeros and the file cut
    back to its size. Where O_DIRECT is missing (macOS) or refused with EINVAL (tmpfs, some FUSE
    and network file systems; at open, at the first write, or later on a device whose blocks are
    larger than DIRECT_ALIGN), the file goes on with plain writes from where the direct ones
    stopped.
    """

    def __init__(self, path: Path, staging: memoryview) -> None:
        self.path = path
        self.size = 0  # bytes written by the caller
        half = len(staging) // 2 // DIRECT_ALIGN * DIRECT_ALIGN
        assert half > 0, "the staging buffer holds two blocks at least"
        self._halves = (staging[:half], staging[half : 2 * half])
        self._current = 0  # the half being filled
        self._fill = 0  # bytes in it
        self._digest = hashlib.sha256()
        # The flusher: one write in flight at a time, so the file is written in order.
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="merge-flusher")
        self._pending: Future[None] | None = None
        # The file's state below belongs to whichever thread writes: the flusher, or close().
        self.direct = False
        self._flushed = 0  # bytes handed to the file
        self._fd = -1
        if o_direct := getattr(os, "O_DIRECT", 0):
            with contextlib.suppress(OSError):
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | o_direct, 0o644)
                self.direct = True
        if self._fd < 0:
            self._buffered()

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        while view:
            half = self._halves[self._current]
            count = min(len(view), len(half) - self._fill, HASH_CHUNK)
            chunk = half[self._fill : self._fill + count]
            chunk[:] = view[:count]
            self._digest.update(chunk)  # now, while the copy is in the cache
            self._fill += count
            view = view[count:]
            if self._fill == len(half):
                self._wait()  # the other half's write: it fills next
                self._pending = self._flusher.submit(self._flush, half)
                self._current ^= 1
                self._fill = 0

    def _wait(self) -> None:
        """Wait for the write in flight, raising its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _buffered(self) -> None:
        """(Re)open the file for plain writes, keeping what was flushed and nothing more."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1  # never closed twice, whatever the open below does
            os.close(fd)
        self.direct = False
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, self._flushed)  # a refused write may have left part of itself
        os.lseek(self._fd, self._flushed, os.SEEK_SET)

    def _flush(self, view: memoryview) -> None:
        """Write `view` (whole blocks while direct) at the end of the file."""
        try:
            self._write_all(view)
        except OSError as exc:
            if not self.direct or exc.errno != errno.EINVAL:
                raise
            # Refused (at the first write, or a block size this device does not take): what was
            # flushed stays; go on buffered.
            self._buffered()
            self._write_all(view)
        self._flushed += len(view)

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self, complete: bool = True) -> None:
        """Write what is left (padded to a whole block if direct, then cut back) and close the
        file; an incomplete one (the merge failed or was cancelled) is closed as it is."""
        try:
            if not complete:
                # The error (or cancel) that stopped the merge is the one to report, not a failed
                # write of a file that is thrown away.
                with contextlib.suppress(Exception):
                    self._wait()
                return
            self._wait()
            if self._fill:
                half = self._halves[self._current]
                length = self._fill
                if self.direct:
                    length = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
                    half[self._fill : length] = bytes(length - self._fill)
                self._flush(half[:length])
                os.ftruncate(self._fd, self.size)
        finally:
            self._flusher.shutdown()  # waits: nothing may still write to the descriptor
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)


_DONE = object()


@dataclass(frozen=True)
class _ShardWritten:
    """A shard the writer has finished and closed."""

    shard: str
    size: int
    sha256: str


class _Pipeline:
    def __init__(
        self,
        source: Source,
        headers: Mapping[str, SafetensorsHeader],
        shards: Mapping[str, list[TensorPlan]],
        out: Path,
        metadata: Mapping[str, str],
        weights: _AdapterWeights,
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
        self.shard_of = {key: shard for shard, h in headers.items() for key in h.tensors}
        self.pieces = {
            shard: [piece for plan in plans for piece in _pieces(plan, self._source_bytes(plan))]
            for shard, plans in shards.items()
        }
        # In flight at once: the largest piece plus half as much again (at least 64 MiB more), so
        # reading, compute and writing overlap while peak memory follows the largest piece.
        largest = max((p.cost for pieces in self.pieces.values() for p in pieces), default=0)
        self.ring = _Ring(largest + max(largest // 2, RING_FLOOR))
        # The writer's staging buffer (mapped: page-aligned, for O_DIRECT), reused for every
        # shard: two halves of DIRECT_STAGING, one filling while the other is written.
        self._staging_map = mmap.mmap(-1, 2 * DIRECT_STAGING)
        self.staging = memoryview(self._staging_map)
        self.to_compute: queue.Queue[Any] = queue.Queue()
        self.to_write: queue.Queue[Any] = queue.Queue()
        self.to_sync: queue.Queue[Any] = queue.Queue()
        self.tensors_total = sum(len(plans) for plans in shards.values())
        self.bytes_total = sum(p.nbytes for plans in shards.values() for p in plans)
        self.tensors_done = self.bytes_done = 0
        self.errors: list[BaseException] = []
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _source_bytes(self, plan: TensorPlan) -> int:
        if plan.source is None:
            return 0
        return self.headers[self.shard_of[plan.source]].tensors[plan.source].nbytes

    def run(self, publish: Callable[[FileEntry], None]) -> None:
        stages = [
            threading.Thread(target=self._guard, args=(self._read,), name="merge-reader"),
            threading.Thread(target=self._guard, args=(self._write,), name="merge-writer"),
            threading.Thread(target=self._guard, args=(self._sync, publish), name="merge-syncer"),
        ]
        started: list[threading.Thread] = []
        try:
            for stage in stages:
                stage.start()
                started.append(stage)
            self._compute_all()
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            # Shutdown: the writer ends on _DONE and passes it on to the syncer;
            # the reader ends when the ring stops (and a failing stage stops it too, see _guard).
            self.to_write.put(_DONE)
            self.ring.stop()
            for stage in started:
                stage.join()
            self._release_ring()
        if self.errors:
            first, self.errors = self.errors[0], []
            raise first

    def _compute_all(self) -> None:
        """The compute stage, in the calling thread (the one whose torch threads were set)."""
        while True:
            item = self.to_compute.get()
            if item is _DONE or self.errors:
                break
            piece, buffer = item
            if self.cancelled and self.cancelled():
                raise MergeCancelled()
            self.to_write.put((piece, self._compute(piece, buffer)))
            if piece.last:
                self.weights.forget()

    def _release_ring(self) -> None:
        """Unmap the ring now. After a failure, views of it may still sit in the queues and in
        the locals of the failed stages' frames (which the exception's traceback keeps): drop
        both first (the traceback still prints; only its frames' variables go)."""
        for stage_queue in (self.to_compute, self.to_write, self.to_sync):
            with contextlib.suppress(queue.Empty):
                while True:
                    stage_queue.get_nowait()
        for error in self.errors:
            traceback.clear_frames(error.__traceback__)
        self.ring.close()
        with contextlib.suppress(BufferError):
            self.staging.release()
            self._staging_map.close()

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            self.errors.append(exc)
            self.ring.stop()
            self.to_compute.put(_DONE)

    def _read(self) -> None:
        for piece in (p for pieces in self.pieces.values() for p in pieces):
            region = self.ring.take(piece.cost)
            if region is None or self.errors:
                break
            buffer = None
            if piece.plan.source is not None:
                shard = self.shard_of[piece.plan.source]
                header = self.headers[shard]
                start = header.data_start + header.tensors[piece.plan.source].begin + piece.offset
                buffer = region[: piece.source_bytes]
                self.source.read_into(shard, start, buffer)
            self.to_compute.put((piece, buffer))
        self.to_compute.put(_DONE)

    # --- writing: the writer copies and hashes, a flusher writes the file, a syncer fsyncs ------
    #
    # The writer gathers each shard's bytes in the staging buffer, hashing them as it copies (see
    # _ShardFile), and gives their ring room back; the file is written by the shard's flusher
    # thread meanwhile, and the syncer fsyncs each complete shard while the next one is being
    # written. A shard is published only once it is complete, hashed and fsynced; the writer
    # passes _DONE on when it stops, so a failure or a cancel anywhere stops the syncer too.

    def _write(self) -> None:
        """Write shard by shard, in plan order (the order the reader and compute follow)."""
        try:
            for shard, pieces in self.pieces.items():
                if not self._write_shard(shard, pieces):
                    return  # compute stopped (an error or a cancel): leave the rest
        finally:
            self.to_sync.put(_DONE)

    def _write_shard(self, shard: str, pieces: list[_Piece]) -> bool:
        handle = _ShardFile(self.out / shard, self.staging)
        complete = False
        try:
            handle.write(self._header(self.shards[shard]))
            for expected in pieces:
                item = self.to_write.get()
                if item is _DONE or self.errors:
                    return False
                piece, data = item
                assert piece is expected
                handle.write(data)  # copied out: the piece's room can be reused
                self.ring.give_back()
                self._report(piece)
            complete = True
        finally:
            handle.close(complete)
        self.to_sync.put(_ShardWritten(shard, handle.size, handle.sha256))
        return True

    def _report(self, piece: _Piece) -> None:
        self.tensors_done += piece.last
        self.bytes_done += piece.nbytes
        if self.progress:
            self.progress(
                Progress(
                    tensors_done=self.tensors_done,
                    tensors_total=self.tensors_total,
                    bytes_done=self.bytes_done,
                    bytes_total=self.bytes_total,
                )
            )

    def _sync(self, publish: Callable[[FileEntry], None]) -> None:
        """fsync each written and hashed shard, then publish it (only complete, durable files)."""
        while (written := self.to_sync.get()) is not _DONE:
            if self.errors:  # failing or cancelled: publish nothing more (drain to _DONE)
                continue
            _fsync_file(self.out / written.shard)
            if not self.errors:
                publish(FileEntry(written.shard, written.size, written.sha256))

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

    def _compute(self, piece: _Piece, buffer: memoryview | None) -> memoryview | bytearray:
        plan = piece.plan
        if not plan.changed:
            assert buffer is not None
            if plan.dtype == plan.source_dtype:
                return buffer
            return _cast(buffer, piece)
        assert piece.rows is not None
        first, stop = piece.rows
        shape = [stop - first, *plan.shape[1:]]
        model_dtype = TORCH_DTYPES[plan.source_dtype or plan.dtype]
        out_dtype = TORCH_DTYPES[plan.dtype]
        if plan.replace:
            saved = self.weights.get_tensor(plan.replace, rows=piece.rows)
            weight = saved.to(model_dtype).reshape(shape).contiguous()
        else:
            assert buffer is not None
            weight = _view(buffer, model_dtype, shape)
        # Results land in a buffer of the output dtype: the input buffer itself when it fits.
        result: memoryview | bytearray
        if buffer is not None and model_dtype == out_dtype and not plan.replace:
            result, target = buffer, weight
        else:
            result = bytearray(piece.nbytes)
            target = _view(result, out_dtype, shape)
            if not plan.lora:
                target.copy_(weight)
        if plan.lora:
            self._apply_lora(plan, weight, target, first)
        if plan.bias:
            key, scale = plan.bias
            bias = self.weights.get_tensor(key, rows=piece.rows)
            target.copy_(target.float() + bias.float() * scale)
        if plan.tokens:
            key, indices = plan.tokens
            # The trained rows that fall in this piece, in the order the adapter lists them.
            inside = [(row - first, i) for i, row in enumerate(indices) if first <= row < stop]
            if inside:
                index = torch.tensor([row for row, _ in inside], dtype=torch.long)
                rows = self.weights.get_tensor(key)[[i for _, i in inside]].to(target.dtype)
                target.copy_(target.index_copy(0, index, rows))
        if plan.replace or plan.bias or plan.tokens or (plan.lora and plan.lora.magnitude):
            _check_finite(target, plan.key)  # LoRA blocks were checked as they were computed
        return result

    def _apply_lora(
        self, plan: TensorPlan, weight: torch.Tensor, target: torch.Tensor, first: int
    ) -> None:
        """ΔW added to `weight` (rows first.. of the tensor) into `target`, block by block."""
        lora = plan.lora
        assert lora is not None
        dev = self.device
        span = (first, first + weight.shape[0])
        if lora.magnitude and lora.kind != "linear":  # moves whole (see _merged_pieces)
            a = _float32_on(self.weights.get_tensor(lora.a), dev)
            b = _float32_on(self.weights.get_tensor(lora.b), dev)
            target.copy_(self._dora_transposed(weight, a, b, lora.scale, lora.magnitude, lora.kind))
            return
        if lora.kind == "linear":  # this piece's rows of B·A: its rows of B
            a = _float32_on(self.weights.get_tensor(lora.a), dev)
            b = _float32_on(self.weights.get_tensor(lora.b, rows=span), dev)
        else:  # conv1d and embedding: the weight's rows are columns of B·A, so columns of A
            a = _float32_on(self.weights.get_tensor(lora.a)[:, span[0] : span[1]], dev)
            b = _float32_on(self.weights.get_tensor(lora.b), dev)
        magnitude = None
        if lora.magnitude:
            magnitude = _float32_on(self.weights.get_tensor(lora.magnitude, rows=span), dev)
        # A power-of-two scale is exact whichever factor it multiplies: fold it into B (small)
        # instead of a pass over every block. Otherwise scale each block as PEFT does.
        folded = lora.kind != "embedding" and math.frexp(lora.scale)[0] == 0.5
        if folded:
            b = b * lora.scale
        # bfloat16 W + ΔW on the CPU: one pass of the C kernel per block instead of four torch
        # ops (upcast, add, finite check, downcast), with the same result bit for bit.
        fused = (
            kernels is not None
            and lora.kind == "linear"
            and magnitude is None
            and weight.dtype == target.dtype == torch.bfloat16
            and weight.device.type == target.device.type == dev.type == "cpu"
            and weight.is_contiguous()
            and target.is_contiguous()
        )
        if weight.device != dev:  # a GPU merge: the piece moves once, in its own dtype
            weight = weight.to(dev)
        rows, width = weight.shape[0], weight.shape[1]
        blocks = _row_blocks(rows, width)
        tallest = max((stop - start for start, stop in blocks), default=0)
        delta_space, base_space = self._workspaces(tallest * width)
        for start, stop in blocks:
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
            if fused:
                assert kernels is not None and delta.is_contiguous()
                rows_in, rows_out = weight[start:stop], target[start:stop]
                if not kernels.add_bf16(
                    rows_in.data_ptr(), delta.data_ptr(), rows_out.data_ptr(), count
                ):
                    raise _non_finite(plan.key)
                continue
            base = base_space[:count].view(stop - start, width)
            base.copy_(weight[start:stop])  # upcast, on the device the merge runs on
            merged = delta.add_(base)  # ΔW + W: the same float32 sum as PEFT's W + ΔW
            if magnitude is not None:  # DoRA: rows rescaled to the trained magnitude
                norm = torch.linalg.norm(merged, dim=1)
                merged = (magnitude[start:stop] / norm).view(-1, 1) * merged
            # Checked once, rounded to the output dtype: a NaN or inf stays one, and a finite
            # float32 can also round to inf in a 16-bit dtype (as the C kernel checks).
            if merged.device != target.device:  # a GPU merge: rounded and checked there
                merged = merged.to(target.dtype)
                _check_finite(merged, plan.key)
                target[start:stop].copy_(merged)
            else:
                target[start:stop].copy_(merged)
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
        magnitude = _float32_on(self.weights.get_tensor(magnitude_key), dev)
        w = weight.to(dev)
        delta = (b @ a).T * scale
        norm = torch.linalg.norm(w.T + delta.T, dim=1)
        factor = (magnitude / norm).view(-1, 1).T
        result: torch.Tensor = (factor * (w + delta)).to("cpu")
        return result


def _float32_on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` as float32 on `device`: moved in its stored dtype, then upcast there.

    A host-to-GPU `.to(device, torch.float32)` (or `copy_` into a float32 GPU tensor) converts on
    the host before the transfer: a multithreaded CPU pass, and twice a 16-bit tensor's bytes over
    the bus. The upcast is exact either way, so the result is the same bit for bit."""
    return tensor.to(device).to(torch.float32)


def _row_blocks(rows: int, width: int) -> list[tuple[int, int]]:
    """(start, stop) of the row blocks a merged piece is computed in: about BLOCK_ELEMENTS each."""
    return _split_rows(rows, BLOCK_ELEMENTS // max(1, width))


def _split_rows(rows: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) runs of `step` rows rounded down to a whole multiple of BLOCK_ROWS (at least
    BLOCK_ROWS), a tail thinner than BLOCK_ROWS joined to the run before it (see BLOCK_ROWS:
    PEFT's float32 results depend on it)."""
    step = max(BLOCK_ROWS, step // BLOCK_ROWS * BLOCK_ROWS)
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < BLOCK_ROWS:
        starts.pop()
    stops = [*starts[1:], rows] if starts else []
    return list(zip(starts, stops, strict=True))


def _check_finite(values: torch.Tensor, key: str) -> None:
    """NaN/inf in a merged tensor is an error naming it. One fast reduction first: a finite
    sum proves every value finite; only a non-finite sum pays for the element-wise check."""
    total = values.sum(dtype=torch.float32) if values.dtype != torch.float64 else values.sum()
    if torch.isfinite(total) or torch.isfinite(values).all():
        return
    raise _non_finite(key)


def _non_finite(key: str) -> NonFiniteResult:
    return NonFiniteResult(
        f"merging produced NaN or inf in {key}: the adapter's tensors for it (lora_A, lora_B, "
        "magnitude, bias or saved weights) hold non-finite values; retrain or re-save the adapter",
        tensor=key,
    )


def _view(buffer: memoryview | bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def _cast(buffer: memoryview, piece: _Piece) -> bytearray:
    """A copied piece in another dtype (elementwise, so any stretch of a tensor converts)."""
    assert piece.plan.source_dtype is not None
    result = bytearray(piece.nbytes)
    if result:
        source = torch.frombuffer(buffer, dtype=TORCH_DTYPES[piece.plan.source_dtype])
        converted = torch.frombuffer(result, dtype=TORCH_DTYPES[piece.plan.dtype])
        converted.copy_(source)
        # float16 tops out at 65504: a finite base value above it becomes inf in the cast.
        overflow = converted.dtype == torch.float16 and not bool(torch.isfinite(converted).all())
        if overflow and bool(torch.isfinite(source).all()):
            raise NonFiniteResult(
                f"--dtype float16 turns values of {piece.plan.key} into inf (float16 holds "
                "at most 65504): keep the base's dtype or use --dtype bfloat16",
                tensor=piece.plan.key,
            )
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


def _fsync_file(path: Path) -> None:
    """fsync a closed file (Linux and macOS flush the file's data whichever descriptor asks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Best effort: a folder's entries made durable where the file system allows it."""
    with contextlib.suppress(OSError):
        _fsync_file(path)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
