"""The merge engine's C kernel (worker/_kernels.c) against torch's arithmetic, bit for bit, and the
engine with and without it. PEFT's own merges are the oracle in test_merge_oracle.py, whose bf16
cases go through the kernel."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from registry.core.errors import NonFiniteResult
from tests.support.merging import folder_bytes
from worker import engine
from worker.engine import MergeOptions, merge_to_folder

bf16 = torch.bfloat16
BF16_MAX = torch.finfo(bf16).max


def test_the_kernels_are_built() -> None:
    """Without them merges are right but slower: a missing compiler must not pass unnoticed."""
    assert engine.kernels is not None, (
        "worker/_kernels.c was not built: install a C compiler and the Python headers, then "
        "`pip install -e .` again"
    )


@pytest.fixture
def add_bf16() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]:
    """The kernel over tensors: out = bf16(float32(weight) + delta); whether every result is
    finite."""
    kernels = engine.kernels
    assert kernels is not None

    def run(weight: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> bool:
        assert weight.is_contiguous() and delta.is_contiguous() and out.is_contiguous()
        assert weight.numel() == delta.numel() == out.numel()
        assert (weight.dtype, delta.dtype, out.dtype) == (bf16, torch.float32, bf16)
        return kernels.add_bf16(weight.data_ptr(), delta.data_ptr(), out.data_ptr(), out.numel())

    return run


def torch_sum(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What the engine computes without the kernel (and PEFT computes): the float32 sum, rounded."""
    return (weight.float() + delta).to(torch.bfloat16)


def bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.int16)


EVERY_BF16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)


@pytest.mark.parametrize("exponent", [-45, -40, -38, -30, -10, -3, 0, 3, 10, 30, 38])
def test_every_bfloat16_weight_plus_deltas_of_every_scale_is_torchs_sum(
    add_bf16: Callable[..., bool], exponent: int
) -> None:
    """All 65,536 bfloat16 bit patterns (NaN and inf included) plus random float32 deltas around
    10^exponent, float32 denormals (below 1e-38) included: finite results are torch's bits, and
    the kernel says whether all of them are finite."""
    weight = EVERY_BF16.view(torch.bfloat16)
    generator = torch.Generator().manual_seed(exponent + 100)
    delta = torch.randn(weight.numel(), generator=generator) * 10.0**exponent
    out = torch.empty_like(weight)
    expected = torch_sum(weight, delta)
    finite = torch.isfinite(expected)
    assert not finite.all()  # NaN and inf weights are in there
    assert add_bf16(weight, delta, out) is False
    assert torch.equal(bits(out)[finite], bits(expected)[finite])
    # Without the non-finite weights: finite unless a delta near 1e38 overflowed the sum.
    keep = torch.isfinite(weight.float())
    weight, delta = weight[keep].contiguous(), delta[keep].contiguous()
    out, expected = torch.empty_like(weight), torch_sum(weight, delta)
    finite = torch.isfinite(expected)
    assert add_bf16(weight, delta, out) is bool(finite.all())
    assert bool(finite.all()) == (exponent < 38)
    assert torch.equal(bits(out)[finite], bits(expected)[finite])


def test_halfway_sums_round_to_the_even_neighbour(add_bf16: Callable[..., bool]) -> None:
    """1 + 2^-8 is halfway between bfloat16 1 and 1 + 2^-7: ties go to the even mantissa, down
    from an even one and up from an odd one, as torch rounds."""
    ulp = 2.0**-7
    weight = torch.tensor([1.0, 1.0 + ulp, -1.0, -(1.0 + ulp)], dtype=torch.bfloat16)
    delta = torch.tensor([ulp / 2, ulp / 2, -ulp / 2, -ulp / 2])
    out = torch.empty_like(weight)
    assert add_bf16(weight, delta, out)
    assert out.tolist() == [1.0, 1.0 + 2 * ulp, -1.0, -(1.0 + 2 * ulp)]
    assert torch.equal(bits(out), bits(torch_sum(weight, delta)))


@pytest.mark.parametrize(
    ("weight", "delta"),
    [
        (1.0, float("nan")),
        (1.0, float("inf")),
        (BF16_MAX, 3e38),  # the float32 sum overflows
        (BF16_MAX, 1e36),  # finite in float32, rounds up past bfloat16's largest value
        (-BF16_MAX, -1e36),
    ],
)
def test_a_non_finite_result_is_reported(
    add_bf16: Callable[..., bool], weight: float, delta: float
) -> None:
    """In any position of a vector-sized run (the vector loop and its scalar tail)."""
    for position in (0, 5, 16, 38):
        weights = torch.ones(39, dtype=torch.bfloat16)
        deltas = torch.zeros(39)
        weights[position], deltas[position] = weight, delta
        assert add_bf16(weights, deltas, torch.empty_like(weights)) is False
        assert not torch.isfinite(torch_sum(weights, deltas)).all()


def test_the_largest_finite_sum_is_finite(add_bf16: Callable[..., bool]) -> None:
    weight = torch.full((33,), BF16_MAX, dtype=torch.bfloat16)
    delta = torch.full((33,), 1e34)  # rounds back down to the largest bfloat16
    out = torch.empty_like(weight)
    assert add_bf16(weight, delta, out) is True
    assert torch.equal(out, weight)


def test_in_place_is_the_same_as_into_another_buffer(add_bf16: Callable[..., bool]) -> None:
    """The engine merges in place (out is weight): every element is read before it is written."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(513, 77, generator=generator).to(torch.bfloat16)
    delta = torch.randn(513, 77, generator=generator) * 0.01
    apart = torch.empty_like(weight)
    assert add_bf16(weight, delta, apart)
    assert add_bf16(weight, delta, weight)
    assert torch.equal(bits(weight), bits(apart))


# --- the engine with and without the kernel ----------------------------------------------------


def _counting_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the engine's calls of the kernel (the elements of each)."""
    real = engine.kernels
    assert real is not None
    counts: list[int] = []

    class Counting:
        @staticmethod
        def add_bf16(weight: int, delta: int, out: int, count: int) -> bool:
            counts.append(count)
            return real.add_bf16(weight, delta, out, count)

    monkeypatch.setattr(engine, "kernels", Counting)
    return counts


def test_a_bf16_merge_with_the_kernel_is_byte_identical_to_one_without(
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = base_dir("llama", dtype="bfloat16", max_shard_size="40KB")
    adapter = adapter_dir("llama", dtype="bfloat16", target_modules="all-linear")
    counts = _counting_kernel(monkeypatch)
    merge_to_folder(adapter, base, tmp_path / "kernel")
    assert counts, "the kernel was not used for a bf16 Linear LoRA"
    monkeypatch.setattr(engine, "kernels", None)
    merge_to_folder(adapter, base, tmp_path / "torch")
    assert folder_bytes(tmp_path / "kernel") == folder_bytes(tmp_path / "torch")


def test_the_kernel_is_not_used_where_its_arithmetic_would_differ(
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float32 bases, float32 output of a bf16 base, DoRA: torch does those."""
    counts = _counting_kernel(monkeypatch)
    merge_to_folder(adapter_dir("llama"), base_dir("llama"), tmp_path / "f32")
    bf16_adapter = adapter_dir("llama", dtype="bfloat16")
    bf16_base = base_dir("llama", dtype="bfloat16")
    options = MergeOptions(dtype="float32")
    merge_to_folder(bf16_adapter, bf16_base, tmp_path / "widened", options=options)
    dora = adapter_dir("llama", dtype="bfloat16", use_dora=True)
    merge_to_folder(dora, bf16_base, tmp_path / "dora")
    assert counts == []


@pytest.mark.parametrize("with_kernel", [True, False])
def test_a_sum_that_rounds_past_bf16_max_is_refused_on_both_paths(
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    with_kernel: bool,
) -> None:
    """A weight at bfloat16's largest value (3.3895e38) plus ΔW = 1e36 is 3.3995e38: finite in
    float32, past the halfway point to the next power of two in bfloat16, so it rounds to inf.
    An error naming the tensor, with or without the kernel."""
    from safetensors.torch import load_file, save_file

    module = "model.layers.0.self_attn.q_proj"
    base = shutil.copytree(base_dir("llama", dtype="bfloat16"), tmp_path / "base")
    adapter = shutil.copytree(adapter_dir("llama", dtype="bfloat16"), tmp_path / "adapter")
    # One row of ΔW = s·B·A up to 1e36: that row of B zero but for one entry, sized so the
    # largest element of the row, at `column`, is 1e36.
    weights = load_file(adapter / "adapter_model.safetensors")
    a_key, b_key = (f"base_model.model.{module}.lora_{x}.weight" for x in "AB")
    scale = _scale(adapter)
    column = int(weights[a_key][0].float().abs().argmax())
    b = torch.zeros_like(weights[b_key])
    b[0, 0] = 1e36 / (scale * float(weights[a_key][0, column]))
    save_file({**weights, b_key: b}, adapter / "adapter_model.safetensors")
    delta = _delta(adapter, module)
    assert 6.7e35 < float(delta[0, column]) < 1.3e36  # past halfway, short of float32 overflow
    shard = base / "model.safetensors"
    tensors = load_file(shard)
    tensors[f"{module}.weight"][0, column] = BF16_MAX
    save_file(tensors, shard, metadata={"format": "pt"})
    counts = _counting_kernel(monkeypatch)
    if not with_kernel:
        monkeypatch.setattr(engine, "kernels", None)
    with pytest.raises(NonFiniteResult, match=rf"{module}\.weight"):
        merge_to_folder(adapter, base, tmp_path / "merged")
    assert bool(counts) == with_kernel
    assert not (tmp_path / "merged").exists()


def _scale(adapter: Path) -> float:
    config = json.loads((adapter / "adapter_config.json").read_text())
    return float(config["lora_alpha"] / config["r"])


def _delta(adapter: Path, module: str) -> torch.Tensor:
    """s·B·A of one module of a PEFT adapter folder, in float32."""
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    prefix = f"base_model.model.{module}"
    a = weights[f"{prefix}.lora_A.weight"].float()
    b = weights[f"{prefix}.lora_B.weight"].float()
    return (b @ a) * _scale(adapter)
