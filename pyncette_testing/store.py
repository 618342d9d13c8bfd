"""The in-memory store: plain records plus a due-time index per dynamic task.

Records mirror the columns of Pyncette's sqlite table (timestamps as float seconds, leases as
strings) so that the repository on top of it reproduces the sqlite backend bit for bit.
"""

from __future__ import annotations

import datetime
import heapq
import json
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dateutil.tz
from sortedcontainers import SortedList

__all__ = ["InMemoryStore", "TaskRecord"]


@dataclass(frozen=True)
class TaskRecord:
    """An immutable snapshot of one stored task (a static task or a dynamic instance)."""

    name: str
    """Canonical name, e.g. ``"hello"`` or ``"hello:instance"``."""
    parent: str | None
    """Canonical name of the dynamic (or partition) template, ``None`` for static tasks."""
    execute_after: datetime.datetime | None
    locked_until: datetime.datetime | None
    locked_by: str | None
    spec: Mapping[str, Any] | None
    """The stored task spec (``Task.as_spec()``) of a dynamic instance, ``None`` for static tasks."""


def _to_datetime(timestamp: float | None) -> datetime.datetime | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, dateutil.tz.UTC)


class _Row:
    """One mutable row. Only the store and the repository ever see these."""

    __slots__ = ("execute_after", "locked_by", "locked_until", "name", "parent", "rowid", "spec", "version")

    def __init__(
        self,
        name: str,
        parent: str | None,
        rowid: int,
        execute_after: float | None,
        locked_until: float | None = None,
        locked_by: str | None = None,
        spec: str | None = None,
    ) -> None:
        self.name = name
        self.parent = parent
        self.rowid = rowid
        self.execute_after = execute_after
        self.locked_until = locked_until
        self.locked_by = locked_by
        self.spec = spec
        self.version = 0  # bumped on every change of its due key: older index entries are stale

    @property
    def due_key(self) -> tuple[float, int]:
        # The sqlite backend orders due instances by MAX(COALESCE(locked_until, 0),
        # COALESCE(execute_after, 0)) through its index, ties broken by rowid.
        return (max(self.locked_until or 0.0, self.execute_after or 0.0), self.rowid)

    def freeze(self) -> TaskRecord:
        spec = None if self.spec is None else types.MappingProxyType(json.loads(self.spec))
        return TaskRecord(
            name=self.name,
            parent=self.parent,
            execute_after=_to_datetime(self.execute_after),
            locked_until=_to_datetime(self.locked_until),
            locked_by=self.locked_by,
            spec=spec,
        )


_IndexEntry = tuple[tuple[float, int], int, "_Row"]  # (due key, row version, row)


class _DueIndex:
    """One dynamic template's instances ordered by due key: a heap with lazy deletion.

    A change pushes the row's new entry and leaves the old one behind, stale (its version is no
    longer the row's); stale entries are dropped when they reach the top, and the heap is rebuilt
    once they outnumber the live ones. Pushing is a C call, where a sorted list's remove and add
    cost several Python calls: this runs three times per execution of a dynamic instance.
    """

    __slots__ = ("_heap", "_held", "live")

    def __init__(self) -> None:
        self._heap: list[_IndexEntry] = []
        self._held: list[_IndexEntry] = []  # handed out by first(), not pushed back yet
        self.live = 0

    def add(self, row: _Row) -> None:
        self.live += 1
        self._push(row)

    def moved(self, row: _Row) -> None:
        """``row``'s due key changed."""
        self._push(row)
        self._compact()

    def remove(self, row: _Row) -> None:
        row.version += 1
        self.live -= 1
        self._compact()

    def earliest(self) -> float | None:
        """The smallest due time, ``None`` if empty."""
        heap = self._top()
        return heap[0][0][0] if heap else None

    def first(self, now: float, limit: int) -> list[_Row]:
        """Up to ``limit`` rows due at ``now``, soonest first (ties by rowid): O(limit log n)."""
        heap = self._top()
        taken: list[_IndexEntry] = []
        while heap and len(taken) < limit and heap[0][0][0] <= now:
            taken.append(heapq.heappop(heap))
            _drop_stale(heap)
        # The caller (a poll) usually moves these rows at once, which makes these entries stale:
        # they are pushed back only if still current when the index is next read.
        self._held = taken
        return [row for _, _, row in taken]

    def _push(self, row: _Row) -> None:
        row.version += 1
        heapq.heappush(self._heap, (row.due_key, row.version, row))

    def _compact(self) -> None:
        if len(self._heap) > 2 * self.live + 64:
            self._heap = [entry for entry in self._heap if entry[1] == entry[2].version]
            heapq.heapify(self._heap)

    def _top(self) -> list[_IndexEntry]:
        heap = self._heap
        if self._held:
            for entry in self._held:
                if entry[1] == entry[2].version:
                    heapq.heappush(heap, entry)
            self._held = []
        _drop_stale(heap)
        return heap


def _drop_stale(heap: list[_IndexEntry]) -> None:
    while heap and heap[0][1] != heap[0][2].version:
        heapq.heappop(heap)


class InMemoryStore:
    """Tasks, leases and schedules held in memory, shareable by several apps (a simulated cluster).

    Give the same store to several ``memory_repository`` factories (``memory_store=store``) and
    they see the same data, exactly like processes sharing one database. The public methods are
    read-only views; only a repository changes the data.
    """

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._due: dict[str, _DueIndex] = {}
        self._names: dict[str, SortedList] = {}
        self._next_rowid = 1
        self._listeners: list[Callable[[], None]] = []

    # -- read-only inspection -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._rows))

    def __repr__(self) -> str:
        return f"<InMemoryStore: {len(self._rows)} task(s)>"

    def get(self, name: str) -> TaskRecord | None:
        """The record stored under a canonical task name, or ``None``."""
        row = self._rows.get(name)
        return None if row is None else row.freeze()

    def snapshot(self) -> tuple[TaskRecord, ...]:
        """Every stored record, sorted by name."""
        return tuple(self._rows[name].freeze() for name in sorted(self._rows))

    def instances(self, parent: str) -> tuple[TaskRecord, ...]:
        """The records of one dynamic template's instances (by its canonical name), sorted by name."""
        return tuple(self._rows[name].freeze() for name in self._names.get(parent, ()))

    # -- used by the repository ----------------------------------------------------------

    def _add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in tuple(self._listeners):
            listener()

    def _row(self, name: str) -> _Row | None:
        return self._rows.get(name)

    def _insert(self, name: str, parent: str | None, execute_after: float | None, spec: str | None = None) -> _Row:
        row = _Row(name, parent, self._next_rowid, execute_after, spec=spec)
        self._next_rowid += 1
        self._rows[name] = row
        if parent is not None:
            self._due.setdefault(parent, _DueIndex()).add(row)
            self._names.setdefault(parent, SortedList()).add(name)
        return row

    def _update(
        self,
        row: _Row,
        *,
        execute_after: float | None,
        locked_until: float | None,
        locked_by: str | None,
        spec: str | None = None,
    ) -> None:
        row.execute_after = execute_after
        row.locked_until = locked_until
        row.locked_by = locked_by
        if spec is not None:
            row.spec = spec
        if row.parent is not None:
            self._due[row.parent].moved(row)

    def _delete(self, name: str) -> None:
        row = self._rows.pop(name, None)
        if row is not None and row.parent is not None:
            index = self._due[row.parent]
            index.remove(row)
            names = self._names[row.parent]
            names.remove(name)
            if not index.live:
                del self._due[row.parent]
                del self._names[row.parent]

    def _due_rows(self, parent: str, now: float, limit: int) -> list[_Row]:
        """Instances of ``parent`` due at ``now``, soonest first: O(limit log n)."""
        index = self._due.get(parent)
        return [] if index is None else index.first(now, limit)

    def _children(self, parent: str, after: str | None, limit: int) -> list[_Row]:
        """Instances of ``parent`` ordered by name, strictly after ``after``, at most ``limit``."""
        names = self._names.get(parent)
        if not names:
            return []
        window = names.irange(minimum=after, inclusive=(False, True)) if after is not None else iter(names)
        return [self._rows[name] for name, _ in zip(window, range(limit), strict=False)]
