"""registry.core.schemas: the I/O-free validation shared by the CLI and the server."""

from __future__ import annotations

import json
import math
from typing import Any

import pydantic
import pytest

from registry.core.errors import InvalidInput, InvalidMetric, InvalidPath
from registry.core.manifest import FileEntry
from registry.core.schemas import (
    MAX_ENTRIES,
    FileSpec,
    UploadPlanRequest,
    check_key,
    check_metrics,
    check_strings,
)

SHA = "ab" * 32

# --- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.41, 0.41),
        (3, 3.0),
        (0, 0.0),
        (-1.5, -1.5),
        ("0.5", 0.5),
        ("1e-3", 0.001),
        ("-2", -2.0),
        (10**20, 1e20),
        (1e308, 1e308),
    ],
)
def test_check_metrics_accepts_finite_numbers_and_numeric_strings(
    value: Any, expected: float
) -> None:
    result = check_metrics({"rougeL": value})
    assert result == {"rougeL": expected}
    assert type(result["rougeL"]) is float


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        "nan",
        "inf",
        "-Infinity",
        "abc",
        "",
        "0.5.1",
        True,
        False,
        None,
        [1.0],
        {"value": 1.0},
    ],
    ids=repr,
)
def test_check_metrics_refuses_non_finite_or_non_numeric_values(value: Any) -> None:
    with pytest.raises(InvalidMetric) as excinfo:
        check_metrics({"loss": value})
    assert excinfo.value.details["metric"] == "loss"


def test_check_metrics_refuses_an_integer_too_large_for_a_float() -> None:
    with pytest.raises(InvalidMetric):
        check_metrics({"loss": 10**400})


@pytest.mark.parametrize("key", ["rougeL", "eval/loss", "a:b", "x_1.2-3", "A", "9", "k" * 64])
def test_check_metrics_accepts_valid_keys(key: str) -> None:
    assert key in check_metrics({key: 1})


@pytest.mark.parametrize("key", ["", "-x", "_x", ".x", "a b", "k" * 65, "caf\u00e9", "a\nb"])
def test_check_metrics_refuses_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidInput, match="metric name") as excinfo:
        check_metrics({key: 1.0})
    assert excinfo.value.details["key"] == key


def test_check_metrics_accepts_at_most_100_metrics() -> None:
    assert len(check_metrics({f"m{i}": i for i in range(MAX_ENTRIES)})) == MAX_ENTRIES
    with pytest.raises(InvalidMetric, match="at most 100"):
        check_metrics({f"m{i}": i for i in range(MAX_ENTRIES + 1)})


def test_check_metrics_of_nothing_is_nothing() -> None:
    assert check_metrics({}) == {}


# --- labels and lineage ------------------------------------------------------------------------


def test_check_strings_accepts_strings_up_to_the_limit() -> None:
    assert check_strings("label", {"team": "x" * 10}, 10) == {"team": "x" * 10}


@pytest.mark.parametrize("value", ["x" * 11, 1, None, ["x"]], ids=repr)
def test_check_strings_refuses_long_or_non_string_values(value: Any) -> None:
    with pytest.raises(InvalidInput, match="label team"):
        check_strings("label", {"team": value}, 10)


def test_check_key_names_the_kind_of_key() -> None:
    with pytest.raises(InvalidInput, match="invalid lineage name"):
        check_key("lineage", "bad key")


# --- FileSpec ----------------------------------------------------------------------------------


def test_file_spec_builds_a_file_entry() -> None:
    spec = FileSpec(path="sub/adapter_config.json", size=12, sha256=SHA)
    assert spec.entry() == FileEntry("sub/adapter_config.json", 12, SHA)


@pytest.mark.parametrize("path", ["", "../x", "/abs", "a\\b", "a//b", "./a", "a/", "C:/x", "a\x00"])
def test_file_spec_refuses_bad_paths_with_the_core_invalid_path_error(path: str) -> None:
    # The validator raises the registry's own error (not a pydantic ValidationError), so the CLI
    # and the server give the same message.
    with pytest.raises(InvalidPath) as excinfo:
        FileSpec(path=path, size=1, sha256=SHA)
    assert excinfo.value.details["path"] == path


def test_file_spec_refuses_bad_paths_when_validating_json() -> None:
    body = json.dumps({"path": "../x", "size": 1, "sha256": SHA})
    with pytest.raises(InvalidPath):
        FileSpec.model_validate_json(body)


def test_upload_plan_request_refuses_a_bad_file_path() -> None:
    with pytest.raises(InvalidPath):
        UploadPlanRequest.model_validate({"files": [{"path": "/etc", "size": 1, "sha256": SHA}]})


@pytest.mark.parametrize("sha256", ["", "AB" * 32, "ab" * 31, "sha256:" + SHA])
def test_file_spec_refuses_bad_sha256(sha256: str) -> None:
    with pytest.raises(InvalidPath, match="sha256"):
        FileSpec(path="a", size=1, sha256=sha256)


def test_file_spec_refuses_a_negative_size_with_a_validation_error() -> None:
    with pytest.raises(pydantic.ValidationError, match="size"):
        FileSpec(path="a", size=-1, sha256=SHA)
