"""``VirtualTimeLoop``: an asyncio event loop whose clock jumps straight to the next timer.

The one rule (after trio's ``MockClock`` with ``autojump_threshold=0``): when nothing is ready to
run, no socket has an event and no real work is in flight, virtual time jumps to the earliest
timer and fires it. Timers are kept in our own heap, ordered by (when, scheduling order), and
fired one at a time only when the loop is otherwise idle, so two timers due at the same instant
behave as if the later-scheduled one were a hair later: everything the first one makes ready
settles before the second one fires.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import heapq
import itertools
import math
import selectors
import types
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from .errors import SimulationStalled

T = TypeVar("T")

__all__ = ["VirtualTimeLoop"]

TASK_GROUP: contextvars.ContextVar[object | None] = contextvars.ContextVar("pyncette_testing_task_group", default=None)
"""The group (a simulated worker's incarnation) that the current code runs for; tasks inherit it."""

# After this many consecutive loop iterations with ready work, a due timer is fired anyway, so
# that code spinning on ``await asyncio.sleep(0)`` until time passes cannot hang the loop.
_BUSY_ITERATIONS_BEFORE_TIME_PASSES = 10_000


class _IdleWaiter:
    """A pending ``advance``/``run_until_idle``/``run_until``, resolved when the loop goes idle.

    ``advance``: idle with no timer left at or before ``horizon``; time then moves to ``horizon``.
    ``settle`` (run_until_idle): no timer left at all; fails if the next one is past ``horizon``.
    ``condition`` (run_until): resolves ``True`` at the first idle instant where it holds,
    ``False`` at ``horizon``.
    """

    __slots__ = ("condition", "future", "horizon", "settle")

    def __init__(
        self,
        future: asyncio.Future[Any],
        horizon: float,
        settle: bool,
        condition: Callable[[], bool] | None,
    ) -> None:
        self.future = future
        self.horizon = horizon
        self.settle = settle
        self.condition = condition


class _VirtualSelector(selectors.BaseSelector):
    """Delegates to a real selector; ``select`` asks the loop what to do when it would block."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop
        self._registered = 0  # counted here: the loop asks on every step

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = self._real.register(fileobj, events, data)
        self._registered += 1
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = self._real.unregister(fileobj)
        self._registered -= 1
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        return self._loop._select(self._real, timeout, self._registered)

    def close(self) -> None:
        self._real.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Any:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An ``asyncio.SelectorEventLoop`` on virtual time, starting at 0.

    ``stall_timeout`` is the real-time grace (seconds) the loop waits for an I/O event when nothing
    else can happen, before raising :class:`SimulationStalled`. ``io_timeout`` bounds how long
    (real seconds) it holds time still for work in flight in another thread, and how long a
    simulation waits for a call to a real backend.
    """

    def __init__(self, *, stall_timeout: float = 1.0, io_timeout: float = 60.0) -> None:
        super().__init__(selector=_VirtualSelector(selectors.DefaultSelector(), self))
        for name, value in (("stall_timeout", stall_timeout), ("io_timeout", io_timeout)):
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                self.close()
                raise ValueError(f"{name} must be a positive number of real seconds, got {value!r}")
        self.stall_timeout = float(stall_timeout)
        self.io_timeout = float(io_timeout)
        self._now = 0.0
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._cancelled_timers = 0
        self._sequence = itertools.count()
        self._in_flight = 0
        # in-flight work by the task group that started it: a frozen or crashed group's does not hold time
        self._in_flight_by_group: dict[object, int] = {}
        self._busy_iterations = 0
        self._aborting: BaseException | None = None  # raised by the next iteration (see _abort)
        self._waiter: _IdleWaiter | None = None
        self._time_listeners: list[Callable[[float], None]] = []
        self._clock: Any = None  # the VirtualClock active on this loop, set by the clock itself
        # Idle-tick elision (see elision.py): Pyncette poll-loop tasks whose wait timers we track,
        # the tick timers themselves, and the hook that may move them when the loop is idle.
        self._tick_tasks: dict[asyncio.Task[Any], Any] = {}
        self._tick_capture: asyncio.Task[Any] | None = None
        # keyed by id(): a TimerHandle hashes by its instant, which elision changes
        self._tick_timers: dict[int, tuple[asyncio.TimerHandle, Any]] = {}
        self._idle_hook: Callable[[VirtualTimeLoop], None] | None = None
        self._elisions: list[Any] = []  # the simulations' TickElisions; the first is the idle hook
        self._closing_with: list[Callable[[], None]] = []  # backend loops still open (see backend_loop)
        # Frozen task groups: their callbacks are held (a paused process) until thawed, if ever.
        self._frozen: dict[object, list[asyncio.Handle]] = {}
        self._group_tasks: dict[object, list[asyncio.Task[Any]]] = {}

    # -- time ---------------------------------------------------------------------------------

    def time(self) -> float:
        return self._now

    def _set_time(self, when: float) -> None:
        if when > self._now:
            self._now = when
            for listener in self._time_listeners:
                listener(when)

    def _jump(self, seconds: float) -> None:
        """Move time forward without firing what falls due (a frozen process): timers fire late."""
        self._set_time(self._now + seconds)

    def _add_time_listener(self, listener: Callable[[float], None]) -> None:
        self._time_listeners.append(listener)

    def _remove_time_listener(self, listener: Callable[[float], None]) -> None:
        with contextlib.suppress(ValueError):
            self._time_listeners.remove(listener)

    # -- timers -------------------------------------------------------------------------------

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()  # type: ignore[attr-defined]
        if self.get_debug():
            self._check_thread()  # type: ignore[attr-defined]
        timer = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._timers, (when, next(self._sequence), timer))
        timer._scheduled = True  # type: ignore[attr-defined]
        if self._tick_capture is not None and asyncio.current_task(self) is self._tick_capture:
            # the first timer a poll loop creates after its tick: the wait until the next tick
            self._tick_timers[id(timer)] = (timer, self._tick_tasks.get(self._tick_capture))
            self._tick_capture = None
        return timer

    # -- task groups: freezing a simulated process ---------------------------------------------

    def _call_soon_holding(self, callback: Callable[..., object], *args: Any, context: Any = None) -> asyncio.Handle:
        """``call_soon`` while some group is frozen: a frozen group's callbacks are held. Installed
        on the instance only then, so that the common path pays nothing."""
        handle = asyncio.SelectorEventLoop.call_soon(self, callback, *args, context=context)
        group = handle._context.get(TASK_GROUP)  # type: ignore[attr-defined]
        if group is not None and group in self._frozen:
            self._ready.pop()  # type: ignore[attr-defined]  # just appended: hold it instead
            self._frozen[group].append(handle)
        return handle

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = super().create_task(coro, **kwargs)
        context = kwargs.get("context")
        group = context.get(TASK_GROUP) if context is not None else TASK_GROUP.get()
        if group is not None:
            tasks = self._group_tasks.setdefault(group, [])
            tasks.append(task)
            if len(tasks) > 64 and len(tasks) & (len(tasks) - 1) == 0:  # now and then, forget finished ones
                tasks[:] = [known for known in tasks if not known.done()]
        return task

    def _freeze(self, group: object) -> None:
        """Hold every callback of ``group`` (ready work, timers, wake-ups) until :meth:`_thaw`."""
        self._frozen.setdefault(group, [])
        self.call_soon = self._call_soon_holding  # type: ignore[method-assign,assignment]

    def _thaw(self, group: object) -> None:
        """Deliver the held callbacks of ``group``, in order, late."""
        for handle in self._frozen.pop(group, []):
            if not handle.cancelled():
                self._ready.append(handle)  # type: ignore[attr-defined]
        if not self._frozen:
            self.__dict__.pop("call_soon", None)

    def _group_tasks_of(self, group: object) -> list[asyncio.Task[Any]]:
        return [task for task in self._group_tasks.get(group, ()) if not task.done()]

    def _on_perf_counter(self) -> None:
        """Pyncette read its tick clock: at the end of a tick, watch for its wait timer."""
        if not self._tick_tasks:
            return
        task = asyncio.current_task(self)
        state = self._tick_tasks.get(task) if task is not None else None
        if state is None:
            return
        # Pyncette reads it at the start of a tick and again at its end, just before it waits.
        state.in_tick = not state.in_tick
        self._tick_capture = None if state.in_tick else task

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        if self._tick_timers:
            self._tick_timers.pop(id(handle), None)
        if handle._scheduled:  # type: ignore[attr-defined]
            self._cancelled_timers += 1
            if self._cancelled_timers > 100 and self._cancelled_timers * 2 > len(self._timers):
                self._timers = [entry for entry in self._timers if not entry[2].cancelled()]
                heapq.heapify(self._timers)
                self._cancelled_timers = 0

    def _next_timer(self) -> tuple[float, int, asyncio.TimerHandle] | None:
        timers = self._timers
        while timers and timers[0][2].cancelled():
            heapq.heappop(timers)[2]._scheduled = False  # type: ignore[attr-defined]
            self._cancelled_timers = max(0, self._cancelled_timers - 1)
        return timers[0] if timers else None

    def _fire_next_timer(self, horizon: float = math.inf) -> bool:
        entry = self._next_timer()
        if entry is None or entry[0] > horizon:
            return False
        heapq.heappop(self._timers)
        when, _, handle = entry
        handle._scheduled = False  # type: ignore[attr-defined]
        if self._tick_timers:
            self._tick_timers.pop(id(handle), None)
        self._set_time(when)
        group = handle._context.get(TASK_GROUP) if self._frozen else None  # type: ignore[attr-defined]
        if group is not None and group in self._frozen:
            self._frozen[group].append(handle)
        else:
            self._ready.append(handle)  # type: ignore[attr-defined]
        return True

    def _only_tick_timers(self) -> bool:
        if len(self._timers) - self._cancelled_timers > len(self._tick_timers):
            return False
        if not self._cancelled_timers and len(self._timers) == len(self._tick_timers):
            return True  # every tick timer is in the heap, and nothing else is
        return all(id(handle) in self._tick_timers for _, _, handle in self._timers if not handle.cancelled())

    def _next_is_a_tick(self) -> bool:
        """Whether the earliest pending timer is a poll loop's wait for its next tick."""
        entry = self._next_timer()
        return entry is not None and id(entry[2]) in self._tick_timers

    def _first_other_timer(self) -> float:
        """When the earliest pending timer that is not a tick timer fires (inf if there is none)."""
        if self._only_tick_timers():
            return math.inf
        tick_timers = self._tick_timers
        # Only the tick timers and cancelled entries can come before it: look at that many first.
        for when, _, handle in heapq.nsmallest(len(tick_timers) + self._cancelled_timers + 1, self._timers):
            if not handle._cancelled and id(handle) not in tick_timers:
                return when
        return min(
            (when for when, _, handle in self._timers if not handle._cancelled and id(handle) not in tick_timers),
            default=math.inf,
        )

    def _retime(self, order: list[tuple[asyncio.TimerHandle, float]]) -> None:
        """Give the timers in ``order`` new instants and a new scheduling order (the order of
        ``order``); the other pending timers keep theirs, and cancelled ones are dropped."""
        moved = {id(handle) for handle, _ in order}
        self._timers = [entry for entry in self._timers if not entry[2]._cancelled and id(entry[2]) not in moved]
        for handle, when in order:
            handle._when = when  # type: ignore[attr-defined]
            self._timers.append((when, next(self._sequence), handle))
        heapq.heapify(self._timers)
        self._cancelled_timers = 0

    def _pending_timers(self) -> list[asyncio.TimerHandle]:
        return [handle for _, _, handle in sorted(self._timers) if not handle.cancelled()]

    # -- work in flight in other threads -------------------------------------------------------

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        future = super().run_in_executor(executor, func, *args)
        group = self._start_in_flight()
        # in an empty context: a frozen group's completion must still be counted when it comes
        future.add_done_callback(lambda _: self._end_in_flight(group), context=contextvars.Context())
        return future

    async def shutdown_default_executor(self, *args: Any, **kwargs: Any) -> None:
        # It joins the executor's threads from a thread of its own, with a timeout timer (3.12+)
        # that virtual time would otherwise reach at once.
        with self._holding_time():
            await super().shutdown_default_executor(*args, **kwargs)

    def _start_in_flight(self) -> object | None:
        self._in_flight += 1
        group = TASK_GROUP.get()
        if group is not None:
            self._in_flight_by_group[group] = self._in_flight_by_group.get(group, 0) + 1
        return group

    def _end_in_flight(self, group: object | None) -> None:
        self._in_flight -= 1
        if group is not None:
            left = self._in_flight_by_group[group] - 1
            if left:
                self._in_flight_by_group[group] = left
            else:
                del self._in_flight_by_group[group]

    def _holds_time(self) -> bool:
        """Whether work in flight holds time still: work of a frozen or crashed worker does not (a
        paused process's call completes whenever it does, and only its wake-up waits for the thaw)."""
        if not self._in_flight:
            return False
        if not self._frozen:
            return True
        paused = sum(count for group, count in self._in_flight_by_group.items() if group in self._frozen)
        return self._in_flight > paused

    @contextlib.contextmanager
    def _holding_time(self) -> Iterator[None]:
        """Virtual time does not move while the body runs (a call into another thread)."""
        group = self._start_in_flight()
        try:
            yield
        finally:
            self._end_in_flight(group)

    # -- waiting for the loop to go idle ----------------------------------------------------------

    def _wait_idle(
        self, horizon: float, *, settle: bool = False, condition: Callable[[], bool] | None = None
    ) -> asyncio.Future[Any]:
        if self._waiter is not None and not self._waiter.future.done():
            raise RuntimeError(
                "another advance()/run_until_idle()/run_until() is already in progress on this loop; "
                "await it before starting another"
            )
        future = self.create_future()
        self._waiter = _IdleWaiter(future, horizon, settle, condition)
        return future

    def _condition_holds(self) -> bool:
        """At an idle instant: resolve a ``run_until`` waiter whose condition now holds."""
        waiter = self._waiter
        if waiter is None or waiter.condition is None:
            return False
        if waiter.future.done():
            self._waiter = None
            return False
        try:
            holds = waiter.condition()
        except Exception as error:
            self._waiter = None
            waiter.future.set_exception(error)
            return True
        if holds:
            self._waiter = None
            waiter.future.set_result(True)
        return bool(holds)

    def _resolve_waiter(self) -> bool:
        """Called when idle and no timer at or before the horizon can fire."""
        waiter = self._waiter
        if waiter is None:
            return False
        self._waiter = None
        if waiter.future.done():  # the awaiting task was cancelled
            return False
        if waiter.condition is not None:
            self._set_time(waiter.horizon)
            waiter.future.set_result(False)
        elif not waiter.settle:
            self._set_time(waiter.horizon)
            waiter.future.set_result(None)
        elif self._next_timer() is None:
            waiter.future.set_result(None)
        else:
            waiter.future.set_exception(
                TimeoutError(
                    "run_until_idle: timers keep coming past the limit; still scheduled:\n" + self._describe_timers()
                )
            )
        return True

    # -- the one place where time moves ---------------------------------------------------------

    def _run_once(self) -> None:
        # asyncio's own iteration, minus what never applies here: its timer heap stays empty (our
        # timers fire from _select) and the time is read only when a timer fires. It runs several
        # times per execution of any task, so what it skips shows in every simulation.
        if self._aborting is not None:
            error, self._aborting = self._aborting, None
            raise error
        if self._debug:  # type: ignore[attr-defined]
            super()._run_once()  # type: ignore[misc]
            return
        ready: collections.deque[asyncio.Handle] = self._ready  # type: ignore[attr-defined]
        selector: _VirtualSelector = self._selector  # type: ignore[attr-defined]
        events = self._select(selector._real, 0 if ready or self._stopping else None, selector._registered)  # type: ignore[attr-defined]
        if events:
            self._process_events(events)  # type: ignore[attr-defined]
        while True:
            for _ in range(len(ready)):
                handle = ready.popleft()
                if not handle._cancelled:
                    handle._run()
            # With no socket to poll between batches (timers fire only when idle), the next batch
            # runs here, in the same order asyncio would run it, minus an iteration's overhead.
            if not ready or self._stopping or selector._registered > 1:  # type: ignore[attr-defined]
                return
            self._busy_iterations += 1
            if self._busy_iterations >= _BUSY_ITERATIONS_BEFORE_TIME_PASSES:
                return  # _select lets a timer fire for code that spins

    def _select(
        self, real: selectors.BaseSelector, timeout: float | None, registered: int
    ) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout == 0:
            # Ready work exists. Time only passes for code that spins without ever going idle.
            self._busy_iterations += 1
            if self._busy_iterations >= _BUSY_ITERATIONS_BEFORE_TIME_PASSES and not self._holds_time():
                self._busy_iterations = 0
                self._fire_next_timer(self._waiter.horizon if self._waiter is not None else math.inf)
            # With no file descriptor but the loop's own wake-up pipe, the poll can wait until the
            # loop goes idle (it always polls then, before any jump): it saves a syscall per step.
            if registered <= 1:
                return []
            return real.select(0)

        self._busy_iterations = 0
        events = real.select(0)  # sockets are polled before any jump
        if events:
            return events
        if self._holds_time():
            events = real.select(self.io_timeout)
            if events:
                return events
            raise SimulationStalled(
                f"work in another thread has been in flight for {self.io_timeout:g} real seconds "
                f"(io_timeout) without completing.\n{self._describe_state()}"
            )
        if self._condition_holds():
            return []
        if self._idle_hook is not None and self._tick_timers and self._next_is_a_tick():
            self._idle_hook(self)
        waiter = self._waiter
        horizon = waiter.horizon if waiter is not None else math.inf
        if self._fire_next_timer(horizon) or self._resolve_waiter():
            return []
        events = real.select(self.stall_timeout)
        if events:
            return events
        raise SimulationStalled(
            f"nothing can make progress: no ready callbacks, no timers, no work in flight and no I/O "
            f"event within {self.stall_timeout:g} real seconds (stall_timeout).\n{self._describe_state()}"
        )

    # -- describing what is waiting --------------------------------------------------------------

    def _abort(self, error: BaseException) -> None:
        """End the run with ``error``, which no code between the loop and where it happened may
        swallow (Pyncette logs and goes on past any ``Exception`` in a tick): the pending
        ``advance()`` (or ``run_until_idle()``, ``run_until()``) raises it, else the next iteration
        raises it out of ``run_until_complete``."""
        waiter = self._waiter
        if waiter is not None and not waiter.future.done():
            self._waiter = None
            waiter.future.set_exception(error)
        else:
            self._aborting = error

    def _describe_state(self) -> str:
        lines = [f"virtual time: {self._now:g} s"]
        tasks = sorted(asyncio.all_tasks(self), key=lambda task: task.get_name())
        lines.append(f"tasks waiting ({len(tasks)}):")
        lines.extend(f"  - {describe_task(task)}" for task in tasks)
        if self._timers:
            lines.append("timers:\n" + self._describe_timers())
        return "\n".join(lines)

    def _describe_timers(self, limit: int = 10) -> str:
        timers = self._pending_timers()
        lines = [f"  - at {handle.when():g} s: {describe_handle(handle)}" for handle in timers[:limit]]
        if len(timers) > limit:
            lines.append(f"  ... and {len(timers) - limit} more")
        return "\n".join(lines)

    def close(self) -> None:
        if hasattr(self, "_timers"):
            self._timers.clear()
            self._time_listeners.clear()
            self._tick_tasks.clear()
            self._tick_timers.clear()
            self._idle_hook = None
            self._elisions.clear()
            # A run that ended abruptly (a stall) left its simulation's backend open. Its own error
            # is what matters, so a failure to close the backend now is not raised over it.
            while self._closing_with:
                with contextlib.suppress(Exception):
                    self._closing_with.pop()()
        super().close()


def detached_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task in an empty context: it belongs to no worker's group, so it never freezes with one
    (and the connections it opens do not either)."""
    return contextvars.Context().run(loop.create_task, coro)


def detached_call_at(
    loop: VirtualTimeLoop, when: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """A timer in an empty context, for what the simulation itself does (a fault, a thaw): it
    fires on time even when planned from inside a worker that is frozen meanwhile."""
    return loop.call_at(when, callback, *args, context=contextvars.Context())


def _frames(coro: Any) -> tuple[list[str], Any]:
    """The chain of coroutine frames a coroutine is suspended in, and the innermost awaitable."""
    frames = []
    while True:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        awaited = (
            getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
        )
        if awaited is None or not isinstance(
            awaited, (types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType)
        ):
            return frames, awaited
        coro = awaited


def describe_task(task: asyncio.Task[Any]) -> str:
    """One line: a task's name, where it is suspended and what it awaits."""
    frames, awaited = _frames(task.get_coro())
    where = " -> ".join(frames) if frames else repr(task.get_coro())
    waiting_on = getattr(task, "_fut_waiter", None) or awaited
    suffix = f" awaiting {waiting_on!r}" if waiting_on is not None else ""
    return f"{task.get_name()}: {where}{suffix}"


def describe_handle(handle: asyncio.Handle) -> str:
    """Who a timer belongs to: the task it will wake, when that can be found."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return describe_task(owner)
    task = getattr(owner, "_task", None)  # asyncio.Timeout
    if isinstance(task, asyncio.Task):
        return describe_task(task)
    for arg in getattr(handle, "_args", None) or ():
        if isinstance(arg, asyncio.Future):
            for done_callback, _ in getattr(arg, "_callbacks", None) or ():
                target = getattr(done_callback, "__self__", None)
                if isinstance(target, asyncio.Task):
                    return describe_task(target)
    return repr(handle)
