"""The checker against PEFT itself: "compatible" exactly where PEFT loads the adapter cleanly.

A matrix of real PEFT adapters (Llama, Qwen2, Mistral, GPT-2 with Conv1D and tied embeddings,
BERT; q/v, all-linear, rank/alpha patterns, rsLoRA, DoRA, embedding LoRA, modules_to_save,
lora_bias, bias) is checked from headers alone and loaded with `PeftModel` onto the same base
(`tests/support/oracle.py`); the two verdicts must agree, and the scale the checker reports per
module must be the one PEFT applies. The same adapters against bases of another width must fail,
with shape errors, in both; so must an adapter on a base with another number of key/value heads
(GQA), where only k_proj/v_proj's lora_B differ: both name the same tensors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.bases import folder_signature, local_check
from tests.support.oracle import peft_load_report, peft_scalings

LLAMA_LIKE = ("llama", "qwen2", "mistral")
CASES: list[tuple[str, str, dict[str, Any]]] = [
    *[(arch, "q/v", {}) for arch in LLAMA_LIKE],
    *[(arch, "all-linear", {"target_modules": "all-linear"}) for arch in LLAMA_LIKE],
    (
        "llama",
        "rank/alpha patterns",
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"q_proj": 8, "layers.1.mlp.down_proj": 2},
            "alpha_pattern": {"v_proj": 32},
        },
    ),
    ("qwen2", "rsLoRA", {"use_rslora": True, "r": 8}),
    ("llama", "DoRA", {"use_dora": True}),
    ("mistral", "DoRA all-linear", {"use_dora": True, "target_modules": "all-linear"}),
    ("llama", "embedding LoRA", {"target_modules": ["embed_tokens", "q_proj"]}),
    ("llama", "modules_to_save lm_head", {"modules_to_save": ["lm_head"]}),
    ("llama", "lora_bias", {"lora_bias": True}),
    ("qwen2", "bias lora_only", {"bias": "lora_only", "target_modules": ["q_proj", "k_proj"]}),
    ("qwen2", "bias all", {"bias": "all"}),
    ("llama", "layers_to_transform", {"layers_to_transform": [1], "layers_pattern": "layers"}),
    ("gpt2", "c_attn", {}),
    ("gpt2", "Conv1D square and non-square", {"target_modules": ["c_attn", "c_proj", "c_fc"]}),
    ("gpt2", "DoRA Conv1D", {"target_modules": ["c_attn", "c_proj"], "use_dora": True}),
    ("gpt2", "tied lm_head LoRA", {"target_modules": ["c_attn", "lm_head"]}),
    ("gpt2", "tied modules_to_save", {"modules_to_save": ["lm_head"]}),
    ("gpt2", "embedding LoRA on wte", {"target_modules": ["wte", "c_attn"]}),
    (
        "llama",
        "tied llama lm_head LoRA",
        {"target_modules": ["q_proj", "lm_head"], "base_config": {"tie_word_embeddings": True}},
    ),
    ("llama", "trainable tokens", {"trainable_token_indices": [1, 2, 3]}),
    (
        "mistral",
        "modules_to_save + embedding LoRA",
        {"target_modules": ["embed_tokens", "v_proj"], "modules_to_save": ["lm_head"]},
    ),
    ("bert", "query/value", {}),
    ("bert", "all-linear", {"target_modules": "all-linear"}),
    ("bert", "DoRA", {"use_dora": True}),
]
WIDER = {"gpt2": {"n_embd": 96}, "bert": {"hidden_size": 96}}
WIDER_DEFAULT = {"hidden_size": 96, "intermediate_size": 192}


MATRIX = pytest.mark.parametrize(
    ("arch", "options"),
    [pytest.param(arch, options, id=f"{arch}-{label}") for arch, label, options in CASES],
)


def _base_options(options: dict[str, Any]) -> dict[str, Any]:
    return dict(options.get("base_config") or {})


@MATRIX
def test_checker_agrees_with_peft_on_the_adapters_own_base(
    arch: str,
    options: dict[str, Any],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    adapter = adapter_dir(arch, **options)
    base = base_dir(arch, **_base_options(options))
    report, _ = local_check(adapter, folder_signature(base).signature)
    outcome = peft_load_report(base, adapter)
    assert outcome.clean, outcome.reason  # PEFT made these adapters for this very base
    assert report.compatible, [e.message for e in report.errors]
    assert all(row.ok and row.base_tensor for row in report.modules)


@MATRIX
def test_checker_reports_the_scale_peft_applies_to_every_module(
    arch: str,
    options: dict[str, Any],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    """rsLoRA (alpha/sqrt(r)) and rank/alpha patterns included: the merge uses this scale."""
    adapter = adapter_dir(arch, **options)
    base = base_dir(arch, **_base_options(options))
    report, _ = local_check(adapter, folder_signature(base).signature)
    reported = {row.module: row.scale for row in report.modules}
    assert reported == peft_scalings(base, adapter)


@MATRIX
def test_checker_and_peft_both_refuse_a_base_of_another_width(
    arch: str,
    options: dict[str, Any],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    adapter = adapter_dir(arch, **options)
    wider = {**_base_options(options), **WIDER.get(arch, WIDER_DEFAULT)}
    base = base_dir(arch, **wider)
    report, _ = local_check(adapter, folder_signature(base).signature)
    outcome = peft_load_report(base, adapter)
    assert not outcome.clean
    assert not report.compatible
    assert {e.code for e in report.errors} <= {"shape_mismatch", "resized_vocabulary"}
    assert "shape_mismatch" in {e.code for e in report.errors}


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("kv_heads", [1, 4])
@pytest.mark.parametrize("arch", LLAMA_LIKE)
def test_checker_and_peft_refuse_the_same_lora_b_on_a_base_with_other_kv_heads(
    arch: str,
    kv_heads: int,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    """GQA: trained with 2 key/value heads (k_proj/v_proj out = 2 x head_dim), put on a base
    identical but for num_key_value_heads. Only k/v's out_features change, so lora_A (r, hidden)
    still fits everywhere and lora_B alone tells: a checker that skipped lora_B would pass it."""
    adapter = adapter_dir(arch, target_modules=ATTENTION)
    own = base_dir(arch)
    assert peft_load_report(own, adapter).clean
    assert local_check(adapter, folder_signature(own).signature)[0].compatible

    base = base_dir(arch, num_key_value_heads=kv_heads)
    report, _ = local_check(adapter, folder_signature(base).signature)
    outcome = peft_load_report(base, adapter)
    kv = [f"model.layers.{i}.self_attn.{leaf}" for i in (0, 1) for leaf in ("k_proj", "v_proj")]
    assert outcome.size_mismatches == sorted(f"base_model.model.{m}.lora_B.weight" for m in kv), (
        outcome.reason
    )
    assert not outcome.clean
    assert not report.compatible
    assert {(e.code, e.module) for e in report.errors} == {("shape_mismatch", m) for m in kv}
    assert sorted(row.module for row in report.modules if not row.ok) == kv


def _rewrite(adapter: Path, to: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """A copy of `adapter` whose tensors went through `edit` (name -> tensor)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, to)
    weights = to / "adapter_model.safetensors"
    save_file(edit(load_file(str(weights))), str(weights), metadata={"format": "pt"})
    return to


def _drop_v_proj(tensors: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tensors.items() if "v_proj" not in k}


def _add_stray(tensors: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.extra": torch.zeros(4)}


def _bare_model(tensors: dict[str, Any]) -> dict[str, Any]:
    return {
        k.replace("base_model.model.model.", "base_model.model."): v for k, v in tensors.items()
    }


def _truncate_rank(tensors: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v[:2] if "lora_A" in k else v[:, :2].contiguous() if "lora_B" in k else v
        for k, v in tensors.items()
    }


BROKEN = [
    pytest.param(_drop_v_proj, "missing_lora_tensors", id="tensors-missing"),
    pytest.param(_add_stray, "unrecognised_key", id="stray-tensor"),
    pytest.param(_bare_model, "bare_model_prefix", id="bare-model-prefix"),
    pytest.param(_truncate_rank, "rank_mismatch", id="truncated-rank"),
]


@pytest.mark.parametrize(("edit", "code"), BROKEN)
def test_checker_and_peft_both_refuse_broken_adapters(
    edit: Callable[[dict[str, Any]], dict[str, Any]],
    code: str,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    adapter = _rewrite(adapter_dir("llama"), tmp_path / "broken", edit)
    base = base_dir("llama")
    report, _ = local_check(adapter, folder_signature(base).signature)
    outcome = peft_load_report(base, adapter)
    assert not outcome.clean
    assert not report.compatible
    assert code in {e.code for e in report.errors}


def _with_config(adapter: Path, to: Path, **changes: Any) -> Path:
    """A copy of `adapter` with adapter_config.json fields changed."""
    shutil.copytree(adapter, to)
    config = json.loads((to / "adapter_config.json").read_text())
    (to / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return to


CONFIGS = [
    pytest.param(
        {"target_modules": ["q_proj", "v_proj", "input_layernorm"]},
        "unsupported_target",
        id="norm-layer-targeted",
    ),
    pytest.param({"lora_bias": True, "use_dora": True}, "invalid_config", id="lora_bias+dora"),
    pytest.param({"rank_pattern": {"q_proj": "4"}}, "invalid_config", id="rank-as-string"),
    pytest.param(
        {"target_modules": ".*q_proj", "layers_to_transform": [0]},
        "invalid_config",
        id="regex+layers_to_transform",
    ),
    pytest.param({"modules_to_save": ["lm_head"]}, "missing_lora_tensors", id="saved-head-gone"),
    pytest.param({"trainable_token_indices": [1, 2]}, "missing_lora_tensors", id="tokens-gone"),
]


@pytest.mark.parametrize(("changes", "code"), CONFIGS)
def test_checker_and_peft_both_refuse_configs_peft_cannot_load(
    changes: dict[str, Any],
    code: str,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    adapter = _with_config(adapter_dir("llama"), tmp_path / "edited", **changes)
    base = base_dir("llama")
    report, _ = local_check(adapter, folder_signature(base).signature)
    outcome = peft_load_report(base, adapter)
    assert not outcome.clean
    assert not report.compatible
    assert code in {e.code for e in report.errors}
