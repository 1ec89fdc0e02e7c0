"""Every compatibility code, from a crafted adapter: the code, the module it names, and the fix.

Each case starts from a real PEFT adapter and a real tiny base (`tests.support.adapters`, cached
per session by the `adapter_dir` / `base_dir` fixtures), then breaks a copy the way adapters
break in the wild (`tests.support.crafting`): kohya key names, the adapter name left in keys, a
missing `base_model.model.` prefix, keys saved from the bare model, a truncated rank, an integer
dtype, a dropped tensor, an edited adapter_config.json, a resized vocabulary, a quantized base.
The checker runs through `cli.bases.local_check` (the header-reading path the CLI uses), or
`registry.core.compat.check_compatibility` where a pure input is clearer.

For every finding the tests ask what a user needs: the right `code`, the module in `module` and in
the message, and a non-empty `fix` that the message also prints. Clean adapters of every
architecture are the controls: no errors and no warnings, so each test can fail both ways.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from cli.bases import folder_signature, local_check
from registry.core.basemodel import BaseSignature, BaseTensor
from registry.core.compat import CompatReport, Finding, check_compatibility
from registry.core.errors import InvalidProfile, InvalidSafetensors
from registry.core.profiles import VLLM_MAX_LORA_VOCAB, bind
from tests.conftest import unique
from tests.support.crafting import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    copy_folder,
    edit_json,
    make_seq_cls_adapter,
    rename_keys,
    rewrite_tensors,
    write_raw_safetensors,
)

P = "base_model.model."  # PEFT's key prefix
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
EMBED = "model.embed_tokens"
C_ATTN = "transformer.h.0.attn.c_attn"
Tensors = dict[str, torch.Tensor]


# --- fixtures and helpers ----------------------------------------------------------------------


@dataclass
class Lab:
    """Real adapters and bases (made once per session) and writable copies to break."""

    adapters: Callable[..., Path]
    bases: Callable[..., Path]
    tmp: Path

    def adapter(self, arch: str = "llama", **options: Any) -> Path:
        """A writable copy of a real PEFT adapter for `arch` (make_adapter options)."""
        return copy_folder(self.adapters(arch, **options), self.tmp / unique("adapter"))

    def base(self, arch: str = "llama", **options: Any) -> Path:
        """A real tiny base checkpoint (read-only; make_base options such as hidden_size)."""
        return self.bases(arch, **options)

    def base_copy(self, arch: str = "llama", **options: Any) -> Path:
        return copy_folder(self.bases(arch, **options), self.tmp / unique("base"))


@pytest.fixture
def lab(adapter_dir: Callable[..., Path], base_dir: Callable[..., Path], tmp_path: Path) -> Lab:
    return Lab(adapter_dir, base_dir, tmp_path)


def check(adapter: Path, base: Path | BaseSignature, **kwargs: Any) -> CompatReport:
    """The report `lora-reg check ADAPTER --base BASE` computes: headers only."""
    signature = base if isinstance(base, BaseSignature) else folder_signature(base).signature
    report, _ = local_check(adapter, signature, **kwargs)
    return report


def summary(report: CompatReport) -> list[str]:
    return [f"{f.severity} {f.code} [{f.module}]: {f.message}" for f in report.errors] + [
        f"{f.severity} {f.code} [{f.module}]: {f.message}" for f in report.warnings
    ]


def finding(
    report: CompatReport,
    code: str,
    module: str | None = None,
    severity: str = "error",
    names: tuple[str, ...] = (),
) -> Finding:
    """The `severity` finding with `code` for `module` (its `module` field), or else the first
    whose message holds every text in `names`."""
    found = [f for f in (*report.errors, *report.warnings) if f.code == code]
    assert found, f"no {code} in {summary(report)}"
    assert all(f.severity == severity for f in found), summary(report)
    if module is not None:
        found = [f for f in found if f.module == module]
        assert found, f"no {code} with module={module!r} in {summary(report)}"
    matching = [f for f in found if all(text in f.message for text in names)]
    assert matching, f"no {code} message names all of {names}: {summary(report)}"
    return matching[0]


def assert_names_its_fix(f: Finding) -> None:
    assert f.fix, f"{f.code} says what is wrong but not what to do: {f.message}"
    assert f.fix in f.message, f"{f.code}: the message does not print the fix: {f.message}"


# --- controls: real adapters on their own base -------------------------------------------------

CLEAN = [
    pytest.param("llama", {}, id="llama-q/v"),
    pytest.param("qwen2", {}, id="qwen2-q/v"),
    pytest.param("mistral", {}, id="mistral-q/v"),
    pytest.param("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"]}, id="gpt2-conv1d"),
    pytest.param("bert", {}, id="bert-query/value"),
    pytest.param("llama", {"target_modules": ["embed_tokens", "q_proj"]}, id="llama-embedding"),
    pytest.param("llama", {"use_dora": True}, id="llama-dora"),
]


@pytest.mark.parametrize(("arch", "options"), CLEAN)
def test_a_real_adapter_on_its_own_base_has_no_findings(
    lab: Lab, arch: str, options: dict[str, Any]
) -> None:
    report = check(lab.adapter(arch, **options), lab.base(arch))
    assert report.compatible, summary(report)
    assert report.errors == [] and report.warnings == [], summary(report)
    assert report.modules and all(row.ok and row.base_tensor for row in report.modules)


@pytest.mark.parametrize("profile", ["vllm", "merge"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "bert"])
def test_a_real_adapter_passes_the_serving_profiles(lab: Lab, arch: str, profile: str) -> None:
    report = check(lab.adapter(arch), lab.base(arch), profile=profile)
    assert report.compatible, summary(report)
    assert report.errors == [] and report.warnings == [], summary(report)


def test_a_gpt2_adapter_fits_an_unprefixed_gpt2_checkpoint(lab: Lab) -> None:
    """Older GPT-2 checkpoints store `h.0.attn.c_attn.weight`, without `transformer.`."""
    base = lab.base_copy("gpt2")
    rewrite_tensors(base, strip_transformer_prefix, filename="model.safetensors")
    report = check(lab.adapter("gpt2", target_modules=["c_attn", "c_proj", "c_fc"]), base)
    assert report.compatible, summary(report)
    rows = {row.module: row for row in report.modules}
    assert rows[C_ATTN].base_tensor == "h.0.attn.c_attn.weight"
    assert {row.kind for row in report.modules} == {"conv1d"}


def strip_transformer_prefix(tensors: Tensors) -> Tensors:
    return {key.removeprefix("transformer."): value for key, value in tensors.items()}


# --- crafted errors ----------------------------------------------------------------------------


@dataclass
class Setup:
    adapter: Path
    base: Path | BaseSignature
    options: dict[str, Any] = field(default_factory=dict)  # local_check keyword arguments


def drop(*fragments: str) -> Callable[[Tensors], Tensors]:
    return lambda tensors: {k: v for k, v in tensors.items() if not any(f in k for f in fragments)}


def put(key: str, value: torch.Tensor) -> Callable[[Tensors], Tensors]:
    return lambda tensors: {**tensors, key: value}


def change(key: str, how: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors], Tensors]:
    return lambda tensors: {**tensors, key: how(tensors[key])}


def kohya_names(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rename_keys(adapter, ".lora_A.weight", ".lora_down.weight")
    rename_keys(adapter, ".lora_B.weight", ".lora_up.weight")
    return Setup(adapter, lab.base())


def adapter_name_left_in_keys(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rename_keys(adapter, ".lora_A.weight", ".lora_A.default.weight")
    return Setup(adapter, lab.base())


def peft_prefix_missing(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rename_keys(adapter, P, "")
    return Setup(adapter, lab.base())


def merged_weight_saved_too(lab: Lab) -> Setup:
    """A full q_proj weight next to its LoRA pair (PEFT's model calls it base_layer.weight)."""
    adapter = lab.adapter()
    rewrite_tensors(adapter, put(f"{P}{Q0}.weight", torch.zeros(64, 64)))
    return Setup(adapter, lab.base())


def magnitude_without_use_dora(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rewrite_tensors(adapter, put(f"{P}{Q0}.lora_magnitude_vector", torch.ones(64)))
    return Setup(adapter, lab.base())


def lora_bias_tensor_without_lora_bias(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rewrite_tensors(adapter, put(f"{P}{Q0}.lora_B.bias", torch.zeros(64)))
    return Setup(adapter, lab.base())


def lora_b_dropped(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rewrite_tensors(adapter, drop(f"{V1}.lora_B"))
    return Setup(adapter, lab.base())


def lora_a_stored_as_int32(lab: Lab) -> Setup:
    adapter = lab.adapter()
    key = f"{P}{Q0}.lora_A.weight"
    rewrite_tensors(adapter, change(key, lambda t: (t * 1000).to(torch.int32)))
    return Setup(adapter, lab.base())


def truncated_rank(lab: Lab) -> Setup:
    """Both halves cut from rank 4 to rank 2; adapter_config.json still says r=4."""
    adapter = lab.adapter()

    def cut(tensors: Tensors) -> Tensors:
        return {k: v[:2] if ".lora_A." in k else v[:, :2] for k, v in tensors.items()}

    rewrite_tensors(adapter, cut)
    return Setup(adapter, lab.base())


def lora_a_truncated_alone(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rewrite_tensors(adapter, lambda t: {k: v[:2] if ".lora_A." in k else v for k, v in t.items()})
    return Setup(adapter, lab.base())


def llama_on_a_wider_base(lab: Lab) -> Setup:
    return Setup(lab.adapter(), lab.base(hidden_size=96, intermediate_size=192))


def gpt2_c_attn_on_a_wider_base(lab: Lab) -> Setup:
    """c_attn is a non-square Conv1D: weight (in=64, out=192)."""
    return Setup(lab.adapter("gpt2"), lab.base("gpt2", n_embd=96))


def gpt2_square_c_proj_on_a_wider_base(lab: Lab) -> Setup:
    """attn.c_proj is a square Conv1D (64 x 64): only the width can tell."""
    return Setup(lab.adapter("gpt2", target_modules=["attn.c_proj"]), lab.base("gpt2", n_embd=96))


def gpt2_c_attn_in_linear_orientation(lab: Lab) -> Setup:
    """An adapter converted as if c_attn were nn.Linear (out, in): A (r, 192), B (64, r)."""
    adapter = lab.adapter("gpt2")

    def linear(tensors: Tensors) -> Tensors:
        return {k: torch.zeros(4, 192) if ".lora_A." in k else torch.zeros(64, 4) for k in tensors}

    rewrite_tensors(adapter, linear)
    return Setup(adapter, lab.base("gpt2"))


def conv2d_shaped_lora_a(lab: Lab) -> Setup:
    adapter = lab.adapter()
    key = f"{P}{Q0}.lora_A.weight"
    rewrite_tensors(adapter, change(key, lambda t: t[:, :, None, None]))
    return Setup(adapter, lab.base())


def lora_on_a_1d_norm(lab: Lab) -> Setup:
    """LoRA tensors for model.norm, whose base weight is a vector."""
    adapter = lab.adapter()
    rewrite_tensors(adapter, put(f"{P}model.norm.lora_A.weight", torch.zeros(4, 64)))
    rewrite_tensors(adapter, put(f"{P}model.norm.lora_B.weight", torch.zeros(64, 4)))
    return Setup(adapter, lab.base())


def dora_magnitude_of_another_width(lab: Lab) -> Setup:
    adapter = lab.adapter(use_dora=True)
    rewrite_tensors(adapter, put(f"{P}{Q0}.lora_magnitude_vector", torch.ones(32)))
    return Setup(adapter, lab.base())


def lora_bias_of_another_width(lab: Lab) -> Setup:
    adapter = lab.adapter(lora_bias=True)
    rewrite_tensors(adapter, put(f"{P}{Q0}.lora_B.bias", torch.zeros(32)))
    return Setup(adapter, lab.base())


def token_deltas_of_another_width(lab: Lab) -> Setup:
    adapter = lab.adapter(trainable_token_indices=[1, 2, 3])
    key = f"{P}{EMBED}.token_adapter.trainable_tokens_delta"
    rewrite_tensors(adapter, change(key, lambda t: t[:, :32]))
    return Setup(adapter, lab.base())


def saved_lm_head_of_another_width(lab: Lab) -> Setup:
    adapter = lab.adapter(modules_to_save=["lm_head"])
    rewrite_tensors(adapter, change(f"{P}lm_head.weight", lambda t: t[:, :32]))
    return Setup(adapter, lab.base())


def q_proj_renamed(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rename_keys(adapter, ".q_proj.", ".query_proj.")
    return Setup(adapter, lab.base())


def qwen2_biases_on_llama(lab: Lab) -> Setup:
    """bias="lora_only" saves q/v biases; a Llama of the same size has none to replace."""
    return Setup(lab.adapter("qwen2", bias="lora_only"), lab.base("llama"))


def llama_adapter_on_gpt2(lab: Lab) -> Setup:
    return Setup(lab.adapter("llama"), lab.base("gpt2"))


def saved_from_the_bare_model(lab: Lab) -> Setup:
    """base_model.model.model.X -> base_model.model.X, task_type still CAUSAL_LM (peft#1579)."""
    adapter = lab.adapter()
    rename_keys(adapter, f"{P}model.", P)
    return Setup(adapter, lab.base())


def gpt2_saved_from_the_bare_model(lab: Lab) -> Setup:
    adapter = lab.adapter("gpt2")
    rename_keys(adapter, f"{P}transformer.", P)
    return Setup(adapter, lab.base("gpt2"))


def head_adapter_labelled_bare(lab: Lab) -> Setup:
    """A CAUSAL_LM adapter (keys with `model.`) whose task_type says FEATURE_EXTRACTION."""
    adapter = lab.adapter()
    edit_json(adapter / ADAPTER_CONFIG, task_type="FEATURE_EXTRACTION")
    return Setup(adapter, lab.base())


def embedding_lora_on_a_larger_vocabulary(lab: Lab) -> Setup:
    """Embedding LoRA for 256 tokens, pushed without its embedding copy, on a 300-token base."""
    adapter = lab.adapter(target_modules=["embed_tokens", "q_proj"])
    rewrite_tensors(adapter, drop(f"{EMBED}.base_layer.weight"))
    return Setup(adapter, lab.base(vocab_size=300))


def trainable_tokens_past_the_vocabulary(lab: Lab) -> Setup:
    adapter = lab.adapter(trainable_token_indices=[1, 2, 3])
    edit_json(adapter / ADAPTER_CONFIG, trainable_token_indices=[1, 2, 300])
    return Setup(adapter, lab.base())


def trained_on_a_resized_vocabulary(lab: Lab) -> Setup:
    """A real adapter trained after resizing to 300 tokens: embedding LoRA (saved whole) and a
    modules_to_save lm_head, checked against the original 256-token base."""
    adapter = lab.adapter(
        target_modules=["embed_tokens", "q_proj"],
        modules_to_save=["lm_head"],
        base_config={"vocab_size": 300},
    )
    return Setup(adapter, lab.base())


def dora_magnitude_dropped(lab: Lab) -> Setup:
    adapter = lab.adapter(use_dora=True)
    rewrite_tensors(adapter, drop(f"{Q1}.lora_magnitude_vector"))
    return Setup(adapter, lab.base())


def one_module_dropped(lab: Lab) -> Setup:
    adapter = lab.adapter()
    rewrite_tensors(adapter, drop(f"{V1}."))
    return Setup(adapter, lab.base())


def saved_lm_head_dropped(lab: Lab) -> Setup:
    adapter = lab.adapter(modules_to_save=["lm_head"])
    rewrite_tensors(adapter, drop("lm_head"))
    return Setup(adapter, lab.base())


def v_proj_left_out_of_target_modules(lab: Lab) -> Setup:
    adapter = lab.adapter()
    edit_json(adapter / ADAPTER_CONFIG, target_modules=["q_proj"])
    return Setup(adapter, lab.base())


def norm_added_to_target_modules(lab: Lab) -> Setup:
    adapter = lab.adapter()
    edit_json(adapter / ADAPTER_CONFIG, target_modules=["q_proj", "v_proj", "input_layernorm"])
    return Setup(adapter, lab.base())


def config_edit(**changes: Any) -> Callable[[Lab], Setup]:
    def craft(lab: Lab) -> Setup:
        adapter = lab.adapter()
        edit_json(adapter / ADAPTER_CONFIG, **changes)
        return Setup(adapter, lab.base())

    return craft


@dataclass(frozen=True)
class Case:
    craft: Callable[[Lab], Setup]
    code: str
    module: str | None = None  # the finding's module field, also named in its message
    names: tuple[str, ...] = ()  # more text the message must hold (key, tensor, pattern...)
    fix: str | None = None  # the exact fix, where it is pinned


ERRORS = {
    # unrecognised_key: tensors PEFT would not load
    "kohya-lora_down-lora_up": Case(
        kohya_names,
        "unrecognised_key",
        names=(f"{P}{Q0}.lora_down.weight", "kohya"),
        fix="re-save the adapter with PEFT's save_pretrained",
    ),
    "adapter-name-in-key": Case(
        adapter_name_left_in_keys,
        "unrecognised_key",
        names=(f"{P}{Q0}.lora_A.default.weight", "adapter name"),
    ),
    "no-base_model.model-prefix": Case(
        peft_prefix_missing, "unrecognised_key", names=(f"{Q0}.lora_A.weight", repr(P))
    ),
    "stray-full-tensor": Case(
        merged_weight_saved_too,
        "unrecognised_key",
        names=(f"{P}{Q0}.weight", "base_layer.weight"),
    ),
    "magnitude-without-use_dora": Case(
        magnitude_without_use_dora, "unrecognised_key", Q0, ("lora_magnitude_vector",)
    ),
    "lora_B.bias-without-lora_bias": Case(
        lora_bias_tensor_without_lora_bias, "unrecognised_key", Q0, ("lora_B.bias",)
    ),
    # the file itself is inconsistent
    "lora_B-dropped": Case(
        lora_b_dropped, "incomplete_pair", V1, (f"{P}{V1}.lora_A.weight", "lora_B")
    ),
    "lora_A-as-I32": Case(lora_a_stored_as_int32, "invalid_dtype", Q0, (f"{Q0}.lora_A", "I32")),
    "truncated-rank": Case(truncated_rank, "rank_mismatch", Q0, ("rank 4 (r)", "rank 2")),
    "lora_A-truncated-alone": Case(
        lora_a_truncated_alone, "rank_mismatch", Q0, ("lora_A has rank 2", "lora_B has rank 4")
    ),
    # shapes against the base
    "llama-wider-base": Case(
        llama_on_a_wider_base, "shape_mismatch", Q0, (f"{Q0}.weight [96, 96]",)
    ),
    "gpt2-conv1d-non-square-wider-base": Case(
        gpt2_c_attn_on_a_wider_base, "shape_mismatch", C_ATTN, ("[96, 288]", "lora_B [288, 4]")
    ),
    "gpt2-conv1d-square-wider-base": Case(
        gpt2_square_c_proj_on_a_wider_base,
        "shape_mismatch",
        "transformer.h.0.attn.c_proj",
        ("[96, 96]",),
    ),
    "gpt2-conv1d-linear-orientation": Case(
        gpt2_c_attn_in_linear_orientation, "shape_mismatch", C_ATTN, ("transposed",)
    ),
    "conv2d-shaped-lora_A": Case(conv2d_shaped_lora_a, "shape_mismatch", Q0, ("not matrices",)),
    "saved-lm_head-other-width": Case(
        saved_lm_head_of_another_width, "shape_mismatch", "lm_head", ("[256, 32]", "[256, 64]")
    ),
    "lora-on-1d-norm": Case(lora_on_a_1d_norm, "shape_mismatch", "model.norm", ("2-D",)),
    "dora-magnitude-other-width": Case(
        dora_magnitude_of_another_width, "shape_mismatch", Q0, ("magnitude",)
    ),
    "lora_B.bias-other-width": Case(
        lora_bias_of_another_width, "shape_mismatch", Q0, ("lora_B.bias",)
    ),
    "token-deltas-other-width": Case(
        token_deltas_of_another_width,
        "shape_mismatch",
        EMBED,
        ("trainable_tokens_delta",),
    ),
    # names that do not line up with the base
    "renamed-module": Case(
        q_proj_renamed,
        "module_not_found",
        "model.layers.0.self_attn.query_proj",
        ("tried",),
        fix="check that the adapter was trained on this base architecture",
    ),
    "bias-the-base-lacks": Case(qwen2_biases_on_llama, "module_not_found", Q0, (f"{Q0}.bias",)),
    "llama-adapter-on-gpt2": Case(llama_adapter_on_gpt2, "module_not_found", Q0),
    "bare-model-prefix": Case(
        saved_from_the_bare_model,
        "bare_model_prefix",
        "layers.0.self_attn.q_proj",
        (Q0, "CAUSAL_LM"),
        fix="rename keys base_model.model.X to base_model.model.model.X, or re-save the adapter "
        "from the model with the head",
    ),
    "gpt2-bare-model-prefix": Case(
        gpt2_saved_from_the_bare_model,
        "bare_model_prefix",
        "h.0.attn.c_attn",
        (C_ATTN,),
        fix="rename keys base_model.model.X to base_model.model.transformer.X, or re-save the "
        "adapter from the model with the head",
    ),
    "head-adapter-labelled-bare": Case(
        head_adapter_labelled_bare, "module_prefix_mismatch", Q0, ("'model'", "FEATURE_EXTRACTION")
    ),
    "no-module-matches": Case(
        llama_adapter_on_gpt2, "no_modules_matched", names=("4 LoRA modules", "base model")
    ),
    # vocabulary
    "embedding-lora-vocab": Case(
        embedding_lora_on_a_larger_vocabulary,
        "vocab_size_mismatch",
        EMBED,
        ("256 tokens", "has 300"),
    ),
    "trainable-tokens-past-vocab": Case(
        trainable_tokens_past_the_vocabulary, "vocab_size_mismatch", EMBED, ("256",)
    ),
    "resized-lm_head": Case(
        trained_on_a_resized_vocabulary,
        "resized_vocabulary",
        "lm_head",
        ("300 rows",),
        fix="call model.resize_token_embeddings(300) on the base before loading, or merge it "
        "(the merge resizes)",
    ),
    "resized-embedding": Case(
        trained_on_a_resized_vocabulary, "resized_vocabulary", EMBED, ("300 rows", "256")
    ),
    # coverage: the config and the file must name the same modules
    "dora-magnitude-dropped": Case(
        dora_magnitude_dropped, "missing_dora_magnitude", Q1, ("lora_magnitude_vector",)
    ),
    "module-dropped": Case(one_module_dropped, "missing_lora_tensors", V1),
    "saved-lm_head-dropped": Case(saved_lm_head_dropped, "missing_lora_tensors", "lm_head"),
    "untargeted-v_proj": Case(v_proj_left_out_of_target_modules, "untargeted_module", V0, (V0,)),
    "norm-in-target_modules": Case(
        norm_added_to_target_modules, "unsupported_target", "model.layers.0.input_layernorm"
    ),
    # adapter_config.json
    **{
        f"init-{method}": Case(
            config_edit(init_lora_weights=method), "modified_base_init", names=(repr(method),)
        )
        for method in ("pissa", "pissa_niter_4", "olora", "loftq", "corda")
    },
    "target_parameters": Case(
        config_edit(target_parameters=["mlp.experts.gate_up_proj"]),
        "target_parameters_unsupported",
        names=("mlp.experts.gate_up_proj",),
    ),
    "rank_pattern-bad-regex": Case(
        config_edit(rank_pattern={"q_proj[": 8}), "invalid_pattern", names=("q_proj[",)
    ),
    "alpha_pattern-bad-regex": Case(
        config_edit(alpha_pattern={"(v_proj": 16}), "invalid_pattern", names=("(v_proj",)
    ),
    "target_modules-bad-regex": Case(
        config_edit(target_modules="(.*q_proj"), "invalid_pattern", names=("target_modules",)
    ),
    "exclude_modules-bad-regex": Case(
        config_edit(exclude_modules="k_proj["), "invalid_pattern", names=("exclude_modules",)
    ),
    "alpha_pattern-not-a-map": Case(
        config_edit(alpha_pattern=["v_proj"]), "invalid_config", names=("alpha_pattern",)
    ),
    "lora_bias-with-dora": Case(
        config_edit(lora_bias=True, use_dora=True), "invalid_config", names=("lora_bias",)
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=i) for i, c in ERRORS.items()])
def test_crafted_adapter_is_refused_with_its_code_and_module(lab: Lab, case: Case) -> None:
    setup = case.craft(lab)
    report = check(setup.adapter, setup.base, **setup.options)
    assert not report.compatible, summary(report)
    f = finding(report, case.code, case.module, names=case.names)
    if case.module is not None:
        assert case.module in f.message, f.message
    if case.fix is not None:
        assert f.fix == case.fix, f.message


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=i) for i, c in ERRORS.items()],
)
def test_crafted_adapter_refusal_names_the_fix(lab: Lab, case: Case) -> None:
    setup = case.craft(lab)
    report = check(setup.adapter, setup.base, **setup.options)
    assert_names_its_fix(finding(report, case.code, case.module, names=case.names))


def test_unknown_dtype_is_refused_by_the_header_reader(lab: Lab) -> None:
    """A dtype no safetensors reader knows never reaches the checker: invalid_safetensors."""
    adapter = lab.adapter()
    write_raw_safetensors(
        adapter / ADAPTER_WEIGHTS,
        {
            f"{P}{Q0}.lora_A.weight": ("Q4_K", [4, 64], 1),
            f"{P}{Q0}.lora_B.weight": ("F32", [64, 4], 4),
        },
    )
    with pytest.raises(InvalidSafetensors) as caught:
        check(adapter, lab.base())
    assert caught.value.code == "invalid_safetensors"
    assert f"{P}{Q0}.lora_A.weight" in caught.value.message
    assert "'Q4_K'" in caught.value.message


def test_non_float_dtype_is_refused_from_a_pure_input(lab: Lab) -> None:
    signature = folder_signature(lab.base()).signature
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}
    tensors = {
        f"{P}{Q0}.lora_A.weight": BaseTensor(dtype="U8", shape=[4, 64]),
        f"{P}{Q0}.lora_B.weight": BaseTensor(dtype="F32", shape=[64, 4]),
    }
    report = check_compatibility({**config, "target_modules": [Q0]}, tensors, signature)
    f = finding(report, "invalid_dtype", Q0, names=("U8",))
    assert_names_its_fix(f)
    assert report.codes() == {"invalid_dtype"}


def test_rank_pattern_is_resolved_per_module(lab: Lab) -> None:
    """q_proj trained at rank 8 through rank_pattern; the edited config says 6 for q_proj only."""
    adapter = lab.adapter(rank_pattern={"q_proj": 8})
    edit_json(adapter / ADAPTER_CONFIG, rank_pattern={"q_proj": 6})
    report = check(adapter, lab.base())
    flagged = {f.module for f in report.errors if f.code == "rank_mismatch"}
    assert flagged == {Q0, Q1}, summary(report)  # v_proj keeps r=4, which its tensors have
    f = finding(report, "rank_mismatch", Q0)
    assert "rank 6 (rank_pattern['q_proj'])" in f.message and "rank 8" in f.message
    rows = {row.module: row for row in report.modules}
    assert rows[V0].ok and rows[V0].rank == 4 and not rows[Q0].ok


def layers(*leaves: str) -> list[str]:
    """Both layers' modules with these leaves, e.g. layers("self_attn.k_proj")."""
    return [f"model.layers.{i}.{leaf}" for i in (0, 1) for leaf in leaves]


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_a_base_with_other_kv_heads_refuses_only_k_and_v_lora_b(lab: Lab, kv_heads: int) -> None:
    """GQA: trained with num_key_value_heads=2, so k_proj/v_proj are (2 x 16, 64); a base that
    differs only in num_key_value_heads changes their out_features alone. lora_A (r, 64) still
    fits, so only the lora_B comparison can refuse it (every wider-base case changes both)."""
    adapter = lab.adapter(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert check(adapter, lab.base()).compatible  # the control: its own base
    report = check(adapter, lab.base(num_key_value_heads=kv_heads))
    kv = layers("self_attn.k_proj", "self_attn.v_proj")
    assert {(f.code, f.module) for f in report.errors} == {("shape_mismatch", m) for m in kv}, (
        summary(report)
    )
    assert report.warnings == [], summary(report)
    rows = {row.module: row for row in report.modules}
    out = kv_heads * 16
    for module in kv:
        row = rows[module]
        assert not row.ok
        assert row.base_shape == [out, 64]
        assert row.lora_a == [4, 64]  # fits: in_features did not change
        assert row.lora_b == [32, 4]  # does not: out_features = kv heads x head_dim
        f = finding(report, "shape_mismatch", module)
        assert f"expected lora_A [4, 64], lora_B [{out}, 4]" in f.message, f.message
        assert "transposed" not in f.message
    assert all(row.ok for name, row in rows.items() if name not in kv)


PATTERNS = {
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "rank_pattern": {"q_proj": 8, "layers.1.mlp.down_proj": 2},
    "alpha_pattern": {"v_proj": 32, "down_proj": 3},
}


@pytest.mark.parametrize(
    ("arch", "options", "expected"),
    [
        pytest.param(
            "qwen2",
            {"use_rslora": True, "r": 8, "lora_alpha": 16},
            {m: (8, 16, 16 / math.sqrt(8)) for m in layers("self_attn.q_proj", "self_attn.v_proj")},
            id="rslora",
        ),
        pytest.param(
            "llama",
            PATTERNS,  # r=4, lora_alpha=8 otherwise
            {
                **{m: (8, 8, 8 / 8) for m in layers("self_attn.q_proj")},
                **{m: (4, 32, 32 / 4) for m in layers("self_attn.v_proj")},
                "model.layers.0.mlp.down_proj": (4, 3, 3 / 4),
                "model.layers.1.mlp.down_proj": (2, 3, 3 / 2),
            },
            id="rank-alpha-patterns",
        ),
        pytest.param(
            "llama",
            {**PATTERNS, "use_rslora": True},
            {
                **{m: (8, 8, 8 / math.sqrt(8)) for m in layers("self_attn.q_proj")},
                **{m: (4, 32, 32 / math.sqrt(4)) for m in layers("self_attn.v_proj")},
                "model.layers.0.mlp.down_proj": (4, 3, 3 / math.sqrt(4)),
                "model.layers.1.mlp.down_proj": (2, 3, 3 / math.sqrt(2)),
            },
            id="rslora-with-patterns",
        ),
    ],
)
def test_the_report_gives_each_modules_own_rank_alpha_and_scale(
    lab: Lab, arch: str, options: dict[str, Any], expected: dict[str, tuple[int, int, float]]
) -> None:
    """Scale = alpha_M / r_M, or alpha_M / sqrt(r_M) with rsLoRA, per module (the merge applies
    it; tests/test_compat_oracle.py holds it to PEFT's own LoraLayer.scaling)."""
    report = check(lab.adapter(arch, **options), lab.base(arch))
    assert report.compatible, summary(report)
    got = {row.module: (row.rank, row.alpha, row.scale) for row in report.modules}
    assert got == expected


def test_module_not_found_lists_the_checkpoint_names_tried(lab: Lab) -> None:
    report = check(q_proj_renamed(lab).adapter, lab.base())
    module = "model.layers.0.self_attn.query_proj"
    f = finding(report, "module_not_found", module)
    tried = [f"{module}.weight", "layers.0.self_attn.query_proj.weight", f"model.{module}.weight"]
    assert f"tried {', '.join(tried)}" in f.message


@pytest.mark.parametrize(("arch", "stale"), [("llama", True), ("gpt2", False)])
def test_a_stale_fan_in_fan_out_flag_is_not_reported(lab: Lab, arch: str, stale: bool) -> None:
    """PEFT forces fan_in_fan_out per layer type (and warns), so the saved flag decides nothing:
    orientation comes from the architecture (the former fan_in_fan_out_ignored warning is gone)."""
    adapter = lab.adapter(arch)
    edit_json(adapter / ADAPTER_CONFIG, fan_in_fan_out=stale)
    report = check(adapter, lab.base(arch))
    assert report.compatible, summary(report)
    assert report.errors == [] and report.warnings == [], summary(report)


# --- warnings: reported, never a refusal -------------------------------------------------------


def gpt2_lm_head_lora(lab: Lab) -> Setup:
    return Setup(lab.adapter("gpt2", target_modules=["c_attn", "lm_head"]), lab.base("gpt2"))


def gpt2_saved_lm_head(lab: Lab) -> Setup:
    return Setup(lab.adapter("gpt2", modules_to_save=["lm_head"]), lab.base("gpt2"))


def lora_bias_on_llama(lab: Lab) -> Setup:
    return Setup(lab.adapter(lora_bias=True), lab.base())


def quantized_base(lab: Lab) -> Setup:
    base = lab.base_copy()
    quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    edit_json(base / "config.json", quantization_config=quantization)
    return Setup(lab.adapter(), base)


def activated_lora(lab: Lab) -> Setup:
    return Setup(lab.adapter(alora_invocation_tokens=[1, 2]), lab.base())


def replicated_layers(lab: Lab) -> Setup:
    return Setup(lab.adapter(layer_replication=[[0, 2], [1, 2]]), lab.base())


def typo_in_target_modules(lab: Lab) -> Setup:
    adapter = lab.adapter()
    edit_json(adapter / ADAPTER_CONFIG, target_modules=["q_proj", "v_proj", "w_proj"])
    return Setup(adapter, lab.base())


def trained_on_another_base(lab: Lab) -> Setup:
    adapter = lab.adapter(base_model_name_or_path="org/tiny-llama")
    edit_json(adapter / ADAPTER_CONFIG, revision="v1")
    return Setup(adapter, lab.base(), {"base_id": "org/other-llama", "base_revision": "v1"})


def trained_on_another_revision(lab: Lab) -> Setup:
    adapter = lab.adapter(base_model_name_or_path="org/tiny-llama")
    edit_json(adapter / ADAPTER_CONFIG, revision="v1")
    return Setup(adapter, lab.base(), {"base_id": "org/tiny-llama", "base_revision": "v2"})


def revision_not_recorded(lab: Lab) -> Setup:
    adapter = lab.adapter(base_model_name_or_path="org/tiny-llama")
    return Setup(adapter, lab.base(), {"base_id": "org/tiny-llama", "base_revision": "v2"})


def sequence_classifier(lab: Lab) -> Setup:
    """The usual SEQ_CLS adapter: LoRA plus a new `score` head, on a causal-LM checkpoint."""
    base = lab.base()
    adapter = make_seq_cls_adapter(base, lab.tmp / unique("seq-cls"), ["q_proj", "v_proj"])
    return Setup(adapter, base)


WARNINGS = {
    "lora_bias-without-base-bias": Case(
        lora_bias_on_llama,
        "lora_bias_without_base_bias",
        Q0,
        fix="serve it unmerged, or retrain without lora_bias",
    ),
    "tied-gpt2-lm_head-lora": Case(
        gpt2_lm_head_lora,
        "tied_embeddings",
        "lm_head",
        ("transformer.wte",),
        fix="merge with --untie to write a separate lm_head",
    ),
    "tied-gpt2-modules_to_save": Case(
        gpt2_saved_lm_head, "tied_embeddings", "lm_head", ("transformer.wte",)
    ),
    "quantized-base": Case(quantized_base, "quantized_base", names=("bitsandbytes",)),
    "alora": Case(activated_lora, "alora", names=("alora_invocation_tokens",)),
    "layer_replication": Case(replicated_layers, "layer_replication", names=("layer_replication",)),
    "target-module-typo": Case(
        typo_in_target_modules, "target_module_unmatched", names=("'w_proj'",)
    ),
    "base-id-mismatch": Case(
        trained_on_another_base,
        "base_id_mismatch",
        names=("org/tiny-llama", "org/other-llama"),
        fix="check against org/tiny-llama, or push with --base org/other-llama if it is the same "
        "model",
    ),
    "base-revision-mismatch": Case(
        trained_on_another_revision,
        "base_revision_mismatch",
        names=("v1", "v2"),
        fix="register org/tiny-llama@v1 and check against it",
    ),
    "base-revision-unpinned": Case(
        revision_not_recorded, "base_revision_unpinned", fix="push with --base ID@REVISION"
    ),
    "new-classification-head": Case(
        sequence_classifier,
        "new_head",
        "score",
        fix="load the base with the head for task SEQ_CLS and num_labels=2",
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=i) for i, c in WARNINGS.items()])
def test_warning_is_reported_and_the_adapter_stays_compatible(lab: Lab, case: Case) -> None:
    setup = case.craft(lab)
    report = check(setup.adapter, setup.base, **setup.options)
    assert report.compatible, summary(report)
    assert report.errors == [], summary(report)
    f = finding(report, case.code, case.module, severity="warning", names=case.names)
    if case.module is not None:
        assert case.module in f.message, f.message
    if case.fix is not None:
        assert f.fix == case.fix, f.message


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=i) for i, c in WARNINGS.items()],
)
def test_warning_names_the_fix(lab: Lab, case: Case) -> None:
    setup = case.craft(lab)
    report = check(setup.adapter, setup.base, **setup.options)
    assert_names_its_fix(
        finding(report, case.code, case.module, severity="warning", names=case.names)
    )


def test_matching_base_identity_gives_no_identity_warning(lab: Lab) -> None:
    adapter = lab.adapter(base_model_name_or_path="org/tiny-llama")
    edit_json(adapter / ADAPTER_CONFIG, revision="v1")
    report = check(adapter, lab.base(), base_id="org/tiny-llama", base_revision="v1")
    assert report.compatible and report.warnings == [], summary(report)


# --- checker bugs found while crafting (fixed; kept as regression tests) -----------------------


def test_a_saved_base_tensor_that_peft_loads_is_not_called_ignored(lab: Lab) -> None:
    adapter = lab.adapter()
    rewrite_tensors(adapter, put(f"{P}model.norm.weight", torch.ones(64)))
    report = check(adapter, lab.base())
    assert "model.norm.weight" in report.replaced
    assert not any("would ignore" in f.message for f in report.errors), summary(report)


def test_every_untargeted_module_row_is_marked_failing(lab: Lab) -> None:
    report = check(v_proj_left_out_of_target_modules(lab).adapter, lab.base())
    rows = {row.module: row for row in report.modules}
    assert not rows[V0].ok
    assert not rows[V1].ok


def test_vllm_unsupported_module_marks_its_row_failing(lab: Lab) -> None:
    adapter = lab.adapter("qwen2", target_modules=["embed_tokens", "q_proj"])
    report = check(adapter, lab.base("qwen2"), profile="vllm")
    finding(report, "vllm_unsupported_module", names=("embed_tokens",))
    rows = {row.module: row for row in report.modules}
    assert not rows[EMBED].ok


# --- profile vllm ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "fix"),
    [
        (17, "needs --max-lora-rank 32"),
        (33, "needs --max-lora-rank 64"),
        (48, "needs --max-lora-rank 64"),
        (64, "needs --max-lora-rank 64"),
        (600, "vLLM's largest --max-lora-rank is 512: merge first"),
    ],
)
def test_vllm_rank_above_max_lora_rank_names_the_flag_value(lab: Lab, r: int, fix: str) -> None:
    report = check(lab.adapter(r=r), lab.base(), profile="vllm")
    assert not report.compatible
    f = finding(report, "vllm_rank_too_large", names=(f"rank {r}", "max_lora_rank 16"))
    assert f.fix == fix
    assert_names_its_fix(f)


def test_vllm_rank_pattern_counts_towards_max_lora_rank(lab: Lab) -> None:
    report = check(lab.adapter(r=8, rank_pattern={"q_proj": 40}), lab.base(), profile="vllm")
    f = finding(report, "vllm_rank_too_large", names=("rank 40",))
    assert f.fix == "needs --max-lora-rank 64"


def test_vllm_rank_within_the_given_max_lora_rank_passes(lab: Lab) -> None:
    options = {"max_lora_rank": "64"}  # strings, as the CLI passes them
    report = check(lab.adapter(r=64), lab.base(), profile="vllm", options=options)
    assert report.compatible, summary(report)
    assert report.options == {"max_lora_rank": 64}


@pytest.mark.parametrize(
    ("options", "what", "fix"),
    [
        ({"use_dora": True}, "DoRA", "merge first: DoRA"),
        ({"lora_bias": True}, "lora_bias", "merge first: lora_bias"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA", "serve with PEFT"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "serve with PEFT"),
    ],
)
def test_vllm_refuses_features_it_cannot_serve(
    lab: Lab, options: dict[str, Any], what: str, fix: str
) -> None:
    report = check(lab.adapter(**options), lab.base(), profile="vllm")
    assert not report.compatible
    f = finding(report, "vllm_unsupported_feature", names=(what,))
    assert f.fix == fix
    assert_names_its_fix(f)
    # vLLM's own wording replaces the base warnings
    assert not {"alora", "layer_replication"} & report.codes()


@pytest.mark.parametrize(
    ("changes", "what", "fix"),
    [
        ({"bias": "all"}, "bias='all'", "merge first"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'", "convert it to a plain LoRA"),
    ],
)
def test_vllm_refuses_configs_it_cannot_serve(
    lab: Lab, changes: dict[str, Any], what: str, fix: str
) -> None:
    adapter = lab.adapter("qwen2")
    edit_json(adapter / ADAPTER_CONFIG, **changes)
    report = check(adapter, lab.base("qwen2"), profile="vllm")
    f = finding(report, "vllm_unsupported_feature", names=(what,))
    assert f.fix is not None and f.fix.startswith(fix)
    assert_names_its_fix(f)


def test_vllm_requires_the_config_fields_it_reads(lab: Lab) -> None:
    adapter = lab.adapter()
    edit_json(adapter / ADAPTER_CONFIG, drop_lora_alpha=None, drop_target_modules=None)
    report = check(adapter, lab.base(), profile="vllm")
    f = finding(report, "vllm_config_incomplete", names=("lora_alpha", "target_modules"))
    assert_names_its_fix(f)
    assert "vllm_config_incomplete" not in check(adapter, lab.base()).codes()


def test_vllm_refuses_modules_to_save_other_than_heads(lab: Lab) -> None:
    report = check(lab.adapter(modules_to_save=["lm_head"]), lab.base(), profile="vllm")
    assert not report.compatible
    f = finding(report, "vllm_modules_to_save", names=("lm_head",))
    assert f.fix == "merge first (lora-reg merge), or retrain without modules_to_save"
    assert_names_its_fix(f)
    assert check(lab.adapter(modules_to_save=["lm_head"]), lab.base()).compatible


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"trainable_token_indices": [1, 2]}, ("trainable-token", EMBED)),
        ({"modules_to_save": ["norm"]}, ("model.norm.weight",)),
    ],
)
def test_vllm_refuses_tensors_other_than_lora_pairs(
    lab: Lab, options: dict[str, Any], names: tuple[str, ...]
) -> None:
    report = check(lab.adapter(**options), lab.base(), profile="vllm")
    f = finding(report, "vllm_unsupported_weight", names=names)
    assert f.fix == "merge first (lora-reg merge)"
    assert_names_its_fix(f)


def test_vllm_refuses_gpt2_which_has_no_lora_support(lab: Lab) -> None:
    report = check(lab.adapter("gpt2"), lab.base("gpt2"), profile="vllm")
    assert not report.compatible
    f = finding(report, "vllm_unsupported_model", names=("gpt2", "SupportsLoRA"))
    assert_names_its_fix(f)
    assert "merge first" in f.message


@pytest.mark.parametrize("leaf", ["lm_head", "embed_tokens"])
def test_vllm_refuses_lora_on_a_module_qwen2_does_not_support(lab: Lab, leaf: str) -> None:
    adapter = lab.adapter("qwen2", target_modules=[leaf, "q_proj"])
    report = check(adapter, lab.base("qwen2"), profile="vllm")
    assert not report.compatible
    module = "lm_head" if leaf == "lm_head" else f"model.{leaf}"
    f = finding(report, "vllm_unsupported_module", module, names=("qwen2",))
    assert f.fix is not None and f.fix.startswith(f"retrain without {leaf} (supported: ")
    assert_names_its_fix(f)
    assert check(adapter, lab.base("qwen2")).compatible  # PEFT itself loads it


def test_vllm_refuses_embedding_lora_for_another_vocabulary(lab: Lab) -> None:
    setup = trained_on_a_resized_vocabulary(lab)
    report = check(setup.adapter, setup.base, profile="vllm")
    f = finding(report, "vllm_embedding_vocab", EMBED, names=("(300)", "(256)"))
    assert_names_its_fix(f)


def test_vllm_refuses_lm_head_lora_on_a_very_large_vocabulary() -> None:
    vocab = VLLM_MAX_LORA_VOCAB + 1
    base = BaseSignature(
        config={"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        tensors={
            f"{EMBED}.weight": BaseTensor(dtype="BF16", shape=[vocab, 64]),
            "lm_head.weight": BaseTensor(dtype="BF16", shape=[vocab, 64]),
            f"{Q0}.weight": BaseTensor(dtype="BF16", shape=[64, 64]),
        },
    )
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}
    tensors = {
        f"{P}lm_head.lora_A.weight": BaseTensor(dtype="F32", shape=[4, 64]),
        f"{P}lm_head.lora_B.weight": BaseTensor(dtype="F32", shape=[vocab, 4]),
    }
    profile, options = bind("vllm")
    adapter_config = {**config, "target_modules": ["lm_head"]}
    assert check_compatibility(adapter_config, tensors, base).compatible
    report = check_compatibility(adapter_config, tensors, base, profile=profile, options=options)
    f = finding(report, "vllm_embedding_vocab", "lm_head", names=(str(VLLM_MAX_LORA_VOCAB),))
    assert_names_its_fix(f)


def test_vllm_unverified_model_names_the_fix(lab: Lab) -> None:
    report = check(lab.adapter(), olmo2_signature(lab), profile="vllm")
    assert_names_its_fix(finding(report, "vllm_unverified_model", severity="warning"))


def olmo2_signature(lab: Lab) -> BaseSignature:
    """The llama base, labelled as an architecture the vllm profile has no module list for."""
    signature = folder_signature(lab.base()).signature
    return signature.model_copy(update={"config": {**signature.config, "model_type": "olmo2"}})


def test_vllm_warns_that_an_unlisted_architecture_was_not_verified(lab: Lab) -> None:
    report = check(lab.adapter(), olmo2_signature(lab), profile="vllm")
    assert report.compatible, summary(report)
    finding(report, "vllm_unverified_model", severity="warning", names=("'olmo2'",))


@pytest.mark.parametrize(
    ("name", "raw", "text"),
    [
        ("sglang", {}, "unknown profile 'sglang'"),
        ("vllm", {"max_rank": 64}, "no option 'max_rank'"),
        ("vllm", {"max_lora_rank": 24}, "max_lora_rank must be one of"),
        ("vllm", {"max_lora_rank": "sixty-four"}, "must be a int"),
        ("merge", {"untie": "maybe"}, "must be a bool"),
        (None, {"untie": True}, "need a --profile"),
    ],
)
def test_invalid_profile_options_are_refused(
    name: str | None, raw: dict[str, Any], text: str
) -> None:
    with pytest.raises(InvalidProfile) as caught:
        bind(name, raw)
    assert caught.value.code == "invalid_profile"
    assert text in caught.value.message


def test_local_check_refuses_invalid_profile_options_before_reading(lab: Lab) -> None:
    with pytest.raises(InvalidProfile):
        check(lab.adapter(), lab.base(), profile="vllm", options={"max_lora_rank": "24"})


# --- profile merge -----------------------------------------------------------------------------


@pytest.mark.parametrize("craft", [gpt2_lm_head_lora, gpt2_saved_lm_head])
def test_merge_refuses_changes_to_tied_embeddings(lab: Lab, craft: Callable[[Lab], Setup]) -> None:
    setup = craft(lab)
    report = check(setup.adapter, setup.base, profile="merge")
    assert not report.compatible
    f = finding(report, "tied_embeddings", "lm_head", names=("transformer.wte",))
    assert "--untie" in f.message
    assert_names_its_fix(f)


@pytest.mark.parametrize("untie", [True, "true"])
def test_merge_with_untie_allows_changes_to_tied_embeddings(lab: Lab, untie: object) -> None:
    setup = gpt2_lm_head_lora(lab)
    report = check(setup.adapter, setup.base, profile="merge", options={"untie": untie})
    assert report.compatible, summary(report)
    assert "tied_embeddings" not in report.codes()
    assert report.options == {"untie": True}


def test_merge_refuses_lora_bias_without_a_base_bias(lab: Lab) -> None:
    report = check(lab.adapter(lora_bias=True), lab.base(), profile="merge")
    assert not report.compatible
    f = finding(report, "lora_bias_without_base_bias", Q0)
    assert_names_its_fix(f)


def test_merge_keeps_lora_bias_with_a_base_bias(lab: Lab) -> None:
    """Qwen2's q/k/v projections have biases: the lora_bias merge is well defined there."""
    report = check(lab.adapter("qwen2", lora_bias=True), lab.base("qwen2"), profile="merge")
    assert report.compatible and report.errors == [] and report.warnings == [], summary(report)


def test_merge_refuses_a_quantized_base(lab: Lab) -> None:
    setup = quantized_base(lab)
    report = check(setup.adapter, setup.base, profile="merge")
    assert not report.compatible
    f = finding(report, "merge_quantized_base", names=("bitsandbytes",))
    assert f.fix == "register the original bf16/fp16 base and merge into that"
    assert_names_its_fix(f)
    assert "quantized_base" not in report.codes()  # the merge error says it instead


@pytest.mark.parametrize(
    ("craft", "code"), [(activated_lora, "alora"), (replicated_layers, "layer_replication")]
)
def test_merge_refuses_what_cannot_be_merged(
    lab: Lab, craft: Callable[[Lab], Setup], code: str
) -> None:
    setup = craft(lab)
    report = check(setup.adapter, setup.base, profile="merge")
    assert not report.compatible
    finding(report, code, names=("cannot be merged",))


def test_merge_accepts_a_resized_vocabulary_with_a_warning(lab: Lab) -> None:
    setup = trained_on_a_resized_vocabulary(lab)
    report = check(setup.adapter, setup.base, profile="merge")
    assert report.compatible, summary(report)
    f = finding(report, "resized_vocabulary", EMBED, severity="warning")
    assert_names_its_fix(f)
