"""The merge engine's pipeline (worker.engine): its ring of reused memory, copied tensors moving in
pieces, and the writer (which hashes), flusher and syncer threads behind it.

Outputs are compared byte for byte with a merge made with the default sizes (the oracle tests
check those against PEFT). Nothing here asserts a duration.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from registry.core.jobs import Progress
from registry.core.manifest import FileEntry
from tests.support.merging import folder_bytes
from worker import engine
from worker.engine import MergeCancelled, MergeOptions, merge, merge_to_folder
from worker.plan import LoraDelta, TensorPlan

KiB = 1 << 10


@pytest.fixture
def sharded(adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]) -> tuple[Path, Path]:
    """(adapter, base): a tiny Llama base in several shards and an adapter for it."""
    return adapter_dir("llama"), base_dir("llama", max_shard_size="40KB")


# Thread names; each shard's flusher is a one-thread pool ("merge-flusher_0").
STAGES = ("merge-reader", "merge-writer", "merge-flusher", "merge-syncer")


def merge_stages() -> list[str]:
    """Names of the pipeline threads still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith(STAGES)]


# --- the ring -------------------------------------------------------------------------------------


def test_the_ring_hands_out_aligned_room_in_order_and_wraps() -> None:
    ring = engine._Ring(1024)
    first = ring.take(300)
    second = ring.take(500)
    assert first is not None and second is not None
    assert len(first) == 300 and len(second) == 500
    ring.give_back()  # the first: [0, 320) is free again, [320, 832) is held
    third = ring.take(250)  # does not fit in [832, 1024): skips to 0
    assert third is not None and ring.end == 256
    third[:] = b"\x01" * 250
    assert bytes(second) == bytes(500)  # the held region was not touched
    ring.give_back()
    ring.give_back()
    assert ring.used == 0


def test_the_ring_waits_for_room_and_stops() -> None:
    ring = engine._Ring(1024)
    assert ring.take(1000) is not None
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(ring.take(1000)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "there is no room until the first region is given back"
    ring.give_back()
    waiter.join(5)
    assert got and got[0] is not None
    blocked = threading.Thread(target=lambda: got.append(ring.take(1000)))
    blocked.start()
    ring.stop()
    blocked.join(5)
    assert not blocked.is_alive() and got[-1] is None


def test_regions_in_use_are_never_handed_out_again() -> None:
    """Regions of random sizes taken and given back in a random rhythm: after every step, each
    region still held holds what was written into it."""
    ring = engine._Ring(1024)
    schedule = random.Random(7)
    held: deque[tuple[bytes, memoryview]] = deque()

    def give_back_oldest() -> None:
        held.popleft()
        ring.give_back()

    for number in range(3000):
        size = schedule.randrange(0, 400)
        room = -(-size // engine.ALIGN) * engine.ALIGN
        while ring._fit(room) is None:  # take() would wait for this: give back first
            give_back_oldest()
        region = ring.take(size)
        assert region is not None
        region[:] = content = bytes([number % 251]) * size
        held.append((content, region))
        if schedule.random() < 0.5:
            give_back_oldest()
        for content, region in held:
            assert bytes(region) == content, "a region in use was handed out again"
    while held:
        give_back_oldest()
    assert ring.used == 0


def test_copied_tensors_move_in_pieces_of_elements_and_merged_ones_in_runs_of_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "PIECE_BYTES", 4 * KiB)
    copied = TensorPlan("a", "s", "BF16", [5, 1024], "a", source_dtype="BF16")
    pieces = engine._pieces(copied, 10 * KiB)
    assert [(p.offset, p.source_bytes, p.last) for p in pieces] == [
        (0, 4 * KiB, False),
        (4 * KiB, 4 * KiB, False),
        (8 * KiB, 2 * KiB, True),
    ]
    cast = TensorPlan("a", "s", "F32", [5, 1024], "a", source_dtype="BF16")
    pieces = engine._pieces(cast, 10 * KiB)  # 1,024 elements a piece: 2 KiB in, 4 KiB out
    assert [(p.source_bytes, p.nbytes) for p in pieces][:2] == [(2 * KiB, 4 * KiB)] * 2
    assert sum(p.nbytes for p in pieces) == 20 * KiB and pieces[-1].last
    empty = TensorPlan("e", "s", "BF16", [0], "e", source_dtype="BF16")
    assert [(p.source_bytes, p.last) for p in engine._pieces(empty, 0)] == [(0, True)]

    # Merged: runs of whole rows, multiples of BLOCK_ROWS (64), the 44-row tail joined on.
    lora = LoraDelta("a", "b", 2.0, "linear")
    row = 1024 * 2
    merged = TensorPlan("m", "s", "BF16", [300, 1024], "m", source_dtype="BF16", lora=lora)
    pieces = engine._pieces(merged, 300 * row)
    assert [p.rows for p in pieces] == [(0, 64), (64, 128), (128, 192), (192, 300)]
    assert [(p.offset, p.source_bytes, p.nbytes) for p in pieces][-1] == (
        192 * row,
        108 * row,
        108 * row,
    )
    assert [p.last for p in pieces] == [False, False, False, True]
    # The adapter's tensor replaces the base's: nothing is read (its shape may differ).
    saved = TensorPlan("r", "s", "BF16", [300, 1024], "r", source_dtype="BF16", replace="x")
    assert {p.source_bytes for p in engine._pieces(saved, 256 * row)} == {0}
    # Whole: DoRA across rows (Conv1D, embedding), vectors, short tensors.
    dora = LoraDelta("a", "b", 2.0, "embedding", magnitude="m")
    across = TensorPlan("e", "s", "BF16", [300, 1024], "e", source_dtype="BF16", lora=dora)
    bias = TensorPlan("v", "s", "BF16", [30000], "v", source_dtype="BF16", bias=("k", 1.0))
    short = TensorPlan("q", "s", "BF16", [100, 1024], "q", source_dtype="BF16", lora=lora)
    for plan in (across, bias, short):
        (piece,) = engine._pieces(plan, plan.nbytes)
        assert piece.rows == (0, plan.shape[0]) and piece.nbytes == plan.nbytes


@pytest.mark.parametrize(
    ("rows", "width"),
    [(2048, 5632), (2048, 2048), (5632, 2048), (130, 64), (64, 64), (3, 7), (0, 8)],
)
def test_row_blocks_cover_every_row_once_and_none_is_thin(rows: int, width: int) -> None:
    """The 1.1B benchmark's down_proj (2048 x 5632) used to end in a 2-row block, which MKL
    computes in another float32 order than PEFT's whole product (a last-bit difference)."""
    blocks = engine._row_blocks(rows, width)
    assert [r for a, b in blocks for r in range(a, b)] == list(range(rows))
    sizes = [b - a for a, b in blocks]
    assert all(size >= min(rows, engine.BLOCK_ROWS) for size in sizes)
    assert all(size % engine.BLOCK_ROWS == 0 for size in sizes[:-1])
    assert max(sizes, default=0) * width <= max(
        engine.BLOCK_ELEMENTS, (2 * engine.BLOCK_ROWS - 1) * width
    )


def test_row_blocks_of_a_wide_weight_are_multiples_of_block_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1 << 17)  # 23 rows: too thin, so BLOCK_ROWS
    assert engine._row_blocks(2048, 5632) == [(s, s + 64) for s in range(0, 2048, 64)]
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1 << 20)  # 186 rows: rounded down to 128
    assert engine._row_blocks(2048, 5632) == [(s, min(s + 128, 2048)) for s in range(0, 2048, 128)]
    # 130 rows in blocks of 64: the 2-row tail joins the block before it.
    assert engine._row_blocks(130, engine.BLOCK_ELEMENTS // 64) == [(0, 64), (64, 130)]


# --- output files: O_DIRECT through a staging buffer ----------------------------------------


def _staging(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size))  # page-aligned, as the pipeline's


def _is_direct(handle: engine._ShardFile) -> bool:
    """Whether the kernel has the file open with O_DIRECT (its open flags, octal in fdinfo)."""
    flags = Path(f"/proc/self/fdinfo/{handle._fd}").read_text().split("flags:")[1].split()[0]
    return bool(int(flags, 8) & getattr(os, "O_DIRECT", 0))


def _refuse_o_direct(
    monkeypatch: pytest.MonkeyPatch,
    *,
    at_open: bool = False,
    opened: tuple[int, ...] = (),
    part: int = 0,
) -> None:
    """EINVAL for O_DIRECT, as tmpfs, FUSE, network file systems or a device with larger blocks
    answer it: at open (`at_open`), or for every write to a descriptor open with O_DIRECT (those
    opened from now on, and `opened`), after `part` bytes of it landed."""
    direct = getattr(os, "O_DIRECT", 0)
    monkeypatch.setattr(os, "O_DIRECT", direct or 0o40000, raising=False)
    direct_fds = set(opened)
    real_open, real_write = os.open, os.write

    def fake_open(path: str, flags: int, mode: int = 0o777) -> int:
        wanted = bool(flags & os.O_DIRECT)
        if wanted and at_open:
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags if direct else flags & ~os.O_DIRECT, mode)
        (direct_fds.add if wanted else direct_fds.discard)(fd)  # numbers are reused
        return fd

    def fake_write(fd: int, data: memoryview) -> int:
        if fd in direct_fds:
            if part:
                real_write(fd, data[:part])
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this system")
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 8192 + 17, 10 * 8192])
def test_shard_files_hold_exactly_the_bytes_written_in_any_pieces(
    tmp_path: Path, size: int
) -> None:
    """Pieces of every size around the block and staging sizes: the file is the bytes written,
    not a byte more (the padding of the last block is cut off)."""
    data = random.Random(size).randbytes(size)
    handle = engine._ShardFile(tmp_path / "shard", _staging(8192))
    if not _is_direct(handle):
        pytest.skip(f"{tmp_path} refuses O_DIRECT (the buffered path is the plain one)")
    cuts = sorted(random.Random(size + 1).sample(range(size + 1), min(size + 1, 9)))
    for start, stop in zip([0, *cuts], [*cuts, size], strict=True):
        handle.write(memoryview(data)[start:stop])
    handle.close()
    # Still direct: a misaligned write would have been refused and gone buffered unnoticed.
    assert handle.direct, "O_DIRECT was given up on the way"
    assert handle.size == size
    assert (tmp_path / "shard").read_bytes() == data
    assert handle.sha256 == hashlib.sha256(data).hexdigest()


def test_shard_files_fall_back_to_buffered_writes_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tmpfs, FUSE and network file systems refuse O_DIRECT with EINVAL, at open or at the first
    write; the shard is then written with plain writes, whole."""
    data = random.Random(0).randbytes(20_000)
    for refused in ("open", "write"):
        path = tmp_path / f"refused-at-{refused}"
        with monkeypatch.context() as patch:
            _refuse_o_direct(patch, at_open=refused == "open")
            handle = engine._ShardFile(path, _staging(8192))
            handle.write(data[:15_000])  # the staging buffer fills: the first write is refused
            handle.write(data[15_000:])
            handle.close()
        assert not handle.direct, "it should have fallen back to buffered writes"
        assert path.read_bytes() == data


def test_a_refusal_after_direct_writes_goes_on_buffered_keeping_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device with blocks larger than DIRECT_ALIGN takes the 8 MiB writes and refuses the
    padded last one (or a refused write got partly through): the file keeps what was flushed,
    drops any part-write and goes on buffered, whole."""
    handle = engine._ShardFile(tmp_path / "shard", _staging(8192))
    if not handle.direct:
        pytest.skip("O_DIRECT is not used here")
    data = random.Random(1).randbytes(3 * 8192 + 100)
    handle.write(data[:8192])  # both 4 KiB halves handed to the flusher, direct
    handle._wait()  # and written
    _refuse_o_direct(monkeypatch, opened=(handle._fd,), part=4096)  # a part lands, then EINVAL
    handle.write(data[8192:])
    handle.close()
    assert not handle.direct
    assert (tmp_path / "shard").read_bytes() == data


@pytest.mark.parametrize("complete", [True, False])
def test_a_failed_write_is_raised_unless_the_shard_is_being_thrown_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, complete: bool
) -> None:
    """The flusher's error reaches the writer at close; but when the merge already stopped (an
    error elsewhere, or a cancel), that error is the one to report, not the discarded file's."""
    handle = engine._ShardFile(tmp_path / "shard", _staging(8192))

    def no_space(view: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(handle, "_flush", no_space)
    handle.write(bytes(4096))  # a full half: handed to the flusher, whose write fails
    if complete:
        with pytest.raises(OSError, match="No space left"):
            handle.close()
    else:
        handle.close(complete=False)
    assert handle._fd == -1
    assert not merge_stages()


def test_a_failing_buffered_reopen_leaves_no_descriptor_to_close_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT refused at the first write, then the plain reopen fails (EMFILE): the open's error
    is what the caller sees, and close() does not close a descriptor number that another thread
    may have been given since."""
    handle = engine._ShardFile(tmp_path / "shard", _staging(8192))
    if not handle.direct:
        pytest.skip("O_DIRECT is not used here")
    _refuse_o_direct(monkeypatch, opened=(handle._fd,))

    def no_more_files(*args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", no_more_files)
    with pytest.raises(OSError, match="Too many open files"):
        handle.write(bytes(8192))
    closed: list[int] = []
    monkeypatch.setattr(os, "close", closed.append)
    handle.close(complete=False)
    assert closed == [], "close() closed a descriptor that was already closed"


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this system")
def test_merges_written_directly_and_buffered_are_byte_identical(
    sharded: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter, base = sharded
    opened: list[bool] = []  # per shard: O_DIRECT at open and still at close
    real_init, real_close = engine._ShardFile.__init__, engine._ShardFile.close

    def record(self: engine._ShardFile, path: Path, staging: memoryview) -> None:
        real_init(self, path, staging)
        opened.append(_is_direct(self))

    def check(self: engine._ShardFile, complete: bool = True) -> None:
        opened[-1] = opened[-1] and self.direct
        real_close(self, complete)

    monkeypatch.setattr(engine._ShardFile, "__init__", record)
    monkeypatch.setattr(engine._ShardFile, "close", check)
    monkeypatch.setattr(engine, "DIRECT_STAGING", 8 * KiB)  # shards span many staging buffers
    merge_to_folder(adapter, base, tmp_path / "direct")
    if not all(opened):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    monkeypatch.delattr(os, "O_DIRECT")
    opened.clear()
    merge_to_folder(adapter, base, tmp_path / "buffered")
    assert opened and not any(opened)
    assert folder_bytes(tmp_path / "direct") == folder_bytes(tmp_path / "buffered")


def test_a_merged_embedding_in_pieces_reads_each_adapter_byte_once(
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An embedding LoRA moving in pieces: each piece needs all of B and its columns of A, which
    are read once for the tensor, not once per piece (on a 152k-row embedding at r=256 that
    would be 10 GB of reads)."""
    from worker import sources

    base = base_dir("llama")
    adapter = adapter_dir("llama", target_modules=["embed_tokens", "q_proj"])
    monkeypatch.setattr(engine, "PIECE_BYTES", 1 * KiB)  # the 256-row embedding: 4 pieces
    reads: list[tuple[int, int]] = []
    real_read = sources.FolderSource.read_into

    def count(self: sources.FolderSource, path: str, start: int, buffer: memoryview) -> None:
        if path == "adapter_model.safetensors":
            reads.append((start, len(buffer)))
        real_read(self, path, start, buffer)

    pieces: dict[str, int] = {}
    real_pieces = engine._merged_pieces

    def spy(plan: TensorPlan, source_bytes: int) -> list[engine._Piece]:
        made = real_pieces(plan, source_bytes)
        pieces[plan.key] = len(made)
        return made

    monkeypatch.setattr(sources.FolderSource, "read_into", count)
    monkeypatch.setattr(engine, "_merged_pieces", spy)
    merge(adapter, base, tmp_path / "out")
    assert pieces["model.embed_tokens.weight"] == 4
    assert reads and len(reads) == len(set(reads)), "an adapter tensor was read more than once"


# --- whole merges -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])  # the test base is float32
def test_small_pieces_and_a_small_ring_give_the_same_bytes(
    sharded: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dtype: str | None,
) -> None:
    """Many pieces per tensor and a ring that wraps all the time: the output does not change."""
    adapter, base = sharded
    options = MergeOptions(dtype=dtype)
    merge_to_folder(adapter, base, tmp_path / "default", options=options)
    monkeypatch.setattr(engine, "PIECE_BYTES", 1 * KiB)
    monkeypatch.setattr(engine, "RING_FLOOR", 8 * KiB)
    progress: list[Progress] = []
    merge_to_folder(adapter, base, tmp_path / "small", options=options, progress=progress.append)
    assert folder_bytes(tmp_path / "small") == folder_bytes(tmp_path / "default")
    done = [(p.tensors_done, p.bytes_done) for p in progress]
    assert done == sorted(done) and len(done) > progress[-1].tensors_total
    assert progress[-1].tensors_done == progress[-1].tensors_total
    assert progress[-1].bytes_done == progress[-1].bytes_total
    assert not merge_stages()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_on_file_sees_only_hashed_and_fsynced_files(
    sharded: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter, base = sharded
    out = tmp_path / "merged"
    synced: set[Path] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.add(Path(os.readlink(f"/proc/self/fd/{fd}")))

    def on_file(entry: FileEntry) -> None:
        path = out / entry.path
        assert path.resolve() in synced, f"{entry.path} was published before its fsync"
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)
        seen.append(entry.path)

    seen: list[str] = []
    monkeypatch.setattr(os, "fsync", fsync)
    result = merge(adapter, base, out, on_file=on_file)
    assert sorted(seen) == sorted(f.path for f in result.files)
    assert sum(p.endswith(".safetensors") for p in seen) > 1


def test_a_failing_publish_stops_every_stage_and_leaves_nothing(
    sharded: tuple[Path, Path], tmp_path: Path
) -> None:
    adapter, base = sharded

    def on_file(entry: FileEntry) -> None:
        raise OSError("upload refused")

    with pytest.raises(OSError, match="upload refused"):
        merge_to_folder(adapter, base, tmp_path / "merged", on_file=on_file)
    assert not merge_stages()
    assert not list(tmp_path.iterdir())


def test_a_cancel_stops_every_stage(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = sharded
    asked: list[bool] = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) > 3

    with pytest.raises(MergeCancelled):
        merge_to_folder(adapter, base, tmp_path / "merged", cancelled=cancelled)
    assert not merge_stages()
    assert not (tmp_path / "merged").exists()


def test_overlapping_cpu_merges_each_lower_and_restore_their_own_torch_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two merges of one worker (--concurrency 2) in two threads, ending in either order: each
    computes with fewer threads and gets its own setting back (OpenMP's is per thread)."""
    from worker.engine import _compute_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(6)), raising=False)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, tuple[int, int, int]] = {}

    def merge_in_thread(name: str, wait_for: threading.Event, then: threading.Event) -> None:
        torch.set_num_threads(6)
        with _compute_threads(torch.device("cpu")):
            lowered = torch.get_num_threads()
            then.set()
            wait_for.wait(10)
            still = torch.get_num_threads()
        seen[name] = (lowered, still, torch.get_num_threads())

    first = threading.Thread(target=merge_in_thread, args=("first", second_in, first_in))
    first.start()
    first_in.wait(10)
    second = threading.Thread(target=merge_in_thread, args=("second", first_out, second_in))
    second.start()
    first.join(10)  # the first merge ends while the second one runs
    first_out.set()
    second.join(10)
    assert seen == {"first": (4, 4, 6), "second": (4, 4, 6)}
    before = torch.get_num_threads()
    with _compute_threads(torch.device("cuda")):  # GPU merges leave the CPU setting alone
        assert torch.get_num_threads() == before


def _track_staging_maps(monkeypatch: pytest.MonkeyPatch) -> list[mmap.mmap]:
    """The writer's staging buffers that merges map from now on."""
    maps: list[mmap.mmap] = []
    real_init = engine._Pipeline.__init__

    def init(self: engine._Pipeline, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        maps.append(self._staging_map)

    monkeypatch.setattr(engine._Pipeline, "__init__", init)
    return maps


def _fail_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.FolderSource.read_into
    calls = [0]

    def read_into(self: engine.FolderSource, path: str, start: int, buffer: memoryview) -> None:
        calls[0] += isinstance(buffer.obj, mmap.mmap)  # tensor data (headers come first)
        if calls[0] > 5:
            raise OSError("injected: read failed")
        real(self, path, start, buffer)

    monkeypatch.setattr(engine.FolderSource, "read_into", read_into)


def _fail_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine._Ring.give_back
    calls = [0]

    def give_back(self: engine._Ring) -> None:
        calls[0] += 1
        if calls[0] > 4:
            raise OSError("injected: writer failed")
        real(self)

    monkeypatch.setattr(engine._Ring, "give_back", give_back)


def _fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync_file(path: Path) -> None:
        raise OSError("injected: fsync EIO")

    monkeypatch.setattr(engine, "_fsync_file", fsync_file)


def _fail_computing(monkeypatch: pytest.MonkeyPatch) -> None:
    def check_finite(values: torch.Tensor, key: str) -> None:
        raise engine.NonFiniteResult(f"injected: NaN in {key}", tensor=key)

    monkeypatch.setattr(engine, "_check_finite", check_finite)


@pytest.mark.parametrize("fault", [_fail_reading, _fail_writing, _fail_fsync, _fail_computing])
def test_a_failing_stage_stops_every_stage_unmaps_the_ring_and_leaves_nothing(
    sharded: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[pytest.MonkeyPatch], None],
) -> None:
    adapter, base = sharded
    rings: list[engine._Ring] = []
    real_ring = engine._Ring

    def tracked(size: int) -> engine._Ring:
        rings.append(real_ring(size))
        return rings[-1]

    fault(monkeypatch)
    monkeypatch.setattr(engine, "_Ring", tracked)
    maps = _track_staging_maps(monkeypatch)
    published: list[str] = []
    with pytest.raises(Exception, match="injected"):
        merge_to_folder(
            adapter, base, tmp_path / "merged", on_file=lambda e: published.append(e.path)
        )
    assert not merge_stages()
    assert not list(tmp_path.iterdir())  # neither the output nor its staging folder
    assert rings and all(ring._memory.closed for ring in rings)  # unmapped, not left to gc
    assert maps and all(staging.closed for staging in maps)


def test_a_float16_cast_that_overflows_names_the_tensor(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """A copied (not merged) float32 value above 65504 would silently become inf."""
    import shutil

    from safetensors.torch import load_file, save_file

    from registry.core.errors import NonFiniteResult

    base = shutil.copytree(base_dir("llama"), tmp_path / "base")
    shard = base / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.norm.weight"][0] = 1e5  # fine in float32 and bfloat16
    save_file(tensors, shard, metadata={"format": "pt"})
    adapter = adapter_dir("llama")
    merge_to_folder(adapter, base, tmp_path / "bf16", options=MergeOptions(dtype="bfloat16"))
    with pytest.raises(NonFiniteResult, match=r"model\.norm\.weight") as refused:
        merge_to_folder(adapter, base, tmp_path / "fp16", options=MergeOptions(dtype="float16"))
    assert "bfloat16" in refused.value.message
    assert not (tmp_path / "fp16").exists()
