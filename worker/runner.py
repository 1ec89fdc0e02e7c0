"""The merge worker: claims jobs over HTTP, runs the engine, publishes, reports.

`lora-reg worker` runs `Worker.serve`; `lora-reg server` runs one in a thread by default. A job
is claimed with a lease that a heartbeat thread renews (sending progress) every third of the
lease. The heartbeat's answer carries cancellation; a `lease_lost` answer means the server gave
the job to another worker (this one was too slow or presumed dead), so this worker drops it
without finishing. A worker killed mid-merge leaves only staging output; its job is requeued
when the lease expires and runs again from the start on another worker.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cli.client import Registry, default_cache_dir
from registry.core.errors import (
    InvalidBase,
    LeaseLost,
    NotAuthenticated,
    NotPermitted,
    RegistryError,
)
from registry.core.jobs import Claim, JobError, JobOut, JobResult, Progress, parse_target
from registry.core.schemas import BaseOut, FileSpec
from worker.engine import MergeCancelled, MergeOptions, merge
from worker.sources import FolderSource, S3Source, Source
from worker.targets import make_target

log = logging.getLogger("lora_registry.worker")


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Running:
    """What the heartbeat thread shares with the merge."""

    job: JobOut
    progress: Progress | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(
        self,
        client: Registry,
        *,
        name: str | None = None,
        device: str = "auto",
        lease_s: int = 60,
        poll_s: float = 2.0,
        work_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.name = name or default_name()
        self.device = device
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.work_dir = Path(work_dir or tempfile.gettempdir()) / "lora-reg-worker"
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.refused: RegistryError | None = None  # the server refused our token: stop

    def serve(self, stop: threading.Event, concurrency: int = 1) -> None:
        """Claim and run jobs until `stop` is set, `concurrency` at a time (each slot claims
        under a name of its own, so the server never confuses two of them). Raises
        not_authenticated / not_permitted at once when the server refuses the token."""
        slots = [self] if concurrency == 1 else []
        for i in range(len(slots), concurrency):
            slot = copy.copy(self)
            slot.name = f"{self.name}/{i}"
            slots.append(slot)
        threads = [
            threading.Thread(target=slot._loop, args=(stop,), name=f"merge-worker-{i}")
            for i, slot in enumerate(slots)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        refused = next((slot.refused for slot in slots if slot.refused is not None), None)
        if refused is not None:
            raise refused

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                worked = self.run_once()
            except (NotAuthenticated, NotPermitted) as exc:  # retrying cannot help: stop all
                log.error("worker %s: %s", self.name, exc.message)
                self.refused = exc
                stop.set()
                return
            except RegistryError as exc:  # the server is away: keep trying, quietly
                log.warning("worker %s: %s", self.name, exc.message)
                worked = False
            except Exception:  # never let one bad answer kill the worker
                log.exception("worker %s: unexpected error", self.name)
                worked = False
            if not worked:
                stop.wait(self.poll_s)

    def run_once(self) -> bool:
        """Claim one job and run it to the end; False when there was none."""
        claim: Claim | None = self.client.claim_job(
            self.name, device=self.device, lease_s=self.lease_s
        )
        if claim is None:
            return False
        self.run(claim)
        return True

    def run(self, claim: Claim) -> None:
        job = claim.job
        running = _Running(job)
        stop_beat = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(running, stop_beat, claim.lease_s), daemon=True
        )
        beat.start()
        work = self.work_dir / f"job-{job.id}-{uuid.uuid4().hex[:8]}"
        try:
            result = self._merge(running, work)
        except MergeCancelled:
            self._finish(
                running, "cancelled", error=JobError(code="cancelled", message="cancelled")
            )
        except LeaseLost:
            log.warning("job %s: lease lost, dropping it", job.id)
        except RegistryError as exc:
            self._finish(running, "failed", error=JobError(code=exc.code, message=exc.message))
        except Exception as exc:  # a bug or an environment failure: report it, keep serving
            log.exception("job %s failed", job.id)
            self._finish(
                running, "failed", error=JobError(code="merge_failed", message=f"{exc!r}"[:2000])
            )
        else:
            self._finish(running, "succeeded", result=result)
        finally:
            stop_beat.set()
            beat.join()
            shutil.rmtree(work, ignore_errors=True)

    def _finish(
        self,
        running: _Running,
        status: str,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
    ) -> None:
        if running.lost.is_set():
            return
        try:
            if running.progress is not None:  # the last figures, which no heartbeat carried
                self.client.heartbeat(running.job.id, self.name, running.progress)
            self.client.finish_job(running.job.id, self.name, status, result=result, error=error)
        except LeaseLost:
            log.warning("job %s: lease lost before finishing", running.job.id)
        except RegistryError as exc:
            if status != "succeeded":
                raise
            # The server refused the result (too large, a blob gone): the job failed, say why.
            failure = JobError(code=exc.code, message=exc.message)
            self._finish(running, "failed", error=failure)

    def _heartbeat(self, running: _Running, stop: threading.Event, lease_s: int) -> None:
        while not stop.wait(max(1.0, lease_s / 3)):
            try:
                answer = self.client.heartbeat(running.job.id, self.name, running.progress)
            except LeaseLost:
                running.lost.set()
                running.cancel.set()
                return
            except RegistryError as exc:  # transient: the lease outlives a few misses
                log.warning("job %s: heartbeat failed: %s", running.job.id, exc.message)
                continue
            if answer.cancel_requested:
                running.cancel.set()

    def _merge(self, running: _Running, work: Path) -> JobResult:
        job = running.job
        work.mkdir(parents=True, exist_ok=True)
        adapter_dir = work / "adapter"
        self.client.pull(job.adapter, adapter_dir, allow_yanked=True)
        base = self.client.base(job.base)
        source = self._open_base(base)
        target = make_target(
            parse_target(job.target),
            client=self.client,
            job_id=job.id,
            worker=self.name,
            adapter=job.adapter,
            base=job.base,
        )
        out = target.staging(work)

        def progress(p: Progress) -> None:
            running.progress = p  # the heartbeat thread sends the latest

        options = MergeOptions(dtype=job.options.dtype, untie=job.options.untie, device=self.device)
        try:
            result = merge(
                adapter_dir,
                source,
                out,
                options=options,
                provenance={
                    "adapter": job.adapter,
                    "adapter_digest": job.adapter_digest,
                    "base": job.base,
                },
                progress=progress,
                cancelled=running.cancel.is_set,
                on_file=target.add,
                base_id=base.id,
                base_revision=base.revision,
            )
            if running.lost.is_set():
                raise LeaseLost()
            location = target.publish(result.files)
        except BaseException:
            target.abort()
            raise
        finally:  # staging outside the work folder (dir: targets) is not removed with it
            if out.exists() and not out.is_relative_to(work):
                shutil.rmtree(out, ignore_errors=True)
        return JobResult(
            location=location,
            artifact=None,
            files=[FileSpec(path=f.path, size=f.size, sha256=f.sha256) for f in result.files],
            size=result.size,
            device=result.device,
        )

    def _open_base(self, base: BaseOut) -> Source:
        """A readable source for the base's weights, wherever they live."""
        if base.stored:  # uploaded to the registry: fetched once into the worker's cache
            folder = self.cache_dir / "bases" / base.ref.replace("/", "--")
            return FolderSource(self.client.pull_base(base.ref, folder))
        location = base.source
        if location.startswith("s3://"):
            bucket, _, prefix = location.removeprefix("s3://").partition("/")
            return S3Source(bucket, prefix)
        if location.startswith("hf://"):
            from worker.hub import hub_snapshot

            repo, _, revision = location.removeprefix("hf://").partition("@")
            folder, _ = hub_snapshot(repo, revision or None)
            return FolderSource(folder)
        path = Path(location.removeprefix("file://"))
        if not path.is_dir():
            raise InvalidBase(
                f"the base's weights are at {location}, which this worker cannot read; register "
                "the base with --upload, from s3://, or from the Hub"
            )
        return FolderSource(path)
