"""Progress reporting for long transfers, decoupled from rich so the client stays scriptable."""

from __future__ import annotations

import threading
from typing import Protocol


class Progress(Protocol):
    """Receives byte counts from a transfer; implementations must be thread-safe."""

    def begin(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    def begin(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def end(self) -> None:
        pass


class RichProgress:
    """A rich progress bar on stderr (bytes, speed, time left)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: int | None = None
        self._lock = threading.Lock()

    def begin(self, description: str, total: int) -> None:
        with self._lock:
            if self._task is None:
                self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        with self._lock:
            if self._task is not None:
                self._bar.advance(self._task, amount)  # type: ignore[arg-type]

    def end(self) -> None:
        with self._lock:
            self._bar.stop()
            self._task = None
