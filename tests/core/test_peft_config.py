"""registry.core.peft: adapter_config.json parsing and LoRA tensor consistency.

One real PEFT adapter (tests.support.adapters) is made per module; everything else is crafted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from registry.core.errors import InvalidAdapterConfig, InvalidLoraTensors, UnsupportedPeftType
from registry.core.peft import (
    MAX_CONFIG_BYTES,
    AdapterConfigSummary,
    LoraModule,
    check_lora_tensors,
    parse_adapter_config,
)
from registry.core.safetensors_header import SafetensorsHeader, TensorInfo, read_header_from_file

REAL_R = 6
REAL_ALPHA = 12
REAL_BASE = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def real_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.adapters import make_adapter

    return make_adapter(
        "llama",
        tmp_path_factory.mktemp("peft") / "a",
        r=REAL_R,
        lora_alpha=REAL_ALPHA,
        base_model_name_or_path=REAL_BASE,
    )


# --- adapter_config.json written by PEFT -------------------------------------------------------


def test_parses_a_real_peft_config(real_adapter: Path) -> None:
    data = (real_adapter / "adapter_config.json").read_bytes()
    summary = parse_adapter_config(data)
    assert summary == AdapterConfigSummary(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        base_model_name_or_path=REAL_BASE,
        revision=None,
        r=REAL_R,
        lora_alpha=float(REAL_ALPHA),
        target_modules=["q_proj", "v_proj"],
        use_dora=False,
        use_rslora=False,
        raw=json.loads(data),
    )
    assert summary.raw == json.loads(data)
    assert isinstance(summary.lora_alpha, float)


def test_real_adapter_has_one_module_per_targeted_layer_with_rank_r(real_adapter: Path) -> None:
    from tests.support.adapters import tiny_config

    header = read_header_from_file(str(real_adapter / "adapter_model.safetensors"))
    modules = check_lora_tensors(header, name="adapter_model.safetensors")
    layers = tiny_config("llama").num_hidden_layers
    assert modules == [
        LoraModule(f"base_model.model.model.layers.{i}.self_attn.{proj}", REAL_R, False)
        for i in range(layers)
        for proj in ("q_proj", "v_proj")
    ]


# --- crafted configs ---------------------------------------------------------------------------

DROP = object()


def config(**fields: Any) -> bytes:
    """A minimal LoRA config with `fields` overriding it (DROP removes a key)."""
    document: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
    }
    document.update(fields)
    document = {k: v for k, v in document.items() if v is not DROP}
    return json.dumps(document).encode()


def test_minimal_crafted_config_is_accepted() -> None:
    summary = parse_adapter_config(config())
    assert (summary.peft_type, summary.r, summary.lora_alpha) == ("LORA", 8, 16.0)
    assert summary.target_modules == ["q_proj", "v_proj"]


def test_missing_peft_type_is_refused() -> None:
    with pytest.raises(InvalidAdapterConfig, match="peft_type") as excinfo:
        parse_adapter_config(config(peft_type=DROP))
    assert type(excinfo.value) is InvalidAdapterConfig


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "PREFIX_TUNING", "lora", "", 1])
def test_non_lora_peft_type_is_unsupported(peft_type: Any) -> None:
    with pytest.raises(UnsupportedPeftType) as excinfo:
        parse_adapter_config(config(peft_type=peft_type))
    assert excinfo.value.details["peft_type"] == str(peft_type)


def test_ia3_message_names_the_type_and_lora() -> None:
    with pytest.raises(UnsupportedPeftType, match=r"'IA3'.*LORA"):
        parse_adapter_config(config(peft_type="IA3"), name="x/adapter_config.json")


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"{'peft_type': 'LORA'}", b"\xff\xfe", b'{"peft_type": "LORA",}'],
    ids=["empty", "truncated", "single-quotes", "not-utf8", "trailing-comma"],
)
def test_invalid_json_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidAdapterConfig, match="not valid JSON"):
        parse_adapter_config(data)


@pytest.mark.parametrize("data", [b"[]", b'"LORA"', b"null", b"1", b'[{"peft_type": "LORA"}]'])
def test_json_that_is_not_an_object_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidAdapterConfig, match="JSON object"):
        parse_adapter_config(data)


def test_config_over_1_mib_is_refused() -> None:
    data = config()[:-1] + b" " * MAX_CONFIG_BYTES + b"}"
    assert len(data) > MAX_CONFIG_BYTES
    with pytest.raises(InvalidAdapterConfig, match="larger than"):
        parse_adapter_config(data)


def test_deeply_nested_config_is_refused_with_invalid_adapter_config() -> None:
    with pytest.raises(InvalidAdapterConfig):
        parse_adapter_config(b'{"peft_type": "LORA", "x": ' + b"[" * 100_000 + b"}")


@pytest.mark.parametrize("r", [0, -1, "4", True, False, 4.0, None, [4]], ids=lambda v: f"r={v!r}")
def test_bad_rank_is_refused(r: Any) -> None:
    with pytest.raises(InvalidAdapterConfig) as excinfo:
        parse_adapter_config(config(r=r))
    assert excinfo.value.details["key"] == "r"


@pytest.mark.parametrize("r", [1, 8, 64, 512])
def test_positive_integer_rank_is_accepted(r: int) -> None:
    assert parse_adapter_config(config(r=r)).r == r


def test_missing_rank_and_alpha_take_peft_defaults() -> None:
    # LoraConfig() defaults: r=8, lora_alpha=8.
    summary = parse_adapter_config(config(r=DROP, lora_alpha=DROP))
    assert (summary.r, summary.lora_alpha) == (8, 8.0)


@pytest.mark.parametrize(
    "alpha",
    [float("nan"), float("inf"), float("-inf"), "16", True, None, [16]],
    ids=lambda v: f"alpha={v!r}",
)
def test_bad_lora_alpha_is_refused(alpha: Any) -> None:
    data = config(lora_alpha=alpha)  # json.dumps writes NaN/Infinity, json.loads reads them
    with pytest.raises(InvalidAdapterConfig) as excinfo:
        parse_adapter_config(data)
    assert excinfo.value.details["key"] == "lora_alpha"


@pytest.mark.parametrize(("alpha", "expected"), [(16, 16.0), (0.5, 0.5), (0, 0.0)])
def test_numeric_lora_alpha_is_read_as_float(alpha: float, expected: float) -> None:
    value = parse_adapter_config(config(lora_alpha=alpha)).lora_alpha
    assert value == expected
    assert isinstance(value, float)


def test_target_modules_list_comes_back_sorted() -> None:
    summary = parse_adapter_config(config(target_modules=["v_proj", "k_proj", "q_proj"]))
    assert summary.target_modules == ["k_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("target", [r".*\.(q_proj|v_proj)$", "all-linear"])
def test_target_modules_string_is_kept_as_is(target: str) -> None:
    assert parse_adapter_config(config(target_modules=target)).target_modules == target


@pytest.mark.parametrize("target", [None, DROP], ids=["null", "missing"])
def test_target_modules_may_be_absent(target: Any) -> None:
    assert parse_adapter_config(config(target_modules=target)).target_modules is None


@pytest.mark.parametrize("target", [[1], ["q_proj", None], [["q_proj"]], {"q_proj": True}, 1, True])
def test_target_modules_of_the_wrong_type_are_refused(target: Any) -> None:
    with pytest.raises(InvalidAdapterConfig, match="target_modules") as excinfo:
        parse_adapter_config(config(target_modules=target))
    assert excinfo.value.details["key"] == "target_modules"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task_type", 1),
        ("base_model_name_or_path", ["org/model"]),
        ("revision", 5),
        ("use_dora", "true"),
        ("use_dora", 1),
        ("use_rslora", "yes"),
    ],
)
def test_indexed_fields_of_the_wrong_type_are_refused(key: str, value: Any) -> None:
    with pytest.raises(InvalidAdapterConfig, match=key) as excinfo:
        parse_adapter_config(config(**{key: value}))
    assert excinfo.value.details["key"] == key


def test_indexed_fields_are_read() -> None:
    summary = parse_adapter_config(
        config(
            task_type="SEQ_CLS",
            base_model_name_or_path="org/model",
            revision="abc123",
            use_dora=True,
            use_rslora=True,
        )
    )
    assert summary.task_type == "SEQ_CLS"
    assert (summary.base_model_name_or_path, summary.revision) == ("org/model", "abc123")
    assert (summary.use_dora, summary.use_rslora) == (True, True)


def test_null_fields_read_as_none_or_false() -> None:
    summary = parse_adapter_config(
        config(task_type=None, revision=None, use_dora=None, use_rslora=None)
    )
    assert (summary.task_type, summary.revision) == (None, None)
    assert (summary.use_dora, summary.use_rslora) == (False, False)


def test_unknown_keys_are_kept_in_raw_and_never_refused() -> None:
    future = {"some_future_option": {"nested": [1, 2]}, "another": None, "x-vendor": "v"}
    summary = parse_adapter_config(config(**future))
    for key, value in future.items():
        assert summary.raw[key] == value


# --- check_lora_tensors on crafted headers -----------------------------------------------------

P = "base_model.model.model.layers.0.self_attn"


def named(tensors: dict[str, tuple[int, ...]]) -> SafetensorsHeader:
    return SafetensorsHeader(
        {key: TensorInfo("F32", shape, 0, 0) for key, shape in tensors.items()}, {}, 0
    )


def test_matching_pair_gives_one_module_with_its_rank() -> None:
    tensors = {f"{P}.q_proj.lora_A.weight": (4, 64), f"{P}.q_proj.lora_B.weight": (64, 4)}
    assert check_lora_tensors(named(tensors), name="f") == [LoraModule(f"{P}.q_proj", 4, False)]


def test_rank_mismatch_is_refused_naming_the_module() -> None:
    tensors = {f"{P}.q_proj.lora_A.weight": (4, 64), f"{P}.q_proj.lora_B.weight": (64, 8)}
    with pytest.raises(InvalidLoraTensors) as excinfo:
        check_lora_tensors(named(tensors), name="adapter_model.safetensors")
    assert f"{P}.q_proj" in excinfo.value.message
    assert excinfo.value.details == {"module": f"{P}.q_proj", "rank_a": 4, "rank_b": 8}


def test_lora_a_without_lora_b_is_refused() -> None:
    tensors = {f"{P}.q_proj.lora_A.weight": (4, 64)}
    with pytest.raises(InvalidLoraTensors, match="no matching lora_B") as excinfo:
        check_lora_tensors(named(tensors), name="f")
    assert excinfo.value.details["module"] == f"{P}.q_proj"
    assert f"{P}.q_proj.lora_A.weight" in excinfo.value.message


def test_lora_b_without_lora_a_is_refused() -> None:
    tensors = {f"{P}.q_proj.lora_B.weight": (64, 4)}
    with pytest.raises(InvalidLoraTensors, match="no matching lora_A"):
        check_lora_tensors(named(tensors), name="f")


def test_one_incomplete_module_among_complete_ones_is_refused() -> None:
    tensors = {
        f"{P}.q_proj.lora_A.weight": (4, 64),
        f"{P}.q_proj.lora_B.weight": (64, 4),
        f"{P}.v_proj.lora_A.weight": (4, 64),
    }
    with pytest.raises(InvalidLoraTensors) as excinfo:
        check_lora_tensors(named(tensors), name="f")
    assert excinfo.value.details["module"] == f"{P}.v_proj"


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"base_model.model.lm_head.weight": (256, 64)},
        {f"{P}.q_proj.lora_magnitude_vector": (64,)},
        {"model.layers.0.self_attn.q_proj.weight": (64, 64)},
    ],
    ids=["empty", "modules-to-save-only", "magnitude-only", "base-weights"],
)
def test_file_without_lora_tensors_is_refused(tensors: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(InvalidLoraTensors, match="no lora_A/lora_B"):
        check_lora_tensors(named(tensors), name="adapter_model.safetensors")


def test_lora_b_bias_does_not_count_as_a_half() -> None:
    tensors = {
        f"{P}.q_proj.lora_A.weight": (4, 64),
        f"{P}.q_proj.lora_B.weight": (64, 4),
        f"{P}.q_proj.lora_B.bias": (64,),
    }
    assert check_lora_tensors(named(tensors), name="f") == [LoraModule(f"{P}.q_proj", 4, False)]


def test_lora_b_bias_cannot_stand_in_for_a_missing_lora_b_weight() -> None:
    tensors = {f"{P}.q_proj.lora_A.weight": (4, 64), f"{P}.q_proj.lora_B.bias": (64,)}
    with pytest.raises(InvalidLoraTensors, match="no matching lora_B"):
        check_lora_tensors(named(tensors), name="f")


def test_embedding_lora_is_accepted_with_rank_from_a_rows_and_b_columns() -> None:
    module = "base_model.model.model.embed_tokens"
    tensors = {
        f"{module}.lora_embedding_A": (4, 256),  # (r, V)
        f"{module}.lora_embedding_B": (64, 4),  # (D, r)
        f"{module}.base_layer.weight": (256, 64),
    }
    assert check_lora_tensors(named(tensors), name="f") == [LoraModule(module, 4, True)]


def test_embedding_lora_rank_mismatch_is_refused() -> None:
    module = "base_model.model.model.embed_tokens"
    tensors = {f"{module}.lora_embedding_A": (4, 256), f"{module}.lora_embedding_B": (64, 2)}
    with pytest.raises(InvalidLoraTensors, match="embed_tokens"):
        check_lora_tensors(named(tensors), name="f")


def test_embedding_a_does_not_pair_with_a_linear_b() -> None:
    module = "base_model.model.model.embed_tokens"
    tensors = {f"{module}.lora_embedding_A": (4, 256), f"{module}.lora_B.weight": (64, 4)}
    with pytest.raises(InvalidLoraTensors):
        check_lora_tensors(named(tensors), name="f")


def test_conv_lora_with_4d_weights_is_accepted() -> None:
    tensors = {"conv.lora_A.weight": (4, 3, 3, 3), "conv.lora_B.weight": (16, 4, 1, 1)}
    assert check_lora_tensors(named(tensors), name="f") == [LoraModule("conv", 4, False)]


@pytest.mark.parametrize(("shape_a", "shape_b"), [((4,), (64, 4)), ((4, 64), (64,)), ((), (64, 4))])
def test_lora_halves_that_are_not_matrices_are_refused(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> None:
    tensors = {f"{P}.q_proj.lora_A.weight": shape_a, f"{P}.q_proj.lora_B.weight": shape_b}
    with pytest.raises(InvalidLoraTensors, match="not matrices"):
        check_lora_tensors(named(tensors), name="f")


def test_dora_magnitude_and_saved_modules_are_ignored() -> None:
    tensors = {
        f"{P}.q_proj.lora_A.weight": (4, 64),
        f"{P}.q_proj.lora_B.weight": (64, 4),
        f"{P}.q_proj.lora_magnitude_vector": (64,),
        "base_model.model.lm_head.weight": (256, 64),
    }
    assert [m.name for m in check_lora_tensors(named(tensors), name="f")] == [f"{P}.q_proj"]


def test_modules_keep_their_own_ranks_and_come_back_sorted() -> None:
    tensors = {
        f"{P}.v_proj.lora_B.weight": (32, 8),
        f"{P}.v_proj.lora_A.weight": (8, 64),
        f"{P}.q_proj.lora_B.weight": (64, 4),
        f"{P}.q_proj.lora_A.weight": (4, 64),
    }
    assert check_lora_tensors(named(tensors), name="f") == [
        LoraModule(f"{P}.q_proj", 4, False),
        LoraModule(f"{P}.v_proj", 8, False),
    ]
