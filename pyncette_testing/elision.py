"""Idle-tick elision: a simulated year of a daily job costs its 365 executions, not 31 million ticks.

Pyncette's poll loop ticks every ``poll_interval``. When the loop is idle and the next timer is a
worker's wait for its next tick, every tick until something can become due would poll, find every
task pending or locked, and change nothing. So each worker's wait timer is moved straight to the
first instant of its own tick grid at which one of its tasks can be due (its ``execute_after``, or
the expiry of a lease on it), and the observable traces of the skipped ticks are reproduced: the
round-robin rotation of its task list and its ``last_tick``.

Anything that makes ready work (a task body, a write by the test, another worker's commit) runs
before the loop is idle again. Other timers (a task body's sleep, a planned fault) bound the skip:
the first tick left to run comes before the earliest of them, so no write can ever fall inside a
skipped stretch, and a tick never changes places with another timer.

Due times come from the in-memory store directly. On a real backend they are read from the backend
itself (:class:`BackendDueTimes`): after any call that may have written, the first idle moment
re-reads them (in no virtual time) before anything is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import heapq
import math
import types
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import dateutil.tz
from pyncette.model import ResultType, TaskState
from pyncette.pyncette import PyncetteContext
from pyncette.repository import Repository
from pyncette.task import Task

from .backend_loop import BackendRepository
from .clock import VirtualClock
from .loop import TASK_GROUP, VirtualTimeLoop
from .store import InMemoryStore

__all__ = ["BackendDueTimes", "TickElision"]

_RUN_CODE = PyncetteContext.run.__code__
_REPLAY_LIMIT = 2_000
_MAX_READ_BACKOFF = 6  # a busy app on a real backend reads its due times every 2**6 = 64th idle moment
_READS = frozenset({"get_task_state", "list_task_states"})


class _PollLoop:
    """One worker's Pyncette poll loop, as elision sees it."""

    __slots__ = ("context", "elision", "in_tick", "keys", "poll_interval", "skew", "stretch", "task", "tasks")

    def __init__(self, task: asyncio.Task[Any], poll_interval: float, elision: TickElision) -> None:
        self.task = task
        self.elision = elision  # its simulation's: where its tasks' due times come from
        self.context: PyncetteContext | None = None
        self.poll_interval = poll_interval
        self.in_tick = False  # flipped by the loop on each of Pyncette's tick clock readings
        self.tasks: collections.deque[Task] | None = None
        self.keys: list[tuple[str, bool]] | None = None  # (canonical name, dynamic) of its tasks
        self.skew = 0.0  # seconds this worker's clock is ahead (faults add it)
        self.stretch: tuple[float, int] | None = None  # (first skipped tick, how many)

    def task_list(self) -> collections.deque[Task] | None:
        """Pyncette's own deque of enabled tasks, read from its suspended ``run()`` frame."""
        if self.tasks is None:
            coroutine: Any = self.task.get_coro()
            while coroutine is not None:
                frame = getattr(coroutine, "cr_frame", None)
                if frame is not None and frame.f_code is _RUN_CODE:
                    tasks = frame.f_locals.get("tasks")
                    if isinstance(tasks, collections.deque):
                        self.tasks = tasks
                    break
                awaited = getattr(coroutine, "cr_await", None)
                coroutine = awaited if isinstance(awaited, (types.CoroutineType, types.GeneratorType)) else None
        return self.tasks


class TickElision:
    """The loop's idle hook for one simulation: moves idle workers' tick timers ahead."""

    def __init__(
        self,
        loop: VirtualTimeLoop,
        clock: VirtualClock,
        due_times: InMemoryStore | BackendDueTimes,
        *,
        blocked: Callable[[], bool] = lambda: False,
    ) -> None:
        self._loop = loop
        self._blocked = blocked
        self._clock = clock
        self._due_times: _DueTimes = _StoreDueTimes(due_times) if isinstance(due_times, InMemoryStore) else due_times
        self._start_us = _epoch_us(clock.start)
        self.enabled = True
        self.elided_ticks = 0
        # Several simulations may share a loop: one hook serves them all, each poll loop's due
        # times coming from its own simulation (see _PollLoop.elision).
        loop._elisions.append(self)
        loop._idle_hook = loop._elisions[0]
        loop._add_time_listener(self._follow_last_tick)

    def close(self) -> None:
        loop = self._loop
        with contextlib.suppress(ValueError):
            loop._elisions.remove(self)
        loop._idle_hook = loop._elisions[0] if loop._elisions else None
        loop._remove_time_listener(self._follow_last_tick)

    def watch(self, task: asyncio.Task[Any], poll_interval: float) -> _PollLoop:
        """Track the poll loop that ``task`` runs (a worker's main task)."""
        state = _PollLoop(task, poll_interval, self)
        self._loop._tick_tasks[task] = state
        task.add_done_callback(lambda done: self._loop._tick_tasks.pop(done, None))
        return state

    # -- the hook -----------------------------------------------------------------------------

    def __call__(self, loop: VirtualTimeLoop) -> None:
        for owner in loop._elisions:
            if not owner.enabled or owner._blocked() or not owner._due_times.current(loop):
                return
        waiter = loop._waiter
        horizon = waiter.horizon if waiter is not None else math.inf
        # Until another timer fires (a task body's sleep, a planned fault) nothing else can run:
        # ticks before it can be skipped, and the first tick not skipped still comes before it.
        bound = loop._first_other_timer()
        # First pass, cheap: how many ticks each poll loop could skip. Usually none (busy apps).
        skips: dict[int, int] = {}
        frozen = loop._frozen  # a frozen (or crashed) worker's ticks are held, not skipped
        for handle, state in loop._tick_timers.values():
            if frozen and handle._context.get(TASK_GROUP) in frozen:  # type: ignore[attr-defined]
                continue
            if state is not None and state.context is not None and state.stretch is None and not handle._cancelled:
                skipped = self._idle_ticks(state, handle._when, horizon, bound)  # type: ignore[attr-defined]
                if skipped:
                    skips[id(handle)] = skipped
        for owner in loop._elisions:
            owner._due_times.used(bool(skips))
        if not skips:
            return
        states = [entry[1] for entry in loop._tick_timers.values() if entry[1] is not None]
        # Several poll intervals make the tick order a symbolic replay: bound it per idle moment.
        limit = _REPLAY_LIMIT if len({state.poll_interval for state in states}) > 1 else None
        chains: list[tuple[float, int, asyncio.TimerHandle, _PollLoop | None, float]] = []
        for when, sequence, handle in sorted(loop._timers):
            if handle._cancelled or when >= bound:
                continue  # from here on, the timers (and their order) stay as they are
            state = loop._tick_timers[id(handle)][1]
            destination = when
            skipped = skips.get(id(handle), 0)
            if limit is not None:
                skipped = min(skipped, limit)
            if skipped and state is not None:
                destination = _grid(when, state.poll_interval, skipped)
                tasks = state.task_list()
                if tasks:
                    tasks.rotate(skipped)
                state.stretch = (when, skipped)
                state.elision.elided_ticks += skipped
            chains.append((when, sequence, handle, state, destination))
        loop._retime(_tick_order(chains))
        self._follow_last_tick(loop.time())  # a skipped tick may be due right now

    def _idle_ticks(self, state: _PollLoop, when: float, horizon: float, bound: float = math.inf) -> int:
        """How many ticks from ``when`` on would find nothing to do (and can be skipped), leaving
        the first tick not skipped before ``bound``."""
        if when >= bound:
            return 0
        keys = state.keys
        if keys is None:
            tasks = state.task_list()
            if tasks is None:
                return 0
            # the deque rotates, but its tasks stay the same for the life of the poll loop
            keys = state.keys = [(task.canonical_name, task.dynamic) for task in tasks]
        due = state.elision._due_times.next_due(keys)
        if due is None or due <= self._wall(when, state):
            return 0  # its next tick has work (or must run): nothing to skip
        period = state.poll_interval
        if math.isinf(due):
            if when > horizon or (math.isinf(horizon) and math.isinf(bound)):
                return 0
            skipped = math.floor((horizon - when) / period) + 1 if not math.isinf(horizon) else math.inf
        else:
            # ticks at when + k * period; the first one whose "now" reaches `due`
            estimate = max(0, math.ceil((self._loop_time_of(due, state) - when) / period))
            skipped = estimate
            while skipped > 0 and self._wall(_grid(when, period, skipped - 1), state) >= due:
                skipped -= 1
            while self._wall(_grid(when, period, skipped), state) < due:
                skipped += 1
            if not math.isinf(horizon) and _grid(when, period, skipped) > horizon:
                skipped = max(0, math.floor((horizon - when) / period) + 1) if when <= horizon else 0
        if not math.isinf(bound):
            skipped = min(skipped, _ticks_before(when, period, bound))
        return int(skipped)

    # -- time conversions: the same arithmetic as the clock's -------------------------------------

    def _wall(self, loop_time: float, state: _PollLoop) -> float:
        """The timestamp a worker passes to the repository at ``loop_time``."""
        microseconds = self._start_us + self._clock._wall_microseconds(loop_time)
        return microseconds / 1_000_000 + state.skew

    def _loop_time_of(self, timestamp: float, state: _PollLoop) -> float:
        return self._clock._origin + (timestamp - state.skew) - self._start_us / 1_000_000

    # -- last_tick, as if every tick had happened ---------------------------------------------------

    def _follow_last_tick(self, loop_time: float) -> None:
        for state in self._loop._tick_tasks.values():
            if state.stretch is None:
                continue
            first, count = state.stretch
            if loop_time < first:
                continue
            period = state.poll_interval
            done = min(count, math.floor((loop_time - first) / period) + 1)
            # the division can land a tick off where the grid's repeated additions do not
            while done > 1 and _grid(first, period, done - 1) > loop_time:
                done -= 1
            while done < count and _grid(first, period, done) <= loop_time:
                done += 1
            last = _grid(first, period, done - 1)
            microseconds = self._start_us + self._clock._wall_microseconds(last)
            if state.context is not None:
                state.context._last_tick = _utc(microseconds)
            if done >= count:
                state.stretch = None


class _DueTimes(Protocol):
    def current(self, loop: VirtualTimeLoop) -> bool:
        """Whether the due times can be read now (else they are being fetched)."""

    def next_due(self, tasks: Iterable[tuple[str, bool]]) -> float | None:
        """The earliest timestamp at which a poll of one of ``tasks`` (canonical name, dynamic) can
        find work; ``inf`` if none ever can, ``None`` if the next tick must run (a static task not
        yet stored)."""

    def used(self, skipped: bool) -> None:
        """An idle moment read the due times, and skipped ticks or not."""


class _StoreDueTimes:
    """Due times read straight from the in-memory store's indexes."""

    def __init__(self, store: InMemoryStore) -> None:
        self._store = store

    def current(self, loop: VirtualTimeLoop) -> bool:
        return True

    def used(self, skipped: bool) -> None:
        pass

    def next_due(self, tasks: Iterable[tuple[str, bool]]) -> float | None:
        store = self._store
        earliest = math.inf
        for name, dynamic in tasks:
            if dynamic:
                index = store._due.get(name)
                due = None if index is None else index.earliest()
                if due is not None:
                    earliest = min(earliest, due)
                continue
            row = store._row(name)
            if row is None or row.execute_after is None:
                return None
            earliest = min(earliest, max(row.locked_until or 0.0, row.execute_after))
        return earliest


class BackendDueTimes:
    """Due times of a real backend, read through the simulation's own repository (no worker's).

    The simulation calls :meth:`after` after every repository call, which notes whether it may have
    changed the store. The next idle moment then reads every task's state, a call that takes no
    virtual time (see ``backend_loop``), before it skips anything.

    On an app that writes between every two idle moments, a read would cost a round trip per tick
    and never let a tick be skipped. So each read that did not lead to a skip makes the next one
    wait for twice as many idle moments (up to 64; skipping nothing meanwhile, which is always
    safe), and a skip starts over.
    """

    def __init__(
        self,
        repository: Callable[[], BackendRepository],
        now: Callable[[], datetime.datetime],
    ) -> None:
        self._repository = repository
        self._now = now
        self._stale = True
        self._due: dict[str, float | None] = {}
        self._failed: Exception | None = None
        self._fruitless = 0  # reads since the last one that let ticks be skipped
        self._wait = 0  # idle moments to let pass before the next read

    def after(self, operation: str, task: Task | None, result: Any) -> None:
        """Note a repository call (``result`` is None if it raised): re-read unless it cannot have written."""
        if operation in _READS:
            return
        if (
            operation == "poll_task"
            and getattr(result, "result", None) in (ResultType.PENDING, ResultType.LOCKED)
            and task is not None
            and self._due.get(task.canonical_name) is not None
        ):
            return  # only a first poll of a static task writes when it finds nothing to do
        if operation == "poll_dynamic_task" and result is not None and not result.tasks:
            return
        self._stale = True

    def current(self, loop: VirtualTimeLoop) -> bool:
        if not self._stale:
            return True
        if self._failed is not None:
            return False
        if self._wait:
            self._wait -= 1
            return False
        self._wait = 2**self._fruitless - 1
        self._fruitless = min(self._fruitless + 1, _MAX_READ_BACKOFF)
        tasks = {
            task.canonical_name: task
            for state in loop._tick_tasks.values()
            if state.elision._due_times is self  # this simulation's poll loops only
            for task in (state.task_list() or ())
        }
        try:
            repository = self._repository()
            self._due = repository.backend.run(_read_due_times(repository.inner, self._now(), list(tasks.values())))
        except Exception as error:
            # No due times, no skipping: the simulation goes on tick by tick (and its workers,
            # which talk to the same backend, report the trouble).
            self._failed = error
            return False
        self._stale = False
        return True

    def used(self, skipped: bool) -> None:
        if skipped:
            self._fruitless = self._wait = 0

    def next_due(self, tasks: Iterable[tuple[str, bool]]) -> float | None:
        earliest = math.inf
        for name, _ in tasks:
            due = self._due.get(name)
            if due is None:
                return None
            earliest = min(earliest, due)
        return earliest


async def _read_due_times(repository: Repository, now: datetime.datetime, tasks: list[Task]) -> dict[str, float | None]:
    due: dict[str, float | None] = {}
    for task in tasks:
        due[task.canonical_name] = await (
            _earliest_instance(repository, now, task) if task.dynamic else _static_due(repository, now, task)
        )
    return due


async def _static_due(repository: Repository, now: datetime.datetime, task: Task) -> float | None:
    state = await repository.get_task_state(now, task)
    if state is None or state.scheduled_at is None:
        return None
    return _due(state)


async def _earliest_instance(repository: Repository, now: datetime.datetime, template: Task) -> float:
    earliest, token = math.inf, None
    while True:
        page = await repository.list_task_states(now, template, None, token)
        earliest = min([earliest, *(_due(state) for state in page.tasks)])
        token = page.continuation_token
        if token is None:
            return earliest


def _due(state: TaskState) -> float:
    """When a poll can next find the task: its schedule, or its lease's expiry if later."""
    locked_until = state.locked_until.timestamp() if state.locked_until is not None else 0.0
    return max(locked_until, state.scheduled_at.timestamp())


def _tick_order(
    chains: list[tuple[float, int, asyncio.TimerHandle, _PollLoop | None, float]],
) -> list[tuple[asyncio.TimerHandle, float]]:
    """The timers at their destinations, in the order the skipped ticks would have made them.

    A poll loop makes its next timer when it ticks, so at any instant the loops tick in the order
    their timers for it were made, and a timer that exists now precedes any made later. With one
    poll interval that gives a fixed order: the loop whose pending tick is later has already ticked
    at the earlier instants, so it leads; at equal instants, scheduling order decides. With several
    poll intervals, replay the skipped ticks symbolically.
    """
    periods = {state.poll_interval for _, _, _, state, _ in chains if state is not None}
    if len(periods) <= 1:
        order = sorted(range(len(chains)), key=lambda index: (-chains[index][0], chains[index][1]))
        return [(chains[index][2], chains[index][4]) for index in order]
    heap: list[tuple[float, tuple[int, int], int]] = [
        (when, (0, sequence), index) for index, (when, sequence, _, _, _) in enumerate(chains)
    ]
    heapq.heapify(heap)
    final: dict[int, tuple[float, tuple[int, int]]] = {}
    made = 0
    while heap:
        when, key, index = heapq.heappop(heap)
        _, _, _, state, destination = chains[index]
        if state is None or when >= destination:
            final[index] = (when, key)
            continue
        made += 1
        heapq.heappush(heap, (when + state.poll_interval, (1, made), index))
    ranked = sorted(final, key=lambda index: (final[index][1], index))
    return [(chains[index][2], chains[index][4]) for index in ranked]


def _ticks_before(when: float, period: float, bound: float) -> int:
    """The largest ``k`` with ``_grid(when, period, k) < bound`` (``when < bound``)."""
    k = max(0, math.ceil((bound - when) / period) - 1)
    while k > 0 and _grid(when, period, k) >= bound:
        k -= 1
    while _grid(when, period, k + 1) < bound:
        k += 1
    return k


def _grid(when: float, period: float, ticks: int) -> float:
    """``when`` plus ``ticks`` periods, as Pyncette's repeated ``time() + period`` computes it."""
    if ticks <= 0:
        return when
    if _exact(period) and _exact(when):
        return when + ticks * period
    for _ in range(ticks):
        when += period
    return when


def _exact(value: float) -> bool:
    # dyadic values of moderate size add up exactly, so repeated addition equals multiplication
    return math.isfinite(value) and (value * 1024).is_integer() and abs(value) < 2**40


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _epoch_us(instant: datetime.datetime) -> int:
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _utc(microseconds: int) -> datetime.datetime:
    return (_EPOCH + datetime.timedelta(microseconds=microseconds)).astimezone(dateutil.tz.UTC)
