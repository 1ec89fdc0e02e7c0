"""The OpenAPI document, made to tell the truth: every status a route can answer, errors in the
shape the server sends them, the credential it needs and the constraints the routes check.

`create_app` calls `install(app)`; routes declare the registry errors they raise themselves with
`responses=errors(AdapterNotFound, *RESOLVE_ERRORS, ...)`. FastAPI's document is post-processed
once per route set, in place (`document`):

- every 4xx/5xx response is `application/problem+json` with the `Problem` schema (FastAPI's
  `HTTPValidationError` 422 is replaced: the server renders validation errors as problem+json),
  and lists the `code`s it may carry (`x-error-codes`, also in its description);
- statuses that follow from a route's dependencies are added to the declared ones
  (`implied_errors`): 401 when it needs a token, 403 when not every scope may call it, 404 when
  it has path parameters (a segment its pattern refuses routes nowhere), 422 when it takes input,
  400 for a JSON body that cannot be parsed (and everywhere for a Host that is not loopback
  with auth off), 413 when it takes a body (`registry.guards` bounds every body), 409 when it
  writes (a concurrent change loses at commit), 503 when it reads the database (tokens
  included) or the object store;
- routes that need a token get the `bearer` security scheme and `x-token-scopes`;
- path and query parameters get the patterns and enums the routes check (`PARAMETERS`), request
  bodies those their validators check (`body_rules`); a free-text path parameter without a
  rule, or a rule naming a property that does not exist, refuses to build.

Routing: `{digest:sha256}` (`Sha256Convertor`, registered on import) and `allowed_methods`, the
`Allow` header of a 405. Imports FastAPI, `registry.access`/`registry.auth`/`registry.deps` (to
read a route's needs) and `registry.core`; no SQL, no storage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Match
from starlette.types import Scope

from registry import deps
from registry.access import ALLOWED, Need
from registry.adapters.service import COMPAT_FILTERS
from registry.auth import route_rules
from registry.core import names
from registry.core.errors import (
    AdapterNotFound,
    AliasNotFound,
    BodyTooLarge,
    Conflict,
    DatabaseUnavailable,
    HostNotAllowed,
    InvalidAdapterConfig,
    InvalidInput,
    InvalidLoraTensors,
    InvalidName,
    InvalidPath,
    InvalidReference,
    InvalidSafetensors,
    MissingFile,
    NotAuthenticated,
    NotPermitted,
    PickleRefused,
    RegistryError,
    StorageUnavailable,
    TooManyFiles,
    UnsupportedPeftType,
    VersionNotFound,
    VersionTooLarge,
)
from registry.core.events import ACTIONS
from registry.core.jobs import JOB_STATUSES, MAX_TARGET
from registry.core.manifest import MAX_PATH_BYTES
from registry.core.profiles import PROFILES, VLLM_MAX_LORA_RANKS
from registry.core.schemas import (
    KEY_RE,
    MAX_ENTRIES,
    MAX_LABEL_VALUE,
    MAX_LINEAGE_VALUE,
    TOKEN_NAME_RE,
    Problem,
)

BEARER = "bearer"
PROBLEM_JSON = "application/problem+json"
PROBLEM_REF = "#/components/schemas/Problem"
CODES = "x-error-codes"
# FastAPI answers a JSON body it cannot decode (e.g. not UTF-8) with a 400 of its own.
BAD_REQUEST_CODE = "bad_request"
NOT_FOUND_CODE = "not_found"  # registry.app renders the router's own 404 with this code


# Errors several routes raise through the same function, for `errors(*GROUP, ...)`.
# registry.core.names.parse_reference + registry.adapters.service.resolve: ns/name@selector.
RESOLVE_ERRORS = (InvalidName, InvalidReference, AdapterNotFound, VersionNotFound, AliasNotFound)
# registry.core.manifest.check_manifest: a push's, a base's or a merge's list of files.
MANIFEST_ERRORS = (InvalidPath, TooManyFiles, VersionTooLarge, MissingFile, PickleRefused)
# registry.adapters.service.read_adapter: a stored adapter's config and weights header.
ADAPTER_FILE_ERRORS = (
    InvalidAdapterConfig,
    UnsupportedPeftType,
    InvalidSafetensors,
    InvalidLoraTensors,
)


def errors(*classes: type[RegistryError]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: the registry errors it raises itself (not found, conflicts, its own
    input checks), grouped by status. Statuses implied by the route's dependencies are added by
    `install` and need not be declared."""
    codes: dict[int, list[str]] = {}
    for cls in classes:
        codes.setdefault(cls.status, [])
        if cls.code not in codes[cls.status]:
            codes[cls.status].append(cls.code)
    return {status: _problem_response(status, found) for status, found in sorted(codes.items())}


def _problem_response(status: int, codes: list[str]) -> dict[str, Any]:
    phrase = HTTPStatus(status).phrase
    response: dict[str, Any] = {
        "description": f"{phrase}: " + ", ".join(f"`{code}`" for code in codes),
        "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}},
        CODES: codes,
    }
    if status == 401:
        response["headers"] = {
            "WWW-Authenticate": {
                "description": 'The scheme to use: `Bearer realm="lora-registry"`',
                "schema": {"type": "string"},
            }
        }
    return response


# --- what a route's dependencies imply ---------------------------------------------------------


@dataclass(frozen=True)
class RouteFacts:
    need: Need
    has_input: bool  # path, query, header or cookie parameters, or a body
    has_path_parameters: bool
    has_json_body: bool
    writes: bool  # a read-write database session
    reads_database: bool
    uses_store: bool


def implied_errors(facts: RouteFacts) -> dict[int, list[str]]:
    """Statuses (with their codes) a route can answer because of what it depends on."""
    implied: dict[int, list[str]] = {}
    if facts.need != "public":
        implied[401] = [NotAuthenticated.code]
        if facts.need != "read":  # every scope reads
            implied[403] = [NotPermitted.code]
    if facts.has_json_body:
        implied[400] = [BAD_REQUEST_CODE]
    if facts.has_path_parameters:  # a segment its pattern refuses routes nowhere
        implied[404] = [NOT_FOUND_CODE]
    if facts.has_input:
        implied[422] = [InvalidInput.code]
    if facts.writes:
        implied[409] = [Conflict.code]  # registry.db.session_scope: IntegrityError at commit
    unavailable = []
    if facts.reads_database or facts.need != "public":  # tokens are looked up in the database
        unavailable.append(DatabaseUnavailable.code)
    if facts.uses_store:
        unavailable.append(StorageUnavailable.code)
    if unavailable:
        implied[503] = unavailable
    return implied


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            yield dependency.call
        yield from _calls(dependency)


def _has_input(dependant: Dependant) -> bool:
    own = (
        dependant.path_params,
        dependant.query_params,
        dependant.header_params,
        dependant.cookie_params,
        dependant.body_params,
    )
    return any(own) or any(_has_input(d) for d in dependant.dependencies)


def route_facts(app: FastAPI) -> dict[tuple[str, str], RouteFacts]:
    """(METHOD, path) -> what the route depends on, for every API route."""
    needs = {(rule.method, rule.path): rule.need for rule in route_rules(app)}
    facts: dict[tuple[str, str], RouteFacts] = {}
    for route in _api_routes(app):
        calls = set(_calls(route.dependant))
        for method in route.methods or ():
            # The document names `{ref:path}` as `{ref}`.
            facts[(method, route.path_format)] = RouteFacts(
                need=needs.get((method, route.path)) or "public",
                has_input=_has_input(route.dependant),
                has_path_parameters=bool(route.dependant.path_params),
                has_json_body=route.body_field is not None,
                writes=deps.get_session in calls,
                reads_database=bool(calls & {deps.get_session, deps.get_read_session}),
                uses_store=deps.get_store in calls,
            )
    return facts


def _api_routes(app: FastAPI) -> Iterator[Any]:
    """Every APIRoute with its effective path (FastAPI >= 0.16x includes routers lazily)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes: list[Any] = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    for route in routes:
        if isinstance(getattr(route, "original_route", route), APIRoute):
            yield route


# --- parameters --------------------------------------------------------------------------------


ALIAS = names.ALIAS_RE.pattern
NAME = f"{names.PART}/{names.PART}"  # registry.core.names.parse_name
NOT_LATEST: dict[str, Any] = {"not": {"const": "latest"}}  # the newest version, not an alias
DIGEST = names._DIGEST_RE.pattern
# registry.core.names.parse_selector: a number, `latest`, an alias or a digest.
SELECTOR = rf"latest|[1-9][0-9]{{0,8}}|{DIGEST}|{ALIAS}"
BASE_REF = names._BASE_RE.pattern  # registry.core.names.parse_base, which also refuses '..'
NO_DOTDOT: dict[str, Any] = {"not": {"pattern": r"\.\."}}


@dataclass(frozen=True)
class ParameterRule:
    """The schema of parameter `name` in `location`, on routes whose path matches `paths`."""

    location: str  # path, query
    name: str
    schema: dict[str, Any]
    paths: str = ".*"  # a regex searched in the route's path template
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", re.compile(self.paths))

    def applies(self, location: str, name: str, path: str) -> bool:
        return (location, name) == (self.location, self.name) and bool(self._compiled.search(path))


def _string(pattern: str, *, or_empty: bool = False) -> dict[str, Any]:
    """`pattern` (a `fullmatch` pattern); `or_empty`: the route reads an empty value as absent."""
    return {"type": "string", "pattern": f"^(?:{pattern}){'?' if or_empty else ''}$"}


def _one_of(values: tuple[str, ...], *, or_empty: bool = False) -> dict[str, Any]:
    return _string("|".join(re.escape(value) for value in values), or_empty=or_empty)


def _with(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**schema, **extra}


# First match wins. Every path parameter needs a rule (`document` refuses to build otherwise);
# query parameters without one are free text, which the routes must accept as such. Filters that
# read an empty value as "no filter" (`if namespace:`) say so with `or_empty`.
PARAMETERS: tuple[ParameterRule, ...] = (
    ParameterRule("path", "name", _string(TOKEN_NAME_RE.pattern), paths=r"^/api/v1/tokens/"),
    ParameterRule("path", "namespace", _string(names.PART)),
    ParameterRule("path", "name", _string(names.PART)),
    ParameterRule("path", "alias", _with(_string(ALIAS), **NOT_LATEST)),
    ParameterRule("path", "selector", _string(SELECTOR)),
    ParameterRule("path", "digest", _string(DIGEST)),
    ParameterRule("path", "ref", _with(_string(BASE_REF), **NO_DOTDOT)),
    ParameterRule("path", "job_id", {"type": "string"}),  # unknown ids are 404
    ParameterRule("query", "namespace", _string(names.PART, or_empty=True)),
    ParameterRule("query", "alias", _with(_string(ALIAS, or_empty=True), **NOT_LATEST)),
    ParameterRule("query", "base", _with(_string(BASE_REF, or_empty=True), **NO_DOTDOT)),
    ParameterRule("query", "id", _with(_string(BASE_REF, or_empty=True), **NO_DOTDOT)),
    ParameterRule("query", "compat", _one_of(COMPAT_FILTERS, or_empty=True)),
    ParameterRule(
        "query", "status", _one_of(JOB_STATUSES, or_empty=True), paths=r"^/api/v1/merges$"
    ),
    # registry.webhooks.service.deliveries
    ParameterRule(
        "query",
        "status",
        _one_of(("pending", "succeeded", "failed"), or_empty=True),
        paths=r"/deliveries$",
    ),
    ParameterRule("query", "adapter", _string(NAME, or_empty=True), paths=r"^/api/v1/deployments$"),
    ParameterRule("query", "action", {"type": "array", "items": {"enum": sorted(ACTIONS)}}),
    # registry.adapters.service.list_versions: number, created or metrics.<name>; '-' descends.
    ParameterRule("query", "sort", _string(r"[-+]*(?:number|created|metrics\.[\s\S]+)")),
    # registry.core.schemas.parse_pairs: key=value with a non-empty key.
    ParameterRule("query", "label", {"type": "array", "items": _string(r"[^=]+=[\s\S]*")}),
)


def _parameter_schema(location: str, name: str, path: str) -> dict[str, Any] | None:
    for rule in PARAMETERS:
        if rule.applies(location, name, path):
            return rule.schema
    return None


def _constrain(schema: dict[str, Any], constraint: dict[str, Any]) -> dict[str, Any]:
    """Apply `constraint` to a schema, inside `anyOf` to every option but `null` (optional
    values)."""
    if "anyOf" in schema:
        return {
            **schema,
            "anyOf": [
                option if option.get("type") == "null" else _constrain(option, constraint)
                for option in schema["anyOf"]
            ],
        }
    if "$ref" in schema:  # a sibling of $ref is ignored by older readers: wrap it
        return {"allOf": [schema], **{k: v for k, v in constraint.items() if k != "type"}}
    return {**schema, **constraint}


# --- request bodies ----------------------------------------------------------------------------

_CONTROL = r"\x00-\x1f\x7f"
# One segment of a normalised relative POSIX path: not empty, '.' or '..'; no '/', '\' or
# control characters.
_SEGMENT = (
    rf"[^./\\{_CONTROL}][^/\\{_CONTROL}]*"
    rf"|\.[^./\\{_CONTROL}][^/\\{_CONTROL}]*"
    rf"|\.\.[^/\\{_CONTROL}]+"
)
# The first segment is no drive either ('C:').
_FIRST_SEGMENT = (
    rf"[^./\\{_CONTROL}A-Za-z][^/\\{_CONTROL}]*"
    rf"|[A-Za-z](?:[^:/\\{_CONTROL}][^/\\{_CONTROL}]*)?"
    rf"|\.[^./\\{_CONTROL}][^/\\{_CONTROL}]*"
    rf"|\.\.[^/\\{_CONTROL}]+"
)
# registry.core.manifest.check_path (its 255-byte limit is counted here in characters).
FILE_PATH: dict[str, Any] = _with(
    _string(rf"(?:{_FIRST_SEGMENT})(?:/(?:{_SEGMENT}))*"), maxLength=MAX_PATH_BYTES
)
# registry.core.names.parse_reference.
REFERENCE = rf"{NAME}(?:@(?:{SELECTOR}))?"
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
# registry.core.jobs.parse_target; `dir:` and `s3://` in their normalised form (no empty, '.' or
# '..' parts), which is all a client needs to send.
TARGET: dict[str, Any] = {
    "type": "string",
    "maxLength": MAX_TARGET,
    "anyOf": [
        _string("registry"),
        _string(rf"dir:(?:/(?:{_SEGMENT}))+"),
        _string(rf"s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](?:/(?:{_SEGMENT}))*"),
        {
            **_string(rf"hub:{_HUB_PART}/{_HUB_PART}(?:@[A-Za-z0-9][A-Za-z0-9._/-]{{0,199}})?"),
            "not": {
                "anyOf": [
                    {"pattern": r"^hub:[^@]*(?:--|\.\.)"},
                    {"pattern": r"^hub:[^@]*\.git(?:@|$)"},
                    {"pattern": r"@.*(?:\.\.|//)"},
                    {"pattern": r"@.*(?:[/.]|\.lock)$"},
                ]
            },
        },
    ],
}
_KEY = _string(KEY_RE.pattern)


def _spelled(word: str) -> str:
    """`word` in any case, as a JSON Schema pattern (which has no case-insensitive flag)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


# registry.core.profiles._convert: what a profile option of each default's type accepts.
_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")
BOOL_OPTION: dict[str, Any] = {
    "anyOf": [
        {"type": "boolean"},
        {"type": "integer", "enum": [0, 1]},
        _string("|".join(_spelled(word) for word in _BOOL_WORDS)),
    ]
}


def _int_option(allowed: tuple[int, ...] | None) -> dict[str, Any]:
    if allowed is None:
        return {"anyOf": [{"type": "integer"}, _string("[0-9]+")]}
    return {
        "anyOf": [
            {"type": "integer", "enum": list(allowed)},
            _string("0*(?:" + "|".join(map(str, allowed)) + ")"),
        ]
    }


def profile_options() -> dict[str, Any]:
    """registry.core.profiles.bind: no profile takes no options; each profile takes its own
    options only (vLLM's max_lora_rank one of its --max-lora-rank choices)."""
    branches: list[dict[str, Any]] = [
        {
            "if": {"properties": {"profile": {"type": "null"}}},
            "then": {"properties": {"options": {"maxProperties": 0}}},
        }
    ]
    for name, profile in sorted(PROFILES.items()):
        options = {
            key: BOOL_OPTION
            if isinstance(default, bool)
            else _int_option(VLLM_MAX_LORA_RANKS if key == "max_lora_rank" else None)
            for key, default in profile.options.items()
        }
        branches.append(
            {
                "if": {"properties": {"profile": {"const": name}}, "required": ["profile"]},
                "then": {
                    "properties": {
                        "options": {"properties": options, "additionalProperties": False}
                    }
                },
            }
        )
    return {"allOf": branches}


@dataclass(frozen=True)
class BodyRule:
    """The constraint on `component.property` (a property of "" constrains the whole object)."""

    component: str
    property: str
    schema: dict[str, Any]


def body_rules() -> tuple[BodyRule, ...]:
    """What the request models' validators check, as JSON Schema (patterns from registry.core).
    Every named component and property must exist (`document` refuses to build otherwise)."""
    from registry.aliases.api import MAX_IDENTIFY_FILES  # an API module imports this one

    return (
        BodyRule("FileSpec", "path", FILE_PATH),
        BodyRule("FileSpec", "sha256", _string("[0-9a-f]{64}")),
        BodyRule("IdentifyRequest", "files", {"minItems": 1, "maxItems": MAX_IDENTIFY_FILES}),
        BodyRule("TokenCreate", "name", _string(TOKEN_NAME_RE.pattern)),
        BodyRule("WebhookCreate", "events", {"items": {"enum": sorted(ACTIONS)}}),
        BodyRule("LoadedAdapter", "adapter", _string(NAME)),
        BodyRule("LoadedAdapter", "reference", _string(REFERENCE)),
        # registry.merges.service.finish: a success reports its result.
        BodyRule(
            "FinishRequest",
            "",
            {
                "if": {"properties": {"status": {"const": "succeeded"}}, "required": ["status"]},
                "then": {"required": ["result"], "properties": {"result": {"type": "object"}}},
            },
        ),
        BodyRule("AliasSetRequest", "version", _string(SELECTOR, or_empty=True)),
        BodyRule("MergeRequest", "adapter", _string(REFERENCE)),
        BodyRule("MergeRequest", "base", _with(_string(BASE_REF, or_empty=True), **NO_DOTDOT)),
        BodyRule("MergeRequest", "target", TARGET),
        BodyRule("CheckRequest", "base", _with(_string(BASE_REF, or_empty=True), **NO_DOTDOT)),
        BodyRule("CheckRequest", "profile", {"enum": sorted(PROFILES)}),
        BodyRule("CheckRequest", "", profile_options()),
        BodyRule("BaseRegisterRequest", "base", _with(_string(BASE_REF), **NO_DOTDOT)),
        BodyRule("CommitRequest", "base", _with(_string(BASE_REF, or_empty=True), **NO_DOTDOT)),
        BodyRule("CommitRequest", "alias", _with(_string(ALIAS, or_empty=True), **NOT_LATEST)),
        BodyRule(
            "CommitRequest",
            "metrics",
            {
                "maxProperties": MAX_ENTRIES,
                "propertyNames": _KEY,
                "additionalProperties": {"type": "number"},
            },
        ),
        *(
            BodyRule(
                "CommitRequest",
                kind,
                {
                    "maxProperties": MAX_ENTRIES,
                    "propertyNames": _KEY,
                    "additionalProperties": {"type": "string", "maxLength": limit},
                },
            )
            for kind, limit in (("labels", MAX_LABEL_VALUE), ("lineage", MAX_LINEAGE_VALUE))
        ),
    )


def _document_bodies(components: dict[str, Any]) -> list[str]:
    missing = []
    for rule in body_rules():
        found = [
            components[name]
            for name in (rule.component, f"{rule.component}-Input", f"{rule.component}-Output")
            if name in components
        ]
        if rule.property == "":  # the whole object
            for component in found:
                component.update(rule.schema)
            missing += [] if found else [rule.component]
            continue
        properties = [
            c.get("properties", {}) for c in found if rule.property in c.get("properties", {})
        ]
        if not properties:
            missing.append(f"{rule.component}.{rule.property}")
        for owner in properties:
            owner[rule.property] = _constrain(owner[rule.property], rule.schema)
    return missing


# --- the document ------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json) return the post-processed document."""
    generate = app.openapi
    processed: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI caches it until the routes change
        if not processed or processed[-1] is not schema:
            document(app, schema)
            processed[:] = [schema]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI, schema: dict[str, Any]) -> None:
    """Post-process FastAPI's document in place (see the module docstring)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schema["components"]["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer", "description": "A registry token (lrt_...)"}
    }
    facts = route_facts(app)
    missing: list[str] = []
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            route = facts.get((method.upper(), path))
            if route is None:
                continue
            missing += _document_parameters(path, method, operation)
            implied = implied_errors(route)
            # registry.guards: every body is bounded (PUT /blobs declares version_too_large).
            if "requestBody" in operation and 413 not in _declared(operation):
                implied[413] = [BodyTooLarge.code]
            # registry.guards.LoopbackHostMiddleware: with auth off, a non-loopback Host.
            implied.setdefault(400, []).append(HostNotAllowed.code)
            _document_errors(operation, implied)
            if route.need != "public":
                operation["security"] = [{BEARER: []}]
                operation["x-token-scopes"] = sorted(ALLOWED[route.need])
    if missing:
        raise RuntimeError(
            "path parameters without a schema rule (add one to registry.openapi.PARAMETERS): "
            + "; ".join(missing)
        )
    if gone := _document_bodies(components):
        raise RuntimeError(
            "registry.openapi.body_rules names properties the document lacks: " + "; ".join(gone)
        )
    for name in ("HTTPValidationError", "ValidationError"):
        if not _references(schema, f"#/components/schemas/{name}"):
            components.pop(name, None)


def _document_parameters(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    missing = []
    for parameter in operation.get("parameters", []):
        location, name = parameter["in"], parameter["name"]
        constraint = _parameter_schema(location, name, path)
        if constraint is None:
            if location == "path" and _free_text(parameter.get("schema", {})):
                missing.append(f"{method.upper()} {path} {{{name}}}")
            continue
        parameter["schema"] = _constrain(parameter.get("schema", {}), constraint)
    return missing


def _declared(operation: dict[str, Any]) -> set[int]:
    return {int(key) for key in operation.get("responses", {}) if key.isdigit()}


def _free_text(schema: dict[str, Any]) -> bool:
    """A string that says nothing of its form (no pattern, enum or format)."""
    return schema.get("type") == "string" and not {"pattern", "enum", "format"} & set(schema)


def _document_errors(operation: dict[str, Any], implied: dict[int, list[str]]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    codes: dict[int, list[str]] = {status: list(found) for status, found in implied.items()}
    for key, response in responses.items():
        if key.isdigit() and int(key) >= 400:
            declared = response.get(CODES) or []
            if int(key) == 422 and not declared:  # FastAPI's own validation error
                declared = [InvalidInput.code]
            merged = codes.setdefault(int(key), [])
            merged += [code for code in declared if code not in merged]
    for status, found in sorted(codes.items()):
        responses[str(status)] = _problem_response(status, found)
    operation["responses"] = dict(sorted(responses.items()))


def _references(node: Any, ref: str) -> bool:
    if isinstance(node, dict):
        return node.get("$ref") == ref or any(_references(v, ref) for v in node.values())
    if isinstance(node, list):
        return any(_references(v, ref) for v in node)
    return False


# --- routing ----------------------------------------------------------------------------------


class Sha256Convertor(Convertor[str]):
    """`{digest:sha256}` in a route path: matches `sha256:<64 hex>` only, so a sibling route's
    literal segment (`/blobs/gc`) is never read as a digest: another method there is a 405."""

    regex = DIGEST

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("sha256", Sha256Convertor())


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The `Allow` header of a 405: every method of the path template that routing matched
    first (Starlette lists only one route's, and GET, PUT and DELETE of a path are three routes
    here); the same methods the document lists for that path."""
    template: str | None = None
    methods: set[str] = set()
    for route in _all_routes(app):
        if template is not None and getattr(route, "path", None) != template:
            continue
        match, _ = route.matches(scope)
        if match == Match.NONE:
            continue
        template = getattr(route, "path", None)
        methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def _all_routes(app: FastAPI) -> Iterator[Any]:
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        yield from app.routes
    else:
        yield from iter_route_contexts(app.routes)
