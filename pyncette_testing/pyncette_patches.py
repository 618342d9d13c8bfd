"""What stands in for standard modules inside Pyncette's own modules while a virtual clock is active.

Three names are swapped, in Pyncette's module namespaces only (user code and other libraries see the
real modules), and put back when the last active clock stops:

- ``time`` in ``pyncette.pyncette``: its ``perf_counter`` times ticks, and follows loop time on a
  ``VirtualTimeLoop`` so that ticks are exactly ``poll_interval`` apart;
- ``dateutil`` in ``pyncette.task``: ``Task`` validation calls ``dateutil.tz.gettz(None)`` for every
  task without a timezone (every dynamic instance Pyncette rebuilds from its spec, on every poll),
  and that call re-reads the local zone file each time. Pyncette only checks the answer against
  ``None``, which it never is (dateutil falls back to ``tzlocal()``), so the first answer is reused;
- ``_current_time`` in ``pyncette.pyncette`` (its ``datetime.now(tz=UTC)``, read on every tick and
  every commit, and by its healthcheck): on a loop with an active clock, the wall clock is read once
  per instant of virtual time, and that same value is returned until time moves.
"""

from __future__ import annotations

import asyncio
import threading
import time as _time
from typing import Any

import dateutil
import dateutil.tz

from .loop import VirtualTimeLoop

__all__: list[str] = []


def _virtual_loop() -> VirtualTimeLoop | None:
    """The running loop if it is a ``VirtualTimeLoop``."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop if isinstance(loop, VirtualTimeLoop) else None


class _LoopPerfCounter:
    """``time`` inside ``pyncette.pyncette``: ``perf_counter`` follows loop time on a
    ``VirtualTimeLoop`` and real time everywhere else."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def perf_counter() -> float:
        loop = _virtual_loop()
        if loop is None:
            return _time.perf_counter()
        loop._on_perf_counter()
        return loop.time()


def _current_time() -> Any:
    """``pyncette.pyncette._current_time``: read once per instant of virtual time on a clock's loop."""
    loop = _virtual_loop()
    clock = loop._clock if loop is not None else None
    if clock is None:
        return _real_current_time()
    now = clock._pyncette_now
    if now is None:
        now = clock._pyncette_now = _real_current_time()
    return now


class _LocalZoneOnce:
    """``dateutil.tz`` inside ``pyncette.task``: ``gettz(None)`` is looked up once."""

    def __init__(self) -> None:
        self._local: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(dateutil.tz, name)

    def gettz(self, name: str | None = None) -> Any:
        if name is not None:
            return dateutil.tz.gettz(name)
        if self._local is None:
            self._local = dateutil.tz.gettz(None)
        return self._local


class _DateutilForTask:
    """``dateutil`` inside ``pyncette.task``, with the ``tz`` above."""

    def __init__(self) -> None:
        self.tz = _LocalZoneOnce()

    def __getattr__(self, name: str) -> Any:
        return getattr(dateutil, name)


_lock = threading.Lock()
_users = 0
_real_current_time: Any = None


def patch_pyncette() -> None:
    """Install the stand-ins (counted: nested and parallel clocks share them)."""
    global _users, _real_current_time
    import pyncette.pyncette
    import pyncette.task

    with _lock:
        if _users == 0:
            pyncette.pyncette.time = _LoopPerfCounter()  # type: ignore[attr-defined,assignment]
            pyncette.task.dateutil = _DateutilForTask()  # type: ignore[assignment,attr-defined]
            _real_current_time = pyncette.pyncette._current_time
            pyncette.pyncette._current_time = _current_time
        _users += 1


def unpatch_pyncette() -> None:
    """Put the real modules back once the last user is done."""
    global _users
    import pyncette.pyncette
    import pyncette.task

    with _lock:
        _users -= 1
        if _users == 0:
            pyncette.pyncette.time = _time  # type: ignore[attr-defined]
            pyncette.task.dateutil = dateutil  # type: ignore[attr-defined]
            pyncette.pyncette._current_time = _real_current_time
