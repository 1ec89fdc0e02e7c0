"""Adapter names, references and base model ids (docs/architecture.md §3).

Parsing only: turning user text into validated values or raising `InvalidName` /
`InvalidReference`. Resolution of a reference to a version is the server's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from registry.core.errors import InvalidName, InvalidReference

PART = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE = re.compile(rf"({PART})/({PART})")
# Aliases are reserved words: start with a letter so they can never be read as a number.
ALIAS_RE = re.compile(r"[a-z][a-z0-9-]{0,63}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_BASE_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_BASE_RE = re.compile(
    rf"({_BASE_PART}(?:/{_BASE_PART})?)(?:@([A-Za-z0-9][A-Za-z0-9._/-]{{0,199}}))?"
)


@dataclass(frozen=True)
class AdapterName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_name(text: str) -> AdapterName:
    """`ns/name` with each part `[a-z0-9][a-z0-9._-]{0,63}`."""
    match = _NAME_RE.fullmatch(text)
    if not match:
        raise InvalidName(
            f"invalid adapter name {text!r}: use namespace/name, each part starting with a "
            "lower-case letter or digit, then up to 63 of a-z 0-9 . _ -",
            name=text,
        )
    return AdapterName(match.group(1), match.group(2))


def check_part(kind: str, text: str) -> str:
    """Validate one part (namespace or name) of an adapter name."""
    if not re.fullmatch(PART, text):
        raise InvalidName(
            f"invalid {kind} {text!r}: start with a lower-case letter or digit, then up to 63 of "
            "a-z 0-9 . _ -",
            name=text,
        )
    return text


SelectorKind = Literal["latest", "number", "alias", "digest"]


@dataclass(frozen=True)
class Selector:
    """Which version of an adapter a reference points at."""

    kind: SelectorKind
    value: str = ""

    def __str__(self) -> str:
        return "latest" if self.kind == "latest" else self.value

    @property
    def number(self) -> int:
        assert self.kind == "number"
        return int(self.value)


def parse_selector(text: str | None) -> Selector:
    """The part after `@`: a version number, an alias, `sha256:<hex>`; empty or None is latest."""
    if text is None or text == "" or text == "latest":
        return Selector("latest")
    if text.isascii() and text.isdigit():
        if int(text) < 1 or text.startswith("0") or len(text) > 9:
            raise InvalidReference(f"invalid version number {text!r}: versions start at 1")
        return Selector("number", text)
    if text.startswith("sha256:"):
        if not _DIGEST_RE.fullmatch(text):
            raise InvalidReference(f"invalid digest {text!r}: expected sha256:<64 lower-case hex>")
        return Selector("digest", text)
    if ALIAS_RE.fullmatch(text):
        return Selector("alias", text)
    raise InvalidReference(
        f"invalid version selector {text!r}: use a number (@7), an alias (@production) or a "
        "digest (@sha256:<64 hex>)"
    )


@dataclass(frozen=True)
class Reference:
    name: AdapterName
    selector: Selector

    def __str__(self) -> str:
        if self.selector.kind == "latest":
            return str(self.name)
        return f"{self.name}@{self.selector}"


def parse_reference(text: str) -> Reference:
    """`ns/name`, `ns/name@7`, `ns/name@alias` or `ns/name@sha256:<64 hex>`."""
    name_part, sep, selector_part = text.partition("@")
    try:
        name = parse_name(name_part)
    except InvalidName as exc:
        raise InvalidReference(f"invalid reference {text!r}: {exc.message}") from exc
    if sep and not selector_part:
        raise InvalidReference(f"invalid reference {text!r}: nothing after '@'")
    return Reference(name, parse_selector(selector_part if sep else None))


@dataclass(frozen=True)
class BaseModelId:
    id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.id}@{self.revision}" if self.revision else self.id


def parse_base(text: str) -> BaseModelId:
    """A Hugging Face style id with an optional revision: `org/model` or `org/model@rev`."""
    match = _BASE_RE.fullmatch(text)
    if not match or ".." in text:
        raise InvalidName(
            f"invalid base model {text!r}: use a Hugging Face id such as org/model or "
            "org/model@<revision>",
            name=text,
        )
    return BaseModelId(match.group(1), match.group(2))
