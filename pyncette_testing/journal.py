"""The journal: every execution a simulation made, and readable timelines for assertion messages."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Event", "Execution", "Outcome", "Settlement", "render_timeline"]


class Outcome(enum.Enum):
    """How an execution of a task body ended."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CRASHED = "crashed"
    """Its worker crashed (``kill -9``) while it ran: no commit, no unlock, no teardown."""

    def __repr__(self) -> str:
        return f"Outcome.{self.name}"


class Settlement(enum.Enum):
    """How an execution was settled with the store after its body ended."""

    COMMITTED = "committed"
    """The lease was committed: the task is rescheduled (or, once-off, deleted)."""
    UNLOCKED = "unlocked"
    """FailureMode.UNLOCK after a failure: the task is due again on the next tick."""
    LEFT_LOCKED = "left locked"
    """FailureMode.NONE after a failure: retried once the lease expires."""
    LEASE_LOST = "lease lost"
    """The commit or unlock was refused (someone else holds the lease), or it was lost heartbeating."""
    COMMIT_FAILED = "commit failed"
    """The commit or unlock call raised: the task will likely run again after its lease."""
    NOT_APPLICABLE = "not applicable"
    """AT_MOST_ONCE: nothing to settle, the poll already rescheduled it."""
    NONE = "none"
    """Not settled: still running, or crashed."""

    def __repr__(self) -> str:
        return f"Settlement.{self.name}"


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened to the cluster: a fault, a crash, a lease change."""

    at: datetime.datetime
    kind: str
    worker: str | None = None
    task: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        parts = [_instant(self.at), self.kind]
        if self.worker:
            parts.append(f"worker={self.worker}")
        if self.task:
            parts.append(f"task={self.task}")
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Execution:
    """One execution of a task body, as the journal saw it. Instants are aware UTC datetimes."""

    task: str
    """Canonical name: ``"report"``, ``"queue:job-1"``, ``"shards:3:job-1"``."""
    template: str | None
    """The dynamic or partitioned template's name, ``None`` for static tasks."""
    instance: str | None
    """The dynamic instance's name, ``None`` for static tasks."""
    worker: str
    scheduled_at: datetime.datetime
    started_at: datetime.datetime
    finished_at: datetime.datetime | None
    outcome: Outcome
    settlement: Settlement = Settlement.NONE
    error: BaseException | None = dataclasses.field(default=None, compare=False)
    args: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def lateness(self) -> datetime.timedelta:
        """``started_at - scheduled_at``."""
        return self.started_at - self.scheduled_at

    @property
    def duration(self) -> datetime.timedelta | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    def __str__(self) -> str:
        finished = "…" if self.finished_at is None else _clock(self.finished_at)
        error = f" {type(self.error).__name__}: {self.error}" if self.error is not None else ""
        return (
            f"{self.task} on {self.worker}: scheduled {_instant(self.scheduled_at)}, "
            f"ran {_instant(self.started_at)} to {finished}, {self.outcome.value}{error}"
        )


class _Entry:
    """The journal's mutable record of one execution; :meth:`freeze` gives the public view."""

    __slots__ = (
        "args",
        "error",
        "finished_at",
        "group",
        "instance",
        "lease",
        "lease_duration",
        "outcome",
        "scheduled_at",
        "settlement",
        "started_at",
        "task",
        "template",
        "worker",
    )

    def __init__(
        self,
        task: str,
        template: str | None,
        instance: str | None,
        worker: str,
        scheduled_at: datetime.datetime,
        started_at: float,
        args: dict[str, Any],
        group: object,
    ) -> None:
        self.task = task
        self.template = template
        self.instance = instance
        self.worker = worker
        self.scheduled_at = scheduled_at  # as Pyncette gave it (in the task's zone); UTC when read
        self.started_at = started_at  # loop time; the journal turns it into an instant when read
        self.finished_at: float | None = None
        self.outcome = Outcome.RUNNING
        self.settlement = Settlement.NONE
        self.error: BaseException | None = None
        self.args = args
        self.lease: object = None  # the key of the lease it runs under (AT_LEAST_ONCE); "settled" after
        self.lease_duration: float | None = None
        self.group = group  # the worker incarnation that runs it

    def finish(self, outcome: Outcome, at: float, error: BaseException | None = None) -> None:
        if self.outcome is not Outcome.RUNNING:
            return  # a crash already ended it
        self.outcome = outcome
        self.finished_at = at
        self.error = error

    def freeze(self, instant: Callable[[float], datetime.datetime]) -> Execution:
        # Reading the journal builds one Execution per run: fill the frozen dataclass's fields
        # directly instead of through its __init__ (one object.__setattr__ call per field).
        execution = object.__new__(Execution)
        vars(execution).update(
            task=self.task,
            template=self.template,
            instance=self.instance,
            worker=self.worker,
            scheduled_at=self.scheduled_at.astimezone(datetime.timezone.utc),
            started_at=instant(self.started_at),
            finished_at=None if self.finished_at is None else instant(self.finished_at),
            outcome=self.outcome,
            settlement=self.settlement,
            error=self.error,
            args=dict(self.args),
        )
        return execution


class Journal:
    """Executions in start order, and events. Both keep loop times (cheap to take on the hot path)
    and become aware instants through ``instant`` when read."""

    def __init__(self, instant: Callable[[float], datetime.datetime]) -> None:
        self.instant = instant
        self.entries: list[_Entry] = []
        self._events: list[tuple[float, str, str | None, str | None, str]] = []

    def event(self, at: float, kind: str, worker: str | None = None, task: str | None = None, detail: str = "") -> None:
        self._events.append((at, kind, worker, task, detail))

    @property
    def events(self) -> list[Event]:
        instant = self.instant
        return [Event(instant(at), kind, worker, task, detail) for at, kind, worker, task, detail in self._events]

    def executions(self, entries: Iterable[_Entry] | None = None) -> list[Execution]:
        instant = self.instant
        return [entry.freeze(instant) for entry in (self.entries if entries is None else entries)]

    def release_frames(self) -> None:
        """Drop the local variables that errors' tracebacks hold, so that a finished simulation
        can be collected; the tracebacks still print."""
        for entry in self.entries:
            error = entry.error
            seen: set[int] = set()
            while error is not None and id(error) not in seen:
                seen.add(id(error))
                if error.__traceback__ is not None:
                    traceback.clear_frames(error.__traceback__)
                error = error.__cause__ or error.__context__


def _instant(value: datetime.datetime) -> str:
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + _fraction(value)


def _clock(value: datetime.datetime) -> str:
    return value.astimezone(datetime.timezone.utc).strftime("%H:%M:%S") + _fraction(value)


def _fraction(value: datetime.datetime) -> str:
    return f".{value.microsecond:06d}".rstrip("0") if value.microsecond else ""


def _delta(value: datetime.timedelta) -> str:
    seconds = value.total_seconds()
    sign = "-" if seconds < 0 else "+"
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:g}s"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    return sign + "".join(parts) + (f"{seconds:g}s" if seconds else "")


def render_timeline(executions: Sequence[Execution] | Iterable[Execution], *, limit: int = 50) -> str:
    """A plain-text table of executions: scheduled vs started, lateness, worker, outcome."""
    rows = list(executions)
    if not rows:
        return "    (no executions)"
    header = ("#", "task", "scheduled (UTC)", "started", "late", "finished", "worker", "settlement", "outcome")
    table = [header]
    for index, execution in enumerate(rows[:limit], 1):
        error = f" ({type(execution.error).__name__}: {execution.error})" if execution.error is not None else ""
        table.append(
            (
                str(index),
                execution.task,
                _instant(execution.scheduled_at),
                _instant(execution.started_at),
                _delta(execution.lateness),
                "—" if execution.finished_at is None else _instant(execution.finished_at),
                execution.worker,
                execution.settlement.value,
                execution.outcome.value + error,
            )
        )
    widths = [max(len(row[column]) for row in table) for column in range(len(header) - 1)]
    lines = [
        "    " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in table
    ]
    if len(rows) > limit:
        lines.append(f"    ... and {len(rows) - limit} more")
    return "\n".join(line.rstrip() for line in lines)
