"""CLI latency benchmark: `lora-reg ls | show | versions | resolve` as whole processes (issue 18,
item 4: each answers in <= 0.3 s on this machine).

It starts its own `lora-reg server` (SQLite and a folder store in a temp dir, as
`tests/conftest.py` does), pushes a few small adapters (3 adapters, 2 versions each, metrics, a
label, an alias `prod`), then times each command as a user runs it: the installed `lora-reg`
console script, a fresh process every time, the server answering over loopback. Side by side, in
the same run and against the same server:

  * `python -c pass`: the interpreter's own start, the floor of any Python CLI (and a gauge of
    how loaded the machine is while the bench runs);
  * `lora-reg --version`: the entry point alone (typer, rich, the global options);
  * the same commands from the tree before the lazy imports (`--baseline`, a git revision
    extracted with `git archive`; `--baseline none` skips it), run by the same interpreter and
    packages: the ratio is before / now.

It uses hyperfine when it is on PATH (`hyperfine -N`, warm-up runs first) and a plain loop of
`subprocess.run` otherwise, and says which ran. Commands are checked before timing: each must
exit 0, and its output must be byte for byte the baseline's. It prints one table and writes JSON
(every sample, medians, CPU seconds, ratios, PASS/FAIL) to `bench/results/cli.json` by default.

This is a benchmark, not a test: it asserts nothing about timings. From the repository root::

    python -m bench.cli                  # 20 runs per command, about a minute
    python -m bench.cli --runs 50 --baseline none
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import fmt_ratio, machine_info, print_table
from cli.client import Registry
from tests.conftest import ROOT, lora_reg_command, server_environment, start_server, stop_server

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cli.json"
# The last commit before the CLI's lazy imports (issue 18, item 4).
BASELINE = "362f7960aff538961a7d8bbc1b7153d7b3db53b3"
TARGET_S = 0.3
NAME = "bench/adapter-1"  # the adapter `show`, `versions` and `resolve` read


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the registry ----------------------------------------------------------------------------


def write_adapter(directory: Path, seed: int, rank: int = 8, layers: int = 2) -> None:
    """A small valid PEFT LoRA folder: adapter_config.json and float32 lora_A/lora_B tensors
    (random bytes as data) for q_proj and v_proj of a 64-wide Llama-shaped model."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            for part, shape in (("lora_A", [rank, 64]), ("lora_B", [64, rank])):
                size = 4 * shape[0] * shape[1]
                header[f"{key}.{part}.weight"] = {
                    "dtype": "F32",
                    "shape": shape,
                    "data_offsets": [offset, offset + size],
                }
                offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", len(raw)) + raw + rng.randbytes(offset)
    (directory / "adapter_model.safetensors").write_bytes(data)


def fill(url: str, work: Path) -> None:
    """3 adapters of 2 versions each, with metrics and a label; `prod` on NAME@2."""
    with Registry(url, cache_dir=work / "client-cache") as client:
        for adapter in range(1, 4):
            for version in (1, 2):
                folder = work / "adapters" / f"{adapter}-{version}"
                write_adapter(folder, seed=10 * adapter + version)
                client.push(
                    folder,
                    f"bench/adapter-{adapter}",
                    metrics={"acc": 0.5 + version / 10, "loss": 1.0 / version},
                    labels={"team": "bench"},
                )
        client.set_alias(f"{NAME}@2", "prod")


def extract(revision: str, work: Path) -> Path | None:
    """The repository at `revision` in a folder of its own (git archive), or None."""
    target = work / f"tree-{revision[:12]}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        log(f"no baseline: git archive {revision}: {archive.stderr.decode().strip()}")
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


# --- timing ----------------------------------------------------------------------------------


def command_line(tree: Path | None, args: list[str]) -> list[str]:
    """`args` run with `tree` first on the import path (`env PYTHONPATH=...`, so that hyperfine
    and the loop run exactly the same thing); no tree: `args` as they are."""
    return args if tree is None else ["env", f"PYTHONPATH={tree}", *args]


def run_hyperfine(
    commands: dict[str, list[str]], env: dict[str, str], cwd: Path, runs: int, warmup: int
) -> dict[str, dict[str, Any]]:
    export = cwd / "hyperfine.json"
    names = list(commands)
    argv = ["hyperfine", "-N", "--style", "basic", "--warmup", str(warmup), "--runs", str(runs)]
    argv += ["--export-json", str(export)]
    for name in names:
        argv += ["--command-name", name, shlex.join(commands[name])]
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    results = json.loads(export.read_text())["results"]
    return {
        name: {"times": result["times"], "cpu_mean": result["user"] + result["system"]}
        for name, result in zip(names, results, strict=True)
    }


def run_loop(
    commands: dict[str, list[str]], env: dict[str, str], cwd: Path, runs: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """hyperfine's measurement without hyperfine: wall time per run, children's CPU per run.
    Runs interleave the commands, so a change of the machine's load touches them all alike."""
    samples: dict[str, dict[str, Any]] = {name: {"times": [], "cpu": []} for name in commands}
    for round_index in range(warmup + runs):
        for name, argv in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if round_index >= warmup:
                samples[name]["times"].append(elapsed)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                samples[name]["cpu"].append(cpu)
    return {
        name: {"times": s["times"], "cpu_mean": statistics.fmean(s["cpu"])}
        for name, s in samples.items()
    }


def check_outputs(
    commands: dict[str, list[str]], env: dict[str, str], cwd: Path
) -> dict[str, bytes]:
    """Each command's stdout; a command that fails stops the bench."""
    outputs = {}
    for name, argv in commands.items():
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{name} exited {result.returncode}:\n{result.stderr.decode()}")
        outputs[name] = result.stdout
    return outputs


# --- the report ------------------------------------------------------------------------------


def summarize(samples: dict[str, Any]) -> dict[str, float]:
    times = samples["times"]
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_s": samples["cpu_mean"],
    }


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for name, row in report["commands"].items():
        before = row.get("before")
        rows.append(
            [
                name,
                f"{row['median_s']:.3f}",
                f"{row['min_s']:.3f}",
                f"{row['cpu_s']:.3f}",
                f"{before['median_s']:.3f}" if before else "-",
                f"{before['cpu_s']:.3f}" if before else "-",
                fmt_ratio(row.get("speedup")),
                "yes" if row.get("same_output") else ("-" if before is None else "NO"),
                row.get("verdict", ""),
            ]
        )
    print(
        f"\n{report['tool']}, {report['runs']} runs per command after {report['warmup']} warm-up"
        f"; before = {report['baseline'] or 'not measured'}; wall seconds unless marked CPU"
    )
    load = report["load_average_1min"]
    print(
        f"1-minute load average {load['before']:.1f} before the timing, {load['after']:.1f} after\n"
    )
    print_table(
        [
            "command",
            "median s",
            "best s",
            "CPU s",
            "before median s",
            "before CPU s",
            "before/now",
            "same output",
            f"target <= {TARGET_S} s",
        ],
        rows,
        right={1, 2, 3, 4, 5, 6},
    )
    print()
    for name, row in report["commands"].items():
        if "verdict" in row:
            print(f"{row['verdict']:4}  {name}: median {row['median_s']:.3f} s (<= {TARGET_S} s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help="git revision to compare with (default: the last one before the lazy imports); "
        "'none' to skip",
    )
    parser.add_argument("--loop", action="store_true", help="a plain loop even with hyperfine")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-cli-"))
    server = None
    try:
        server_dir = work / "server"
        server_dir.mkdir()
        env, _ = server_environment("sqlite-folder", server_dir, None, lambda: "")
        server = start_server(server_dir, env, "sqlite-folder")
        log(f"server on {server.url}; pushing 6 versions")
        fill(server.url, work)
        baseline = None if args.baseline == "none" else extract(args.baseline, work)

        lora_reg = lora_reg_command()
        reads = {
            "ls": ["ls"],
            "show": ["show", f"{NAME}@2"],
            "versions": ["versions", NAME],
            "resolve": ["resolve", f"{NAME}@prod"],
        }
        commands: dict[str, list[str]] = {"python -c pass": [sys.executable, "-c", "pass"]}
        trees = {"": ROOT, "before: ": baseline} if baseline else {"": ROOT}
        for prefix, tree in trees.items():
            commands[f"{prefix}lora-reg --version"] = command_line(tree, [*lora_reg, "--version"])
            for name, extra in reads.items():
                commands[f"{prefix}lora-reg {name}"] = command_line(tree, [*lora_reg, *extra])
        # No token or URL from the caller's shell; the cwd is not on the import path.
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_REG_")}
        run_env["LORA_REG_URL"] = server.url
        cwd = work / "cwd"
        cwd.mkdir()
        outputs = check_outputs(commands, run_env, cwd)  # also writes the baseline's bytecode
        use_hyperfine = shutil.which("hyperfine") is not None and not args.loop
        tool = "hyperfine -N" if use_hyperfine else "a subprocess.run loop (interleaved)"
        log(f"timing {len(commands)} commands with {tool}")
        runner = run_hyperfine if use_hyperfine else run_loop
        load_before = os.getloadavg()[0]
        samples = runner(commands, run_env, cwd, args.runs, args.warmup)
        load_after = os.getloadavg()[0]

        rows: dict[str, dict[str, Any]] = {}
        for name in commands:
            if name.startswith("before: "):
                continue
            row: dict[str, Any] = summarize(samples[name]) | {"samples_s": samples[name]["times"]}
            before_name = f"before: {name}"
            if before_name in samples:
                row["before"] = summarize(samples[before_name]) | {
                    "samples_s": samples[before_name]["times"]
                }
                row["speedup"] = row["before"]["median_s"] / row["median_s"]
                row["same_output"] = outputs[before_name] == outputs[name]
            if name.removeprefix("lora-reg ") in reads:
                row["verdict"] = "PASS" if row["median_s"] <= TARGET_S else "FAIL"
            rows[name] = row
        report = {
            "benchmark": "cli",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(("typer", "rich", "httpx", "pydantic")),
            # Other processes competing for the CPUs (wall times follow; CPU s much less).
            "load_average_1min": {"before": load_before, "after": load_after},
            "tool": tool,
            "runs": args.runs,
            "warmup": args.warmup,
            "baseline": args.baseline if baseline else None,
            "target_s": TARGET_S,
            "statistic": "median wall seconds per command; CPU s is the mean user + system",
            "commands": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report)
        print(f"\nJSON: {args.out}")
        return 0
    finally:
        if server is not None:
            stop_server(server.process)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
