"""The pure checker never raises on odd input: every malformed field becomes a finding.

Inputs a push can carry (adapter_config.json fields of the wrong type, hostile sizes, a base
config.json with odd values) must give a report with a stable code, never a traceback (an HTTP 500
on push or check), with and without serving profiles.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from registry.core.basemodel import BaseSignature, BaseTensor
from registry.core.compat import check_compatibility
from registry.core.errors import InvalidProfile
from registry.core.profiles import PROFILES, bind
from registry.core.safetensors_header import TensorInfo

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"
ADAPTER = {
    f"{PREFIX}.lora_A.weight": TensorInfo("F32", (4, 64), 0, 1024),
    f"{PREFIX}.lora_B.weight": TensorInfo("F32", (64, 4), 1024, 2048),
}
CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj"],
}
BASE_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "tie_word_embeddings": False,
}


def base(config: dict[str, Any] | None = None) -> BaseSignature:
    return BaseSignature(
        config=config or BASE_CONFIG,
        tensors={
            "model.embed_tokens.weight": BaseTensor(dtype="F32", shape=[256, 64]),
            "model.layers.0.self_attn.q_proj.weight": BaseTensor(dtype="F32", shape=[64, 64]),
            "model.norm.weight": BaseTensor(dtype="F32", shape=[64]),
            "lm_head.weight": BaseTensor(dtype="F32", shape=[256, 64]),
        },
    )


def test_the_well_formed_control_is_compatible() -> None:
    report = check_compatibility(CONFIG, ADAPTER, base())
    assert report.compatible, report.errors
    assert [row.module for row in report.modules] == ["model.layers.0.self_attn.q_proj"]


ODD_FIELDS = [
    ("r", "4"),
    ("r", 0),
    ("lora_alpha", float("inf")),
    ("task_type", 5),
    ("target_modules", 5),
    ("target_modules", [1]),
    ("exclude_modules", [1]),
    ("modules_to_save", 5),
    ("modules_to_save", [["x"]]),
    ("layers_to_transform", "1"),
    ("layers_to_transform", 1.5),
    ("layers_pattern", 5),
    ("rank_pattern", [1]),
    ("rank_pattern", {"q_proj": "4"}),
    ("alpha_pattern", {"q_proj": 1e999}),
    ("layer_replication", [[0, 10**12]]),
    ("layer_replication", [[0, "a"]]),
    ("trainable_token_indices", {"embed_tokens": 5}),
    ("trainable_token_indices", "ab"),
    ("bias", ["all"]),
    ("init_lora_weights", [1]),
    ("use_dora", "yes"),
]


@pytest.mark.parametrize("profile", [None, *PROFILES])
@pytest.mark.parametrize(("key", "value"), ODD_FIELDS, ids=[f"{k}={v!r}" for k, v in ODD_FIELDS])
def test_a_malformed_config_field_is_an_invalid_config_finding(
    key: str, value: Any, profile: str | None
) -> None:
    bound, options = bind(profile)
    started = time.process_time()
    report = check_compatibility(
        {**CONFIG, key: value}, ADAPTER, base(), profile=bound, options=options
    )
    assert time.process_time() - started < 5  # no work proportional to a hostile number
    assert not report.compatible
    invalid = [e for e in report.errors if e.code == "invalid_config"]
    assert invalid and key in invalid[0].message and invalid[0].fix
    report.model_dump_json()  # serialisable: no inf/nan reaches a client


@pytest.mark.parametrize(
    "config",
    [
        {**BASE_CONFIG, "architectures": 5},
        {**BASE_CONFIG, "tie_word_embeddings": "yes"},
        {**BASE_CONFIG, "quantization_config": {"quant_method": [1]}},
        {"model_type": 5},
        {},
    ],
)
@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_an_odd_base_config_never_breaks_the_checker(
    config: dict[str, Any], profile: str | None
) -> None:
    bound, options = bind(profile)
    report = check_compatibility(CONFIG, ADAPTER, base(config), profile=bound, options=options)
    report.model_dump_json()


@pytest.mark.parametrize(
    ("profile", "options"),
    [
        ("vllm", {"max_lora_rank": "²"}),
        ("vllm", {"max_lora_rank": "7"}),
        ("merge", {"x": 1}),
        ("nope", {}),
        (None, {"untie": True}),
        ("merge", {"untie": "maybe"}),
    ],
)
def test_bad_profiles_and_options_are_invalid_profile(
    profile: str | None, options: dict[str, Any]
) -> None:
    with pytest.raises(InvalidProfile):
        bind(profile, options)


@pytest.mark.parametrize("shape", [[], [64], [64, 64, 1], [0, 0]])
@pytest.mark.parametrize(
    "name",
    ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"],
)
@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_odd_base_tensor_shapes_are_reported_not_raised(
    name: str, shape: list[int], profile: str | None
) -> None:
    signature = base()
    signature.tensors[name] = BaseTensor(dtype="F32", shape=shape)
    bound, options = bind(profile)
    embedding = {
        f"base_model.model.model.embed_tokens.{part}": TensorInfo("F32", dims, 0, 0)
        for part, dims in (("lora_embedding_A", (4, 256)), ("lora_embedding_B", (64, 4)))
    }
    config = {
        **CONFIG,
        "target_modules": ["q_proj", "embed_tokens"],
        "trainable_token_indices": [1],
    }
    tokens = {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": TensorInfo(
            "F32", (1, 64), 0, 0
        )
    }
    report = check_compatibility(
        config, {**ADAPTER, **embedding, **tokens}, signature, profile=bound, options=options
    )
    report.model_dump_json()
    if shape != [] and name != "lm_head.weight":
        assert not report.compatible
