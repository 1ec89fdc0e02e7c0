"""registry.core.errors: the one error hierarchy, its codes, HTTP statuses and exit codes."""

from __future__ import annotations

import re

import pytest

from registry.core import errors
from registry.core.errors import (
    ERRORS_BY_CODE,
    RegistryError,
    error_from_code,
    exit_code_for,
)

# docs/architecture.md §16 ("Errors"): HTTP status -> CLI exit code.
EXIT_CODE_BY_STATUS = {
    404: 3,
    409: 4,
    401: 5,
    403: 5,
    400: 6,
    413: 6,
    422: 6,
    503: 7,
    500: 1,
}

# Every error class defined in the module, found independently of ERRORS_BY_CODE.
DEFINED = sorted(
    (
        value
        for value in vars(errors).values()
        if isinstance(value, type)
        and issubclass(value, RegistryError)
        and value.__module__ == errors.__name__
    ),
    key=lambda cls: cls.__name__,
)
REGISTERED = sorted(ERRORS_BY_CODE.items())


def test_every_error_class_is_registered_under_its_code() -> None:
    for cls in DEFINED:
        assert ERRORS_BY_CODE.get(cls.code) is cls, cls.__name__


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in DEFINED]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(("code", "cls"), REGISTERED, ids=[code for code, _ in REGISTERED])
def test_registry_key_is_the_class_code(code: str, cls: type[RegistryError]) -> None:
    assert cls.code == code
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code)


@pytest.mark.parametrize(("code", "cls"), REGISTERED, ids=[code for code, _ in REGISTERED])
def test_every_error_has_its_own_docstring(code: str, cls: type[RegistryError]) -> None:
    # __doc__ is not inherited: a class without one would fall back to its code as message.
    docstring = vars(cls).get("__doc__")
    assert docstring
    assert docstring.strip()


@pytest.mark.parametrize(("code", "cls"), REGISTERED, ids=[code for code, _ in REGISTERED])
def test_status_is_a_known_http_status(code: str, cls: type[RegistryError]) -> None:
    assert cls.status in EXIT_CODE_BY_STATUS


@pytest.mark.parametrize(("code", "cls"), REGISTERED, ids=[code for code, _ in REGISTERED])
def test_exit_code_follows_the_status(code: str, cls: type[RegistryError]) -> None:
    # docs/architecture.md §16: incompatible is invalid input (422) with its own exit code.
    expected = 8 if code == "incompatible" else EXIT_CODE_BY_STATUS[cls.status]
    assert cls.exit_code == expected
    assert exit_code_for(code) == cls.exit_code


@pytest.mark.parametrize(("code", "cls"), REGISTERED, ids=[code for code, _ in REGISTERED])
def test_default_message_and_title_come_from_the_docstring(
    code: str, cls: type[RegistryError]
) -> None:
    error = cls()
    assert error.message == (cls.__doc__ or "").strip()
    assert str(error) == error.message
    assert error.title == (cls.__doc__ or "").strip().splitlines()[0]
    assert error.details == {}


@pytest.mark.parametrize(("code", "cls"), REGISTERED, ids=[code for code, _ in REGISTERED])
def test_error_from_code_round_trips_class_message_and_details(
    code: str, cls: type[RegistryError]
) -> None:
    original = cls("something specific went wrong", path="a/b", limit=3)
    rebuilt = error_from_code(original.code, original.message, original.details)
    assert type(rebuilt) is cls
    assert rebuilt.message == original.message
    assert rebuilt.details == {"path": "a/b", "limit": 3}


def test_explicit_message_replaces_the_default_but_not_the_title() -> None:
    error = errors.AdapterNotFound("adapter ns/x not found", name="ns/x")
    assert (error.message, error.title) == ("adapter ns/x not found", "Adapter not found.")
    assert error.details == {"name": "ns/x"}


def test_error_from_code_without_details() -> None:
    rebuilt = error_from_code("alias_not_found", "no alias prod")
    assert (type(rebuilt), rebuilt.details) == (errors.AliasNotFound, {})


def test_unknown_code_gives_a_plain_registry_error_with_exit_1() -> None:
    rebuilt = error_from_code("no_such_code", "from a newer server")
    assert type(rebuilt) is RegistryError
    assert (rebuilt.message, rebuilt.status, rebuilt.exit_code) == ("from a newer server", 500, 1)
    assert exit_code_for("no_such_code") == 1


@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (errors.AdapterNotFound, errors.NotFound),
        (errors.VersionNotFound, errors.NotFound),
        (errors.InvalidName, errors.InvalidInput),
        (errors.PickleRefused, errors.InvalidInput),
        (errors.VersionTooLarge, errors.InvalidInput),
        (errors.StorageUnavailable, errors.Unavailable),
        (errors.NotFound, RegistryError),
    ],
)
def test_specific_errors_can_be_caught_by_their_family(
    cls: type[RegistryError], parent: type[RegistryError]
) -> None:
    assert issubclass(cls, parent)


def test_error_from_code_tolerates_a_details_key_named_message() -> None:
    rebuilt = error_from_code("conflict", "busy", {"message": "inner"})
    assert type(rebuilt) is errors.Conflict
