"""`Registry`: the Python client for the lora-registry REST API (push, pull, get, versions, ls).

Used by the CLI, by training scripts and by workers. Speaks only HTTP; large bytes go straight to
the object store when the server hands out presigned URLs. Every server error is raised as the
same `registry.core.errors` class the server raised, so callers match on types, not messages.

Safety: push is resumable (blobs first, then an idempotent commit); pull places each file under
a temporary name and renames it only once its bytes are verified, through the content-addressed
cache of `cli.cache` (hashed when filled, trusted afterwards while its stamp matches).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from cli.bases import folder_signature, hub_signature, local_check
from cli.cache import PARTIAL_SUFFIX, BlobCache, BlobWriter, Stamp, default_hardlinks
from cli.folders import walk_files
from cli.problems import DEFAULT_URL, raise_for_problem
from cli.progress import NoProgress, Progress
from registry.core.basemodel import BaseSignature
from registry.core.compat import CompatReport
from registry.core.errors import (
    ArtifactNotFound,
    BlobMissing,
    BlobNotFound,
    ChecksumMismatch,
    InvalidInput,
    InvalidReference,
    OutputNotEmpty,
    RegistryError,
    Unavailable,
    VersionYanked,
)
from registry.core.jobs import (
    DEFAULT_LEASE_S,
    ArtifactOut,
    Claim,
    ClaimRequest,
    FinishRequest,
    HeartbeatOut,
    HeartbeatRequest,
    JobError,
    JobOut,
    JobResult,
    MergeOptions,
    MergeRequest,
    WorkerOut,
    parse_artifact_digest,
    parse_target,
)
from registry.core.jobs import Progress as JobProgress
from registry.core.manifest import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FileEntry,
    check_manifest,
    hash_stream,
    manifest_digest,
)
from registry.core.names import Reference, parse_base, parse_name, parse_reference
from registry.core.peft import check_config_size, check_lora_tensors, parse_adapter_config
from registry.core.profiles import bind
from registry.core.safetensors_header import read_header_from_file
from registry.core.schemas import (
    MAX_LABEL_VALUE,
    MAX_LINEAGE_VALUE,
    AdapterOut,
    AliasMoveOut,
    AliasOut,
    AuditEventOut,
    BaseOut,
    CompletedPart,
    DeliveryOut,
    DeploymentOut,
    DeploymentReport,
    EventPage,
    GcOut,
    IdentifyOut,
    Page,
    Scope,
    TokenCreate,
    TokenCreated,
    TokenOut,
    UploadInstruction,
    UploadPlan,
    VersionFileOut,
    VersionOut,
    WebhookOut,
    WhoAmI,
    check_metrics,
    check_strings,
    check_token_name,
)

CHUNK = 1024 * 1024
RETRIES = 4
PLACE_ATTEMPTS = 3  # downloads of one blob when other processes keep replacing it in the cache
T = TypeVar("T")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORA_REG_CACHE_DIR") or Path.home() / ".cache" / "lora-reg")


@dataclass
class PushResult:
    version: VersionOut
    created: bool
    uploaded_bytes: int
    uploaded_files: int
    skipped_bytes: int  # bytes the registry already had


@dataclass
class AddBaseResult:
    base: BaseOut
    bytes_read: int  # header bytes read on this side (0 when the server read them)
    uploaded_bytes: int


@dataclass
class LocalCheck:
    report: CompatReport
    adapter_bytes_read: int
    base_bytes_read: int


@dataclass
class PullResult:
    version: VersionOut
    path: Path
    downloaded_bytes: int
    cached_bytes: int


def _retry(action: Callable[[], T], what: str) -> T:
    """Retry transient failures (network errors, 5xx) with jittered backoff; never 4xx."""
    for attempt in range(RETRIES):
        try:
            return action()
        except (httpx.TransportError, Unavailable) as exc:
            if attempt == RETRIES - 1:
                if isinstance(exc, RegistryError):
                    raise
                raise Unavailable(f"{what}: {exc}") from exc
            time.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def collect_files(directory: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Regular files under `directory` (recursively), minus `exclude` globs (path or basename);
    symbolic links only where `cli.folders.walk_files` follows them (others: `InvalidPath`)."""
    return walk_files(directory, exclude)


def hash_file(path: Path, progress: Progress) -> tuple[int, str]:
    with open(path, "rb") as handle:
        return hash_stream(handle, progress.advance)


def check_adapter_folder(directory: Path, files: list[Path]) -> None:
    """Refuse what the server would refuse, before uploading anything."""
    relative = {path.relative_to(directory).as_posix(): path for path in files}
    check_manifest(
        FileEntry(name, path.stat().st_size, "0" * 64) for name, path in relative.items()
    )
    config = relative[CONFIG_FILE]
    check_config_size(config.stat().st_size)
    parse_adapter_config(config.read_bytes())
    header = read_header_from_file(str(relative[WEIGHTS_FILE]), name=WEIGHTS_FILE)
    check_lora_tensors(header, name=WEIGHTS_FILE)


class _FileSlice:
    """Streams part of a file to httpx, reporting progress as bytes are sent."""

    def __init__(self, path: Path, offset: int, size: int, progress: Progress) -> None:
        self.path, self.offset, self.size, self.progress = path, offset, size, progress

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            remaining = self.size
            while remaining > 0:
                chunk = handle.read(min(CHUNK, remaining))
                if not chunk:
                    raise InvalidInput(f"{self.path} shrank while it was being uploaded")
                remaining -= len(chunk)
                self.progress.advance(len(chunk))
                yield chunk


class Registry:
    """Client for a lora-registry server.

    >>> reg = Registry("http://127.0.0.1:8000", token=None)
    >>> reg.push("./out", "team/summarizer", metrics={"rougeL": 0.41})  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        cache_dir: str | Path | None = None,
        timeout: float = 300.0,
        concurrency: int = 4,
        hardlinks: bool | None = None,
    ) -> None:
        self.url = (url or os.environ.get("LORA_REG_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("LORA_REG_TOKEN")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.concurrency = concurrency
        # Pulled files may be hard links to the read-only cache blobs (see `cli.cache`).
        self.hardlinks = default_hardlinks() if hardlinks is None else hardlinks
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        # httpx drops Authorization on redirects to another origin (presigned S3 URLs).
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, follow_redirects=True
        )
        # Presigned URLs must not carry our token or base URL.
        self.raw = httpx.Client(timeout=timeout, follow_redirects=True)

    def close(self) -> None:
        self.http.close()
        self.raw.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- HTTP plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(
                f"cannot reach the registry at {self.url} ({type(exc).__name__}: {exc}); is "
                "`lora-reg server` running? (--url / LORA_REG_URL)"
            ) from exc
        raise_for_problem(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- reads ---------------------------------------------------------------------------------

    def get(self, ref: str) -> VersionOut:
        """The version a reference points at (`ns/name`, `@7`, `@alias`, `@sha256:...`)."""
        parsed = parse_reference(ref)
        path = f"/api/v1/adapters/{parsed.name}/versions/{parsed.selector}"
        return VersionOut.model_validate(self._json("GET", path))

    def adapter(self, name: str) -> AdapterOut:
        return AdapterOut.model_validate(self._json("GET", f"/api/v1/adapters/{parse_name(name)}"))

    def list(
        self,
        namespace: str | None = None,
        *,
        base: str | None = None,
        labels: dict[str, str] | None = None,
        compat: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[AdapterOut]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if compat:
            params["compat"] = compat
        if namespace:
            params["namespace"] = namespace
        if base:
            params["base"] = base
        if labels:
            params["label"] = [f"{k}={v}" for k, v in labels.items()]
        return Page[AdapterOut].model_validate(self._json("GET", "/api/v1/adapters", params=params))

    def versions(
        self, name: str, *, sort: str = "-number", limit: int = 50, offset: int = 0
    ) -> Page[VersionOut]:
        path = f"/api/v1/adapters/{parse_name(name)}/versions"
        data = self._json("GET", path, params={"sort": sort, "limit": limit, "offset": offset})
        return Page[VersionOut].model_validate(data)

    # --- base models and compatibility ---------------------------------------------------------

    def add_base(
        self,
        base: str,
        source: str | Path,
        *,
        upload: bool = False,
        progress: Progress | None = None,
    ) -> AddBaseResult:
        """Register a base model from a local folder, `s3://bucket/prefix` or `"hf"` (the Hub).

        Only headers are read: locally here, on the Hub by ranged GETs, from S3 by the server.
        `upload` (folders only) also stores the weights in the registry, content-addressed.
        """
        progress = progress or NoProgress()
        ref = parse_base(base)
        source_text = str(source)
        body: dict[str, Any] = {"base": str(ref)}
        read = uploaded = 0
        if upload and (source_text.startswith("s3://") or source_text == "hf"):
            raise InvalidInput(
                "--upload stores a local folder: download the checkpoint first (e.g. "
                "hf download ID --local-dir DIR), then base add --from DIR --upload"
            )
        if source_text.startswith("s3://"):
            body["source"] = source_text
        elif source_text == "hf":
            hub = hub_signature(ref.id, ref.revision)
            body["base"] = f"{ref.id}@{hub.revision}" if hub.revision else ref.id
            body["source"] = f"hf://{body['base']}"
            body.update(_signature_body(hub.signature))
            read = hub.bytes_read
        else:
            directory = Path(source).resolve()
            local = folder_signature(directory)
            read = local.bytes_read
            body["source"] = f"file://{directory}"
            if upload:
                files = collect_files(directory)
                # Paths and pickle files are refused before hashing; size limits are the server's.
                check_manifest(
                    (FileEntry(p.relative_to(directory).as_posix(), 0, "0" * 64) for p in files),
                    max_files=len(files),
                    required=(),
                )
                entries = self._hash(directory, files, progress)
                uploaded, _ = self._upload(
                    "/api/v1/bases/uploads", directory, entries, str(ref), progress
                )
                body["files"] = _wire(entries)
            else:
                body.update(_signature_body(local.signature))
        out = BaseOut.model_validate(self._json("POST", "/api/v1/bases", json=body))
        return AddBaseResult(out, read, uploaded)

    def bases(
        self, model_id: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> Page[BaseOut]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if model_id:
            params["id"] = str(parse_base(model_id))
        return Page[BaseOut].model_validate(self._json("GET", "/api/v1/bases", params=params))

    def base(self, ref: str, *, tensors: bool = False) -> BaseOut:
        """A registered base (`org/model` for the latest revision, or `org/model@rev`)."""
        path = f"/api/v1/bases/{parse_base(ref)}"
        return BaseOut.model_validate(self._json("GET", path, params={"tensors": tensors}))

    def check(
        self,
        ref: str,
        *,
        base: str | None = None,
        profile: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> CompatReport:
        """Check a stored version against a registered base (default: its own), server-side."""
        parsed = parse_reference(ref)
        bind(profile, options)  # refuse bad options before any request
        body = {
            "base": str(parse_base(base)) if base else None,
            "profile": profile,
            "options": options or {},
        }
        path = f"/api/v1/adapters/{parsed.name}/versions/{parsed.selector}/check"
        return CompatReport.model_validate(self._json("POST", path, json=body))

    def check_folder(
        self,
        adapter_dir: str | Path,
        base: str | Path,
        *,
        profile: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> LocalCheck:
        """Check a local adapter folder against a local base folder (no server involved) or a
        registered base (its signature is fetched); reads headers only."""
        if Path(base).is_dir():
            local = folder_signature(Path(base))
            signature, base_id, revision, read = local.signature, None, None, local.bytes_read
        else:
            out = self.base(str(base), tensors=True)
            assert out.tensors is not None
            signature = BaseSignature(config=out.config, tensors=out.tensors)
            base_id, revision, read = out.id, out.revision, 0
        report, adapter_read = local_check(
            Path(adapter_dir),
            signature,
            base_id=base_id,
            base_revision=revision,
            profile=profile,
            options=options,
        )
        return LocalCheck(report, adapter_read, read)

    # --- aliases and audit -----------------------------------------------------------------------

    def set_alias(self, ref: str, alias: str) -> AliasOut:
        """Point `alias` of the adapter at the version `ref` names (`ns/name@7`, `@sha256:...`)."""
        parsed = parse_reference(ref)
        path = f"/api/v1/adapters/{parsed.name}/aliases/{alias}"
        body = {"version": str(parsed.selector)}
        return AliasOut.model_validate(self._json("PUT", path, json=body))

    def remove_alias(self, name: str, alias: str) -> None:
        self._request("DELETE", f"/api/v1/adapters/{parse_name(name)}/aliases/{alias}")

    def aliases(self, name: str) -> Sequence[AliasOut]:
        data = self._json("GET", f"/api/v1/adapters/{parse_name(name)}/aliases")
        return [AliasOut.model_validate(item) for item in data]

    def resolve(self, ref: str, *, at: datetime | None = None) -> AliasOut:
        """Where `ns/name@alias` points now, or pointed at time `at`."""
        parsed = parse_reference(ref)
        if parsed.selector.kind != "alias":
            raise InvalidReference(f"{ref} names no alias: use ns/name@alias")
        params = {"at": at.isoformat()} if at else {}
        path = f"/api/v1/adapters/{parsed.name}/aliases/{parsed.selector.value}"
        return AliasOut.model_validate(self._json("GET", path, params=params))

    def history(
        self, name: str, *, alias: str | None = None, limit: int = 50, offset: int = 0
    ) -> Page[AliasMoveOut]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if alias:
            params["alias"] = alias
        data = self._json("GET", f"/api/v1/adapters/{parse_name(name)}/history", params=params)
        return Page[AliasMoveOut].model_validate(data)

    def who_runs(self, alias: str, *, limit: int = 100, offset: int = 0) -> Page[AliasOut]:
        params = {"limit": limit, "offset": offset}
        data = self._json("GET", f"/api/v1/aliases/{alias}", params=params)
        return Page[AliasOut].model_validate(data)

    def deployments(
        self,
        adapter: str | None = None,
        *,
        alias: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[DeploymentOut]:
        """Serving engine instances and what each has loaded, with drift against the aliases."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if adapter:
            params["adapter"] = str(parse_name(adapter))
        if alias:
            params["alias"] = alias
        data = self._json("GET", "/api/v1/deployments", params=params)
        return Page[DeploymentOut].model_validate(data)

    def report_deployment(self, instance_id: str, report: DeploymentReport) -> DeploymentOut:
        """A serving engine's full loaded set as it is now (`serving` token)."""
        body = report.model_dump(mode="json")
        data = self._json("PUT", f"/api/v1/deployments/{instance_id}", json=body)
        return DeploymentOut.model_validate(data)

    def forget_deployment(self, instance_id: str) -> None:
        """A serving engine stopped: what it had loaded is recorded as unloaded."""
        self._request("DELETE", f"/api/v1/deployments/{instance_id}")

    def add_webhook(self, url: str, events: Sequence[str], secret: str) -> WebhookOut:
        """POST every event from now on (or only these actions) to `url`, signed (admin)."""
        body = {"url": url, "events": list(events), "secret": secret}  # the server checks it
        return WebhookOut.model_validate(self._json("POST", "/api/v1/webhooks", json=body))

    def webhooks(self) -> Page[WebhookOut]:
        return Page[WebhookOut].model_validate(self._json("GET", "/api/v1/webhooks"))

    def remove_webhook(self, webhook_id: int) -> None:
        self._request("DELETE", f"/api/v1/webhooks/{webhook_id}")

    def webhook_deliveries(
        self, webhook_id: int, *, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> Page[DeliveryOut]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        data = self._json("GET", f"/api/v1/webhooks/{webhook_id}/deliveries", params=params)
        return Page[DeliveryOut].model_validate(data)

    def audit(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        subject: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[AuditEventOut]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for key, value in (("since", since), ("until", until)):
            if value is not None:
                params[key] = value.isoformat()
        for key, text in (("actor", actor), ("action", action), ("subject", subject)):
            if text:
                params[key] = text
        return Page[AuditEventOut].model_validate(self._json("GET", "/api/v1/audit", params=params))

    def events(
        self, after: int = 0, *, wait: float = 0, actions: Sequence[str] = (), limit: int = 100
    ) -> EventPage:
        """Events with an id above `after`, oldest first (`after=-1`: none, and the newest id,
        where a new follower starts); `wait` seconds (at most 30) blocks until one arrives.
        Ask again with `after=page.last_id`."""
        params: dict[str, Any] = {"after": after, "wait": wait, "limit": limit}
        if actions:
            params["action"] = list(actions)
        return EventPage.model_validate(
            self._json("GET", "/api/v1/events", params=params, timeout=wait + 30)
        )

    def yank(self, ref: str, reason: str) -> VersionOut:
        """Mark a version as not to be used (pull refuses it; no alias may point at it)."""
        parsed = parse_reference(ref)
        path = f"/api/v1/adapters/{parsed.name}/versions/{parsed.selector}/yank"
        return VersionOut.model_validate(self._json("POST", path, json={"reason": reason}))

    def gc(self, *, older_than_s: int = 3600, dry_run: bool = False) -> GcOut:
        """Delete blobs no version or stored base references (admin)."""
        body = {"older_than_s": older_than_s, "dry_run": dry_run}
        return GcOut.model_validate(self._json("POST", "/api/v1/blobs/gc", json=body))

    def create_token(self, name: str, scope: Scope) -> TokenCreated:
        """Create a token (admin); the result holds its secret, which is never shown again."""
        body = TokenCreate(name=name, scope=scope).model_dump()
        return TokenCreated.model_validate(self._json("POST", "/api/v1/tokens", json=body))

    def tokens(self, *, revoked: bool = False) -> Sequence[TokenOut]:
        data = self._json("GET", "/api/v1/tokens", params={"revoked": revoked})
        return [TokenOut.model_validate(item) for item in data]

    def revoke_token(self, name: str) -> TokenOut:
        path = f"/api/v1/tokens/{check_token_name(name)}"
        return TokenOut.model_validate(self._json("DELETE", path))

    def whoami(self) -> WhoAmI:
        return WhoAmI.model_validate(self._json("GET", "/api/v1/whoami"))

    def identify(self, path: str | Path, progress: Progress | None = None) -> IdentifyOut:
        """Which registry version a folder or a single file is; only hashes are sent."""
        progress = progress or NoProgress()
        path = Path(path)
        if path.is_file():
            entries = list(self._hash(path.parent, [path], progress))
        else:
            entries = list(self._hash(path, collect_files(path), progress))
        if not entries:
            raise InvalidInput(f"{path} holds no files")
        body = {"files": _wire(entries)}
        return IdentifyOut.model_validate(self._json("POST", "/api/v1/identify", json=body))

    # --- merge jobs ----------------------------------------------------------------------------

    def request_merge(
        self,
        ref: str,
        *,
        base: str | None = None,
        target: str = "registry",
        options: dict[str, Any] | MergeOptions | None = None,
        force: bool = False,
    ) -> JobOut:
        """Queue a merge of the version `ref` names into `base` (default: its own base).

        The answer is the job: a new one (`created`), or the succeeded job with the same
        adapter digest, base revision, options and target (`memoized`), or the same merge still
        queued or running, unless `force`.
        """
        parse_reference(ref)
        parse_target(target)  # refuse a bad target before any request
        if base:
            parse_base(base)
        request = MergeRequest(
            adapter=ref,
            base=base,
            target=target,
            options=MergeOptions.model_validate(options or {}),
            force=force,
        )
        return JobOut.model_validate(
            self._json("POST", "/api/v1/merges", json=request.model_dump(mode="json"))
        )

    def jobs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> Page[JobOut]:
        """Merge jobs, newest first."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return Page[JobOut].model_validate(self._json("GET", "/api/v1/merges", params=params))

    def job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._json("GET", f"/api/v1/merges/{_job_path(job_id)}"))

    def cancel_job(self, job_id: str) -> JobOut:
        """Cancel a queued job, or ask the worker running it to stop (it ends as cancelled)."""
        path = f"/api/v1/merges/{_job_path(job_id)}/cancel"
        return JobOut.model_validate(self._json("POST", path))

    def merge_workers(self, *, limit: int = 50, offset: int = 0) -> Page[WorkerOut]:
        """Merge workers the registry has heard from (a claim or a heartbeat), most recently
        seen first. A server older than this call answers `NotFound`."""
        params = {"limit": limit, "offset": offset}
        data = self._json("GET", "/api/v1/merges/workers", params=params)
        return Page[WorkerOut].model_validate(data)

    def claim_job(
        self, worker: str, *, device: str | None = None, lease_s: int = DEFAULT_LEASE_S
    ) -> Claim | None:
        """Worker: take the oldest queued job with a lease of `lease_s` seconds; None if none.

        Renew the lease with `heartbeat` well before it runs out (a third of it is usual): an
        expired lease puts the job back in the queue for another worker.
        """
        body = ClaimRequest(worker=worker, device=device, lease_s=lease_s)
        response = self._request("POST", "/api/v1/merges/claim", json=body.model_dump())
        if response.status_code == 204:
            return None
        return Claim.model_validate(response.json())

    def heartbeat(
        self, job_id: str, worker: str, progress: JobProgress | None = None
    ) -> HeartbeatOut:
        """Worker: renew the lease and report progress. `LeaseLost`: drop the job, unfinished.
        The answer says whether a cancel was asked for."""
        body = HeartbeatRequest(worker=worker, progress=progress)
        path = f"/api/v1/merges/{_job_path(job_id)}/heartbeat"
        return HeartbeatOut.model_validate(
            _retry(lambda: self._json("POST", path, json=body.model_dump()), "heartbeat")
        )

    def finish_job(
        self,
        job_id: str,
        worker: str,
        status: str,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
    ) -> JobOut:
        """Worker: end the job it holds (`succeeded` with its result, `failed` or `cancelled`
        with an error). Safe to repeat: a finish that already landed returns the job."""
        body = FinishRequest.model_validate(
            {"worker": worker, "status": status, "result": result, "error": error}
        )
        path = f"/api/v1/merges/{_job_path(job_id)}/finish"
        return JobOut.model_validate(
            _retry(lambda: self._json("POST", path, json=body.model_dump(mode="json")), "finish")
        )

    def upload_merged(
        self,
        job_id: str,
        folder: Path,
        files: Sequence[FileEntry],
        *,
        worker: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Worker: upload the blobs of a running job's output files (`files` are relative to
        `folder`) that the registry does not have yet, as push does. With `worker`, the server
        also checks that this worker holds the job."""
        path = f"/api/v1/merges/{_job_path(job_id)}/uploads"
        if worker:
            path += "?" + str(httpx.QueryParams({"worker": worker}))
        self._upload(path, Path(folder), list(files), f"job {job_id}", progress or NoProgress())

    def artifact(self, digest: str) -> ArtifactOut:
        """A merged artifact and its files."""
        path = f"/api/v1/merges/artifacts/{parse_artifact_digest(digest, bare=True)}"
        return ArtifactOut.model_validate(self._json("GET", path))

    def pull_artifact(
        self,
        digest: str,
        dest: str | Path,
        progress: Progress | None = None,
        *,
        force: bool = False,
    ) -> Path:
        """Download a merged artifact stored in the registry into `dest`, verified like `pull`:
        every file's sha256 is checked before it is renamed into place, through the cache."""
        wanted = parse_artifact_digest(digest, bare=True)
        artifact = self.artifact(wanted)
        listed = _listing_digest(artifact.files)
        if artifact.digest != wanted or listed != wanted:
            raise ChecksumMismatch(
                f"the registry's answer for artifact {wanted} lists files whose digest is "
                f"{listed}; refusing to write it"
            )
        if not artifact.stored:
            raise ArtifactNotFound(
                f"artifact {wanted} was published to {artifact.location}, not stored in the "
                "registry: fetch it from there, or merge again with target registry",
                digest=wanted,
            )
        target = Path(dest)
        self._pull_files(
            artifact.files,
            target,
            of=wanted,
            force=force,
            force_hint="force=True",
            title=f"pulling {artifact.adapter} merged into {artifact.base}",
            progress=progress or NoProgress(),
        )
        target.mkdir(parents=True, exist_ok=True)
        return target

    def pull_base(self, ref: str, dest: str | Path, progress: Progress | None = None) -> Path:
        """Download a base whose weights are stored in the registry (`base add --upload`) into
        `dest`, verified and through the cache like `pull`; `dest` ends up holding exactly it."""
        base = self.base(ref)
        if not base.stored or not base.files:
            raise InvalidInput(
                f"base {base.ref} is not stored in the registry (its weights are at "
                f"{base.source}); read it from there"
            )
        _listing_digest(base.files)  # refuse paths that would land outside `dest`
        target = Path(dest)
        self._pull_files(
            base.files,
            target,
            of=base.ref,
            force=True,
            force_hint="force=True",
            title=f"pulling base {base.ref}",
            progress=progress or NoProgress(),
        )
        return target

    # --- push ----------------------------------------------------------------------------------

    def push(
        self,
        directory: str | Path,
        name: str,
        *,
        base: str | None = None,
        metrics: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        lineage: dict[str, str] | None = None,
        description: str | None = None,
        exclude: tuple[str, ...] = (),
        require_compatible: bool = False,
        alias: str | None = None,
        progress: Progress | None = None,
    ) -> PushResult:
        """Push an adapter folder as a new version of `name` (or return the identical one).

        Safe to re-run after any failure: blobs already stored are not sent again. With
        `require_compatible` the registry refuses the version (`Incompatible`, `BaseNotFound`)
        unless it is proven compatible with its registered base.
        """
        progress = progress or NoProgress()
        adapter = parse_name(name)
        if base:
            parse_base(base)
        directory = Path(directory)
        metrics = check_metrics(metrics or {})
        labels = check_strings("label", labels or {}, MAX_LABEL_VALUE)
        lineage = check_strings("lineage", lineage or {}, MAX_LINEAGE_VALUE)
        files = collect_files(directory, exclude)
        check_adapter_folder(directory, files)

        total = sum(path.stat().st_size for path in files)
        entries = self._hash(directory, files, progress)
        manifest = _wire(entries)
        body = {
            "files": manifest,
            "base": base,
            "metrics": metrics,
            "labels": labels,
            "lineage": lineage,
            "description": description,
            "require_compatible": require_compatible,
            "alias": alias,
        }
        uploaded = sent_files = 0
        for attempt in range(2):
            try:
                sent = self._upload(
                    f"/api/v1/adapters/{adapter}/uploads",
                    directory,
                    entries,
                    str(adapter),
                    progress,
                )
                uploaded, sent_files = uploaded + sent[0], sent_files + sent[1]
                version = VersionOut.model_validate(
                    self._json("POST", f"/api/v1/adapters/{adapter}/versions", json=body)
                )
                break
            except BlobMissing:
                # A garbage collection took a blob the plan called present, or one we were
                # uploading: plan and upload again, once.
                if attempt:
                    raise
        return PushResult(
            version=version,
            created=bool(version.created),
            uploaded_bytes=uploaded,
            uploaded_files=sent_files,
            skipped_bytes=max(0, total - uploaded),
        )

    def _hash(
        self, directory: Path, files: Sequence[Path], progress: Progress
    ) -> Sequence[FileEntry]:
        progress.begin("hashing", sum(path.stat().st_size for path in files))
        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                hashes = list(pool.map(lambda path: hash_file(path, progress), files))
        finally:
            progress.end()
        return [
            FileEntry(path.relative_to(directory).as_posix(), size, sha)
            for path, (size, sha) in zip(files, hashes, strict=True)
        ]

    def _upload(
        self,
        plan_path: str,
        directory: Path,
        entries: Sequence[FileEntry],
        label: str,
        progress: Progress,
    ) -> tuple[int, int]:
        """Ask `plan_path` which blobs are missing and upload them; (bytes, files) sent."""
        by_sha = {entry.sha256: directory / entry.path for entry in entries}
        plan = UploadPlan.model_validate(
            self._json("POST", plan_path, json={"files": _wire(entries)})
        )
        uploaded = sum(item.size for item in plan.missing)
        progress.begin(f"uploading {label}", uploaded)
        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                jobs = []
                for item in plan.missing:
                    path = by_sha[item.sha256]
                    if item.kind == "single":
                        jobs.append(pool.submit(self._upload_single, item, path, progress))
                    else:
                        jobs.append(pool.submit(self._upload_multipart, item, path, progress))
                for job in jobs:
                    job.result()
        finally:
            progress.end()
        return uploaded, len(plan.missing)

    def _send(
        self,
        method: str,
        url: str,
        path: Path,
        offset: int,
        size: int,
        headers: dict[str, str],
        progress: Progress,
    ) -> httpx.Response:
        """Send part of a file, retried; relative URLs go to the API (with the token)."""
        client = self.http if url.startswith("/") else self.raw

        def attempt() -> httpx.Response:
            response = client.request(
                method,
                url,
                content=_FileSlice(path, offset, size, progress),
                headers={**headers, "Content-Length": str(size)},
            )
            if response.status_code >= 500:
                raise Unavailable(f"upload of {path.name} failed with HTTP {response.status_code}")
            return response

        response = _retry(attempt, f"upload of {path}")
        if url.startswith("/"):
            raise_for_problem(response)
        elif response.status_code >= 400:
            if "BadDigest" in response.text or "Checksum" in response.text:
                raise ChecksumMismatch(
                    f"{path} changed while it was being pushed: its bytes no longer match the "
                    "sha256 computed at the start; push again"
                )
            raise Unavailable(
                f"object store refused the upload of {path.name}: HTTP {response.status_code} "
                f"{response.text[:300]}"
            )
        return response

    def _upload_single(self, item: UploadInstruction, path: Path, progress: Progress) -> None:
        assert item.url is not None
        self._send(item.method, item.url, path, 0, item.size, item.headers, progress)

    def _upload_multipart(self, item: UploadInstruction, path: Path, progress: Progress) -> None:
        # Parts go to their own small pool so a large file does not starve the shared one.
        with ThreadPoolExecutor(self.concurrency) as parts_pool:
            futures = [
                parts_pool.submit(
                    self._send, "PUT", part.url, path, part.offset, part.size, {}, progress
                )
                for part in item.parts
            ]
            parts = [
                CompletedPart(part_number=part.part_number, etag=future.result().headers["ETag"])
                for part, future in zip(item.parts, futures, strict=True)
            ]
        assert item.complete_url and item.upload_id and item.key
        body = {
            "upload_id": item.upload_id,
            "key": item.key,
            "size": item.size,
            "parts": [p.model_dump() for p in parts],
        }
        _retry(
            lambda: self._request("POST", item.complete_url or "", json=body), "completing upload"
        )

    # --- pull ----------------------------------------------------------------------------------

    def pull(
        self,
        ref: str,
        out_dir: str | Path | None = None,
        *,
        force: bool = False,
        allow_yanked: bool = False,
        progress: Progress | None = None,
    ) -> PullResult:
        """Download a version into `out_dir` (default `./<name>`), verified, through the cache.

        Each file is placed under a temporary name and renamed once its bytes are verified: a
        cached blob is used as it is while its stamp matches, hashed again when not, and fetched
        again when wrong (`cli.cache`). Files are reflinks, hard links to the read-only cache
        blobs or copies, in that order of preference (`hardlinks=False`: never hard links). The
        folder ends up holding exactly the version: files of other versions found there are
        refused (`OutputNotEmpty`) unless `force`, which removes them once the version is in place.
        """
        progress = progress or NoProgress()
        parsed = parse_reference(ref)
        version = self.get(ref)
        files = version.files or []
        _check_version_reply(parsed, version, files)
        if version.yanked_at is not None and not allow_yanked:
            raise VersionYanked(
                f"{version.adapter}@{version.number} was yanked ({version.yank_reason}); pull "
                "another version, or pass --allow-yanked to fetch it anyway",
                version=version.number,
            )
        target = Path(out_dir) if out_dir else Path(parsed.name.name)
        fetched = self._pull_files(
            files,
            target,
            of=ref,
            force=force,
            force_hint="--force",
            title=f"pulling {version.adapter}@{version.number}",
            progress=progress,
        )
        downloaded = sum(f.size for f, network in zip(files, fetched, strict=True) if network)
        cached = sum(f.size for f, network in zip(files, fetched, strict=True) if not network)
        return PullResult(version, target, downloaded, cached)

    def _pull_files(
        self,
        files: Sequence[VersionFileOut],
        target: Path,
        *,
        of: str,
        force: bool,
        force_hint: str,
        title: str,
        progress: Progress,
    ) -> Sequence[bool]:
        """Place `files` (verified, through the cache) so that `target` holds exactly them.

        Other files found there are refused (`OutputNotEmpty`, naming what is pulled, `of`, and
        how to force, `force_hint`) unless `force`, which removes them once the files are in
        place. The answer: for each file, whether its bytes came over the network.
        """
        strangers = _strangers(target, {f.path for f in files})
        if strangers and not force:
            raise OutputNotEmpty(
                f"{target} holds {len(strangers)} file(s) that are not part of {of} "
                f"({', '.join(strangers[:3])}{' ...' if len(strangers) > 3 else ''}); pull into "
                f"an empty folder, or pass {force_hint} to remove them",
                paths=strangers,
            )
        progress.begin(title, sum(f.size for f in files))
        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                fetched = list(pool.map(lambda f: self._pull_file(f, target, progress), files))
        finally:
            progress.end()
        for stranger in strangers:
            (target / stranger).unlink()
        return fetched

    @property
    def blob_cache(self) -> BlobCache:
        """The verified blob cache under `cache_dir` that pulls go through."""
        return BlobCache(self.cache_dir, hardlinks=self.hardlinks)

    def _pull_file(self, file: VersionFileOut, target: Path, progress: Progress) -> bool:
        """Place one file; True when its bytes came over the network.

        Bytes are hashed on the way into the cache (download); a cached blob is placed without
        being read while its stamp matches, and hashed again first when it does not.
        """
        destination = target / file.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        cache = self.blob_cache
        if cache.place(file.sha256, file.size, destination, progress):
            return False
        # Absent or damaged: the download replaces the cache entry atomically. Another process
        # sharing the cache may replace it again before it is placed here: download again then.
        for attempt in range(PLACE_ATTEMPTS):
            if attempt:
                progress.advance(-file.size)  # counted again by the next download
            stamp = _retry(
                lambda: self._download(file, cache, progress), f"download of {file.path}"
            )
            if cache.put(file.sha256, stamp, destination) or cache.place(
                file.sha256, file.size, destination, NoProgress()
            ):
                return True
        raise Unavailable(
            f"{file.path}: its blob in {cache.root} was replaced while it was being placed, "
            f"{PLACE_ATTEMPTS} times (another process writing to the cache?); pull again"
        )

    def _download(self, file: VersionFileOut, cache: BlobCache, progress: Progress) -> Stamp:
        """Fetch one blob into the cache, hashing it on the way; the stamp of the verified blob."""
        if file.url is None:
            raise BlobNotFound(f"the registry does not hold {file.path}: nothing to download")
        client = self.http if file.url.startswith("/") else self.raw
        writer: BlobWriter | None = None
        try:
            with (
                cache.fill(file.sha256, file.size, file.path) as writer,
                client.stream("GET", file.url) as response,
            ):
                if response.status_code >= 400:
                    response.read()
                    raise_for_problem(response)
                for chunk in response.iter_bytes(CHUNK):
                    writer.write(chunk)
                    progress.advance(len(chunk))
        except BaseException:
            progress.advance(-(writer.received if writer else 0))
            raise
        assert writer.stamp is not None  # set by a clean exit from `fill`
        return writer.stamp


def _job_path(job_id: str) -> str:
    """A job id as one path segment (ids are uuid4 hex; anything else is refused here)."""
    if not job_id or not all(c.isascii() and (c.isalnum() or c in "-_") for c in job_id):
        raise InvalidInput(f"invalid job id {job_id!r}")
    return job_id


def _signature_body(signature: BaseSignature) -> dict[str, Any]:
    return {
        "config": signature.config,
        "tensors": {name: t.model_dump() for name, t in signature.tensors.items()},
    }


def _wire(entries: Iterable[FileEntry]) -> list[dict[str, Any]]:
    return [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in entries]


def _check_version_reply(ref: Reference, version: VersionOut, files: list[VersionFileOut]) -> None:
    """Refuse a server reply that does not describe what was asked for, before writing a byte:
    its file list (see `_listing_digest`) must have the version's digest."""
    listed = _listing_digest(files)
    if (
        version.adapter != str(ref.name)
        or listed != version.digest
        or (ref.selector.kind == "digest" and version.digest != ref.selector.value)
        or (ref.selector.kind == "number" and version.number != ref.selector.number)
    ):
        raise ChecksumMismatch(
            f"the registry's answer for {ref} does not match what was asked for (adapter "
            f"{version.adapter}@{version.number}, digest {version.digest}); refusing to write it"
        )


def _listing_digest(files: list[VersionFileOut]) -> str:
    """The manifest digest of a file list the server sent, once it is checked to be a valid
    manifest (relative, normalised paths: nothing can be written outside the output folder)."""
    entries = [FileEntry(f.path, f.size, f.sha256) for f in files]
    check_manifest(
        entries, max_files=len(entries), max_bytes=sum(e.size for e in entries), required=()
    )
    return manifest_digest(entries)


def _strangers(target: Path, expected: set[str]) -> list[str]:
    """Files under `target` that are not in `expected` (relative POSIX paths).

    Temporary files an interrupted pull left behind are removed here: they are ours.
    """
    if not target.is_dir():
        return []
    found = []
    for path in target.rglob("*"):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX):
            path.unlink(missing_ok=True)
            continue
        relative = path.relative_to(target).as_posix()
        if relative not in expected:
            found.append(relative)
    return sorted(found)
