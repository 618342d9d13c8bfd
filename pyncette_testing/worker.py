"""``Worker``: one process of the simulated cluster, a ``PyncetteContext`` running ``run()``."""

from __future__ import annotations

import asyncio
import contextvars
import datetime
from typing import TYPE_CHECKING, Any

from pyncette import Pyncette
from pyncette.pyncette import PyncetteContext

from .clock import to_seconds
from .journal import Outcome, Settlement
from .loop import TASK_GROUP, detached_call_at

if TYPE_CHECKING:
    from .simulation import Simulation

__all__ = ["Worker"]


# -- workers ------------------------------------------------------------------------------------------


class Worker:
    """One process of the simulated cluster: a ``PyncetteContext`` running ``run()``."""

    def __init__(self, simulation: Simulation, name: str, source: Pyncette | None) -> None:
        self._simulation = simulation
        self.name = name
        self._source = source  # None: the simulated app, with its inline definitions
        self._app: Pyncette | None = None
        self._context: PyncetteContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._created: asyncio.Future[None] | None = None
        self._go: asyncio.Future[None] | None = None
        self._shut_down_before_start = False
        self._poll_loop: Any = None  # its state for idle-tick elision
        self._group = object()  # this incarnation: its tasks, its repository, its frozen state
        self._crashed = False
        self._incarnations = 1
        self._clock_skew = datetime.timedelta(0)

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self.stopped else "idle")
        return f"<Worker {self.name} {state}>"

    @property
    def app(self) -> Pyncette:
        """This worker's private copy of the app (made when it starts, with every definition so far)."""
        if self._app is None:
            self._app = self._simulation._worker_app(self.name, self._source)
        return self._app

    @property
    def context(self) -> PyncetteContext:
        """This worker's ``PyncetteContext`` (once the simulation has started)."""
        if self._context is None:
            raise RuntimeError(f"worker {self.name} has not started yet; move time or await sim.start() first")
        return self._context

    @property
    def running(self) -> bool:
        """Its poll loop runs (it was started and has not shut down or crashed)."""
        return self._go is not None and self._go.done() and not self.stopped

    @property
    def stopped(self) -> bool:
        """It has shut down or crashed (or was shut down before it ever started)."""
        return self._crashed or self._shut_down_before_start or (self._task is not None and self._task.done())

    @property
    def crashed(self) -> bool:
        return self._crashed

    @property
    def clock_skew(self) -> datetime.timedelta:
        """How far this worker's "now" (what it passes to the repository) is off: ahead if positive."""
        return self._clock_skew

    @clock_skew.setter
    def clock_skew(self, value: datetime.timedelta) -> None:
        if not isinstance(value, datetime.timedelta):
            raise TypeError(f"clock_skew must be a timedelta (ahead: positive, behind: negative), got {value!r}")
        self._clock_skew = value
        if self._poll_loop is not None:
            self._poll_loop.skew = value.total_seconds()

    async def crash(self) -> None:
        """The process dies now, as on ``kill -9``: running task bodies stop where they are (no commit,
        no unlock, no middleware or fixture teardown) and its leases stay until they expire."""
        if not self.running:
            raise RuntimeError(f"worker {self.name} is not running, so it cannot crash; start it or restart() it")
        self._crash_now("crash")

    def _crash_now(self, reason: str) -> None:
        if not self.running:
            return
        simulation = self._simulation
        loop = simulation.clock.loop
        loop._freeze(self._group)  # never thawed: its code never runs again
        self._crashed = True
        now = loop.time()
        for entry in simulation._journal.entries:
            if entry.group is self._group and entry.outcome is Outcome.RUNNING:
                entry.finish(Outcome.CRASHED, now)
                entry.settlement = Settlement.NONE
        if self._task is not None:
            loop._tick_tasks.pop(self._task, None)
        simulation._event("worker crashed", self.name, None, reason)
        signal = simulation._crash_signal
        if signal is not None and not signal.done():
            signal.set_result(None)  # a shutdown waiting for this worker stops waiting

    async def restart(self) -> None:
        """A new incarnation with the same name, after a crash or a shutdown: fixtures are set up
        again and it starts polling at once."""
        simulation = self._simulation
        simulation._check_usable()
        if self._task is not None and not self._task.done() and not self._crashed:
            await self.shutdown()  # running, or set up but never started polling
        if self._crashed:
            simulation._dead_groups.append(self._group)
        self._group = object()
        self._crashed = False
        self._shut_down_before_start = False
        self._task = self._created = self._go = None
        self._context = None
        self._app = None
        self._poll_loop = None
        self._incarnations += 1
        simulation._event("worker restarted", self.name, None, f"incarnation {self._incarnations}")
        if simulation._state == "started":
            await self._create()
            self._start()

    def freeze(self, duration: datetime.timedelta | float) -> None:
        """A stop-the-world pause (a GC pause, a suspended VM): for ``duration`` of virtual time this
        worker makes no progress while the others go on; its timers then fire late."""
        seconds = to_seconds(duration, what="freeze duration")
        if not self.running:
            raise RuntimeError(f"worker {self.name} is not running, so it cannot freeze")
        simulation = self._simulation
        loop = simulation.clock.loop
        group = self._group
        loop._freeze(group)
        simulation._event("worker frozen", self.name, None, f"for {datetime.timedelta(seconds=seconds)}")

        def thaw() -> None:
            if self._group is group and not self._crashed:
                loop._thaw(group)
                simulation._event("worker thawed", self.name)

        detached_call_at(loop, loop.time() + seconds, thaw)

    async def _create(self) -> None:
        if self._shut_down_before_start:
            return
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._created = loop.create_future()
            self._go = loop.create_future()
            context = contextvars.copy_context()
            context.run(TASK_GROUP.set, self._group)
            self._task = context.run(loop.create_task, self._main(), name=f"pyncette worker {self.name}")
            elision = self._simulation._elision
            if elision is not None:
                self._poll_loop = elision.watch(self._task, self.app._poll_interval.total_seconds())
                self._poll_loop.skew = self.clock_skew.total_seconds()
        assert self._created is not None
        await asyncio.shield(self._created)

    def _start(self) -> None:
        if self._go is not None and not self._go.done():
            self._go.set_result(None)

    async def _main(self) -> None:
        assert self._created is not None and self._go is not None
        try:
            async with self.app.create() as context:
                for key, value in self._simulation._context_items.items():
                    context.add_to_context(key, value)
                self._context = context
                if self._poll_loop is not None:
                    self._poll_loop.context = context
                self._created.set_result(None)
                await self._go
                if not context._shutting_down.is_set():
                    await context.run()
        except BaseException as error:
            if not self._created.done():
                self._created.set_exception(error)
                return
            raise

    async def shutdown(self) -> None:
        """Graceful shutdown, as on SIGINT: stop polling, let running executions finish."""
        if self._crashed:
            return
        if self._task is None:
            self._shut_down_before_start = True
            return
        if self._context is not None:
            self._context.shutdown()
        self._start()
        await self._simulation._wait_for_workers([self])
