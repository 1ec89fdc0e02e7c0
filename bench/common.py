"""What the benchmarks share: the machine they ran on, and their tables.

Only the standard library: `bench.merge` runs its steps in child processes that must start with
nothing but what the step imports, and on a GPU machine that holds nothing else (no registry
client, no test fixtures).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def fresh_page_ns(size: int = 256 << 20) -> float:
    """What touching a never-used page of memory costs here, in ns per 4 KiB page.

    Every step that allocates (PEFT's copy-on-write of the mapped weights, page-cache writes of
    a copy) pays this per page. On bare metal it is a fraction of a microsecond; on some VMs it
    is several, and then it dominates those steps: printed with the figures so that runs on
    different machines can be compared.
    """
    page = mmap.PAGESIZE
    memory = mmap.mmap(-1, size)
    try:
        started = time.perf_counter()
        for offset in range(0, size, page):
            memory[offset] = 1
        elapsed = time.perf_counter() - started
    finally:
        memory.close()
    return elapsed / (size / page) * 1e9 * (4096 / page)


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """CPU, memory, platform and Python, the versions of `packages`, and the cost of a fresh
    page of memory (`fresh_page_ns`)."""
    cpu = None
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None
        )
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{package: version(package) for package in packages},
        "fresh_page_ns": round(fresh_page_ns()),
    }


def fmt_ratio(value: float | None, digits: int = 2) -> str:
    """A ratio as "12.34x" (no decimals from 100 on); "-" for none."""
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.{digits}f}x"


def print_table(head: list[str], rows: list[list[str]], right: set[int] | None = None) -> None:
    """Columns padded to their widest cell; those in `right` right-aligned (default: all but
    the first)."""
    if right is None:
        right = set(range(1, len(head)))
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
