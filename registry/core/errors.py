"""The one error hierarchy of lora-registry.

Each class carries its HTTP status, its CLI exit code and a stable `code` string that clients
match on (never the message). A class's docstring is its default message. The API renders every
error as problem+json (`registry.api`), and the CLI maps `code` back to an exit code with
`exit_code_for`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    """Unexpected registry error."""

    status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    code: ClassVar[str] = "internal"

    def __init__(self, message: str | None = None, /, **details: Any) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.details = details
        super().__init__(self.message)

    @property
    def title(self) -> str:
        return (type(self).__doc__ or self.code).strip().splitlines()[0]


# --- 404 ---------------------------------------------------------------------------------------


class NotFound(RegistryError):
    """Not found."""

    status = 404
    exit_code = 3
    code = "not_found"


class AdapterNotFound(NotFound):
    """Adapter not found."""

    code = "adapter_not_found"


class VersionNotFound(NotFound):
    """Adapter version not found."""

    code = "version_not_found"


class AliasNotFound(NotFound):
    """Alias not found."""

    code = "alias_not_found"


class BlobNotFound(NotFound):
    """Blob not found in the object store."""

    code = "blob_not_found"


class BaseNotFound(NotFound):
    """Base model not registered (see lora-reg base ls; register it with lora-reg base add)."""

    code = "base_not_found"


class JobNotFound(NotFound):
    """Merge job not found (see lora-reg jobs)."""

    code = "job_not_found"


class ArtifactNotFound(NotFound):
    """Merged artifact not found (see lora-reg jobs for merges published to the registry)."""

    code = "artifact_not_found"


# --- 409 ---------------------------------------------------------------------------------------


class Conflict(RegistryError):
    """The request conflicts with the current state; re-read it and retry."""

    status = 409
    exit_code = 4
    code = "conflict"


class VersionYanked(Conflict):
    """The version is yanked: it must not be used (pull --allow-yanked to fetch it anyway)."""

    code = "version_yanked"


class OutputNotEmpty(Conflict):
    """The output folder holds files that are not part of the version."""

    code = "output_not_empty"


class LeaseLost(Conflict):
    """This worker no longer holds the job's lease (it expired and the job was requeued)."""

    code = "lease_lost"


class JobFinished(Conflict):
    """The job has already finished; it cannot change state again."""

    code = "job_finished"


class ProtectedAlias(Conflict):
    """This alias is protected: only an admin token may move or remove it."""

    code = "protected_alias"


class OutputExists(Conflict):
    """The merge output already exists; pass --force to replace it."""

    code = "output_exists"


# --- 401 / 403 ---------------------------------------------------------------------------------


class NotAuthenticated(RegistryError):
    """A valid token is required: pass --token or set LORA_REG_TOKEN."""

    status = 401
    exit_code = 5
    code = "not_authenticated"


class NotPermitted(RegistryError):
    """Your token's scope does not allow this."""

    status = 403
    exit_code = 5
    code = "not_permitted"


# --- 400 / 413 / 422 ---------------------------------------------------------------------------


class InvalidInput(RegistryError):
    """Invalid input."""

    status = 422
    exit_code = 6
    code = "invalid_input"


class InvalidName(InvalidInput):
    """Invalid adapter name: use namespace/name, lower-case letters, digits, '.', '_' or '-'."""

    code = "invalid_name"


class InvalidReference(InvalidInput):
    """Invalid reference: use ns/name, ns/name@7, ns/name@alias or ns/name@sha256:<64 hex>."""

    code = "invalid_reference"


class InvalidPath(InvalidInput):
    """Invalid file path in the manifest: use relative paths with '/' separators."""

    code = "invalid_path"


class TooManyFiles(InvalidInput):
    """The version has too many files."""

    code = "too_many_files"


class VersionTooLarge(InvalidInput):
    """The version is larger than the server allows."""

    status = 413
    code = "version_too_large"


class BodyTooLarge(InvalidInput):
    """The request body is larger than this server accepts on this route."""

    status = 413
    code = "body_too_large"


class HostNotAllowed(InvalidInput):
    """With LORA_REG_AUTH=off the registry answers only requests addressed to a loopback name
    (localhost, 127.0.0.1, [::1]): use http://127.0.0.1:PORT, or turn auth on."""

    status = 400
    code = "host_not_allowed"


class MissingFile(InvalidInput):
    """A required adapter file is missing."""

    code = "missing_file"


class PickleRefused(InvalidInput):
    """Pickle weight files are refused: they can run code when loaded. Convert to safetensors."""

    code = "pickle_refused"


class InvalidAdapterConfig(InvalidInput):
    """adapter_config.json is missing a field or is not valid JSON."""

    code = "invalid_adapter_config"


class UnsupportedPeftType(InvalidInput):
    """Only LoRA adapters (peft_type "LORA") are supported."""

    code = "unsupported_peft_type"


class InvalidSafetensors(InvalidInput):
    """The safetensors file is malformed."""

    code = "invalid_safetensors"


class InvalidLoraTensors(InvalidInput):
    """The LoRA tensors are inconsistent."""

    code = "invalid_lora_tensors"


class InvalidMetric(InvalidInput):
    """Metric values must be finite numbers."""

    code = "invalid_metric"


class ChecksumMismatch(InvalidInput):
    """The uploaded bytes do not match their declared sha256 digest or size."""

    status = 400
    code = "checksum_mismatch"


class UploadIncomplete(InvalidInput):
    """The upload ended before every byte arrived; upload the blob again."""

    status = 400
    code = "upload_incomplete"


class StoreUploadMode(InvalidInput):
    """This object store takes uploads through PUT /api/v1/blobs/{digest}, not multipart."""

    status = 400
    code = "upload_mode"


class InvalidBase(InvalidInput):
    """The base model folder is not a safetensors checkpoint with a config.json."""

    code = "invalid_base"


class InvalidProfile(InvalidInput):
    """Unknown serving profile or profile option (see lora-reg check --help)."""

    code = "invalid_profile"


class Incompatible(InvalidInput):
    """The adapter is not compatible with its base model (see the compatibility report)."""

    exit_code = 8
    code = "incompatible"


class BlobMissing(InvalidInput):
    """A file of the version has not been uploaded yet; upload it, then commit again."""

    code = "blob_missing"


class InvalidTarget(InvalidInput):
    """Invalid merge target: use registry, dir:PATH, s3://bucket/prefix or hub:ORG/REPO[@branch]."""

    code = "invalid_target"


class NonFiniteResult(InvalidInput):
    """The merge produced NaN or infinite values; the adapter (or base) holds non-finite weights."""

    code = "non_finite"


class MergeFailed(RegistryError):
    """The merge failed; see the job's error for why, then retry or re-request it."""

    code = "merge_failed"


# --- 503 ---------------------------------------------------------------------------------------


class Unavailable(RegistryError):
    """A backing service is unavailable; retry later."""

    status = 503
    exit_code = 7
    code = "unavailable"


class StorageUnavailable(Unavailable):
    """The object store is unavailable; retry later."""

    code = "storage_unavailable"


class DatabaseUnavailable(Unavailable):
    """The database is unavailable; retry later."""

    code = "database_unavailable"


def _all_subclasses(cls: type[RegistryError]) -> list[type[RegistryError]]:
    found: list[type[RegistryError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_ALL_ERRORS: list[type[RegistryError]] = [RegistryError, *_all_subclasses(RegistryError)]
ERRORS_BY_CODE: dict[str, type[RegistryError]] = {error.code: error for error in _ALL_ERRORS}


def error_from_code(
    code: str, message: str, details: dict[str, Any] | None = None
) -> RegistryError:
    """Rebuild the error a server sent (clients use it to raise the same class)."""
    cls = ERRORS_BY_CODE.get(code, RegistryError)
    return cls(message, **(details or {}))


def exit_code_for(code: str) -> int:
    """The CLI exit code for an error code; unknown codes exit 1."""
    return ERRORS_BY_CODE.get(code, RegistryError).exit_code
