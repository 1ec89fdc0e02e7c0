"""The streaming merge engine against PEFT's own `merge_and_unload`, on CPU, bit for bit.

Every case (docs/peft-format.md §7) merges a real PEFT adapter into a tiny random base folder with
`worker.engine.merge`, builds the reference from the same folders with transformers + PEFT
(`tests/support/merge_oracle.py`), and checks:

- every tensor of the output is bitwise equal to PEFT's merged model (Linear, Conv1D, embedding,
  DoRA, lora_bias, replaced tensors, trainable tokens), with the base's names, shapes and dtypes,
  and every base tensor the adapter names has changed;
- transformers loads the output folder with no missing, unexpected or mismatched keys, and its
  logits equal those of PEFT's merged model on a fixed input;
- config.json changes only where untie / a resized vocabulary / the dtype option require, other
  files are copied, every shard says {"format": "pt"}, and `MergeResult.files` describes the files.

The adapters are `make_adapter`'s with the tensors PEFT initialises from the base (modules_to_save,
saved embeddings and biases, trainable tokens, DoRA magnitudes) given trained values, so that a
merge ignoring them fails. Some cases are checked against the formula too (bf16(fp32(W) + s·B·A),
the float32 output of a bf16 base); the refusals (tied embeddings without untie, lora_bias
without a base bias, bare-model prefix, NaN/inf in the adapter) are checked to write nothing; an
untied output must compute what PEFT computes unmerged on the tied base. The engine runs on CPU
(`device="cpu"`) so bitwise equality is a fair demand; where CUDA is present the GPU merge must
be within one rounding of PEFT on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Plain imports, not importorskip: without torch, transformers or PEFT this module must fail to
# collect, not skip, or CI would drop the comparison with PEFT without a word. The oracle imports
# peft and transformers lazily, so they are imported here for that alone.
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401

from registry.core.errors import Incompatible, NonFiniteResult
from tests.support.crafting import copy_folder, rewrite_tensors
from tests.support.merge_oracle import (
    checkpoint_state,
    forward,
    load_merged_folder,
    mismatches,
    peft_merged,
    read_folder,
    train_adapter,
    ulp_distance,
)
from tests.support.merging import folder_bytes
from worker import engine
from worker.engine import MergeOptions, MergeResult, merge

CPU = MergeOptions(device="cpu")
UNTIE = MergeOptions(untie=True, device="cpu")
PREFIX = "base_model.model."


@dataclass(frozen=True)
class Case:
    arch: str
    adapter: dict[str, Any] = field(default_factory=dict)  # make_adapter options
    dtype: str | None = "bfloat16"  # the base's stored dtype
    config: dict[str, Any] = field(default_factory=dict)  # base config (base and adapter)
    adapter_config: dict[str, Any] = field(default_factory=dict)  # the adapter's base only
    shard: str | None = None  # make_base max_shard_size
    unprefixed: bool = False  # GPT-2 checkpoint without `transformer.`
    options: MergeOptions = CPU
    # The oracle: PEFT on an untied copy of the base / after resize_token_embeddings / in float32.
    untie: bool = False
    vocab_size: int | None = None
    peft_dtype: str | None = None


GPT2_CONV1D = ["c_attn", "c_proj", "c_fc"]  # c_attn (64, 192), attn.c_proj (64, 64) square, ...
CASES: dict[str, Case] = {
    "llama-bf16-q/v": Case("llama"),
    "llama-rank-alpha-patterns": Case(
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"q_proj": 8, "layers.1.mlp.down_proj": 2},
            "alpha_pattern": {"v_proj": 32, "down_proj": 3},
        },
    ),
    "qwen2-rslora": Case("qwen2", {"use_rslora": True, "r": 8, "lora_alpha": 16}),
    "mistral-fp16-all-linear": Case("mistral", {"target_modules": "all-linear"}, dtype="float16"),
    "gpt2-conv1d": Case("gpt2", {"target_modules": GPT2_CONV1D}),
    "gpt2-conv1d-unprefixed-checkpoint": Case(
        "gpt2", {"target_modules": GPT2_CONV1D}, unprefixed=True
    ),
    "llama-embedding-lora": Case("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "llama-dora": Case("llama", {"use_dora": True}),
    "gpt2-dora-conv1d": Case("gpt2", {"target_modules": ["c_attn", "c_proj"], "use_dora": True}),
    "llama-dora-embedding": Case(
        "llama", {"target_modules": ["embed_tokens", "v_proj"], "use_dora": True}
    ),
    "qwen2-lora-bias": Case("qwen2", {"lora_bias": True}),
    "gpt2-lora-bias-conv1d": Case(
        "gpt2", {"target_modules": ["c_attn", "c_proj"], "lora_bias": True}
    ),
    "qwen2-bias-lora-only+modules-to-save-lm-head": Case(
        "qwen2",
        {
            "bias": "lora_only",
            "target_modules": ["q_proj", "k_proj"],
            "modules_to_save": ["lm_head"],
        },
    ),
    "llama-trainable-tokens": Case("llama", {"trainable_token_indices": [1, 2, 3]}),
    "gpt2-tied-modules-to-save-lm-head-untie": Case(
        "gpt2", {"modules_to_save": ["lm_head"]}, options=UNTIE, untie=True
    ),
    "gpt2-tied-lm-head-lora-untie": Case(
        "gpt2", {"target_modules": ["c_attn", "lm_head"]}, options=UNTIE, untie=True
    ),
    "llama-tied-lm-head-lora-untie": Case(
        "llama",
        {"target_modules": ["q_proj", "lm_head"]},
        config={"tie_word_embeddings": True},
        options=UNTIE,
        untie=True,
    ),
    "gpt2-tied-wte-lora-untie": Case(
        "gpt2", {"target_modules": ["wte", "c_attn"]}, options=UNTIE, untie=True
    ),
    "gpt2-tied-resized-vocab-wte-lora-untie": Case(
        "gpt2",
        {"target_modules": ["wte", "c_attn"]},
        adapter_config={"vocab_size": 264},
        vocab_size=264,
        options=UNTIE,
        untie=True,
    ),
    "llama-resized-vocab-modules-to-save": Case(
        "llama",
        {"modules_to_save": ["embed_tokens", "lm_head"]},
        adapter_config={"vocab_size": 264},
        vocab_size=264,
    ),
    "llama-resized-vocab-embedding-lora": Case(
        "llama",
        {"target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"]},
        adapter_config={"vocab_size": 264},
        vocab_size=264,
    ),
    "llama-sharded": Case("llama", {"target_modules": "all-linear"}, shard="20KB"),
    "llama-sharded-to-float32": Case(
        "llama",
        {"use_dora": True},
        shard="20KB",
        options=MergeOptions(dtype="float32", device="cpu"),
        peft_dtype="float32",
    ),
    "llama-bf16-to-float32": Case(
        "llama", options=MergeOptions(dtype="float32", device="cpu"), peft_dtype="float32"
    ),
    "bert-fp32-query/value": Case("bert", dtype=None),
    "bert-bf16-all-linear": Case("bert", {"target_modules": "all-linear"}),
}


@dataclass
class Outcome:
    case: Case
    base: Path
    adapter: Path
    out: Path
    result: MergeResult
    ours: dict[str, Any]
    reference: dict[str, Any]  # PEFT's merged model's tensors: `_peft_reference`
    model: Any  # PEFT's merged model


# --- fixtures ----------------------------------------------------------------------------------


def _strip_prefix(base: Path, to: Path, prefix: str) -> Path:
    """A copy of a single-file base whose tensor names lack `prefix` (old GPT-2 checkpoints)."""
    rewrite_tensors(
        copy_folder(base, to),
        lambda tensors: {k.removeprefix(prefix): v for k, v in tensors.items()},
        "model.safetensors",
    )
    return to


@pytest.fixture(scope="session")
def case_base(
    base_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], Path]:
    made: dict[str, Path] = {}

    def get(case: Case) -> Path:
        key = repr(case)
        if key not in made:
            options: dict[str, Any] = {"dtype": case.dtype, **case.config}
            if case.shard:
                options["max_shard_size"] = case.shard
            base = base_dir(case.arch, **options)
            if case.unprefixed:
                base = _strip_prefix(
                    base, tmp_path_factory.mktemp("unprefixed") / "base", "transformer."
                )
            made[key] = base
        return made[key]

    return get


@pytest.fixture(scope="session")
def untrained_adapter(adapter_dir: Callable[..., Path]) -> Callable[[Case], Path]:
    """The adapter as `make_adapter` saves it: random LoRA factors, but the tensors that replace
    base tensors (modules_to_save, biases, saved embeddings, trainable tokens) and the DoRA
    magnitudes still hold their initial values, copies of the base."""

    def get(case: Case) -> Path:
        options = dict(case.adapter)
        if case.dtype is not None:
            options["dtype"] = case.dtype
        if case.config or case.adapter_config:
            options["base_config"] = {**case.config, **case.adapter_config}
        return adapter_dir(case.arch, **options)

    return get


@pytest.fixture(scope="session")
def case_adapter(
    untrained_adapter: Callable[[Case], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], Path]:
    """The adapter with every tensor as training would leave it (`train_adapter`): a replacement
    the merge forgot, or took from the wrong place, shows in the output."""
    made: dict[Path, Path] = {}

    def get(case: Case) -> Path:
        source = untrained_adapter(case)
        if source not in made:
            made[source] = train_adapter(source, tmp_path_factory.mktemp("trained") / "adapter")
        return made[source]

    return get


@pytest.fixture(scope="session")
def outcome(
    case_base: Callable[[Case], Path],
    case_adapter: Callable[[Case], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], Outcome]:
    """Each case merged once per session by the engine and by PEFT."""
    done: dict[str, Outcome] = {}

    def get(name: str) -> Outcome:
        if name not in done:
            case = CASES[name]
            base, adapter = case_base(case), case_adapter(case)
            out = tmp_path_factory.mktemp("merged") / "out"
            result = merge(adapter, base, out, options=case.options)
            ours = read_folder(out)
            model = peft_merged(
                base,
                adapter,
                dtype=getattr(torch, case.peft_dtype) if case.peft_dtype else None,
                untie=case.untie,
                vocab_size=case.vocab_size,
            )
            reference = _peft_reference(model, set(ours))
            done[name] = Outcome(case, base, adapter, out, result, ours, reference, model)
        return done[name]

    return get


def _tied(model: Any) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _peft_reference(model: Any, checkpoint_keys: set[str]) -> dict[str, Any]:
    """PEFT's merged model's tensors, named as the checkpoint names them; a tied lm_head, which
    the checkpoint does not store (nor should the output), left out."""
    reference = checkpoint_state(model, checkpoint_keys)
    if _tied(model):
        reference.pop("lm_head.weight", None)
    return reference


def _config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# --- every case against PEFT -------------------------------------------------------------------

CASE_IDS = list(CASES)


@pytest.mark.parametrize("name", CASE_IDS)
def test_every_tensor_is_bitwise_what_peft_merge_and_unload_gives(
    name: str, outcome: Callable[[str], Outcome]
) -> None:
    o = outcome(name)
    assert mismatches(o.ours, o.reference) == []
    assert o.result.tensors_total == len(o.ours)


@pytest.mark.parametrize("name", CASE_IDS)
def test_output_keeps_the_base_names_shapes_and_dtypes(
    name: str, outcome: Callable[[str], Outcome]
) -> None:
    o = outcome(name)
    base = read_folder(o.base)
    expected = set(base)
    if o.case.untie:
        expected.add("lm_head.weight")
    assert set(o.ours) == expected
    out_dtype = getattr(torch, o.case.options.dtype) if o.case.options.dtype else None
    for key, tensor in o.ours.items():
        # an untied lm_head starts as the input embedding
        embedding = "model.embed_tokens.weight"
        source = base[
            key if key in base else embedding if embedding in base else "transformer.wte.weight"
        ]
        assert tensor.dtype == (out_dtype or source.dtype), key
        if o.case.vocab_size is None:
            assert tensor.shape == source.shape, key
    changed = {
        k
        for k, v in o.ours.items()
        if k not in base or v.shape != base[k].shape or not torch.equal(v, base[k].to(v.dtype))
    }
    assert 0 < len(changed) <= o.result.tensors_merged <= o.result.tensors_total
    # Independently of PEFT (which might drop a tensor as quietly as the engine): every base
    # tensor the adapter names has changed.
    touched = _touched(_adapter_tensors(o.adapter), set(o.ours))
    assert touched and touched <= changed, sorted(touched - changed)


@pytest.mark.parametrize("name", CASE_IDS)
def test_transformers_loads_the_output_and_gives_peft_logits(
    name: str, outcome: Callable[[str], Outcome]
) -> None:
    o = outcome(name)
    model, info = load_merged_folder(o.out)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ours, theirs = forward(model), forward(o.model)
    assert ours.dtype == theirs.dtype
    diff = float((ours.double() - theirs.double()).abs().max())
    assert torch.equal(ours, theirs), f"logits differ by up to {diff:.3g}"
    if o.case.untie:
        assert not _tied(model)


@pytest.mark.parametrize("name", CASE_IDS)
def test_config_files_metadata_and_result_describe_the_output(
    name: str, outcome: Callable[[str], Outcome]
) -> None:
    o = outcome(name)
    case = o.case
    # config.json: only what untie, the resized vocabulary or the dtype option require
    expected = _config(o.base)
    if case.untie:
        expected["tie_word_embeddings"] = False
    if case.vocab_size:
        expected["vocab_size"] = case.vocab_size
    if case.options.dtype:
        expected["dtype"] = case.options.dtype
    assert _config(o.out) == expected
    if expected == _config(o.base):
        assert (o.out / "config.json").read_bytes() == (o.base / "config.json").read_bytes()
    # other small files copied byte for byte; the model card is ours
    for path in o.base.iterdir():
        if path.suffix != ".safetensors" and path.name not in (
            "config.json",
            "model.safetensors.index.json",
            "README.md",
        ):
            assert (o.out / path.name).read_bytes() == path.read_bytes(), path.name
    assert (o.out / "README.md").is_file()
    # every shard: the base's file names, {"format": "pt"}
    shards = sorted(p.name for p in o.out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in o.base.glob("*.safetensors"))
    for shard in shards:
        assert _metadata(o.out / shard).get("format") == "pt", shard
    # MergeResult.files: exactly the files on disk, with their sizes and digests
    on_disk = {p.relative_to(o.out).as_posix(): p for p in o.out.rglob("*") if p.is_file()}
    assert sorted(f.path for f in o.result.files) == sorted(on_disk)
    for entry in o.result.files:
        path = on_disk[entry.path]
        assert (entry.size, entry.sha256) == (path.stat().st_size, _sha256(path)), entry.path


# --- against the formula -----------------------------------------------------------------------


def _adapter_tensors(adapter: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


_TOUCHES = [  # adapter key (without base_model.model.) -> the checkpoint tensor it changes
    (re.compile(r"(.*)\.lora_(A|B)\.weight"), r"\1.weight"),
    (re.compile(r"(.*)\.lora_embedding_(A|B)"), r"\1.weight"),
    (re.compile(r"(.*)\.lora_magnitude_vector(\.weight)?"), r"\1.weight"),
    (re.compile(r"(.*)\.lora_B\.bias"), r"\1.bias"),
    (re.compile(r"(.*)\.base_layer\.(weight|bias)"), r"\1.\2"),
    (re.compile(r"(.*)\.token_adapter\.trainable_tokens_delta"), r"\1.weight"),
    (re.compile(r"(.*)"), r"\1"),  # modules_to_save: the tensor itself
]


def _touched(adapter_tensors: dict[str, Any], output_keys: set[str]) -> set[str]:
    """The output tensors an adapter's keys name (GPT-2's `transformer.` may be absent)."""
    touched = set()
    for key in adapter_tensors:
        name = key.removeprefix(PREFIX)
        for pattern, target in _TOUCHES:
            if pattern.fullmatch(name):
                name = pattern.sub(target, name)
                break
        candidates = [name, name.removeprefix("transformer.")]
        found = [c for c in candidates if c in output_keys]
        assert found, f"{key} names no tensor of the output"
        touched.add(found[0])
    return touched


def _qv_deltas(adapter: Path) -> dict[str, Any]:
    """s·B·A in float32 for each module of a plain LoRA adapter (r=4, alpha=8: s = 2)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    scale = config["lora_alpha"] / config["r"]
    tensors = _adapter_tensors(adapter)
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            assert a.dtype == b.dtype == torch.float32
            deltas[f"{module}.weight"] = (b @ a) * scale
    return deltas


def test_llama_bf16_is_the_once_rounded_float32_sum(outcome: Callable[[str], Outcome]) -> None:
    o = outcome("llama-bf16-q/v")
    base = read_folder(o.base)
    deltas = _qv_deltas(o.adapter)
    assert len(deltas) == 4  # q_proj and v_proj of 2 layers
    for key, delta in deltas.items():
        w = base[key]
        assert w.dtype == torch.bfloat16
        expected = (w.float() + delta).to(torch.bfloat16)
        assert torch.equal(o.ours[key], expected), key
        assert not torch.equal(o.ours[key], w), key  # the adapter did change it
    for key in set(base) - set(deltas):
        assert torch.equal(o.ours[key], base[key]), key


def test_float32_output_of_a_bf16_base_is_the_unrounded_sum(
    outcome: Callable[[str], Outcome],
) -> None:
    o = outcome("llama-bf16-to-float32")
    base = read_folder(o.base)
    deltas = _qv_deltas(o.adapter)
    for key, w in base.items():
        expected = w.float() + deltas[key] if key in deltas else w.float()
        assert o.ours[key].dtype == torch.float32
        assert torch.equal(o.ours[key], expected), key
    # and it is not the bf16 result widened: the float32 option keeps the extra bits
    rounded = outcome("llama-bf16-q/v").ours
    assert any(not torch.equal(o.ours[k], rounded[k].float()) for k in deltas)


# Weights tall enough to be merged in several row blocks and pieces once those are small:
# gate/up_proj have 194 rows (3 runs of 64 and 2 rows left), the embedding 258 (4 and 2),
# down_proj is 194 wide. float32: a last-bit difference in B·A shows in the output (bf16 would
# hide most).
BLOCKED = {
    "llama-blocked": Case(
        "llama",
        {"target_modules": ["embed_tokens", "q_proj", "gate_proj", "down_proj"]},
        dtype=None,
        config={"intermediate_size": 194, "vocab_size": 258},
    ),
    "llama-blocked-dora": Case(
        "llama",
        {"target_modules": ["q_proj", "gate_proj", "down_proj"], "use_dora": True},
        dtype=None,
        config={"intermediate_size": 194},
    ),
    # token rows in every piece of the embedding, the last row included
    "llama-blocked-tokens": Case(
        "llama",
        {"trainable_token_indices": [1, 70, 130, 200, 257]},
        dtype=None,
        config={"vocab_size": 258},
    ),
}


@pytest.mark.parametrize("name", list(BLOCKED))
def test_merging_in_row_blocks_and_pieces_stays_bitwise_peft(
    name: str,
    case_base: Callable[[Case], Path],
    case_adapter: Callable[[Case], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large weights are merged in pieces of whole rows, each computed in row blocks
    (`_merged_pieces`, `_row_blocks`); the tests' tiny weights fit in one unless both are made
    small. A thin block (the 2 rows left over) is computed by MKL in another float32 order than
    PEFT's product over the whole weight: the engine must not make one (it once did, and the 1.1B
    benchmark's output differed from PEFT's in 2 tensors)."""
    case = BLOCKED[name]
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 64 * 64)
    monkeypatch.setattr(engine, "PIECE_BYTES", 64 * 64 * 4)
    base, adapter = case_base(case), case_adapter(case)
    assert len(engine._row_blocks(194, 64)) > 1 and len(engine._row_blocks(258, 64)) > 1
    merge(adapter, base, tmp_path / "out", options=CPU)
    reference = _peft_reference(peft_merged(base, adapter), set(read_folder(base)))
    assert mismatches(read_folder(tmp_path / "out"), reference) == []


# Cases with merged weights of 128 rows or more: Linear (gate/up_proj), Conv1D (GPT-2's
# mlp.c_proj), embedding LoRA, a saved head, trainable tokens, a resized vocabulary.
SPLIT_CASES = {
    "mistral-fp16-all-linear",
    "gpt2-conv1d",
    "llama-embedding-lora",
    "qwen2-bias-lora-only+modules-to-save-lm-head",
    "llama-trainable-tokens",
    "llama-resized-vocab-embedding-lora",
}


@pytest.mark.parametrize("name", CASE_IDS)
def test_merged_tensors_moving_in_small_pieces_give_the_same_bytes(
    name: str, outcome: Callable[[str], Outcome], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every case again with pieces of BLOCK_ROWS rows: tall weights (gate/up_proj, embeddings,
    heads, GPT-2's mlp.c_proj) move in several pieces, with their LoRA, DoRA, saved tensors,
    token rows and resized vocabularies split along; the files are byte for byte the default
    merge's (which the tests above hold to PEFT)."""
    o = outcome(name)
    monkeypatch.setattr(engine, "PIECE_BYTES", 1024)  # merged weights: runs of BLOCK_ROWS rows
    tall: set[str] = set()  # merged weights of two pieces' rows or more
    split: set[str] = set()
    real = engine._merged_pieces

    def spy(plan: Any, source_bytes: int) -> list[Any]:
        pieces = real(plan, source_bytes)
        dora_across_rows = plan.lora and plan.lora.magnitude and plan.lora.kind != "linear"
        if len(plan.shape) == 2 and plan.shape[0] >= 2 * engine.BLOCK_ROWS and not dora_across_rows:
            tall.add(plan.key)
        if len(pieces) > 1:
            split.add(plan.key)
        return pieces

    monkeypatch.setattr(engine, "_merged_pieces", spy)
    merge(o.adapter, o.base, tmp_path / "out", options=o.case.options)
    assert split == tall
    if name in SPLIT_CASES:
        assert split, "this case has tall merged weights: they should move in pieces"
    assert folder_bytes(tmp_path / "out") == folder_bytes(o.out)


# --- shards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-sharded", "llama-sharded-to-float32"])
def test_sharded_base_keeps_its_layout_and_recomputes_the_index(
    name: str, outcome: Callable[[str], Outcome]
) -> None:
    o = outcome(name)
    shards = sorted(p.name for p in o.base.glob("*.safetensors"))
    assert len(shards) >= 4
    index = json.loads((o.base / "model.safetensors.index.json").read_text())
    merged_index = json.loads((o.out / "model.safetensors.index.json").read_text())
    assert merged_index["weight_map"] == index["weight_map"]
    sizes = {k: v.numel() * v.element_size() for k, v in o.ours.items()}
    assert merged_index["metadata"]["total_size"] == sum(sizes.values())
    if o.case.options.dtype == "float32":  # every tensor doubled: the total is recomputed
        assert merged_index["metadata"]["total_size"] == 2 * index["metadata"]["total_size"]
    # each tensor in the shard the index names, in the base shard's order
    from safetensors import safe_open

    for shard in shards:
        with (
            safe_open(str(o.base / shard), framework="pt") as a,
            safe_open(str(o.out / shard), framework="pt") as b,
        ):
            assert list(b.keys()) == list(a.keys())


# --- what is refused ---------------------------------------------------------------------------


def _rewrite(adapter: Path, to: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    rewrite_tensors(copy_folder(adapter, to), edit)
    return to


def _codes(error: Incompatible) -> set[str]:
    report = error.details["report"]
    return {e["code"] for e in report["errors"]}


REFUSED = {
    "llama-lora-bias-without-base-bias": (
        Case("llama", {"lora_bias": True}),
        "lora_bias_without_base_bias",
    ),
    "gpt2-tied-lm-head-lora": (
        Case("gpt2", {"target_modules": ["c_attn", "lm_head"]}),
        "tied_embeddings",
    ),
    "llama-tied-lm-head-lora": (
        Case(
            "llama", {"target_modules": ["q_proj", "lm_head"]}, config={"tie_word_embeddings": True}
        ),
        "tied_embeddings",
    ),
    "gpt2-tied-modules-to-save-lm-head": (
        Case("gpt2", {"modules_to_save": ["lm_head"]}),
        "tied_embeddings",
    ),
    "gpt2-tied-wte-lora": (Case("gpt2", {"target_modules": ["wte", "c_attn"]}), "tied_embeddings"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_merges_write_nothing(
    name: str,
    case_base: Callable[[Case], Path],
    case_adapter: Callable[[Case], Path],
    tmp_path: Path,
) -> None:
    case, code = REFUSED[name]
    out = tmp_path / "out"
    with pytest.raises(Incompatible) as caught:
        merge(case_adapter(case), case_base(case), out, options=case.options)
    assert code in _codes(caught.value)
    assert not out.exists() or not any(out.iterdir())


def test_bare_model_prefix_is_refused(
    case_base: Callable[[Case], Path],
    case_adapter: Callable[[Case], Path],
    tmp_path: Path,
) -> None:
    case = CASES["llama-bf16-q/v"]
    adapter = _rewrite(
        case_adapter(case),
        tmp_path / "bare",
        lambda t: {k.replace(f"{PREFIX}model.", PREFIX): v for k, v in t.items()},
    )
    out = tmp_path / "out"
    with pytest.raises(Incompatible) as caught:
        merge(adapter, case_base(case), out, options=CPU)
    assert "bare_model_prefix" in _codes(caught.value)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_adapter_is_refused_naming_the_tensor(
    value: float,
    case_base: Callable[[Case], Path],
    case_adapter: Callable[[Case], Path],
    tmp_path: Path,
) -> None:
    case = CASES["llama-bf16-q/v"]
    target = "model.layers.1.self_attn.v_proj"

    def poison(tensors: dict[str, Any]) -> dict[str, Any]:
        b = tensors[f"{PREFIX}{target}.lora_B.weight"].clone()
        b[3, 1] = value
        return {**tensors, f"{PREFIX}{target}.lora_B.weight": b}

    adapter = _rewrite(case_adapter(case), tmp_path / "poisoned", poison)
    with pytest.raises(NonFiniteResult) as caught:
        merge(adapter, case_base(case), tmp_path / "out", options=CPU)
    assert f"{target}.weight" in str(caught.value)
    assert caught.value.details.get("tensor") == f"{target}.weight"


# --- no-ops and determinism --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-bf16-q/v", "gpt2-conv1d", "llama-embedding-lora"])
def test_an_untrained_adapter_leaves_the_base_bitwise(
    name: str,
    case_base: Callable[[Case], Path],
    untrained_adapter: Callable[[Case], Path],
    tmp_path: Path,
) -> None:
    """ΔW = 0 (PEFT initialises lora_B, or for embeddings lora_embedding_A, to zero)."""
    case = CASES[name]
    base = case_base(case)

    def untrained(tensors: dict[str, Any]) -> dict[str, Any]:
        zero = ("lora_B.weight", "lora_embedding_A")
        return {k: torch.zeros_like(v) if k.endswith(zero) else v for k, v in tensors.items()}

    adapter = _rewrite(untrained_adapter(case), tmp_path / "untrained", untrained)
    merge(adapter, base, tmp_path / "out", options=CPU)
    ours, original = read_folder(tmp_path / "out"), read_folder(base)
    assert mismatches(ours, original) == []
    assert mismatches(ours, _peft_reference(peft_merged(base, adapter), set(ours))) == []


@pytest.mark.parametrize("name", ["llama-dora", "llama-sharded", "gpt2-tied-lm-head-lora-untie"])
def test_merging_twice_gives_byte_identical_files(
    name: str,
    case_base: Callable[[Case], Path],
    case_adapter: Callable[[Case], Path],
    tmp_path: Path,
) -> None:
    case = CASES[name]
    provenance = {"adapter": "team/adapter@3", "base": "tiny/base@main"}
    results = [
        merge(
            case_adapter(case),
            case_base(case),
            tmp_path / f"out{i}",
            options=case.options,
            provenance=provenance,
        )
        for i in range(2)
    ]
    assert results[0].files == results[1].files
    files = sorted(p.name for p in (tmp_path / "out0").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out1").iterdir())
    for file in files:
        assert (tmp_path / "out0" / file).read_bytes() == (tmp_path / "out1" / file).read_bytes()
    for shard in (tmp_path / "out0").glob("*.safetensors"):
        metadata = _metadata(shard)
        assert metadata["format"] == "pt"
        assert provenance["adapter"] in metadata.values()


# --- untie means the function the adapter was trained as ---------------------------------------

# Where PEFT's own merge into the tied model lands the change in the shared tensor (the reason
# the merge is refused without untie); a modules_to_save head is a separate copy in PEFT too.
PEFT_TIED_MERGE_DIFFERS = {
    "gpt2-tied-modules-to-save-lm-head-untie": False,
    "gpt2-tied-lm-head-lora-untie": True,
    "llama-tied-lm-head-lora-untie": True,
    "gpt2-tied-wte-lora-untie": True,
    "gpt2-tied-resized-vocab-wte-lora-untie": True,
}


@pytest.mark.parametrize("name", list(PEFT_TIED_MERGE_DIFFERS))
def test_untied_output_computes_the_unmerged_adapter_on_the_tied_base(
    name: str,
    case_base: Callable[[Case], Path],
    case_adapter: Callable[[Case], Path],
    tmp_path: Path,
) -> None:
    """The adapter as trained (loaded by PEFT, unmerged, on the tied base) is the function the
    untied output must compute. Float32 base, so that the only differences are the roundings of
    a merged against an unmerged forward pass."""
    case = dataclasses.replace(CASES[name], dtype=None)
    base, adapter = case_base(case), case_adapter(case)
    merge(adapter, base, tmp_path / "out", options=UNTIE)
    model, info = load_merged_folder(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not _tied(model)
    trained = forward(peft_merged(base, adapter, vocab_size=case.vocab_size, merge=False))
    torch.testing.assert_close(forward(model), trained, rtol=1e-4, atol=1e-5)
    peft_tied = forward(peft_merged(base, adapter, vocab_size=case.vocab_size))
    differs = not torch.allclose(peft_tied, trained, rtol=1e-4, atol=1e-5)
    assert differs is PEFT_TIED_MERGE_DIFFERS[name]


# --- on a GPU: within one rounding of PEFT on CPU ----------------------------------------------

CUDA_CASES = [
    "llama-bf16-q/v",
    "mistral-fp16-all-linear",
    "gpt2-conv1d",
    "llama-embedding-lora",
    "llama-dora",
    "gpt2-dora-conv1d",
    "llama-dora-embedding",
    "qwen2-lora-bias",
    "llama-trainable-tokens",
    "gpt2-tied-resized-vocab-wte-lora-untie",
    "llama-sharded-to-float32",
    "bert-fp32-query/value",
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_merge_is_within_one_rounding_of_peft_on_cpu(
    name: str, outcome: Callable[[str], Outcome], tmp_path: Path
) -> None:
    """GPU matmuls and norms sum in another order than the CPU's, so the float32 ΔW may differ
    in its last bits: a 16-bit result may then round the other way (1 ulp), a float32 one
    differs by a few float32 ulps of ΔW. More than that (TF32 matmuls, a lost rounding step)
    fails."""
    o = outcome(name)
    options = dataclasses.replace(o.case.options, device="cuda")
    result = merge(o.adapter, o.base, tmp_path / "out", options=options)
    assert result.device.startswith("cuda")
    ours = read_folder(tmp_path / "out")
    assert set(ours) == set(o.reference)
    far = []
    for key, tensor in sorted(ours.items()):
        expected = o.reference[key]
        assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), key
        if tensor.dtype in (torch.bfloat16, torch.float16):
            if ulp_distance(tensor, expected) > 1:
                far.append(f"{key}: {ulp_distance(tensor, expected)} ulp")
        elif not torch.allclose(tensor, expected, rtol=1e-6, atol=1e-6):
            far.append(f"{key}: {float((tensor - expected).abs().max()):.3g}")
    assert far == []


def _host_conversions(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The host-to-GPU copy that also converts the dtype, if `func(*args, **kwargs)` is one."""
    if func is torch.ops.aten._to_copy.default:
        source = args[0]
        device = torch.device(kwargs.get("device") or source.device)
        dtype = kwargs.get("dtype") or source.dtype
    elif func is torch.ops.aten.copy_.default:
        source, device, dtype = args[1], args[0].device, args[0].dtype
    else:
        return None
    if source.device.type == "cpu" and device.type == "cuda" and dtype != source.dtype:
        return f"{func}: {source.dtype} {tuple(source.shape)} -> {dtype}"
    return None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["llama-bf16-q/v", "mistral-fp16-all-linear", "llama-dora"])
def test_cuda_merge_moves_tensors_in_their_stored_dtype(
    name: str, outcome: Callable[[str], Outcome], tmp_path: Path
) -> None:
    """A host-to-GPU copy that converts (`.to("cuda", torch.float32)`, or `copy_` of a bf16 CPU
    tensor into a float32 GPU one) converts on the host first: a multithreaded CPU pass per block
    and twice the bytes over the bus. On an H200 that made a 1.1 B merge burn 58 s of CPU in
    4.4 s; moved in their stored dtype and upcast on the GPU, it took 4.3 s of CPU in 2.6 s
    (bench/README.md, bench.merge). The merge runs in the calling thread, which the mode sees."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class HostConversions(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            if found := _host_conversions(func, args, kwargs):
                seen.append(found)
            return func(*args, **kwargs)

    o = outcome(name)
    options = dataclasses.replace(o.case.options, device="cuda")
    with HostConversions():  # type: ignore[no-untyped-call]
        merge(o.adapter, o.base, tmp_path / "out", options=options)
    assert seen == []
