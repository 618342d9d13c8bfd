"""Differential test: ``InMemoryRepository`` against Pyncette's own ``SqliteRepository``.

A hypothesis state machine applies the same random sequence of repository calls to both backends
(sqlite on ``:memory:``) and asserts that everything observable is identical at every step:
results, schedules, raised exceptions, returned tasks and their order, continuation tokens, and the
stored state. Leases are random UUIDs on each side, so they are compared through a bijection
between the two sides' lease strings (``None`` and the literal string ``"None"`` that both store
after a commit must map to themselves).

``PYNCETTE_DIFF_EXAMPLES`` sets the number of examples (default 100).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dateutil.tz
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pyncette.errors import PyncetteException, TaskLockedException
from pyncette.model import ExecutionMode, FailureMode, PollResponse, ResultType, TaskState
from pyncette.repository import Repository
from pyncette.sqlite import sqlite_repository
from pyncette.task import PartitionedTask, Task

from pyncette_testing import InMemoryRepository, InMemoryStore

START = datetime.datetime(2019, 1, 1, tzinfo=dateutil.tz.UTC)
INSTANCE_NAMES = ["a", "b", "c", "x:y"]
CRON_SCHEDULES = ["* * * * *", "*/5 * * * *", "0 * * * *", "30 2 * * *", "0 0 * * 1"]
TIMEZONES = [None, "UTC", "Europe/Ljubljana", "America/New_York"]
FAST_FORWARD_CRON = "30 2 * * *"
MAX_POLL_PAGES = 4
# Calls (on both backends) one step may make before it stops paging, ticking and following up:
# keeps the worst-case step, and so the whole test, fast.
STEP_CALL_BUDGET = 30
MAX_LIST_PAGES = 40
# Exceptions a repository may legitimately raise in these scenarios. Anything else on either side
# is a bug even if both sides agree on it.
EXPECTED_ERRORS = (PyncetteException, TaskLockedException)

LeasePair = tuple[Any, Any]


async def noop(ctx: Any) -> None:
    pass


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None


def _norm(lease: Any) -> str | None:
    return None if lease is None else str(lease)


def _utc_ts(value: Any) -> datetime.datetime | None:
    return None if value is None else datetime.datetime.fromtimestamp(value, dateutil.tz.UTC)


lease_durations = st.builds(
    lambda seconds, millis: datetime.timedelta(seconds=seconds, milliseconds=millis),
    st.sampled_from([1, 5, 30, 60, 90, 300, 600]) | st.integers(1, 900),
    st.sampled_from([0, 0, 0, 1, 250, 999]),
)

schedules = st.one_of(
    st.tuples(
        st.just("interval"),
        st.sampled_from([1, 10, 30, 60, 90, 300, 3600, 86400]) | st.integers(1, 7200),
    ),
    st.tuples(st.just("cron"), st.sampled_from(CRON_SCHEDULES), st.sampled_from(TIMEZONES)),
    st.tuples(
        st.just("at"),
        st.integers(-7200, 7200) | st.sampled_from([0, 1, -1]),
        st.sampled_from([0, 0, 1, 500_000]),
        st.sampled_from([None, "Europe/Ljubljana"]),
    ),
)

due_schedules = st.one_of(
    st.tuples(st.just("interval"), st.sampled_from([1, 5, 30, 60])),
    st.tuples(st.just("cron"), st.just("* * * * *"), st.sampled_from(TIMEZONES)),
    st.tuples(
        st.just("at"),
        st.integers(-120, 5),
        st.sampled_from([0, 0, 1, 500_000]),
        st.sampled_from([None, "Europe/Ljubljana"]),
    ),
)

time_steps = st.one_of(
    st.just(datetime.timedelta(0)),
    st.sampled_from([1, 1, 5, 10, 30, 45, 59, 60, 61, 90]).map(lambda s: datetime.timedelta(seconds=s)),
    st.integers(1, 120).map(lambda s: datetime.timedelta(seconds=s)),
    st.integers(1, 1_000_000).map(lambda us: datetime.timedelta(microseconds=us)),
    st.integers(1, 900).map(lambda s: datetime.timedelta(seconds=s)),
    st.integers(1, 6 * 3600).map(lambda s: datetime.timedelta(seconds=s)),
    st.integers(1, 120).map(lambda d: datetime.timedelta(days=d)),
)

lease_choices = st.sampled_from(["current", "current", "current", "stale", "foreign", "none", "none_str", "fresh"])


class RepositoryDiff(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sqlite_cm: Any = None
        self.sqlite: Repository | None = None
        self.memory: InMemoryRepository | None = None
        self.now = START
        self.step_calls = 0
        # sqlite lease string -> memory lease string, and back
        self.s2m: dict[str, str] = {}
        self.m2s: dict[str, str] = {}
        # every lease pair ever returned, per canonical task name, and the latest one
        self.history: dict[str, list[LeasePair]] = {}
        self.current: dict[str, LeasePair] = {}
        # the Task objects to address instances with
        self.registered: dict[str, Task] = {}
        self.registered_keys: dict[str, tuple[Task, str]] = {}
        self.polled: dict[str, tuple[Task, Task]] = {}

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, awaitable: Awaitable[Any]) -> Outcome:
        try:
            return Outcome(value=self.loop.run_until_complete(awaitable))
        except Exception as e:
            return Outcome(error=e)

    def _both(
        self,
        s_call: Callable[[Repository], Awaitable[Any]],
        m_call: Callable[[Repository], Awaitable[Any]] | None = None,
    ) -> tuple[Any, Any, bool]:
        """Runs a call on both repositories; returns (sqlite value, memory value, ok)."""
        assert self.sqlite is not None
        assert self.memory is not None
        self.step_calls += 1
        s = self._run(s_call(self.sqlite))
        m = self._run((m_call or s_call)(self.memory))
        assert type(s.error) is type(m.error), f"sqlite raised {s.error!r}, memory raised {m.error!r}"
        if s.error is not None:
            event(f"raised {type(s.error).__name__}")
            assert isinstance(s.error, EXPECTED_ERRORS), f"unexpected error on both sides: {s.error!r}"
            assert str(s.error) == str(m.error)
            return None, None, False
        return s.value, m.value, True

    def _check_lease(self, s_lease: Any, m_lease: Any) -> None:
        assert type(s_lease) is type(m_lease), f"lease types differ: {s_lease!r} vs {m_lease!r}"
        s, m = _norm(s_lease), _norm(m_lease)
        if s is None or m is None or s == "None" or m == "None":
            assert s == m, f"lease {s!r} (sqlite) vs {m!r} (memory)"
            return
        if s in self.s2m or m in self.m2s:
            assert self.s2m.get(s) == m, f"sqlite lease {s} maps to {self.s2m.get(s)}, memory has {m}"
            assert self.m2s.get(m) == s, f"memory lease {m} maps to {self.m2s.get(m)}, sqlite has {s}"
        else:
            self.s2m[s] = m
            self.m2s[m] = s

    def _remember_lease(self, name: str, pair: LeasePair, current: bool) -> None:
        """Keeps every lease ever handed out; ``current`` marks the one a worker would now hold."""
        if pair[0] is not None:
            self.history.setdefault(name, []).append(pair)
        if current:
            self.current[name] = pair

    def _pick_lease(self, data: st.DataObject, name: str, choice: str) -> LeasePair:
        if choice == "current":
            pair = self.current.get(name, (None, None))
        elif choice == "stale" and self.history.get(name):
            pair = data.draw(st.sampled_from(self.history[name]))
        elif choice == "foreign" and self.history:
            other = data.draw(st.sampled_from(sorted(self.history)))
            pair = data.draw(st.sampled_from(self.history[other]))
        elif choice == "none_str":
            return ("None", "None")
        elif choice == "fresh":
            fresh = data.draw(st.uuids())
            return (fresh, fresh)
        else:
            return (None, None)
        if pair[0] is not None and data.draw(st.booleans()):
            # Pyncette accepts any lease object and compares it by str(); pass the string form.
            pair = (str(pair[0]), str(pair[1]))
        return pair

    def _check_task(self, s_task: Task, m_task: Task) -> None:
        name = s_task.canonical_name
        assert type(s_task) is type(m_task), f"{name}: {type(s_task)} (sqlite) vs {type(m_task)} (memory)"
        assert name == m_task.canonical_name, f"{name} (sqlite) vs {m_task.canonical_name} (memory)"
        assert s_task.as_spec() == m_task.as_spec(), f"{name}: {s_task.as_spec()} vs {m_task.as_spec()}"
        assert s_task.execution_mode == m_task.execution_mode, name
        assert s_task.lease_duration == m_task.lease_duration, name
        s_parent, m_parent = s_task.parent_task, m_task.parent_task
        assert (s_parent is None) == (m_parent is None), name
        if s_parent is not None and m_parent is not None:
            assert s_parent.canonical_name == m_parent.canonical_name, name

    def _check_dt(self, s: datetime.datetime | None, m: datetime.datetime | None) -> None:
        assert s == m, f"{s!r} (sqlite) vs {m!r} (memory)"
        if s is not None and m is not None:
            assert s.utcoffset() == m.utcoffset()

    def _check_state(self, s: TaskState | None, m: TaskState | None) -> None:
        assert (s is None) == (m is None), f"{s!r} (sqlite) vs {m!r} (memory)"
        if s is None or m is None:
            return
        assert type(s) is type(m)
        self._check_task(s.task, m.task)
        self._check_dt(s.scheduled_at, m.scheduled_at)
        self._check_dt(s.locked_until, m.locked_until)
        # sqlite shows the "None" string it stores for a cleared lease; memory shows None, as redis
        # and postgres do (tests/test_backend_differences.py pins it)
        self._check_lease(None if s.locked_by == "None" else s.locked_by, m.locked_by)

    def _check_poll(self, name: str, s: PollResponse, m: PollResponse, s_task: Task, m_task: Task) -> None:
        assert type(s) is type(m)
        assert s.result == m.result, f"{name}: {s.result} (sqlite) vs {m.result} (memory)"
        event(f"poll_task {s.result.name}")
        self._check_dt(s.scheduled_at, m.scheduled_at)
        self._check_lease(s.lease, m.lease)
        self._remember_lease(name, (s.lease, m.lease), current=s.result == ResultType.READY)
        # Does the returned lease equal the one now stored?
        # (read straight from the table / the store: one sqlite round trip instead of three)
        assert self.memory is not None
        rows = self._sqlite_rows("WHERE name = ?", (name,))
        record = self.memory.store.get(name)
        s_holds = bool(rows) and rows[0]["locked_by"] == _norm(s.lease)
        m_holds = record is not None and record.locked_by == _norm(m.lease)
        assert s_holds == m_holds, f"{name}: sqlite holds returned lease: {s_holds}, memory: {m_holds}"

    def _sqlite_rows(self, where: str = "", params: tuple[Any, ...] = ()) -> list[Any]:
        assert self.sqlite is not None
        rows = self._run(
            self.sqlite._connection.execute_fetchall(  # type: ignore[attr-defined]
                "SELECT name, parent_name, execute_after, locked_until, locked_by, task_spec "
                f"FROM pyncette_tasks {where} ORDER BY name",
                params,
            )
        )
        assert rows.error is None, rows.error
        return list(rows.value)

    def _poll(self, data: st.DataObject, name: str, s_task: Task, m_task: Task, s_lease: Any, m_lease: Any) -> None:
        """poll_task on both sides; when READY, often carries on as a worker would."""
        s, m, ok = self._both(
            lambda r: r.poll_task(self.now, s_task, s_lease), lambda r: r.poll_task(self.now, m_task, m_lease)
        )
        if not ok:
            return
        self._check_poll(name, s, m, s_task, m_task)
        if s.result != ResultType.READY or self.step_calls >= STEP_CALL_BUDGET:
            return
        follow_up = data.draw(
            st.sampled_from(
                ["nothing", "commit", "commit", "unlock", "extend", "extend_commit", "contend", "reregister"]
            )
        )
        if follow_up == "nothing":
            return
        if follow_up == "contend":
            # another worker, holding no lease (or someone else's), polls the task while it is leased
            other = data.draw(st.sampled_from([(None, None), ("None", "None"), *self.history.get(name, [])[-3:]]))
            self._poll(data, name, s_task, m_task, *other)
            return
        if follow_up == "reregister":
            # the app reschedules the instance while a worker holds it
            if s_task.parent_task is not None:
                force = data.draw(st.booleans())
                self._both(
                    lambda r: r.register_task(self.now, s_task, force=force),
                    lambda r: r.register_task(self.now, m_task, force=force),
                )
            return
        if follow_up.startswith("extend"):
            self.now += data.draw(st.sampled_from([datetime.timedelta(0), datetime.timedelta(seconds=1)]))
            self._extend(name, s_task, m_task, s.lease, m.lease)
        if follow_up.endswith("commit"):
            self._commit(name, s_task, m_task, s.lease, m.lease)
        elif follow_up == "unlock":
            self._unlock(name, s_task, m_task, s.lease, m.lease)

    def _commit(self, name: str, s_task: Task, m_task: Task, s_lease: Any, m_lease: Any) -> None:
        assert self.memory is not None
        before = self.memory.store.get(name)
        s, m, ok = self._both(
            lambda r: r.commit_task(self.now, s_task, s_lease), lambda r: r.commit_task(self.now, m_task, m_lease)
        )
        event(f"commit {'applied' if self.memory.store.get(name) != before else 'skipped'}")
        assert ok
        assert s is None
        assert m is None

    def _unlock(self, name: str, s_task: Task, m_task: Task, s_lease: Any, m_lease: Any) -> None:
        assert self.memory is not None
        before = self.memory.store.get(name)
        s, m, ok = self._both(
            lambda r: r.unlock_task(self.now, s_task, s_lease), lambda r: r.unlock_task(self.now, m_task, m_lease)
        )
        event(f"unlock {'applied' if self.memory.store.get(name) != before else 'skipped'}")
        assert ok
        assert s is None
        assert m is None

    def _extend(self, name: str, s_task: Task, m_task: Task, s_lease: Any, m_lease: Any) -> None:
        s, m, ok = self._both(
            lambda r: r.extend_lease(self.now, s_task, s_lease), lambda r: r.extend_lease(self.now, m_task, m_lease)
        )
        assert ok
        assert (s is None) == (m is None), f"extend_lease: {s!r} (sqlite) vs {m!r} (memory)"
        event(f"extend_lease {'extended' if s is not None else 'lost'}")
        if s is not None:
            assert s is s_lease
            assert m is m_lease

    def _pollable(self, data: st.DataObject) -> Task:
        """A template (or partition) to query, mostly one with registered instances."""
        parents = sorted({t.parent_task.canonical_name for t in self.registered.values() if t.parent_task})
        if parents and data.draw(st.integers(0, 3)) > 0:
            name = data.draw(st.sampled_from(parents))
            return next(t for t in self.pollables if t.canonical_name == name)
        return data.draw(st.sampled_from(self.pollables))

    def _instance_key(self, data: st.DataObject) -> tuple[Task, str]:
        """A (template, instance name), mostly one already registered so that collisions happen."""
        if self.registered and data.draw(st.integers(0, 2)) > 0:
            return data.draw(st.sampled_from(sorted(self.registered_keys.values(), key=lambda k: (k[0].name, k[1]))))
        return data.draw(st.sampled_from(self.templates)), data.draw(st.sampled_from(INSTANCE_NAMES))

    def _target(self, data: st.DataObject) -> tuple[str, Task, Task]:
        """A task to address: mostly one holding a lease, else a static task or a dynamic instance
        (registered or not: unregistered ones must fail alike)."""
        kind = data.draw(st.integers(0, 9))
        if kind < 5 and self.current:
            name = data.draw(st.sampled_from(sorted(self.current)))
            if name in self.polled and (name not in self.registered or data.draw(st.booleans())):
                s_task, m_task = self.polled[name]
                return name, s_task, m_task
            task = self.registered.get(name) or next(t for t in self.statics if t.canonical_name == name)
            return name, task, task
        if kind < 7:
            task = data.draw(st.sampled_from(self.statics))
            return task.canonical_name, task, task
        template, name = self._instance_key(data)
        task = template.instantiate(name, interval=datetime.timedelta(seconds=60))
        canonical = task.canonical_name
        if canonical in self.polled and data.draw(st.booleans()):
            s_task, m_task = self.polled[canonical]
            return canonical, s_task, m_task
        task = self.registered.get(canonical, task)
        return canonical, task, task

    # -- setup ----------------------------------------------------------------------------

    @initialize(
        batch_size=st.integers(1, 4),
        leases=st.lists(lease_durations, min_size=7, max_size=7),
        modes=st.lists(st.sampled_from(ExecutionMode), min_size=3, max_size=3),
        fast_forward=st.lists(st.booleans(), min_size=3, max_size=3),
        seed=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(INSTANCE_NAMES), due_schedules), max_size=5),
        data=st.data(),
    )
    def setup(
        self,
        batch_size: int,
        leases: list[datetime.timedelta],
        modes: list[ExecutionMode],
        fast_forward: list[bool],
        seed: list[tuple[int, str, tuple[Any, ...]]],
        data: st.DataObject,
    ) -> None:
        def failure(mode: ExecutionMode, otherwise: FailureMode) -> FailureMode:
            return FailureMode.NONE if mode == ExecutionMode.AT_MOST_ONCE else otherwise

        self.templates: list[Task] = [
            Task(
                name="dyn",
                func=noop,
                dynamic=True,
                execution_mode=ExecutionMode.AT_LEAST_ONCE,
                failure_mode=FailureMode.UNLOCK,
                lease_duration=leases[0],
                fast_forward=fast_forward[0],
            ),
            Task(
                name="dyn_commit",
                func=noop,
                dynamic=True,
                execution_mode=ExecutionMode.AT_LEAST_ONCE,
                failure_mode=FailureMode.COMMIT,
                lease_duration=leases[1],
            ),
            Task(
                name="dyn_amo",
                func=noop,
                dynamic=True,
                execution_mode=ExecutionMode.AT_MOST_ONCE,
                failure_mode=FailureMode.NONE,
                lease_duration=leases[2],
                fast_forward=fast_forward[1],
            ),
            PartitionedTask(
                name="part",
                func=noop,
                partition_count=2,
                execution_mode=modes[0],
                failure_mode=failure(modes[0], FailureMode.UNLOCK),
                lease_duration=leases[3],
            ),
        ]
        self.partitions: list[Task] = self.templates[3].get_partitions()  # type: ignore[attr-defined]
        self.statics: list[Task] = [
            Task(
                name="static_interval",
                func=noop,
                interval=datetime.timedelta(seconds=45),
                execution_mode=modes[1],
                failure_mode=failure(modes[1], FailureMode.COMMIT),
                lease_duration=leases[4],
                fast_forward=fast_forward[2],
            ),
            Task(
                name="static:cron",
                func=noop,
                schedule="*/5 * * * *",
                timezone="Europe/Ljubljana",
                execution_mode=modes[2],
                lease_duration=leases[5],
            ),
            Task(
                name="static_daily",
                func=noop,
                schedule=FAST_FORWARD_CRON,
                timezone="Europe/Ljubljana",
                fast_forward=True,
                execution_mode=ExecutionMode.AT_LEAST_ONCE,
                lease_duration=leases[6],
            ),
        ]
        self.lease_durations = leases
        # What poll_dynamic_task / list_task_states are asked about. The bare partitioned template
        # has no instances of its own, and Pyncette's tick calls poll_dynamic_task for static tasks
        # too: both backends must answer those with nothing.
        self.pollables: list[Task] = [*self.templates[:3], *self.partitions, self.templates[3], *self.statics]

        self.sqlite_cm = sqlite_repository(sqlite_database=":memory:", batch_size=batch_size)
        self.sqlite = self.loop.run_until_complete(self.sqlite_cm.__aenter__())
        self.memory = InMemoryRepository(InMemoryStore(), batch_size=batch_size)

        # start with a few instances, most of them due, so that every run has something to do
        for template_index, name, schedule in seed:
            self._register(data, self.templates[template_index], name, schedule, force=False)

    def teardown(self) -> None:
        try:
            if self.sqlite_cm is not None:
                self.loop.run_until_complete(self.sqlite_cm.__aexit__(None, None, None))
        finally:
            self.loop.close()

    # -- registration ---------------------------------------------------------------------

    @rule(data=st.data(), schedule=schedules, force=st.booleans())
    def register(self, data: st.DataObject, schedule: tuple[Any, ...], force: bool) -> None:
        template, name = self._instance_key(data)
        self._register(data, template, name, schedule, force)

    @rule(data=st.data(), schedule=due_schedules, force=st.booleans())
    def register_due(self, data: st.DataObject, schedule: tuple[Any, ...], force: bool) -> None:
        """Registers an instance that is due now or very soon (so that queries find something)."""
        template, name = self._instance_key(data)
        self._register(data, template, name, schedule, force)

    @rule(
        data=st.data(),
        names=st.lists(st.sampled_from(INSTANCE_NAMES), min_size=2, max_size=3, unique=True),
        schedule=due_schedules,
    )
    def register_many(self, data: st.DataObject, names: list[str], schedule: tuple[Any, ...]) -> None:
        """Several instances of one template on the same schedule: their due times tie."""
        template = data.draw(st.sampled_from(self.templates))
        for name in names:
            self._register(data, template, name, schedule, force=data.draw(st.booleans()))

    def _register(self, data: st.DataObject, template: Task, name: str, schedule: tuple[Any, ...], force: bool) -> None:
        kwargs: dict[str, Any] = {}
        if schedule[0] == "interval":
            kwargs["interval"] = datetime.timedelta(seconds=schedule[1])
        elif schedule[0] == "cron":
            # Fast-forwarding a cron schedule walks every occurrence up to now (Pyncette's own
            # Task.get_next_execution, the same on both sides): a minutely schedule after a jump of
            # months takes seconds. Fast-forwarding templates get a daily schedule instead.
            kwargs["schedule"] = FAST_FORWARD_CRON if template.fast_forward else schedule[1]
            if schedule[2] is not None:
                kwargs["timezone"] = schedule[2]
        else:
            _, seconds, micros, tz = schedule
            at = self.now + datetime.timedelta(seconds=seconds, microseconds=micros)
            kwargs["execute_at"] = at.astimezone(dateutil.tz.gettz(tz)) if tz else at
        if data.draw(st.booleans()):
            kwargs["payload"] = data.draw(st.sampled_from([1, "x", [1, 2], {"k": None}]))
        task = template.instantiate(name, **kwargs)
        assert self.memory is not None
        event(f"register existing={task.canonical_name in self.memory.store} force={force}")
        _, _, ok = self._both(lambda r: r.register_task(self.now, task, force=force))
        if ok:
            self.registered[task.canonical_name] = task
            self.registered_keys[task.canonical_name] = (template, name)

    @rule(data=st.data())
    def unregister(self, data: st.DataObject) -> None:
        _, s_task, m_task = self._target(data)
        s, m, ok = self._both(
            lambda r: r.unregister_task(self.now, s_task), lambda r: r.unregister_task(self.now, m_task)
        )
        assert ok
        assert s is None
        assert m is None

    # -- polling --------------------------------------------------------------------------

    @rule(data=st.data(), choice=lease_choices)
    def poll_static(self, data: st.DataObject, choice: str) -> None:
        task = data.draw(st.sampled_from(self.statics))
        self._poll(data, task.canonical_name, task, task, *self._pick_lease(data, task.canonical_name, choice))

    @rule(data=st.data(), choice=lease_choices)
    def poll_instance(self, data: st.DataObject, choice: str) -> None:
        name, s_task, m_task = self._target(data)
        self._poll(data, name, s_task, m_task, *self._pick_lease(data, name, choice))

    @rule(data=st.data(), follow=st.booleans())
    def poll_dynamic(self, data: st.DataObject, follow: bool) -> None:
        self._poll_dynamic(data, self._pollable(data), follow)

    def _poll_dynamic(self, data: st.DataObject, template: Task, follow: bool) -> None:
        s_token: Any = None
        m_token: Any = None
        for _ in range(MAX_POLL_PAGES):
            # as Pyncette does, each page is asked for with the previous page's token
            s, m, ok = self._both(
                lambda r, token=s_token: r.poll_dynamic_task(self.now, template, token),
                lambda r, token=m_token: r.poll_dynamic_task(self.now, template, token),
            )
            assert ok
            s_names = [task.canonical_name for task, _ in s.tasks]
            m_names = [task.canonical_name for task, _ in m.tasks]
            assert s_names == m_names, f"poll_dynamic_task({template}): {s_names} (sqlite) vs {m_names} (memory)"
            assert (s.continuation_token is None) == (m.continuation_token is None), (
                f"poll_dynamic_task({template}) token: {s.continuation_token!r} (sqlite) vs "
                f"{m.continuation_token!r} (memory)"
            )
            event(f"poll_dynamic_task returned {len(s.tasks)}, token: {s.continuation_token is not None}")
            for (s_task, s_lease), (m_task, m_lease) in zip(s.tasks, m.tasks, strict=True):
                self._check_task(s_task, m_task)
                self._check_lease(s_lease, m_lease)
                name = s_task.canonical_name
                self._remember_lease(name, (s_lease, m_lease), current=True)
                self.polled[name] = (s_task, m_task)
                # As Pyncette does: poll each returned instance with the lease it came with
                # (sometimes skipped, leaving the query's lock in place).
                if data.draw(st.integers(0, 3)) > 0 and self.step_calls < STEP_CALL_BUDGET:
                    self._poll(data, name, s_task, m_task, s_lease, m_lease)
            if s.continuation_token is None or not follow or self.step_calls >= STEP_CALL_BUDGET:
                break
            s_token, m_token = s.continuation_token, m.continuation_token

    @rule(data=st.data())
    def tick(self, data: st.DataObject) -> None:
        """One Pyncette tick: every static task and every template, continuation tokens followed."""
        for task in self.statics:
            self._poll(data, task.canonical_name, task, task, None, None)
        for template in self.pollables:
            if self.step_calls < STEP_CALL_BUDGET:
                self._poll_dynamic(data, template, follow=True)

    # -- lease operations -----------------------------------------------------------------

    @rule(data=st.data(), choice=lease_choices)
    def commit(self, data: st.DataObject, choice: str) -> None:
        name, s_task, m_task = self._target(data)
        self._commit(name, s_task, m_task, *self._pick_lease(data, name, choice))

    @rule(data=st.data(), choice=lease_choices)
    def unlock(self, data: st.DataObject, choice: str) -> None:
        name, s_task, m_task = self._target(data)
        self._unlock(name, s_task, m_task, *self._pick_lease(data, name, choice))

    @rule(data=st.data(), choice=lease_choices)
    def extend_lease(self, data: st.DataObject, choice: str) -> None:
        name, s_task, m_task = self._target(data)
        self._extend(name, s_task, m_task, *self._pick_lease(data, name, choice))

    # -- queries --------------------------------------------------------------------------

    @rule(data=st.data())
    def get_state(self, data: st.DataObject) -> None:
        _, s_task, m_task = self._target(data)
        s, m, ok = self._both(
            lambda r: r.get_task_state(self.now, s_task), lambda r: r.get_task_state(self.now, m_task)
        )
        assert ok
        self._check_state(s, m)

    @rule(data=st.data(), limit=st.none() | st.integers(1, 5))
    def list_states(self, data: st.DataObject, limit: int | None) -> None:
        template = self._pollable(data)
        s_token: Any = None
        m_token: Any = None
        for page in range(1, MAX_LIST_PAGES + 1):
            s, m, ok = self._both(
                lambda r, token=s_token: r.list_task_states(self.now, template, limit, token),
                lambda r, token=m_token: r.list_task_states(self.now, template, limit, token),
            )
            assert ok
            s_names = [t.task.canonical_name for t in s.tasks]
            m_names = [t.task.canonical_name for t in m.tasks]
            assert s_names == m_names, f"list_task_states({template}): {s_names} (sqlite) vs {m_names} (memory)"
            for s_state, m_state in zip(s.tasks, m.tasks, strict=True):
                self._check_state(s_state, m_state)
            assert type(s.continuation_token) is type(m.continuation_token), (
                s.continuation_token,
                m.continuation_token,
            )
            assert s.continuation_token == m.continuation_token, (s.continuation_token, m.continuation_token)
            s_token, m_token = s.continuation_token, m.continuation_token
            if s_token is None:
                event(f"list_task_states pages: {min(page, 3)}{'+' if page >= 3 else ''}")
                break

    # -- time -----------------------------------------------------------------------------

    @rule(step=time_steps)
    def advance(self, step: datetime.timedelta) -> None:
        self.now += step

    @rule(data=st.data(), delta_us=st.sampled_from([-1, 0, 0, 1, 1_000_000]))
    def advance_past_lease(self, data: st.DataObject, delta_us: int) -> None:
        """Moves by (about) a lease duration, so that leases taken now would just (not) expire."""
        lease = data.draw(st.sampled_from(self.lease_durations))
        self.now += max(datetime.timedelta(0), lease + datetime.timedelta(microseconds=delta_us))

    @rule(data=st.data(), delta_us=st.sampled_from([-1, 0, 0, 1]))
    def jump_to_stored_time(self, data: st.DataObject, delta_us: int) -> None:
        """Moves exactly onto (or a microsecond around) a stored lock expiry or due time."""
        assert self.memory is not None
        times = sorted(
            t
            for record in self.memory.store.snapshot()
            for t in (record.locked_until, record.execute_after)
            if t is not None and t + datetime.timedelta(microseconds=delta_us) >= self.now
        )
        if times:
            self.now = data.draw(st.sampled_from(times)) + datetime.timedelta(microseconds=delta_us)

    @rule(
        data=st.data(),
        delta_us=st.sampled_from([-1, 0, 0, 1]),
        which=st.sampled_from(["locked_until", "execute_after"]),
        action=st.sampled_from(["poll", "poll", "register"]),
        choice=st.sampled_from(["none", "foreign", "current", "fresh"]),
    )
    def act_at_boundary(self, data: st.DataObject, delta_us: int, which: str, action: str, choice: str) -> None:
        """Moves onto (or a microsecond around) one task's lock expiry or due time and acts on it
        right there: the strict/non-strict comparisons of both backends must agree."""
        assert self.memory is not None
        delta = datetime.timedelta(microseconds=delta_us)
        candidates = [
            record
            for record in self.memory.store.snapshot()
            if getattr(record, which) is not None and getattr(record, which) + delta >= self.now
        ]
        if not candidates:
            return
        record = data.draw(st.sampled_from(candidates))
        self.now = getattr(record, which) + delta
        name = record.name
        if name in self.polled and (name not in self.registered or data.draw(st.booleans())):
            s_task, m_task = self.polled[name]
        elif name in self.registered:
            s_task = m_task = self.registered[name]
        else:
            s_task = m_task = next(t for t in self.statics if t.canonical_name == name)
        if action == "register" and s_task.parent_task is not None:
            force = data.draw(st.booleans())
            self._both(
                lambda r: r.register_task(self.now, s_task, force=force),
                lambda r: r.register_task(self.now, m_task, force=force),
            )
        else:
            self._poll(data, name, s_task, m_task, *self._pick_lease(data, name, choice))

    # -- the whole stored state -----------------------------------------------------------

    @invariant()
    def stored_state_identical(self) -> None:
        self.step_calls = 0  # invariants run after every step: a new step starts with a fresh budget
        assert self.sqlite is not None
        assert self.memory is not None
        rows = self._sqlite_rows()
        records = self.memory.store.snapshot()
        s_names = [row["name"] for row in rows]
        m_names = [record.name for record in records]
        assert s_names == m_names, f"stored tasks: {s_names} (sqlite) vs {m_names} (memory)"
        assert len(self.memory.store) == len(records)
        for row, record in zip(rows, records, strict=True):
            assert row["parent_name"] == record.parent
            self._check_dt(_utc_ts(row["execute_after"]), record.execute_after)
            self._check_dt(_utc_ts(row["locked_until"]), record.locked_until)
            self._check_lease(row["locked_by"], record.locked_by)
            if row["task_spec"] is None:
                assert record.spec is None
            else:
                assert record.spec is not None
                s_spec = json.loads(row["task_spec"])
                m_spec = json.loads(json.dumps(dict(record.spec)))
                assert s_spec == m_spec, f"{row['name']}: spec {s_spec} (sqlite) vs {m_spec} (memory)"


TestRepositoryDifferential = RepositoryDiff.TestCase
TestRepositoryDifferential.settings = settings(
    max_examples=int(os.environ.get("PYNCETTE_DIFF_EXAMPLES", "100")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_lease_bijection_rejects_mismatches() -> None:
    """The lease bijection itself must catch a side that reuses or swaps leases."""
    machine = RepositoryDiff()
    try:
        a, b = uuid.uuid4(), uuid.uuid4()
        machine._check_lease(a, b)
        machine._check_lease(str(a), str(b))
        for s, m in [(a, a), (uuid.uuid4(), b), ("None", str(b)), (None, "None"), (str(a), b)]:
            with pytest.raises(AssertionError):
                machine._check_lease(s, m)
    finally:
        machine.teardown()
