"""Merge benchmark: the streaming merge engine against PEFT's merge_and_unload and `cp -r`.

It makes, once, under `--work` (default: `$TMPDIR/lora-registry-bench-merge`, kept and reused), a
Llama-shaped base with random bf16 weights and a real PEFT adapter for it (r=16, all-linear),
with `bench.compat`'s generators: TinyLlama-1.1B's shape by default (1.1 B parameters, 2.2 GB in
5 shards + index), or with `--quick` a ~100 M-parameter base (200 MB in 5 shards). Then,
`--repeat` rounds (3; 1 with `--quick`), each step in a fresh child process:

  1. `cp -r` of the base folder (the floor: every merge reads the base and writes a same-sized
     copy);
  2. ours: `worker.engine.merge_to_folder(adapter, base, out, options=MergeOptions(device=...))`;
  3. PEFT: `AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16)` +
     `PeftModel.from_pretrained` + `merge_and_unload()` + `save_pretrained(max_shard_size=<the
     base's>)`;

and, with `--registry`, registry to registry: a throwaway SeaweedFS and `lora-reg server`
(SQLite + S3), the base stored in the registry (`base add --upload`) and the adapter pushed
(untimed), then per round a fresh `lora-reg worker` and `lora-reg merge REF --base ID --to
registry --wait --force`, timed as the user sees it.

What is measured, per step: wall time from after the child's imports to its output on disk
(`os.sync()` once the step returns; our engine fsyncs each file itself, cp and
`save_pretrained` do not), the whole child process's time (interpreter and imports included), the
CPU time of the step (user + system, every thread: steadier than wall time on a shared machine),
and the child's peak RSS read by the child itself (`VmHWM`; for cp, `ru_maxrss` and the CPU time
of the `cp` process its wrapper waited for). The page cache is warm, and equally so for every
step: the base is read once in full before each step, earlier steps' outputs are deleted and
synced first. Once, the outputs of ours and PEFT's are compared tensor by tensor (streaming,
`safe_open`): bitwise on CPU. The targets (at least 8x faster than PEFT, within 3x of cp's time,
at most 1/4 of PEFT's peak memory) are printed as PASS/FAIL; the exit status does not depend on
them.

This is a benchmark, not a test::

    python -m bench.merge                    # 1.1 B parameters, 3 rounds, on CPU
    python -m bench.merge --quick            # ~100 M parameters, 1 round (under a minute)
    python -m bench.merge --device cuda      # the engine and PEFT on the GPU
    python -m bench.merge --registry         # + registry -> registry through a worker

JSON goes to `bench/results/merge-<device>.json` (`merge-<device>-quick.json` with `--quick`;
git-ignored) unless `--json` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only the standard library (and bench.compat, which keeps to it too) at module level: the child
# processes run this module and must start with nothing but what their step imports.
from bench.common import fmt_ratio, machine_info, print_table
from bench.compat import (
    INDEX_JSON,
    RANK,
    SHAPES,
    build_or_reuse,
    describe_adapter,
    describe_base,
    fmt_bytes,
    log,
    peak_rss,
    proc_status,
)

if TYPE_CHECKING:
    from tests.conftest import RunningServer
    from tests.support.seaweed import SeaweedServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "lora-registry-bench-merge"
# Llama-shaped bases: (config, max_shard_size). The full one is bench.compat's TinyLlama shape.
QUICK_KEY, FULL_KEY = "llama-100m", "llama-1.1b"
BASES: dict[str, tuple[dict[str, Any], str]] = {
    FULL_KEY: SHAPES[FULL_KEY],
    # --quick: 99.6 M parameters, 199 MB in bf16, 5 shards (the embedding alone is 49 MB).
    QUICK_KEY: (
        {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 8,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },
        "50MB",
    ),
}
STEPS = {
    "cp": "cp -r of the base folder",
    "ours": "ours: merge_to_folder",
    "peft": "PEFT: load + merge_and_unload + save",
    "registry": "registry -> registry (worker)",
}
# Targets from the issue: ours >= 8x faster than PEFT, <= 3x cp's time, <= 1/4 of PEFT's memory.
TARGET_SPEEDUP_VS_PEFT = 8.0
TARGET_TIMES_CP = 3.0
TARGET_MEMORY_FRACTION = 0.25
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",  # PEFT must not look the adapter's base up on the Hub
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# --- the children ------------------------------------------------------------------------------


def peak_rss_self() -> int:
    """This process's peak resident set size so far, in bytes."""
    return proc_status("VmHWM") or peak_rss()


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU time of this process (every thread) or of its waited-for children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cuda_peak(torch: Any, device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def step_result(
    started: float,
    imported: float,
    done: float,
    rss_imports: int | None,
    peak: int,
    cpu_s: float,
    **phases: float,
) -> dict[str, Any]:
    """What every child reports, once its output is flushed to disk (`os.sync()`): imports_s,
    the step's `phases`, op_s (the step until `done`), wall_s (the step and the sync), cpu_s
    (the CPU time the step used, every thread), rss_after_imports and peak_rss."""
    os.sync()
    synced = time.perf_counter()
    return {
        "imports_s": imported - started,
        **phases,
        "op_s": done - imported,
        "wall_s": synced - imported,
        "cpu_s": cpu_s,
        "rss_after_imports": rss_imports,
        "peak_rss": peak,
    }


def child_ours(base: Path, adapter: Path, out: Path, device: str) -> dict[str, Any]:
    """Our engine, folder to folder."""
    started = time.perf_counter()
    import torch

    from worker.engine import MergeOptions, merge_to_folder

    imported = time.perf_counter()
    rss_imports = proc_status("VmRSS")
    cpu_before = cpu_seconds()
    result = merge_to_folder(adapter, base, out, options=MergeOptions(device=device))
    merged = time.perf_counter()
    cpu_s = cpu_seconds() - cpu_before
    return {
        **step_result(started, imported, merged, rss_imports, peak_rss_self(), cpu_s),
        "cuda_peak_allocated": cuda_peak(torch, result.device),
        "device": result.device,
        "files": len(result.files),
        "bytes_written": result.size,
        "tensors_total": result.tensors_total,
        "tensors_merged": result.tensors_merged,
    }


def child_peft(
    base: Path, adapter: Path, out: Path, device: str, max_shard_size: str
) -> dict[str, Any]:
    """The reference: what merging with transformers and PEFT takes."""
    started = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    imported = time.perf_counter()
    rss_imports = proc_status("VmRSS")
    cpu_before = cpu_seconds()
    placement = {"device_map": device} if device != "cpu" else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, **placement)
    loaded = time.perf_counter()
    with warnings.catch_warnings():
        # PEFT 0.21 calls a transformers 5 API deprecated in favour of is_activation_checkpointing.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = PeftModel.from_pretrained(model, adapter)
        merged_model = peft_model.merge_and_unload()
    merged = time.perf_counter()
    merged_model.save_pretrained(out, max_shard_size=max_shard_size)
    saved = time.perf_counter()
    cpu_s = cpu_seconds() - cpu_before
    phases = {
        "from_pretrained_s": loaded - imported,
        "peft_and_merge_s": merged - loaded,
        "save_s": saved - merged,
    }
    return {
        **step_result(started, imported, saved, rss_imports, peak_rss_self(), cpu_s, **phases),
        "cuda_peak_allocated": cuda_peak(torch, device),
        "device": device,
        "files": sum(1 for p in out.iterdir() if p.is_file()),
        "bytes_written": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    }


def child_exec(command: list[str]) -> dict[str, Any]:
    """Run a command; its wall time (then synced) and peak RSS (`ru_maxrss` of what we waited for:
    this wrapper has no other child)."""
    started = time.perf_counter()
    subprocess.run(command, check=True)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return step_result(started, started, done, None, peak, cpu_seconds(resource.RUSAGE_CHILDREN))


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH already holds (packages installed aside)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def run_child(kind: str, *args: str, scratch: Path) -> dict[str, Any]:
    """Run `python -m bench.merge --child KIND ARGS` and return its JSON, plus `process_s`."""
    command = [sys.executable, "-m", "bench.merge", "--child", kind, *args]
    env = {**os.environ, "PYTHONPATH": python_path(), **CHILD_ENV}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        (scratch / f"child-{kind}.log").write_text(done.stdout + done.stderr)
        raise RuntimeError(f"the {kind} step failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = elapsed
    return result


# --- the page cache, outputs ---------------------------------------------------------------------


def warm_read(folder: Path) -> int:
    """Read every file of `folder` once, so that the step after starts with it in the page cache
    (as the earlier rounds' steps did); returns the bytes read."""
    total = 0
    buffer = bytearray(8 << 20)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total


def remove(path: Path) -> None:
    """Delete an output and flush the deletion, so the next step does not pay for it."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def tensor_files(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a checkpoint folder (index, or every file)."""
    index = folder / INDEX_JSON
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), path.name))
    return names


def compare_outputs(ours: Path, reference: Path) -> dict[str, Any]:
    """Compare two merged checkpoints tensor by tensor (one pair in memory at a time): the same
    names, dtypes and shapes, and bitwise-equal data; for tensors that differ, the largest
    absolute difference."""
    import torch
    from safetensors import safe_open

    ours_map, reference_map = tensor_files(ours), tensor_files(reference)
    common = sorted(set(ours_map) & set(reference_map))
    handles: dict[Path, Any] = {}

    def tensor(folder: Path, name: str, files: dict[str, str]) -> torch.Tensor:
        path = folder / files[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        loaded: torch.Tensor = handles[path].get_tensor(name)
        return loaded

    differing: list[str] = []
    mismatched: list[str] = []
    max_abs = 0.0
    compared_bytes = 0
    for name in common:
        a, b = tensor(ours, name, ours_map), tensor(reference, name, reference_map)
        if a.dtype != b.dtype or a.shape != b.shape:
            mismatched.append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            continue
        compared_bytes += a.numel() * a.element_size()
        if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
            differing.append(name)
            max_abs = max(max_abs, float((a.float() - b.float()).abs().max()))
        del a, b
    handles.clear()
    return {
        "tensors_ours": len(ours_map),
        "tensors_reference": len(reference_map),
        "only_ours": sorted(set(ours_map) - set(reference_map)),
        "only_reference": sorted(set(reference_map) - set(ours_map)),
        "tensors_compared": len(common) - len(mismatched),
        "bytes_compared": compared_bytes,
        "dtype_or_shape_mismatches": mismatched,
        "tensors_differing": len(differing),
        "differing_examples": differing[:10],
        "max_abs_difference": max_abs,
        "bitwise_equal": not differing
        and not mismatched
        and set(ours_map) == set(reference_map)
        and bool(common),
    }


# --- registry -> registry ------------------------------------------------------------------------


def registry_missing() -> str | None:
    """Why registry -> registry cannot run with this checkout's CLI; None when it can."""
    from tests.conftest import lora_reg_command

    needed = {
        ("merge",): ("--to", "--wait", "--force"),
        ("worker",): ("--once", "--device"),
        ("base", "add"): ("--upload",),
    }
    for command, flags in needed.items():
        done = subprocess.run(
            [*lora_reg_command(), *command, "--help"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        )
        missing = [flag for flag in flags if flag not in done.stdout]
        if done.returncode != 0 or missing:
            what = " ".join(command)
            return f"`lora-reg {what}` " + (
                f"lacks {', '.join(missing)}" if done.returncode == 0 else "does not exist"
            )
    return None


@dataclass
class RegistryBench:
    """A throwaway SeaweedFS + `lora-reg server` holding the base and the adapter."""

    scratch: Path
    device: str
    seaweed: SeaweedServer | None = None
    server: RunningServer | None = None
    ref: str = ""
    base_id: str = ""
    setup_s: dict[str, float] = field(default_factory=dict)

    def start(self, base_id: str, base_dir: Path, adapter_dir: Path) -> None:
        from bench.transfer import sqlite_s3_environment
        from cli.client import Registry
        from tests.conftest import start_server
        from tests.support.seaweed import start_seaweed

        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.seaweed = start_seaweed(self.scratch / "seaweed")
        server_dir = self.scratch / "server"
        server_dir.mkdir()
        env, bucket = sqlite_s3_environment(self.seaweed, server_dir)
        self.server = start_server(server_dir, env, "sqlite-s3", bucket)
        log(f"registry on {self.server.url}, SeaweedFS on {self.seaweed.endpoint}")
        self.base_id = base_id
        with Registry(self.server.url, cache_dir=self.scratch / "client-cache") as client:
            started = time.perf_counter()
            client.add_base(base_id, base_dir, upload=True)
            self.setup_s["base_add_upload"] = time.perf_counter() - started
            started = time.perf_counter()
            pushed = client.push(adapter_dir, "bench/merge-adapter", base=base_id)
            self.setup_s["push_adapter"] = time.perf_counter() - started
        self.ref = f"bench/merge-adapter@{pushed.version.number}"
        log(f"stored the base and pushed {self.ref}: {self.setup_s}")

    def round(self, index: int) -> dict[str, Any]:
        """A fresh worker (started and idle before the clock starts), then `lora-reg merge
        --wait` timed; the worker's peak RSS is read from /proc before it is stopped."""
        from tests.conftest import lora_reg_command, stop_server

        assert self.server is not None
        env = {
            **os.environ,
            **self.server.env,
            **CHILD_ENV,
            "PYTHONPATH": python_path(),
            "LORA_REG_URL": self.server.url,
            "LORA_REG_CACHE_DIR": str(self.scratch / f"worker-cache-{index}"),
            "TMPDIR": str(self.scratch),
        }
        worker_log = self.scratch / f"worker-{index}.log"
        with open(worker_log, "wb") as sink:
            worker = subprocess.Popen(
                [
                    *lora_reg_command(),
                    "worker",
                    "--device",
                    self.device,
                    "--name",
                    f"bench-{index}",
                ],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 120
            while b"serving" not in worker_log.read_bytes():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start:\n{worker_log.read_text()}")
                time.sleep(0.1)
            os.sync()
            command = [
                *lora_reg_command(),
                "merge",
                self.ref,
                "--base",
                self.base_id,
                "--to",
                "registry",
                "--wait",
                "--force",
                "--json",
            ]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"lora-reg merge failed ({done.returncode}):\n{done.stderr}")
            job = json.loads(done.stdout)
            peak = proc_status("VmHWM", worker.pid)
        finally:
            stop_server(worker)
        result = job.get("result") or {}
        return {
            "wall_s": wall,
            "process_s": wall,
            "peak_rss": peak,
            "job_status": job.get("status"),
            "artifact": result.get("artifact"),
            "job_id": job.get("id"),
        }

    def stop(self) -> None:
        from tests.conftest import stop_server
        from tests.support.seaweed import stop_seaweed

        if self.server is not None:
            stop_server(self.server.process)
        if self.seaweed is not None:
            stop_seaweed(self.seaweed)


# --- the benchmark -------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return name


def run_rounds(
    prepared: dict[str, Any],
    device: str,
    repeat: int,
    scratch: Path,
    registry: RegistryBench | None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Every step, `repeat` times, interleaved; then the outputs of round 1 compared."""
    base_dir, adapter_dir = prepared["base_dir"], prepared["adapter_dir"]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in STEPS}
    kept: dict[str, Path] = {}
    for index in range(1, repeat + 1):
        for name in ("cp", "ours", "peft"):
            out = scratch / f"out-{name}-{index}"
            warm_read(base_dir)
            warm_read(adapter_dir)
            os.sync()
            log(f"round {index}/{repeat}: {STEPS[name]}")
            merging = [str(base_dir), str(adapter_dir), str(out), device]
            child = {
                "cp": ["exec", "cp", "-r", str(base_dir), str(out)],
                "ours": ["ours", *merging],
                "peft": ["peft", *merging, prepared["max_shard_size"]],
            }[name]
            result = run_child(*child, scratch=scratch)
            log(
                f"  {result['wall_s']:.2f} s (process {result['process_s']:.2f} s), peak RSS "
                f"{fmt_bytes(result['peak_rss'])}"
            )
            samples[name].append(result)
            if index == 1 and name in ("ours", "peft"):
                kept[name] = out
            else:
                remove(out)
        if registry is not None:
            warm_read(base_dir)
            log(f"round {index}/{repeat}: {STEPS['registry']}")
            result = registry.round(index)
            log(f"  {result['wall_s']:.2f} s, worker peak RSS {fmt_bytes(result['peak_rss'])}")
            samples["registry"].append(result)
    log("comparing our output with PEFT's, tensor by tensor")
    try:
        correctness = compare_outputs(kept["ours"], kept["peft"])
    finally:
        for path in kept.values():
            remove(path)
    return {k: v for k, v in samples.items() if v}, correctness


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    """The median of a field the runs report, None where they do not (the registry step)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    steps: dict[str, Any] = {}
    for name, runs in samples.items():
        walls = [r["wall_s"] for r in runs]
        peaks = [r["peak_rss"] for r in runs if r.get("peak_rss")]
        growths = [
            r["peak_rss"] - r["rss_after_imports"] for r in runs if r.get("rss_after_imports")
        ]
        steps[name] = {
            "label": STEPS[name],
            "wall_s": walls,
            "median_wall_s": statistics.median(walls),
            "best_wall_s": min(walls),
            "median_op_s": statistics.median([r.get("op_s", r["wall_s"]) for r in runs]),
            "median_process_s": statistics.median([r["process_s"] for r in runs]),
            "median_cpu_s": median_of(runs, "cpu_s"),
            "median_peak_rss": int(statistics.median(peaks)) if peaks else None,
            # what the step itself added: peak minus the RSS after the child's imports
            "median_rss_growth": int(statistics.median(growths)) if growths else None,
            "runs": runs,
        }
    cp, ours, peft = steps["cp"], steps["ours"], steps["peft"]
    speedup = peft["median_wall_s"] / ours["median_wall_s"]
    times_cp = ours["median_wall_s"] / cp["median_wall_s"]
    memory = ours["median_peak_rss"] / peft["median_peak_rss"]
    targets = {
        "speedup_vs_peft": {
            "value": speedup,
            "target": f">= {TARGET_SPEEDUP_VS_PEFT:g}x",
            "pass": speedup >= TARGET_SPEEDUP_VS_PEFT,
        },
        "times_cp": {
            "value": times_cp,
            "target": f"<= {TARGET_TIMES_CP:g}x",
            "pass": times_cp <= TARGET_TIMES_CP,
        },
        "memory_vs_peft": {
            "value": memory,
            "target": f"<= {TARGET_MEMORY_FRACTION:g}",
            "pass": memory <= TARGET_MEMORY_FRACTION,
        },
    }
    # Informational: the same ratios on whole-process times (interpreter start and imports
    # included), and memory without the imports (torch's own footprint differs between builds).
    other = {
        "process_speedup_vs_peft": peft["median_process_s"] / ours["median_process_s"],
        "process_times_cp": ours["median_process_s"] / cp["median_process_s"],
        "rss_growth_vs_peft": ours["median_rss_growth"] / peft["median_rss_growth"],
        "cpu_vs_peft": peft["median_cpu_s"] / ours["median_cpu_s"],
        "cpu_times_cp": ours["median_cpu_s"] / cp["median_cpu_s"],
    }
    return {"steps": steps, "targets": targets, "other_ratios": other}


def print_report(report: dict[str, Any]) -> None:
    steps, targets, base, machine = (
        report["steps"],
        report["targets"],
        report["base"],
        report["machine"],
    )
    peft, cp = steps["peft"], steps["cp"]
    print(
        f"Merge benchmark: {report['base_id']} ({base['parameter_count']:,} parameters, bf16), "
        f"{fmt_bytes(base['total_bytes'])} in {len(base['shards'])} shards; adapter r={RANK} "
        f"all-linear, {fmt_bytes(report['adapter']['total_bytes'])}; device {report['device']}; "
        f"median of {report['repeat']} round(s)"
    )
    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB RAM, Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}; a fresh page of "
        f"memory costs {machine['fresh_page_ns']:,} ns; C kernels "
        f"{'built' if machine.get('c_kernels') else 'NOT built (torch ops instead)'}"
    )
    print()
    rows = []
    for step in steps.values():
        wall, peak = step["median_wall_s"], step["median_peak_rss"]
        rows.append(
            [
                step["label"],
                f"{wall:.2f}",
                fmt_bytes(peak),
                fmt_ratio(peft["median_wall_s"] / wall),
                fmt_ratio(wall / cp["median_wall_s"]),
                f"{peak / peft['median_peak_rss']:.3f}" if peak else "-",
                fmt_bytes(step["median_rss_growth"]),
                f"{step['median_process_s']:.2f}",
                "-" if step["median_cpu_s"] is None else f"{step['median_cpu_s']:.2f}",
            ]
        )
    head = [
        "step",
        "wall s",
        "peak RSS",
        "vs PEFT",
        "vs cp",
        "memory vs PEFT",
        "RSS growth",
        "process s",
        "CPU s",
    ]
    print_table(head, rows)
    print()
    print(
        "wall s: from after the child's imports until its output is on disk (os.sync() after the "
        "step; ours fsyncs its files itself); process s: the whole child, interpreter start and "
        "imports included. vs PEFT: PEFT's wall time over the step's (times faster); vs cp: the "
        "step's wall time over cp's; memory vs PEFT: the step's peak RSS over PEFT's; RSS growth: "
        "the peak minus the RSS after the child's imports; CPU s: user + system time of the step, "
        "every thread (for cp, the cp process). Page cache warm for every step (the base read in "
        "full just before it)."
    )
    if "registry" in steps:
        print(
            "registry -> registry: `lora-reg merge --wait` as the user sees it (the worker's claim "
            "poll, S3 reads of the stored base, the upload of the result included); peak RSS is "
            "the worker's."
        )
    print()
    for name, target in targets.items():
        verdict = "PASS" if target["pass"] else "FAIL"
        print(f"{verdict}  {name}: {target['value']:.3f} (target {target['target']})")
    other = report["other_ratios"]
    print(
        f"      (whole processes, imports included: {other['process_speedup_vs_peft']:.2f}x "
        f"faster than PEFT, {other['process_times_cp']:.2f}x cp; RSS growth "
        f"{other['rss_growth_vs_peft']:.3f} of PEFT's; CPU time {other['cpu_vs_peft']:.2f}x "
        f"less than PEFT's, {other['cpu_times_cp']:.2f}x cp's)"
    )
    check = report["correctness"]
    exact = "bitwise equal" if check["bitwise_equal"] else "NOT bitwise equal"
    print(
        f"{'PASS' if check['bitwise_equal'] else 'FAIL'}  correctness: our output vs PEFT's "
        f"saved output: {exact} ({check['tensors_compared']} tensors, "
        f"{fmt_bytes(check['bytes_compared'])} compared; {check['tensors_differing']} differ, max "
        f"|diff| {check['max_abs_difference']:g}; names only in ours {len(check['only_ours'])}, "
        f"only in PEFT's {len(check['only_reference'])})"
    )
    if report["quick"]:
        print(
            "(--quick: a small base, where the children's imports weigh as much as the model; "
            "the targets are meant for the full-size run)"
        )
    if report.get("registry_unavailable"):
        print(f"registry -> registry: not available yet ({report['registry_unavailable']})")


def engine_source() -> dict[str, Any]:
    """Which engine was measured: the git commit, and whether worker/ differs from it."""
    import hashlib

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    engine = ROOT / "worker" / "engine.py"
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "worker_modified": bool(git("status", "--porcelain", "--", "worker")),
        "engine_sha256": hashlib.sha256(engine.read_bytes()).hexdigest(),
    }


def machine(device: str) -> dict[str, Any]:
    from worker import engine

    info = machine_info(("torch", "transformers", "peft", "safetensors"))
    info["c_kernels"] = engine.kernels is not None  # worker/_kernels.c built (setup.py)
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.merge",
        description="The streaming merge engine against PEFT's merge_and_unload and cp -r.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a ~100 M-parameter base and 1 round (< 1 minute)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--repeat", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument(
        "--json", type=Path, help="results path (default bench/results/merge-<device>.json)"
    )
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help=f"base and adapter cache ({DEFAULT_WORK})"
    )
    parser.add_argument(
        "--registry", action="store_true", help="also time registry -> registry through a worker"
    )
    # internal: a step in its own process
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def child_main(kind: str, *args: str) -> dict[str, Any]:
    if kind == "ours":
        base, adapter, out, device = args
        return child_ours(Path(base), Path(adapter), Path(out), device)
    if kind == "peft":
        base, adapter, out, device, max_shard_size = args
        return child_peft(Path(base), Path(adapter), Path(out), device, max_shard_size)
    if kind == "exec":
        return child_exec(list(args))
    raise SystemExit(f"unknown child {kind!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_main(*args.child)))
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    device = resolve_device(args.device)
    unavailable = registry_missing() if args.registry else None
    if unavailable:
        log(f"registry -> registry: not available yet ({unavailable}); timing the rest")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / f"run-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    registry: RegistryBench | None = None
    try:
        # bench.compat's folder names: a --work shared with it reuses the 1.1 B base.
        key = QUICK_KEY if args.quick else FULL_KEY
        prepared = build_or_reuse(work, key, BASES[key])
        base, adapter = (
            describe_base(prepared["base_dir"]),
            describe_adapter(prepared["adapter_dir"]),
        )
        log(f"base {fmt_bytes(base.total_bytes)} in {len(base.shards)} shards; warming the cache")
        warm_read(prepared["base_dir"])
        if args.registry and not unavailable:
            registry = RegistryBench(scratch, device)
            registry.start(prepared["base_id"], prepared["base_dir"], prepared["adapter_dir"])
        samples, correctness = run_rounds(prepared, device, args.repeat, scratch, registry)
        ours = samples["ours"][0]
        report: dict[str, Any] = {
            "benchmark": "merge",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(device),
            "engine": engine_source(),
            "device": device,
            "repeat": args.repeat,
            "quick": args.quick,
            "statistic": "median over rounds (every sample is kept under steps.*.runs)",
            "page_cache": "warm: the base is read in full before every step",
            "base_id": prepared["base_id"],
            "base": {
                "dir": str(prepared["base_dir"]),
                "shape": prepared["shape"],
                "max_shard_size": prepared["max_shard_size"],
                "parameter_count": (base.total_bytes - base.header_bytes) // 2,  # all bf16
                "tensors": ours["tensors_total"],
                "files": base.files,
                "shards": base.shards,
                "total_bytes": base.total_bytes,
            },
            "adapter": {
                "dir": str(prepared["adapter_dir"]),
                "total_bytes": adapter.total_bytes,
                "tensors_merged": ours["tensors_merged"],
            },
            "built_s": prepared["built_s"],
            **summarize(samples),
            "correctness": correctness,
            "registry_setup_s": registry.setup_s if registry else None,
            "registry_unavailable": unavailable,
        }
        suffix = "-quick" if args.quick else ""
        out = args.json or RESULTS / f"merge-{device}{suffix}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report)
        print(f"\nJSON: {out}")
        return 0
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
