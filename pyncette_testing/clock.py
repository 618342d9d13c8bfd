"""``VirtualClock``: the test's handle on virtual time, and the wall clock that follows it.

While a clock is active, ``datetime.now()``, ``datetime.utcnow()``, ``date.today()`` and
``time.time()`` report ``start + elapsed`` (through time-machine, or through an active freezegun
``freeze_time``), and Pyncette's tick timing (``time.perf_counter`` in ``pyncette.pyncette``)
reads loop time, so ticks are exactly ``poll_interval`` apart.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import sys
from typing import Any

import time_machine

from .loop import VirtualTimeLoop
from .pyncette_patches import patch_pyncette, unpatch_pyncette

__all__ = ["DEFAULT_START", "VirtualClock"]

DEFAULT_START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
"""The start instant used when nothing else says where time begins."""

Duration = datetime.timedelta | float | int


def to_seconds(delta: Any, *, what: str = "duration") -> float:
    """Validate a duration (a ``timedelta`` or a number of seconds) and return it in seconds."""
    if isinstance(delta, datetime.timedelta):
        seconds = delta.total_seconds()
    elif isinstance(delta, (int, float)) and not isinstance(delta, bool):
        seconds = float(delta)
    else:
        raise TypeError(f"{what} must be a timedelta or a number of seconds, got {type(delta).__name__} {delta!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be finite, got {delta!r}")
    if seconds < 0:
        raise ValueError(f"{what} must not be negative, got {delta!r}: virtual time never moves backwards")
    return seconds


def to_utc(when: Any, *, what: str = "instant") -> datetime.datetime:
    """Validate an aware datetime (or an ISO-8601 string with an offset) and return it in UTC."""
    if isinstance(when, str):
        try:
            when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"{what} {when!r} is not an ISO-8601 date-time, e.g. 2024-01-01T00:00:00Z") from None
    if not isinstance(when, datetime.datetime):
        raise TypeError(f"{what} must be an aware datetime, got {type(when).__name__} {when!r}")
    if when.utcoffset() is None:
        raise ValueError(
            f"{what} {when.isoformat()} is naive; give it a timezone, e.g. {when.isoformat()}+00:00 "
            "or datetime(..., tzinfo=timezone.utc)"
        )
    return when.astimezone(datetime.timezone.utc)


# -- freezegun interop ---------------------------------------------------------------------------


def _active_freezegun_factory() -> Any:
    api = sys.modules.get("freezegun.api")
    factories = getattr(api, "freeze_factories", None)
    return factories[-1] if factories else None


def default_start() -> datetime.datetime:
    """The instant of an active freezegun ``freeze_time`` or time-machine ``travel``, else DEFAULT_START."""
    factory = _active_freezegun_factory()
    if factory is not None:
        frozen = factory()
        return frozen.replace(tzinfo=datetime.timezone.utc) if frozen.tzinfo is None else to_utc(frozen)
    if time_machine.escape_hatch.is_travelling():
        return datetime.datetime.now(datetime.timezone.utc)
    return DEFAULT_START


_ACTIVE_CLOCKS: set[VirtualClock] = set()


def stop_active_clocks() -> None:
    """Undo the patches of clocks whose owner never got to stop them (a loop torn down mid-test)."""
    for clock in list(_ACTIVE_CLOCKS):
        clock._deactivate()


def active_clock(loop: VirtualTimeLoop) -> VirtualClock | None:
    """The clock currently active on ``loop``, if any."""
    clock = getattr(loop, "_clock", None)
    return clock if isinstance(clock, VirtualClock) and clock.active else None


# -- the clock ---------------------------------------------------------------------------------


class VirtualClock:
    """Virtual time for one ``VirtualTimeLoop``, with the wall clock following it while active.

    Use it as a context manager (``with VirtualClock(start, loop=loop) as clock:`` or, inside the
    loop, ``async with VirtualClock(start) as clock:``). The ``pyncette_clock`` fixture hands you an
    active one bound to the test's loop.
    """

    def __init__(self, start: datetime.datetime | str | None = None, *, loop: VirtualTimeLoop | None = None) -> None:
        self._start = default_start() if start is None else to_utc(start, what="start")
        if loop is not None and not isinstance(loop, VirtualTimeLoop):
            raise TypeError(f"loop must be a VirtualTimeLoop, got {type(loop).__name__}")
        self._loop = loop
        self._origin = 0.0
        self._active = False
        self._stopped = False
        self._traveller: Any = None
        self._travel: Any = None
        self._freezegun: Any = None
        self._freezegun_original: datetime.datetime | None = None
        self._wall_us = 0
        self._pyncette_now: datetime.datetime | None = None  # Pyncette's "now" at this instant, once read

    def __repr__(self) -> str:
        state = "active" if self._active else ("stopped" if self._stopped else "not started")
        now = self.now().isoformat() if self._loop is not None else self._start.isoformat()
        return f"<VirtualClock {state} at {now}>"

    # -- reading time -------------------------------------------------------------------------

    @property
    def start(self) -> datetime.datetime:
        """The instant virtual time started at (aware, UTC)."""
        return self._start

    @property
    def loop(self) -> VirtualTimeLoop:
        if self._loop is None:
            raise RuntimeError("this VirtualClock is not bound to a loop yet; enter it inside a VirtualTimeLoop")
        return self._loop

    @property
    def active(self) -> bool:
        return self._active

    @property
    def elapsed(self) -> datetime.timedelta:
        """Virtual time since ``start``."""
        return datetime.timedelta(seconds=self.loop.time() - self._origin)

    def now(self) -> datetime.datetime:
        """The current virtual instant (aware, UTC): ``start + elapsed``."""
        return self._start + self.elapsed

    def _instant_at(self, loop_time: float) -> datetime.datetime:
        """The virtual instant at a loop time (what ``now()`` returns then)."""
        return self._start + datetime.timedelta(seconds=loop_time - self._origin)

    def _wall_microseconds(self, loop_time: float) -> int:
        """Microseconds since ``start`` that the patched wall clock reads at a loop time."""
        return round((loop_time - self._origin) * 1_000_000)

    # -- moving time --------------------------------------------------------------------------

    async def advance(self, delta: Duration) -> None:
        """Run everything due up to and including ``now() + delta``, let it settle, stop exactly there."""
        seconds = to_seconds(delta, what="advance() duration")
        loop = self._check_running()
        await loop._wait_idle(loop.time() + seconds, settle=False)

    async def advance_to(self, when: datetime.datetime | str) -> None:
        """Like :meth:`advance`, to an absolute aware instant (not before ``now()``)."""
        target = to_utc(when, what="advance_to() instant")
        now = self.now()
        if target < now:
            raise ValueError(
                f"cannot move time backwards: advance_to({target.isoformat()}) is before now ({now.isoformat()})"
            )
        loop = self._check_running()
        await loop._wait_idle(loop.time() + (target - now).total_seconds(), settle=False)

    async def run_until_idle(self, limit: Duration = datetime.timedelta(days=1)) -> None:
        """Fire timer after timer until no timer and no ready work remain.

        Raises ``TimeoutError`` naming what is still scheduling if timers keep coming past ``limit``
        of virtual time (a running Pyncette app never goes idle: use :meth:`advance` for it).
        """
        seconds = to_seconds(limit, what="run_until_idle() limit")
        loop = self._check_running()
        await loop._wait_idle(loop.time() + seconds, settle=True)

    def jump(self, delta: Duration) -> None:
        """Move time forward without running what falls due in between (a frozen process, a suspended
        VM): those timers then fire late, in order."""
        seconds = to_seconds(delta, what="jump() duration")
        self._check_active()
        self.loop._jump(seconds)

    # -- activation ---------------------------------------------------------------------------

    def __enter__(self) -> VirtualClock:
        if self._loop is None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "VirtualClock needs a loop: pass loop=VirtualTimeLoop() or enter it inside a running VirtualTimeLoop"
                ) from None
            if not isinstance(running, VirtualTimeLoop):
                raise TypeError(
                    f"the running loop is a {type(running).__name__}, not a VirtualTimeLoop; run the test on virtual "
                    "time with @pytest.mark.pyncette, or asyncio.run(main(), loop_factory=VirtualTimeLoop)"
                )
            self._loop = running
        self._activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._deactivate()

    async def __aenter__(self) -> VirtualClock:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self._deactivate()

    def _activate(self) -> None:
        if self._active or self._stopped:
            raise RuntimeError("a VirtualClock can be entered only once; create a new one")
        loop = self.loop
        if loop.is_closed():
            raise RuntimeError("cannot start a VirtualClock on a closed loop")
        self._origin = loop.time()
        self._wall_us = 0
        self._pyncette_now = None
        self._freezegun = _active_freezegun_factory()
        if self._freezegun is not None:
            self._freezegun_original = self._freezegun()
            self._freezegun.move_to(self._start.replace(tzinfo=None))
        else:
            self._travel = time_machine.travel(self._start, tick=False)
            self._traveller = self._travel.start()
        patch_pyncette()
        loop._add_time_listener(self._follow)
        loop._clock = self
        _ACTIVE_CLOCKS.add(self)
        self._active = True

    def _deactivate(self) -> None:
        if not self._active:
            return
        self._active = False
        self._stopped = True
        _ACTIVE_CLOCKS.discard(self)
        if getattr(self.loop, "_clock", None) is self:
            self.loop._clock = None
        self.loop._remove_time_listener(self._follow)
        unpatch_pyncette()
        if self._travel is not None:
            self._travel.stop()
            self._travel = self._traveller = None
        if self._freezegun is not None:
            self._freezegun.move_to(self._freezegun_original)
            self._freezegun = None

    def _restart_at(self, start: datetime.datetime) -> None:
        """Move the start instant of an active clock on which no time has passed yet."""
        if self.loop.time() != self._origin:
            raise ValueError(
                f"this loop's clock started at {self._start.isoformat()} and has already moved to "
                f"{self.now().isoformat()}; give the start instant where the clock is created, e.g. "
                "@pytest.mark.pyncette(start=...)"
            )
        self._start = start
        self._wall_us = 0
        self._pyncette_now = None
        if self._traveller is not None:
            self._traveller.move_to(start)
        elif self._freezegun is not None:
            self._freezegun.move_to(start.replace(tzinfo=None))

    def _follow(self, loop_time: float) -> None:
        wall_us = self._wall_microseconds(loop_time)
        if self._traveller is not None:
            self._traveller.shift(datetime.timedelta(microseconds=wall_us - self._wall_us))
        elif self._freezegun is not None:
            self._freezegun.move_to((self._start + datetime.timedelta(microseconds=wall_us)).replace(tzinfo=None))
        self._wall_us = wall_us
        self._pyncette_now = None

    def _check_active(self) -> None:
        if not self._active:
            if self._stopped:
                raise RuntimeError(
                    "this VirtualClock has stopped (its test or simulation ended); time can no longer move"
                )
            raise RuntimeError(
                "this VirtualClock is not active; use it as `with clock:` or take the pyncette_clock fixture"
            )

    def _check_running(self) -> VirtualTimeLoop:
        self._check_active()
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            raise RuntimeError("advance()/advance_to()/run_until_idle() must be awaited inside the clock's own loop")
        return loop
