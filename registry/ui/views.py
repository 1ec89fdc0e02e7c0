"""What the pages show, computed from the API's models: metric columns, a metric's chart
across versions, and each alias's timeline. Pure functions (no SQL, no HTTP), so each is easy
to test on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from registry.core.schemas import AliasMoveOut


class HasMetrics(Protocol):
    """A version as far as charts care (VersionOut, adapters.service.MetricPoint)."""

    @property
    def number(self) -> int: ...

    @property
    def metrics(self) -> dict[str, float]: ...


def metric_names(versions: Sequence[HasMetrics]) -> list[str]:
    """Every metric any of the versions has, in name order (one table column each)."""
    return sorted({name for version in versions for name in version.metrics})


@dataclass(frozen=True)
class Point:
    number: int  # the version
    value: float
    x: float
    y: float


@dataclass(frozen=True)
class Chart:
    """A metric across versions, laid out for an inline SVG of `width` x `height`."""

    metric: str
    points: list[Point]
    low: float
    high: float
    width: int = 320
    height: int = 120
    pad: int = 14

    @property
    def line(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)

    @property
    def best(self) -> Point:
        return max(self.points, key=lambda point: point.value)


def chart(metric: str, versions: Sequence[HasMetrics]) -> Chart | None:
    """`metric` of every version that has it, oldest version on the left; None when no version
    has a finite value."""
    found = [
        (v.number, v.metrics[metric])
        for v in sorted(versions, key=lambda v: v.number)
        if metric in v.metrics and math.isfinite(v.metrics[metric])
    ]
    if not found:
        return None
    template = Chart(metric=metric, points=[], low=0.0, high=0.0)
    width, height, pad = template.width, template.height, template.pad
    values = [value for _, value in found]
    low, high = min(values), max(values)
    spread = (high - low) or 1.0
    step = (width - 2 * pad) / max(len(found) - 1, 1)
    points = [
        Point(
            number=number,
            value=value,
            x=pad + (index * step if len(found) > 1 else (width - 2 * pad) / 2),
            y=height - pad - (value - low) / spread * (height - 2 * pad),
        )
        for index, (number, value) in enumerate(found)
    ]
    return Chart(metric=metric, points=points, low=low, high=high)


@dataclass(frozen=True)
class Span:
    """An alias pointed at `version` (None: it was removed) from `start` until `end` (None:
    still does), set by `actor`."""

    alias: str
    version: int | None
    previous: int | None
    start: datetime
    end: datetime | None
    actor: str | None

    def covers(self, moment: datetime) -> bool:
        return self.start <= moment and (self.end is None or moment < self.end)


def timelines(moves: list[AliasMoveOut]) -> dict[str, list[Span]]:
    """Each alias's history as spans, newest first: which version it meant, from when until
    when, and who moved it there."""
    spans: dict[str, list[Span]] = {}
    for move in sorted(moves, key=lambda m: m.at):
        history = spans.setdefault(move.alias, [])
        start = _utc(move.at)
        if history:
            last = history[-1]
            history[-1] = Span(
                last.alias, last.version, last.previous, last.start, start, last.actor
            )
        history.append(Span(move.alias, move.version, move.previous, start, None, move.actor))
    return {alias: list(reversed(history)) for alias, history in sorted(spans.items())}


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)
