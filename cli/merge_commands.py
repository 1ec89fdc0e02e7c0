"""`lora-reg merge`, `lora-reg jobs` and `lora-reg worker`.

`merge REF --base ID` queues a job on the server (a worker does the work; `--wait` follows it
with a progress bar, `--timeout` gives up after a while, and a queued job whose server has heard
from no worker lately says so once); `merge --local ADAPTER_DIR --base BASE_DIR -o OUT` runs
the engine here, with no server. The engine and the worker need the `[worker]` extra (torch):
they are imported inside the commands, so the rest of the CLI works without it.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from cli.client import Registry
    from registry.core.jobs import JobOut
    from registry.core.jobs import Progress as JobProgress
from rich.table import Table

from cli.console import (
    JsonOpt,
    emit_json,
    err,
    escape,
    out,
    page_footer,
    registry,
    size,
    state,
    when,
)
from registry.core.errors import InvalidInput, RegistryError, Unavailable, error_from_code
from registry.core.jobs import DTYPES

WORKER_RECENT = timedelta(seconds=60)  # a worker seen this recently will claim a queued job
WORKER_CHECK_EVERY_S = 10.0

DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype", help="Output dtype: bfloat16, float16 or float32 (default: the base's)."
    ),
]
UntieOpt = Annotated[
    bool,
    typer.Option(
        "--untie", help="Write a separate lm_head when the adapter touches tied embeddings."
    ),
]


def _worker_extra() -> None:
    if importlib.util.find_spec("torch") is None:  # pragma: no cover - depends on the extras
        raise InvalidInput(
            "this command runs the merge engine: pip install 'lora-registry[worker]'"
        )


def merge(
    ref: Annotated[
        str | None, typer.Argument(help="Adapter version: ns/name, ns/name@7, ns/name@production.")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model id[@rev] (default: the version's own base); a folder with --local.",
        ),
    ] = None,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="registry, dir:PATH (on the worker), s3://bucket/prefix, hub:ORG/REPO[@branch].",
        ),
    ] = "registry",
    dtype: DtypeOpt = None,
    untie: UntieOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Merge again even if the same merge already succeeded.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it finishes.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0,
            metavar="SECONDS",
            help="Wait (as --wait) at most this long, then exit 7 (the job carries on).",
            show_default=False,
        ),
    ] = None,
    local: Annotated[
        Path | None,
        typer.Option("--local", help="Merge this adapter folder here, with no server."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (with --local).")
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="With --local: auto, cpu or cuda.")
    ] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Merge an adapter into its base model: as a job on the server, or --local."""
    if dtype is not None and dtype not in DTYPES:
        raise InvalidInput(f"--dtype {dtype!r}: use {', '.join(DTYPES)}")
    if local is not None:
        _merge_local(local, base, output, dtype, untie, device, force, as_json)
        return
    if ref is None:
        raise InvalidInput("give an adapter reference (ns/name@N), or --local ADAPTER_DIR")
    if output is not None:
        raise InvalidInput("-o is for --local merges; a server merge goes --to a target")
    options = {"dtype": dtype, "untie": untie}
    with registry() as client:
        job = client.request_merge(ref, base=base, target=to, options=options, force=force)
        if job.memoized:
            err.print(
                f"same merge already done by job {job.id}: returning its result (--force to redo)"
            )
        elif not as_json:
            err.print(
                f"queued merge job {job.id}: "
                + escape(f"{job.adapter} into {job.base} -> {job.target}")
            )
        wait = wait or timeout is not None
        if wait:
            job = _follow(client, job, timeout)
    if as_json:
        emit_json(job)
    else:
        _print_job(job)
    if job.status in ("failed", "cancelled") and wait:
        code = job.error.code if job.error else "merge_failed"
        message = job.error.message if job.error else f"the job was {job.status}"
        raise error_from_code(code, f"job {job.id} {job.status}: {message}")


@contextmanager
def _merge_bar(description: str) -> Iterator[Callable[[JobProgress, str], None]]:
    """A progress bar on a terminal (bytes and tensors merged); yields its update function,
    a no-op when quiet or piped."""
    if state.quiet or not sys.stderr.isatty():
        yield lambda progress, status: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[tensors]}"),
        TimeRemainingColumn(),
        console=err,
    )
    task = bar.add_task(description, total=None, tensors="")

    def update(progress: JobProgress, status: str) -> None:
        bar.update(
            task,
            description=f"{description} ({status})",
            completed=progress.bytes_done,
            total=progress.bytes_total or None,
            tensors=f"{progress.tensors_done}/{progress.tensors_total} tensors",
        )

    bar.start()
    try:
        yield update
    finally:
        bar.stop()


def _follow(client: Registry, job: JobOut, timeout: float | None) -> JobOut:
    """Poll the job until it finishes, with a progress bar on a terminal; `Unavailable` (exit 7)
    once `timeout` seconds have passed. While it is queued, say once if no worker called in."""
    deadline = None if timeout is None else time.monotonic() + timeout
    hint = _WorkerHint(client)
    with _merge_bar(f"merge {job.id[:8]}") as update:
        while not job.finished:
            if job.status == "queued":
                hint.check()
            if deadline is not None and time.monotonic() >= deadline:
                raise Unavailable(
                    f"job {job.id} is still {job.status} after {timeout:g} s (--timeout); it "
                    f"stays on the server: follow it with lora-reg jobs {job.id}, or cancel it "
                    f"with lora-reg jobs cancel {job.id}",
                    job=job.id,
                )
            pause = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            time.sleep(pause)
            job = client.job(job.id)
            if job.progress is not None:
                update(job.progress, job.status)
    return job


class _WorkerHint:
    """Says once, on stderr, that no merge worker has called in lately (a queued job then waits
    until one starts). Checked at most every WORKER_CHECK_EVERY_S; a server without the workers
    list (older: 404) or that refuses it is left alone, silently."""

    def __init__(self, client: Registry) -> None:
        self.client = client
        self.done = False
        self.next_check = 0.0

    def check(self) -> None:
        if self.done or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + WORKER_CHECK_EVERY_S
        try:
            workers = self.client.merge_workers(limit=1).items  # newest first
        except Unavailable:
            return  # try again at the next check
        except RegistryError:  # NotFound from an older server, or a token that may not list
            self.done = True
            return
        now = datetime.now(UTC)
        if workers and now - workers[0].last_seen < WORKER_RECENT:
            return
        self.done = True
        seen = f"last one seen {when(workers[0].last_seen)}" if workers else "none ever"
        err.print(
            f"[yellow]warning[/yellow] no merge worker has called in for "
            f"{WORKER_RECENT.seconds} s ({seen}): the job stays queued until one runs "
            "(lora-reg worker, or a server with its embedded worker); --timeout SECONDS stops "
            "waiting",
            highlight=False,
        )


def _merge_local(
    adapter: Path,
    base: str | None,
    output: Path | None,
    dtype: str | None,
    untie: bool,
    device: str,
    force: bool,
    as_json: bool,
) -> None:
    _worker_extra()
    from worker.engine import MergeOptions, merge_to_folder

    if base is None or output is None:
        raise InvalidInput("--local needs --base BASE_DIR and -o OUTPUT_DIR")
    options = MergeOptions(dtype=dtype, untie=untie, device=device)
    with _merge_bar("merging") as update:
        result = merge_to_folder(
            adapter,
            Path(base),
            output,
            force=force,
            options=options,
            progress=lambda progress: update(progress, "local"),
        )
    if as_json:
        emit_json(
            {
                "path": str(output),
                "digest": result.digest,
                "size": result.size,
                "tensors_total": result.tensors_total,
                "tensors_merged": result.tensors_merged,
                "device": result.device,
                "files": [vars(f) for f in result.files],
                "warnings": [w.model_dump() for w in result.report.warnings],
            }
        )
        return
    for warning in result.report.warnings:
        err.print(
            f"[yellow]warning[/yellow] ({warning.code}): {escape(warning.message)}",
            highlight=False,
        )
    out.print(
        f"merged {escape(str(adapter))} into {escape(base)}: {result.tensors_merged} of "
        f"{result.tensors_total} tensors changed, {size(result.size)} in {len(result.files)} "
        f"files on {result.device}\n  -> {escape(str(output))} ({result.digest})"
    )


def _print_job(job: JobOut) -> None:
    lines = [
        f"job {job.id}: {job.status}" + (" (memoized)" if job.memoized else ""),
        f"  adapter  {job.adapter} ({job.adapter_digest[:19]})",
        f"  base     {job.base}",
        f"  target   {job.target}",
        f"  options  dtype={job.options.dtype or 'base'} untie={job.options.untie}",
        f"  attempts {job.attempts}/{job.max_attempts}"
        + (f" on {job.worker}" if job.worker else ""),
    ]
    if job.progress is not None and job.status == "running":
        p = job.progress
        lines.append(
            f"  progress {p.tensors_done}/{p.tensors_total} tensors, "
            f"{size(p.bytes_done)} of {size(p.bytes_total)}"
        )
    if job.result is not None:
        lines.append(f"  output   {job.result.location} ({size(job.result.size)})")
        if job.result.artifact:
            lines.append(f"  artifact {job.result.artifact}")
            lines.append(f"  pull it: lora-reg pull {job.result.artifact} -o DIR")
    if job.error is not None:
        lines.append(f"  error    ({job.error.code}) {job.error.message}")
    out.print("\n".join(lines), markup=False, highlight=False)


def jobs(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="Nothing (list), a job ID (show), or `cancel ID`.", show_default=False),
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="queued, running, succeeded, failed, cancelled.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Merge jobs: `lora-reg jobs`, `lora-reg jobs ID`, `lora-reg jobs cancel ID`."""
    args = args or []
    with registry() as client:
        if args and args[0] == "cancel":
            if len(args) != 2:
                raise InvalidInput("usage: lora-reg jobs cancel ID")
            job = client.cancel_job(args[1])
            if as_json:
                emit_json(job)
            else:
                _print_job(job)
            return
        if len(args) > 1:
            raise InvalidInput("usage: lora-reg jobs [ID] | lora-reg jobs cancel ID")
        if args:
            job = client.job(args[0])
            if as_json:
                emit_json(job)
            else:
                _print_job(job)
            return
        page = client.jobs(status=status, limit=limit, offset=offset)
    if as_json:
        emit_json(page)
        return
    table = Table("id", "status", "adapter", "base", "target", "progress", "created")
    for job in page.items:
        p = job.progress
        table.add_row(
            job.id[:12],
            escape(job.status + (f" ({job.error.code})" if job.error else "")),
            escape(job.adapter),
            escape(job.base),
            escape(job.target),
            f"{p.tensors_done}/{p.tensors_total}" if p else "-",
            when(job.created_at),
        )
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)


def worker(
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=64, help="Jobs run at once.")
    ] = 1,
    name: Annotated[
        str | None, typer.Option("--name", help="Worker name (default host-pid).")
    ] = None,
    lease: Annotated[
        int, typer.Option("--lease", min=5, max=3600, help="Lease seconds (renewed every third).")
    ] = 60,
    once: Annotated[bool, typer.Option("--once", help="Run at most one job, then exit.")] = False,
) -> None:
    """Run a merge worker: claim jobs from the server, merge, publish, report."""
    _worker_extra()
    from worker import engine
    from worker.runner import Worker

    with registry() as client:
        runner = Worker(client, name=name, device=device, lease_s=lease)
        err.print(escape(f"worker {runner.name} ({device}) serving {state.url}"))
        if engine.kernels is None:
            err.print(
                "[yellow]warning[/yellow] the merge engine's C kernels were not built (no C "
                "compiler or Python headers when lora-registry was installed): CPU merges of "
                "bf16 weights use slower torch ops. Install gcc and reinstall to build them."
            )
        if once:
            worked = runner.run_once()
            err.print("ran one job" if worked else "no job was queued")
            return
        stop = threading.Event()
        try:
            runner.serve(stop, concurrency)
        except KeyboardInterrupt:
            stop.set()
