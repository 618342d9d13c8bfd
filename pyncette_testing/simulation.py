"""``Simulation``: the user's real Pyncette app, on a shared store, under virtual time, journaled.

Pyncette is never forked: every worker is an ordinary ``PyncetteContext`` running ``run()`` for a
copy of the user's app (same tasks, fixtures and middlewares) whose repository factory is the
simulation's, and whose first middleware records each execution in the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import inspect
import random
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pyncette import Pyncette
from pyncette.model import Context, ListTasksResponse, TaskState
from pyncette.pyncette import PyncetteContext
from pyncette.repository import Repository, RepositoryFactory
from pyncette.task import PartitionedTask, Task, _TaskPartition

from .backend_loop import BackendLoop, BackendRepository
from .backends import IsolatedBackend, _check_name, isolated_backend
from .boundary import _recording_middleware, _SimulationRepository
from .clock import VirtualClock, active_clock, to_seconds, to_utc
from .elision import BackendDueTimes, TickElision
from .errors import SimulationStalled
from .faults import Faults
from .journal import Event, Execution, Journal, Outcome, _Entry, render_timeline
from .loop import VirtualTimeLoop, describe_task
from .repository import _configured, memory_repository
from .store import InMemoryStore
from .tracking import untracked
from .worker import Worker

__all__ = ["Simulation", "SimulationReport", "TaskSummary", "Worker", "simulate"]

T = TypeVar("T")
Duration = datetime.timedelta | float | int
TaskRef = Task | str


def _duration(delta: Duration | None, kwargs: Mapping[str, float], what: str) -> float:
    """A duration given either positionally (timedelta or seconds) or as timedelta keywords."""
    if delta is not None and kwargs:
        raise TypeError(f"{what}: give a duration or timedelta keywords (days=, hours=, ...), not both")
    if delta is None:
        if not kwargs:
            raise TypeError(f"{what} needs a duration: a timedelta, seconds, or keywords such as days=2")
        try:
            delta = datetime.timedelta(**kwargs)
        except TypeError as error:
            raise TypeError(f"{what}: {error}; use timedelta keywords (weeks, days, hours, minutes, seconds)") from None
    return to_seconds(delta, what=what)


# -- copies of the user's app ------------------------------------------------------------------------


def _copy_app(
    app: Pyncette,
    *,
    repository_factory: RepositoryFactory | None = None,
    poll_interval: datetime.timedelta | None = None,
    configuration: Mapping[str, Any] | None = None,
    fixtures: Mapping[str, Callable[..., Any]] | None = None,
    middlewares: Sequence[Callable[..., Any]] = (),
) -> Pyncette:
    """A new ``Pyncette`` with ``app``'s tasks, fixtures and middlewares; ``app`` is left untouched."""
    copy = Pyncette(
        repository_factory=repository_factory or app._repository_factory,
        executor_cls=app._executor_cls,
        poll_interval=poll_interval or app._poll_interval,
        **{**app._configuration, **(configuration or {})},
    )
    copy._tasks = list(app._tasks)
    overrides = fixtures or {}
    copy._fixtures = [(name, overrides.get(name, factory)) for name, factory in app._fixtures]
    copy._middlewares = [*middlewares, *app._middlewares]
    return copy


def _fixture_override(name: str, value: Any) -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """A fixture factory yielding ``value``, or wrapping an async generator function."""
    if inspect.isasyncgenfunction(value):
        takes_context = len(inspect.signature(value).parameters) > 0
        generator = contextlib.asynccontextmanager(value)

        def from_generator(app_context: PyncetteContext) -> contextlib.AbstractAsyncContextManager[Any]:
            return generator(app_context) if takes_context else generator()

        return from_generator

    @contextlib.asynccontextmanager
    async def constant(app_context: PyncetteContext) -> AsyncIterator[Any]:
        yield value

    return constant


def _root_name(task: Task) -> str:
    """The name under which ``task`` (static, template, partition or instance) is defined in the app."""
    while task.parent_task is not None:
        task = task.parent_task
    return task.name


# -- the simulation ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSummary:
    """Per-task figures of a simulation run."""

    task: str
    runs: int
    succeeded: int
    failed: int
    first_start: datetime.datetime | None
    last_start: datetime.datetime | None
    worst_lateness: datetime.timedelta


@dataclasses.dataclass(frozen=True)
class SimulationReport:
    """What a finished simulation did: the journal and a per-task summary."""

    start: datetime.datetime
    end: datetime.datetime
    executions: list[Execution]
    summary: dict[str, TaskSummary]

    def timeline(self, limit: int = 50) -> str:
        return render_timeline(self.executions, limit=limit)


def summarize(executions: Iterable[Execution]) -> dict[str, TaskSummary]:
    grouped: dict[str, list[Execution]] = {}
    for execution in executions:
        grouped.setdefault(execution.task, []).append(execution)
    return {
        name: TaskSummary(
            task=name,
            runs=len(runs),
            succeeded=sum(run.outcome is Outcome.SUCCEEDED for run in runs),
            failed=sum(run.outcome is Outcome.FAILED for run in runs),
            first_start=min(run.started_at for run in runs),
            last_start=max(run.started_at for run in runs),
            worst_lateness=max(run.lateness for run in runs),
        )
        for name, runs in sorted(grouped.items())
    }


class Simulation:
    """Run a Pyncette app (or inline tasks) under virtual time, on the in-memory store or a real backend.

    ``async with Simulation(app, start=..., poll_interval=None, backend="memory",
    store=None, seed=0, **config_overrides) as sim:`` — then move time with :meth:`advance` and
    read what happened with :meth:`executions` and :meth:`assert_executed`.

    ``backend`` is a name ("memory", "sqlite", "redis", "postgres") or any Pyncette repository
    factory, configured by ``config_overrides`` (``redis_url=...``); a real backend runs on an event
    loop of its own, each call atomic in virtual time as on the in-memory store, in a namespace of
    its own, removed at shutdown (see :func:`isolated_backend`).
    """

    def __init__(
        self,
        app: Pyncette | None = None,
        *,
        start: datetime.datetime | str | None = None,
        poll_interval: Duration | None = None,
        backend: str | RepositoryFactory = "memory",
        store: InMemoryStore | None = None,
        seed: int = 0,
        workers: int = 1,
        context_items: Mapping[str, Any] | None = None,
        shutdown_timeout: Duration = datetime.timedelta(days=1),
        elide_idle_ticks: bool = True,
        **config_overrides: Any,
    ) -> None:
        if app is not None and not isinstance(app, Pyncette):
            raise TypeError(f"app must be a Pyncette app or None, got {type(app).__name__}")
        if store is not None and not isinstance(store, InMemoryStore):
            raise TypeError(f"store must be an InMemoryStore, got {type(store).__name__}")
        if isinstance(backend, str):
            _check_name(backend)
        elif not callable(backend):
            raise TypeError(f"backend must be a backend name or a Pyncette repository factory, got {backend!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self._start_request = None if start is None else to_utc(start, what="start")
        self._poll_interval = (
            None
            if poll_interval is None
            else datetime.timedelta(seconds=to_seconds(poll_interval, what="poll_interval"))
        )
        if self._poll_interval is not None and self._poll_interval <= datetime.timedelta(0):
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        self._shutdown_timeout = to_seconds(shutdown_timeout, what="shutdown_timeout")
        self._backend = backend
        self._is_memory = backend in ("memory", memory_repository)
        self._backend_scope = contextlib.AsyncExitStack()
        self._backend_loop: BackendLoop | None = None  # a real backend's (see backend_loop)
        self._store = store if store is not None else InMemoryStore()
        self._seed = seed
        self.random = random.Random(seed)
        self._initial_workers = workers
        self._context_items = dict(context_items or {})
        self._config = dict(config_overrides)
        self._template = _copy_app(app if app is not None else Pyncette())
        self._fixture_overrides: dict[str, Callable[..., Any]] = {}
        self._journal = Journal(self._instant)  # re-pointed at the clock alone once it is known
        self._by_lease: dict[object, _Entry] = {}  # executions whose lease is not settled yet
        self._scheduled_instances: dict[str, bool] = {}
        self._crash_signal: asyncio.Future[None] | None = None  # dynamic instances registered -> once-off
        self._dead_groups: list[object] = []
        self.faults = Faults(self)
        """Planned faults: crashes, repository failures, outages, lease faults, chaos."""
        self._workers: list[Worker] = []
        self._clock: VirtualClock | None = None
        self._owns_clock = False
        self._elide = bool(elide_idle_ticks)
        self._elision: TickElision | None = None
        self._isolated: IsolatedBackend | None = None
        self._due_times: BackendDueTimes | None = None  # a real backend's, for elision
        self._admin_repository: Repository | None = None
        self._state = "new"  # new -> entered -> started -> ended
        self._window_end: datetime.datetime | None = None

    def __repr__(self) -> str:
        when = f" at {self.now.isoformat()}" if self._clock is not None and self._state != "ended" else ""
        return f"<Simulation {self._state}{when}: {len(self._workers)} worker(s), {len(self._journal.entries)} execution(s)>"

    # -- inline definitions (before the simulation starts) -------------------------------------

    def task(self, **kwargs: Any) -> Callable[[Any], Task]:
        """Define a static task, like ``Pyncette.task``."""
        self._check_definable("define a task")
        return self._template.task(**kwargs)

    def dynamic_task(self, **kwargs: Any) -> Callable[[Any], Task]:
        """Define a dynamic task template, like ``Pyncette.dynamic_task``."""
        self._check_definable("define a dynamic task")
        return self._template.dynamic_task(**kwargs)

    def partitioned_task(self, **kwargs: Any) -> Callable[[Any], PartitionedTask]:
        """Define a partitioned dynamic task, like ``Pyncette.partitioned_task``."""
        self._check_definable("define a partitioned task")
        return self._template.partitioned_task(**kwargs)

    def fixture(self, name: str | None = None) -> Callable[[T], T]:
        """Define a fixture, like ``Pyncette.fixture``."""
        self._check_definable("define a fixture")
        return self._template.fixture(name)  # type: ignore[return-value]

    def middleware(self, func: T) -> T:
        """Add a middleware, like ``Pyncette.middleware``."""
        self._check_definable("add a middleware")
        return self._template.middleware(func)  # type: ignore[arg-type,return-value]

    def override_fixture(self, name: str, value: Any) -> None:
        """Give tasks ``value`` (or what an async generator function yields) instead of the app's fixture."""
        self._check_definable("override a fixture")
        known = [fixture_name for fixture_name, _ in self._template._fixtures]
        if name not in known:
            raise KeyError(f"unknown fixture {name!r}; the app defines: {', '.join(known) or 'no fixtures'}")
        self._fixture_overrides[name] = _fixture_override(name, value)

    def _check_definable(self, action: str) -> None:
        if self._state in ("started", "ended"):
            raise RuntimeError(
                f"cannot {action}: the simulation has already {self._state}; define everything before time first moves"
            )

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Simulation:
        if self._state != "new":
            raise RuntimeError("a Simulation can be entered only once; create a new one")
        loop = asyncio.get_running_loop()
        if not isinstance(loop, VirtualTimeLoop):
            raise RuntimeError(
                f"Simulation needs a VirtualTimeLoop, but this code runs on a {type(loop).__name__}: mark the test "
                "with @pytest.mark.pyncette, take the pyncette_app fixture, or call simulate() from synchronous code"
            )
        clock = active_clock(loop)
        if clock is None:
            clock = VirtualClock(self._start_request, loop=loop)
            clock.__enter__()
            self._owns_clock = True
        elif self._start_request is not None and self._start_request != clock.now():
            clock._restart_at(self._start_request)
        self._clock = clock
        try:
            self._isolated = await self._backend_scope.enter_async_context(
                isolated_backend(self._backend, **self._config)
            )
        except BaseException:
            if self._owns_clock:
                clock.__exit__(None, None, None)
            raise
        if self._is_memory:
            self._config = {**self._isolated.config, "memory_store": self._store}
        else:
            self._config = self._isolated.config
            self._backend_loop = BackendLoop(loop)
            self._backend_scope.callback(self._backend_loop.close)
        self._journal.instant = clock._instant_at  # the clock's, so that it never keeps the simulation alive
        if self._elide:
            if not self._is_memory:
                self._due_times = BackendDueTimes(self._backend_admin, clock.now)
            due_times = self._store if self._due_times is None else self._due_times
            self._elision = TickElision(loop, clock, due_times, blocked=self.faults.blocks_elision)
        self._state = "entered"
        for _ in range(self._initial_workers):
            self._add_worker_object(None, None)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Set up every worker's context (fixtures included) and start their poll loops."""
        self._check_usable()
        await self._ensure_created()
        if self._state == "entered":
            self._state = "started"
        for worker in self._workers:
            worker._start()

    async def shutdown(self) -> None:
        """Shut every worker down gracefully and wait for running executions (idempotent)."""
        if self._state in ("new", "ended"):
            return
        self._window_end = self.now  # what ran after this was only finishing
        try:
            alive = [worker for worker in self._workers if not worker._crashed]
            for worker in alive:
                if worker._context is not None:
                    worker._context.shutdown()
                worker._start()
            await self._wait_for_workers(alive)
            await self._dispose_crashed()  # including workers that crashed while shutting down
        finally:
            self._state = "ended"
            if self._elision is not None:
                self._elision.close()
            self._journal.release_frames()
            try:
                await self._backend_scope.aclose()  # the namespace of a real backend is removed
            finally:
                if self._owns_clock and self._clock is not None:
                    self._clock.__exit__(None, None, None)

    async def _dispose_crashed(self) -> None:
        """Let crashed incarnations unwind (their repository calls are refused) now that the
        simulation is over, so that no task is left pending on the loop."""
        loop = self.clock.loop
        groups = self._dead_groups + [worker._group for worker in self._workers if worker._crashed]
        tasks = []
        for group in groups:
            loop._thaw(group)
            for task in loop._group_tasks_of(group):
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=self._shutdown_timeout)

    async def _wait_for_workers(self, workers: Sequence[Worker]) -> None:
        """Wait for the workers' main tasks to end; one that crashes meanwhile is no longer waited for."""
        loop = self.clock.loop
        owners = {worker._task: worker for worker in workers if worker._task is not None and not worker._crashed}
        deadline = loop.time() + self._shutdown_timeout
        pending: set[asyncio.Task[None]] = set(owners)
        done: set[asyncio.Task[None]] = set()
        while pending and loop.time() < deadline:
            self._crash_signal = crashed = loop.create_future()
            finished, _ = await asyncio.wait(
                {*pending, crashed}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            if not crashed.done():
                crashed.cancel()
            done |= {task for task in finished if task is not crashed}
            pending = {task for task in pending - finished if not owners[task]._crashed}
            if not finished:
                break
        if pending:
            running = [entry for entry in self._journal.entries if entry.outcome is Outcome.RUNNING]
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
            raise SimulationStalled(
                f"shutdown waited {datetime.timedelta(seconds=self._shutdown_timeout)} of virtual time "
                "(shutdown_timeout) for running executions that never finished:\n"
                + render_timeline(self._journal.executions(running))
                + "\n"
                + "\n".join(f"  - {describe_task(task)}" for task in pending)
            )
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _ensure_created(self) -> None:
        for worker in self._workers:
            await worker._create()

    async def _ensure_running(self) -> None:
        self._check_usable()
        if self._state != "started" or any(not worker.running and not worker.stopped for worker in self._workers):
            await self.start()

    def _admin(self) -> Repository:
        """The simulation's own repository: no worker's, no faults, no journal. For reading the
        store whatever the workers' state, and for the lease faults' writes on a real backend."""
        if self._admin_repository is None:
            assert self._isolated is not None, "the backend is opened when the simulation is entered"
            if self._backend_loop is None:
                self._admin_repository = _configured(**self._config)  # memory_repository's, opened at once
            else:
                self._admin_repository = self._backend_loop.open(untracked(self._isolated.factory), **self._config)
        return self._admin_repository

    def _backend_admin(self) -> BackendRepository:
        """:meth:`_admin` on a real backend, whose calls run on the backend's own loop."""
        admin = self._admin()
        assert isinstance(admin, BackendRepository), "only a real backend has a loop of its own"
        return admin

    def _static_names(self) -> set[str]:
        return {task.canonical_name for task in self._template._tasks if not task.dynamic}

    def _check_usable(self) -> None:
        if self._state == "new":
            raise RuntimeError(
                "use the simulation inside `async with Simulation(...) as sim:` (or the pyncette_app fixture)"
            )
        if self._state == "ended":
            raise RuntimeError("this simulation has ended (its `async with` block or test is over); start a new one")

    # -- workers --------------------------------------------------------------------------------

    @property
    def workers(self) -> tuple[Worker, ...]:
        return tuple(self._workers)

    def worker(self, name: str) -> Worker:
        """The worker called ``name``."""
        for worker in self._workers:
            if worker.name == name:
                return worker
        raise KeyError(f"unknown worker {name!r}; workers: {', '.join(w.name for w in self._workers)}")

    async def add_worker(
        self,
        name: str | None = None,
        app: Pyncette | None = None,
        *,
        clock_skew: datetime.timedelta = datetime.timedelta(0),
    ) -> Worker:
        """Add a process to the cluster: a copy of ``app`` (default: the simulated app) on the same store.

        It starts at once if the simulation is running.
        """
        self._check_usable()
        worker = self._add_worker_object(name, app)
        worker.clock_skew = clock_skew
        if self._state == "started":
            await worker._create()
            worker._start()
        return worker

    def _add_worker_object(self, name: str | None, app: Pyncette | None) -> Worker:
        if app is not None and not isinstance(app, Pyncette):
            raise TypeError(f"app must be a Pyncette app, got {type(app).__name__}")
        name = name if name is not None else f"w{len(self._workers) + 1}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"worker name must be a non-empty string, got {name!r}")
        if any(worker.name == name for worker in self._workers):
            raise ValueError(f"there is already a worker called {name!r}")
        worker = Worker(self, name, app)
        self._workers.append(worker)
        return worker

    def _worker_app(self, name: str, source: Pyncette | None) -> Pyncette:
        worker = self.worker(name)
        return _copy_app(
            self._template if source is None else source,
            repository_factory=self._repository_factory(worker, worker._group),
            poll_interval=self._poll_interval,
            configuration=self._config,
            fixtures=self._fixture_overrides,
            middlewares=[self._recording_middleware(name)],
        )

    def _repository_factory(self, worker: Worker, group: object) -> RepositoryFactory:
        assert self._isolated is not None, "workers are made once the simulation is entered"
        backend, backend_loop = untracked(self._isolated.factory), self._backend_loop
        simulation = self

        @contextlib.asynccontextmanager
        async def factory(**config: Any) -> AsyncIterator[Repository]:
            opening = backend(**config) if backend_loop is None else backend_loop.opened(backend, **config)
            async with opening as repository:
                yield _SimulationRepository(repository, simulation, worker, group)

        return factory

    def _primary(self) -> Worker:
        if all(worker._context is None for worker in self._workers):
            raise RuntimeError("the simulation has not started yet; move time or await sim.start() first")
        for worker in self._workers:
            if worker._context is not None and not worker.stopped:
                return worker
        raise RuntimeError("no worker is running: every worker has shut down")

    # -- the journal ------------------------------------------------------------------------------

    def _recording_middleware(self, worker: str) -> Callable[[Context, Callable[[], Awaitable[None]]], Awaitable[None]]:
        # A weak reference: tracebacks in the journal hold this middleware's closure.
        started = weakref.WeakMethod(self.faults._execution_started)

        def execution_started(name: str, task: Task) -> None:
            callback = started()
            if callback is not None:
                callback(name, task)

        return _recording_middleware(
            self._journal, self.clock, worker, self._by_lease, execution_started, self.faults._crash_plans
        )

    def _event(self, kind: str, worker: str | None = None, task: Task | str | None = None, detail: str = "") -> None:
        # The name, not the Task: a dynamic instance's Task is built afresh for every execution,
        # and keeping each one would hold every instance ever run in memory.
        assert self._clock is not None
        name = task.canonical_name if isinstance(task, Task) else task
        self._journal.event(self._clock.loop._now, kind, worker, name, detail)

    def events(self, kind: str | None = None) -> list[Event]:
        """Faults, crashes and lease changes, in the order they happened (optionally one kind)."""
        return [event for event in self._journal.events if kind is None or event.kind == kind]

    def executions(
        self,
        task: TaskRef | None = None,
        *,
        instance: str | None = None,
        worker: str | None = None,
        outcome: Outcome | None = None,
    ) -> list[Execution]:
        """Executions in start order, filtered by task (a ``Task`` or a name), instance, worker, outcome."""
        return self._journal.executions(self._select(task, instance=instance, worker=worker, outcome=outcome))

    def _select(
        self,
        task: TaskRef | None,
        *,
        instance: str | None = None,
        worker: str | None = None,
        outcome: Outcome | None = None,
    ) -> list[_Entry]:
        matches = self._task_matcher(task) if task is not None else None
        if worker is not None and not any(w.name == worker for w in self._workers):
            raise KeyError(f"unknown worker {worker!r}; workers: {', '.join(w.name for w in self._workers)}")
        if outcome is not None and not isinstance(outcome, Outcome):
            raise TypeError(f"outcome must be an Outcome, e.g. Outcome.FAILED, got {outcome!r}")
        return [
            entry
            for entry in self._journal.entries
            if (matches is None or matches(entry))
            and (instance is None or entry.instance == instance)
            and (worker is None or entry.worker == worker)
            and (outcome is None or entry.outcome is outcome)
        ]

    def _known_names(self) -> set[str]:
        names = {task.name for task in self._template._tasks}
        for worker in self._workers:
            if worker._source is not None:
                names.update(task.name for task in worker._source._tasks)
        return names

    def _task_matcher(self, task: TaskRef) -> Callable[[_Entry], bool]:
        known = self._known_names()
        if isinstance(task, str):
            root = task.split(":", 1)[0]
            if (
                task not in known
                and root not in known
                and not any(entry.task == task for entry in self._journal.entries)
            ):
                raise ValueError(
                    f"unknown task {task!r}; the simulation runs: {', '.join(sorted(known)) or 'no tasks'}"
                )
            return lambda entry: entry.task == task or entry.template == task
        if not isinstance(task, Task):
            raise TypeError(f"task must be a Task or a task name, got {type(task).__name__}")
        if _root_name(task) not in known:
            raise ValueError(
                f"unknown task {task.canonical_name!r}: it is not part of the simulated app; "
                f"the simulation runs: {', '.join(sorted(known)) or 'no tasks'}"
            )
        if task.parent_task is not None:
            canonical = task.canonical_name
            return lambda entry: entry.task == canonical
        if isinstance(task, _TaskPartition):
            prefix = task.canonical_name + ":"
            return lambda entry: entry.task.startswith(prefix)
        if task.dynamic:
            name = task.name
            return lambda entry: entry.template == name
        canonical = task.canonical_name
        return lambda entry: entry.template is None and entry.task == canonical

    def assert_executed(
        self,
        task: TaskRef,
        times: int | None = None,
        *,
        outcome: Outcome | None = None,
        at: datetime.datetime | Iterable[datetime.datetime] | None = None,
    ) -> list[Execution]:
        """Assert how often ``task`` ran (with ``outcome``, starting at ``at``); returns those executions.

        Without ``times``, at least one must match. The ``AssertionError`` shows the task's timeline.
        """
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 0):
            raise ValueError(f"times must be a non-negative int, got {times!r}")
        every = self._journal.executions(self._select(task))
        selected = [run for run in every if outcome is None or run.outcome is outcome]
        instants: set[datetime.datetime] | None = None
        if at is not None:
            instants = (
                {to_utc(at, what="at")}
                if isinstance(at, (datetime.datetime, str))
                else {to_utc(x, what="at") for x in at}
            )
            selected = [run for run in selected if run.started_at in instants]
        ok = len(selected) == times if times is not None else bool(selected)
        if not ok:
            label = task if isinstance(task, str) else task.canonical_name
            wanted = f"exactly {times}" if times is not None else "at least one"
            conditions = []
            if outcome is not None:
                conditions.append(f"outcome {outcome.value}")
            if instants is not None:
                conditions.append("started at " + ", ".join(sorted(i.isoformat() for i in instants)))
            condition = f" with {' and '.join(conditions)}" if conditions else ""
            raise AssertionError(
                f"expected {wanted} execution(s) of {label!r}{condition}, found {len(selected)} "
                f"(of {len(every)} in all, at {self.now.isoformat()}).\nTimeline of {label!r}:\n"
                + render_timeline(every)
            )
        return selected

    def timeline(self, task: TaskRef | None = None, *, limit: int = 50) -> str:
        """The journal (or one task's part of it) as a readable table."""
        return render_timeline(self.executions(task), limit=limit)

    def report(self) -> SimulationReport:
        executions = self.executions()
        return SimulationReport(
            start=self.clock.start if self._clock is not None else datetime.datetime.min,
            end=self._window_end or self.now,
            executions=executions,
            summary=summarize(executions),
        )

    # -- time -------------------------------------------------------------------------------------

    def _instant(self, loop_time: float) -> datetime.datetime:
        return self.clock._instant_at(loop_time)

    @property
    def clock(self) -> VirtualClock:
        if self._clock is None:
            raise RuntimeError("the simulation has no clock before `async with Simulation(...)` is entered")
        return self._clock

    @property
    def now(self) -> datetime.datetime:
        """The current virtual instant (aware UTC)."""
        return self.clock.now()

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def store(self) -> InMemoryStore:
        """The shared in-memory store (when the backend is the in-memory one)."""
        if not self._is_memory:
            raise RuntimeError(
                f"this simulation runs on the {getattr(self._isolated, 'name', None) or 'given'} backend; there is "
                "no in-memory store: read what is stored with sim.get_task(...) and sim.list_tasks(...)"
            )
        return self._store

    async def advance(self, delta: Duration | None = None, /, **timedelta_kwargs: float) -> None:
        """Run the cluster for ``delta`` (a timedelta, seconds, or keywords like ``days=2``) of virtual time."""
        seconds = _duration(delta, timedelta_kwargs, "advance()")
        await self._ensure_running()
        await self.clock.advance(seconds)

    async def advance_to(self, when: datetime.datetime | str) -> None:
        """Run the cluster up to the aware instant ``when``."""
        target = to_utc(when, what="advance_to() instant")
        await self._ensure_running()
        await self.clock.advance_to(target)

    async def run_until(
        self, predicate: Callable[[Simulation], bool], *, timeout: Duration = datetime.timedelta(days=1)
    ) -> None:
        """Run until ``predicate(sim)`` holds at an idle instant; ``TimeoutError`` (with the timeline)
        if it does not within ``timeout`` of virtual time."""
        if not callable(predicate):
            raise TypeError(f"predicate must be a callable taking the simulation, got {predicate!r}")
        seconds = to_seconds(timeout, what="run_until() timeout")
        await self._ensure_running()
        loop = self.clock.loop
        held = await loop._wait_idle(loop.time() + seconds, condition=lambda: bool(predicate(self)))
        if not held:
            raise TimeoutError(
                f"run_until: the condition did not hold within {datetime.timedelta(seconds=seconds)} of virtual time "
                f"(now {self.now.isoformat()}).\nTimeline:\n{self.timeline()}"
            )

    async def run_until_executed(
        self, task: TaskRef, times: int = 1, *, timeout: Duration = datetime.timedelta(days=1)
    ) -> list[Execution]:
        """Run until ``task`` has finished ``times`` more executions; returns them."""
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int, got {times!r}")
        matches = self._task_matcher(task)
        before = len(self._journal.entries)

        def finished() -> list[_Entry]:
            return [
                entry
                for entry in self._journal.entries[before:]
                if matches(entry) and entry.outcome is not Outcome.RUNNING
            ]

        try:
            await self.run_until(lambda _: len(finished()) >= times, timeout=timeout)
        except TimeoutError:
            label = task if isinstance(task, str) else task.canonical_name
            raise TimeoutError(
                f"{label!r} finished {len(finished())} of {times} execution(s) within {timeout} of virtual time "
                f"(now {self.now.isoformat()}).\nTimeline of {label!r}:\n{self.timeline(task)}"
            ) from None
        return self._journal.executions(finished()[:times])

    # -- dynamic tasks and queries, through the primary worker -------------------------------------

    @property
    def context(self) -> PyncetteContext:
        """The primary worker's ``PyncetteContext`` (once started)."""
        self._check_usable()
        return self._primary().context

    async def _primary_context(self) -> PyncetteContext:
        self._check_usable()
        await self._ensure_created()
        if self._state == "entered":
            self._state = "started"
        return self._primary().context

    async def schedule_task(self, task: Task, instance_name: str, *, force: bool = False, **kwargs: Any) -> Task:
        """Schedule a dynamic task instance (``PyncetteContext.schedule_task``)."""
        self._check_task(task, "schedule_task")
        context = await self._primary_context()
        return await context.schedule_task(task, instance_name, force=force, **kwargs)

    async def unschedule_task(self, task: Task, instance_name: str | None = None) -> None:
        """Remove a dynamic task instance (``PyncetteContext.unschedule_task``)."""
        self._check_task(task, "unschedule_task")
        context = await self._primary_context()
        await context.unschedule_task(task, instance_name)

    async def get_task(self, task: Task, instance_name: str | None = None) -> TaskState | None:
        """The stored state of a task or instance (``PyncetteContext.get_task``), read straight from
        the store: it needs no running worker and no planned fault applies to it."""
        reader = await self._store_reader(task, "get_task")
        return await PyncetteContext.get_task(reader, task, instance_name)

    async def list_tasks(
        self, task: Task, limit: int | None = None, continuation_token: Any = None
    ) -> ListTasksResponse:
        """A page of a dynamic task's instances (``PyncetteContext.list_tasks``), read straight from
        the store like :meth:`get_task`: it needs no running worker and no planned fault applies to it."""
        reader = await self._store_reader(task, "list_tasks")
        return await PyncetteContext.list_tasks(reader, task, limit, continuation_token)

    async def _store_reader(self, task: Any, method: str) -> Any:
        """What Pyncette's own context methods need to run on the simulation's repository instead
        of a worker's."""
        self._check_task(task, method)
        self._check_usable()
        return types.SimpleNamespace(_repository=self._admin())

    def _check_task(self, task: Any, method: str) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"{method}() takes a Task (the decorated function), got {type(task).__name__}")
        self._task_matcher(task)


async def _run_simulation(app: Pyncette | None, seconds: float, options: dict[str, Any]) -> SimulationReport:
    async with Simulation(app, **options) as sim:
        await sim.advance(seconds)
    return sim.report()


def simulate(
    app: Pyncette | None,
    duration: Duration,
    *,
    start: datetime.datetime | str | None = None,
    workers: int = 1,
    seed: int = 0,
    **options: Any,
) -> SimulationReport:
    """Run ``app`` for ``duration`` of virtual time on its own loop and report what it did.

    For scripts, synchronous tests and the command line; ``options`` are ``Simulation`` keywords.
    """
    seconds = to_seconds(duration, what="duration")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "simulate() runs its own event loop and cannot be called from async code; "
            "use `async with Simulation(app) as sim: await sim.advance(...)` instead"
        )
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(
            _run_simulation(app, seconds, {"start": start, "workers": workers, "seed": seed, **options})
        )
    finally:
        _close_loop(loop)


def _close_loop(loop: VirtualTimeLoop) -> None:
    try:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
