"""registry.core.names: adapter names, references, base model ids (docs/architecture.md §3)."""

from __future__ import annotations

import pytest

from registry.core.errors import InvalidName, InvalidReference
from registry.core.names import (
    AdapterName,
    BaseModelId,
    Reference,
    Selector,
    check_part,
    parse_base,
    parse_name,
    parse_reference,
    parse_selector,
)

DIGEST = "sha256:" + "0123456789abcdef" * 4

# --- adapter names -----------------------------------------------------------------------------

VALID_NAMES = [
    ("ns/name", "ns", "name"),
    ("a/b", "a", "b"),
    ("0/9", "0", "9"),
    ("my-team/llama.lora_v2", "my-team", "llama.lora_v2"),
    ("1ns/2name", "1ns", "2name"),
    ("ns/a.b-c_d", "ns", "a.b-c_d"),
    ("a" * 64 + "/" + "b" * 64, "a" * 64, "b" * 64),
]

INVALID_NAMES = {
    "empty": "",
    "no-slash": "ns",
    "empty-namespace": "/name",
    "empty-name": "ns/",
    "only-slash": "/",
    "upper-namespace": "NS/name",
    "upper-name": "ns/Name",
    "double-slash": "ns//name",
    "extra-part": "ns/name/extra",
    "leading-slash": "/ns/name",
    "trailing-slash": "ns/name/",
    "namespace-65-chars": "a" * 65 + "/b",
    "name-65-chars": "ns/" + "b" * 65,
    "starts-with-dash": "ns/-name",
    "starts-with-dot": "ns/.name",
    "starts-with-underscore": "_ns/name",
    "space": "ns/na me",
    "trailing-newline": "ns/name\n",
    "leading-space": " ns/name",
    "non-ascii": "ns/n\u00e4me",
    "with-selector": "ns/name@7",
    "colon": "ns/na:me",
}


@pytest.mark.parametrize(("text", "namespace", "name"), VALID_NAMES)
def test_parse_name_accepts_valid_names(text: str, namespace: str, name: str) -> None:
    assert parse_name(text) == AdapterName(namespace, name)


@pytest.mark.parametrize(("text", "namespace", "name"), VALID_NAMES)
def test_adapter_name_str_round_trips(text: str, namespace: str, name: str) -> None:
    assert str(parse_name(text)) == text


@pytest.mark.parametrize("text", INVALID_NAMES.values(), ids=INVALID_NAMES.keys())
def test_parse_name_refuses_invalid_names_with_invalid_name(text: str) -> None:
    with pytest.raises(InvalidName) as excinfo:
        parse_name(text)
    assert excinfo.value.details["name"] == text
    assert repr(text) in excinfo.value.message


def test_part_of_64_chars_is_the_longest_accepted() -> None:
    assert check_part("name", "x" * 64) == "x" * 64
    with pytest.raises(InvalidName):
        check_part("name", "x" * 65)


@pytest.mark.parametrize("text", ["ns", "a", "0", "a.b-c_d", "9lives"])
def test_check_part_accepts_valid_parts(text: str) -> None:
    assert check_part("namespace", text) == text


@pytest.mark.parametrize("text", ["", "Ns", "a/b", "-a", ".a", "_a", "a b", "a\n"])
def test_check_part_refuses_invalid_parts_naming_the_kind(text: str) -> None:
    with pytest.raises(InvalidName, match="namespace"):
        check_part("namespace", text)


# --- references --------------------------------------------------------------------------------

VALID_REFERENCES = [
    ("ns/name", "latest", ""),
    ("ns/name@7", "number", "7"),
    ("ns/name@1", "number", "1"),
    ("ns/name@120", "number", "120"),
    ("ns/name@production", "alias", "production"),
    ("ns/name@staging-2", "alias", "staging-2"),
    ("ns/name@p", "alias", "p"),
    ("ns/name@" + "a" * 64, "alias", "a" * 64),
    (f"ns/name@{DIGEST}", "digest", DIGEST),
]


@pytest.mark.parametrize(("text", "kind", "value"), VALID_REFERENCES)
def test_parse_reference_accepts_valid_references(text: str, kind: str, value: str) -> None:
    reference = parse_reference(text)
    assert reference.name == AdapterName("ns", "name")
    assert reference.selector == Selector(kind, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "kind", "value"), VALID_REFERENCES)
def test_reference_str_round_trips(text: str, kind: str, value: str) -> None:
    reference = parse_reference(text)
    assert str(reference) == text
    assert parse_reference(str(reference)) == reference


def test_version_number_selector_exposes_the_number_as_int() -> None:
    assert parse_reference("ns/name@42").selector.number == 42


def test_at_latest_means_the_latest_version() -> None:
    reference = parse_reference("ns/name@latest")
    assert reference == Reference(AdapterName("ns", "name"), Selector("latest"))
    assert str(reference) == "ns/name"


@pytest.mark.parametrize("text", [None, "", "latest"])
def test_empty_selector_is_latest(text: str | None) -> None:
    assert parse_selector(text) == Selector("latest")
    assert str(parse_selector(text)) == "latest"


INVALID_REFERENCES = {
    "nothing-after-at": "ns/name@",
    "version-zero": "ns/name@0",
    "leading-zero": "ns/name@07",
    "all-zeros": "ns/name@00",
    "negative": "ns/name@-1",
    "decimal": "ns/name@1.0",
    "digit-then-letter": "ns/name@1a",
    "upper-alias": "ns/name@UPPER",
    "capitalised-alias": "ns/name@Production",
    "alias-with-underscore": "ns/name@a_b",
    "alias-with-dot": "ns/name@a.b",
    "alias-starting-with-dash": "ns/name@-prod",
    "alias-65-chars": "ns/name@" + "a" * 65,
    "two-ats": "ns/name@a@b",
    "short-digest": "ns/name@sha256:short",
    "digest-63-hex": "ns/name@sha256:" + "a" * 63,
    "digest-65-hex": "ns/name@sha256:" + "a" * 65,
    "upper-hex-digest": "ns/name@sha256:" + "A" * 64,
    "non-hex-digest": "ns/name@sha256:" + "g" * 64,
    "empty-digest": "ns/name@sha256:",
    "other-algorithm": "ns/name@sha512:" + "a" * 64,
    "bad-name": "NS/name@7",
    "no-namespace": "name@7",
    "only-selector": "@7",
    "empty": "",
}


@pytest.mark.parametrize("text", INVALID_REFERENCES.values(), ids=INVALID_REFERENCES.keys())
def test_parse_reference_refuses_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_bad_name_in_a_reference_is_reported_as_invalid_reference_not_invalid_name() -> None:
    with pytest.raises(InvalidReference) as excinfo:
        parse_reference("NS/name@7")
    assert type(excinfo.value) is InvalidReference
    assert "NS/name" in excinfo.value.message


def test_non_ascii_digits_are_not_a_version_number() -> None:
    with pytest.raises(InvalidReference):
        parse_reference("ns/name@\u0661")


def test_superscript_digit_is_refused_with_invalid_reference() -> None:
    with pytest.raises(InvalidReference):
        parse_reference("ns/name@\u00b2")


# --- base model ids ----------------------------------------------------------------------------

VALID_BASES = [
    ("org/model", "org/model", None),
    ("model", "model", None),
    ("gpt2", "gpt2", None),
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", None),
    ("Org_1/Model.v2-x", "Org_1/Model.v2-x", None),
    ("org/model@main", "org/model", "main"),
    ("org/model@" + "0123456789" * 4, "org/model", "0123456789" * 4),
    ("org/model@refs/pr/1", "org/model", "refs/pr/1"),
    ("model@v1.0", "model", "v1.0"),
]


@pytest.mark.parametrize(("text", "model_id", "revision"), VALID_BASES)
def test_parse_base_accepts_hub_ids_with_optional_revision(
    text: str, model_id: str, revision: str | None
) -> None:
    assert parse_base(text) == BaseModelId(model_id, revision)


@pytest.mark.parametrize(("text", "model_id", "revision"), VALID_BASES)
def test_base_model_id_str_round_trips(text: str, model_id: str, revision: str | None) -> None:
    assert str(parse_base(text)) == text


INVALID_BASES = {
    "empty": "",
    "leading-slash": "/model",
    "trailing-slash": "org/",
    "three-parts": "org/model/extra",
    "double-slash": "org//model",
    "empty-revision": "org/model@",
    "only-revision": "@main",
    "two-ats": "org/model@@main",
    "dot-dot-in-id": "org/mo..del",
    "dot-dot-revision": "org/model@../x",
    "revision-starting-with-slash": "org/model@/main",
    "space": "org/my model",
    "space-in-revision": "org/model@a b",
    "starts-with-dash": "-org/model",
    "starts-with-dot": ".org/model",
    "part-97-chars": "o/" + "m" * 97,
    "non-ascii": "org/mod\u00e8le",
    "url": "https://huggingface.co/org/model",
}


@pytest.mark.parametrize("text", INVALID_BASES.values(), ids=INVALID_BASES.keys())
def test_parse_base_refuses_invalid_ids_with_invalid_name(text: str) -> None:
    with pytest.raises(InvalidName) as excinfo:
        parse_base(text)
    assert excinfo.value.details["name"] == text
