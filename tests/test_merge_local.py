"""`lora-reg merge --local`: the engine in-process through the CLI, as a user runs it.

Output layout and loading, the refusal paths (incompatible adapter, existing output) with their
exit codes, and a merge killed with SIGKILL leaving nothing under the final name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import ROOT, run_cli
from tests.support.merging import kill_when


def merge_local(
    adapter: Path, base: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`lora-reg merge --local ADAPTER --base BASE -o OUT [extra]`, run from out's parent."""
    return run_cli(
        "merge",
        "--local",
        str(adapter),
        "--base",
        str(base),
        "-o",
        str(out),
        *extra,
        cwd=out.parent,
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            found.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    return found


def test_local_merge_writes_the_base_layout_and_loads(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    base = base_dir("llama", max_shard_size="40KB")
    adapter = adapter_dir("llama")
    out = tmp_path / "merged"
    done = merge_local(adapter, base, out, "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    base_shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(base_shards) >= 4
    assert sorted(p.name for p in out.glob("*.safetensors")) == base_shards
    assert reply["tensors_merged"] == 4  # q_proj and v_proj of two layers
    assert {f["path"] for f in reply["files"]} == {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    merged = _tensors(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in merged.values())
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
        assert metadata["format"] == "pt"
        assert metadata["lora_registry.adapter_digest"].startswith("sha256:")
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert "merged" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".merged.partial-*"))

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert model is not None


def test_local_merge_refuses_existing_output_unless_force(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    base, adapter = base_dir("llama"), adapter_dir("llama")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = merge_local(adapter, base, out)
    assert refused.returncode == 4, refused.stderr
    assert "output_exists" in refused.stderr and "--force" in refused.stderr
    assert (out / "keep.txt").read_text() == "mine"
    forced = merge_local(adapter, base, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_local_merge_refuses_an_incompatible_adapter_with_its_report(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    # An adapter trained on a wider model cannot be merged into this base.
    adapter = adapter_dir("llama", base_config={"hidden_size": 96, "head_dim": 24})
    base = base_dir("llama")
    out = tmp_path / "merged"
    done = merge_local(adapter, base, out)
    assert done.returncode == 8, done.stderr
    assert "incompatible" in done.stderr and "shape_mismatch" in done.stderr
    assert not out.exists()


def test_merges_are_deterministic(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    from worker.engine import merge_to_folder

    base, adapter = base_dir("gpt2", max_shard_size="60KB"), adapter_dir("gpt2")
    first = merge_to_folder(adapter, base, tmp_path / "one")
    second = merge_to_folder(adapter, base, tmp_path / "two")
    assert first.files == second.files
    for entry in first.files:
        assert (tmp_path / "one" / entry.path).read_bytes() == (
            tmp_path / "two" / entry.path
        ).read_bytes()


def test_a_killed_local_merge_leaves_nothing_under_the_final_name(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """SIGKILL while the engine is writing: only a staging folder is left; a re-run works and
    removes it."""
    base = base_dir("llama", max_shard_size="40KB")
    adapter = adapter_dir("llama")
    out = tmp_path / "merged"
    marker = tmp_path / "started"
    # A progress callback that announces the first tensor and then stalls, so the kill lands
    # mid-merge every time (no timing guesses).
    script = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from worker.engine import merge_to_folder
def stall(progress):
    Path({str(marker)!r}).write_text(str(progress.tensors_done))
    time.sleep(60)
merge_to_folder(Path({str(adapter)!r}), Path({str(base)!r}), Path({str(out)!r}), progress=stall)
"""
    kill_when(marker, subprocess.Popen([sys.executable, "-c", script], env={**os.environ}))
    assert not out.exists()
    leftovers = list(tmp_path.glob(".merged.partial-*"))
    assert leftovers, "the engine should have been writing into a staging folder"
    # A staging folder of a merge still running (this test's own process) must be left alone.
    running = tmp_path / f".merged.partial-{os.getpid()}-1"
    running.mkdir()
    done = merge_local(adapter, base, out)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file()
    assert list(tmp_path.glob(".merged.partial-*")) == [running]  # the killed one's is gone


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_output_dtype_option(
    adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path, dtype: str
) -> None:
    base = base_dir("llama", dtype="bfloat16")
    adapter = adapter_dir("llama", dtype="bfloat16")
    out = tmp_path / "merged"
    done = merge_local(adapter, base, out, "--dtype", dtype)
    assert done.returncode == 0, done.stderr
    merged = _tensors(out)
    assert {t.dtype for t in merged.values()} == {getattr(torch, dtype)}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype


def test_an_unknown_dtype_is_refused_before_any_work(tmp_path: Path) -> None:
    """Checked by the CLI for local and server merges alike: exit 6, nothing written."""
    local = merge_local(
        tmp_path / "adapter", tmp_path / "base", tmp_path / "out", "--dtype", "int8"
    )
    assert local.returncode == 6 and "invalid_input" in local.stderr and "bfloat16" in local.stderr
    remote = run_cli("merge", "team/x@1", "--dtype", "int8", cwd=tmp_path)
    assert remote.returncode == 6 and "invalid_input" in remote.stderr
    assert not (tmp_path / "out").exists()
