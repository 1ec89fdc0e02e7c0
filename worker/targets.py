"""Where a merge job's output goes, and how it gets there without a half-written result.

Every target receives the merged folder as the engine writes it, file by file (`add`, called
as each file completes, so uploads overlap the rest of the merge), and `publish` makes it
visible only once everything is there:

- `registry`: files become content-addressed blobs; the job's finish call records the artifact,
  so it exists only when every blob does.
- `dir:PATH`: the engine writes a staging folder beside PATH, renamed into place at the end.
- `s3://bucket/prefix`: objects go under `prefix/.staging-<job>/`, are copied to their final
  keys (shards first, config and index last) and the staging objects deleted.
- `hub:org/repo[@branch]`: one Hub commit holding every file (`worker.hub`).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cli.client import Registry
from registry.core.basemodel import CONFIG_JSON, INDEX_JSON
from registry.core.errors import OutputExists, RegistryError, Unavailable
from registry.core.jobs import Target
from registry.core.manifest import FileEntry
from worker.engine import folder_entries


class Publisher:
    """A target: the engine writes into `staging(work)`, hands over each file as it completes
    (`add`), and `publish` makes the whole output visible; `abort` undoes what `add` started."""

    out: Path

    def staging(self, work: Path) -> Path:
        """Where the engine writes the merged folder (a fresh, empty path)."""
        self.out = work / "merged"
        return self.out

    def add(self, entry: FileEntry) -> None:
        pass

    def publish(self, files: list[FileEntry]) -> str:
        """Make the output visible; returns its location."""
        raise NotImplementedError

    def abort(self) -> None:
        pass


class _Uploads:
    """Uploads running beside the merge; `wait` re-raises the first failure."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="merge-upload")
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self.futures.append(self.pool.submit(fn, *args, **kwargs))

    def wait(self) -> None:
        try:
            for future in self.futures:
                future.result()
        finally:
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        for future in self.futures:
            future.cancel()
        self.pool.shutdown(wait=True)


class RegistryTarget(Publisher):
    def __init__(self, client: Registry, job_id: str, worker: str) -> None:
        self.client = client
        self.job_id = job_id
        self.worker = worker
        self.uploads = _Uploads()

    def add(self, entry: FileEntry) -> None:
        self.uploads.submit(
            self.client.upload_merged, self.job_id, self.out, [entry], worker=self.worker
        )

    def publish(self, files: list[FileEntry]) -> str:
        self.uploads.wait()
        return "registry"

    def abort(self) -> None:
        self.uploads.abort()


class DirTarget(Publisher):
    """The merged folder at PATH on the worker. An existing folder is never overwritten: if it
    already holds exactly this merge (an earlier attempt finished), the job succeeds.

    `job_ended(job_id)` says whether a job is over (succeeded, failed or cancelled): staging
    folders that such jobs left beside PATH (a worker killed mid-merge, never retried) are
    removed. Without it, or when the registry cannot say, they are left alone: another worker may
    be writing there (PATH can be on a shared file system)."""

    def __init__(self, path: Path, job_ended: Callable[[str], bool] | None = None) -> None:
        self.path = path
        self.job_ended = job_ended

    def staging(self, work: Path) -> Path:
        # Beside the final folder, so publishing is a rename on one filesystem. `work` is named
        # job-<id>-<random>: what an earlier attempt of this job left (its worker was killed or
        # lost the lease, so it publishes nothing) is removed first, and so is what ended jobs
        # left.
        prefix = f".{self.path.name}.partial-"
        job = work.name.rsplit("-", 1)[0]
        if self.path.parent.is_dir():
            for leftover in self.path.parent.iterdir():
                if not leftover.name.startswith(prefix):
                    continue
                owner = leftover.name[len(prefix) :].rsplit("-", 1)[0]  # job-<id>
                if owner == job or (
                    self.job_ended is not None
                    and owner.startswith("job-")
                    and self.job_ended(owner.removeprefix("job-"))
                ):
                    shutil.rmtree(leftover, ignore_errors=True)
        self.out = self.path.parent / f"{prefix}{work.name}"
        return self.out

    def publish(self, files: list[FileEntry]) -> str:
        if self.path.exists() and any(self.path.iterdir()):
            if folder_entries(self.path) == sorted(files, key=lambda f: f.path):
                return str(self.path)
            raise OutputExists(
                f"{self.path} already exists on the worker and holds something else; choose "
                "another dir: target or remove it"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.rmdir()
        self.out.rename(self.path)
        return str(self.path)


class S3Target(Publisher):
    def __init__(self, bucket: str, prefix: str, job_id: str, client: Any | None = None) -> None:
        if client is None:
            from worker.s3 import s3_client

            client = s3_client()
        self.s3 = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.staged_root = f"{self.prefix}/.staging-{job_id}".lstrip("/")
        self.uploads = _Uploads()
        self.staged: list[str] = []

    def _key(self, root: str, path: str) -> str:
        return f"{root}/{path}" if root else path

    def add(self, entry: FileEntry) -> None:
        key = self._key(self.staged_root, entry.path)
        self.staged.append(key)
        self.uploads.submit(self._upload, self.out / entry.path, key)

    def _upload(self, path: Path, key: str) -> None:
        try:
            self.s3.upload_file(str(path), self.bucket, key)
        except Exception as exc:
            raise Unavailable(f"upload to s3://{self.bucket}/{key} failed: {exc}") from exc

    def publish(self, files: list[FileEntry]) -> str:
        self.uploads.wait()
        # Readers look for config.json and the index: those land last.
        last = (CONFIG_JSON, INDEX_JSON)
        ordered = sorted(files, key=lambda f: (f.path in last, f.path))
        try:
            for entry in ordered:
                self.s3.copy(
                    {"Bucket": self.bucket, "Key": self._key(self.staged_root, entry.path)},
                    self.bucket,
                    self._key(self.prefix, entry.path),
                )
        except Exception as exc:
            raise Unavailable(
                f"publishing to s3://{self.bucket}/{self.prefix} failed: {exc}"
            ) from exc
        self.abort()
        return f"s3://{self.bucket}/{self.prefix}"

    def abort(self) -> None:
        self.uploads.abort()
        for key in self.staged:
            # Best effort: staging objects are never read as output.
            with contextlib.suppress(Exception):
                self.s3.delete_object(Bucket=self.bucket, Key=key)
        self.staged = []


class HubTarget(Publisher):
    def __init__(self, repo: str, branch: str | None, message: str, description: str) -> None:
        self.repo = repo
        self.branch = branch
        self.message = message
        self.description = description

    def publish(self, files: list[FileEntry]) -> str:
        from worker.hub import publish_to_hub

        published = publish_to_hub(
            self.out,
            self.repo,
            branch=self.branch,
            commit_message=self.message,
            commit_description=self.description,
        )
        return published.commit_url or f"hub:{self.repo}"


def _job_ended(client: Registry, job_id: str) -> bool:
    """Whether the registry says this job is over; False when it cannot say (unknown id,
    unreachable)."""
    try:
        return client.job(job_id).finished
    except RegistryError:
        return False


def make_target(
    target: Target, *, client: Registry, job_id: str, worker: str, adapter: str, base: str
) -> Publisher:
    if target.kind == "registry":
        return RegistryTarget(client, job_id, worker)
    if target.kind == "dir":
        assert target.path is not None
        return DirTarget(Path(target.path), job_ended=lambda other: _job_ended(client, other))
    if target.kind == "s3":
        assert target.bucket is not None
        return S3Target(target.bucket, target.prefix or "", job_id)
    assert target.repo is not None
    return HubTarget(
        target.repo,
        target.branch,
        f"Merge LoRA adapter {adapter} into {base}",
        f"Merged by lora-registry (job {job_id}): adapter {adapter}, base {base}.",
    )
