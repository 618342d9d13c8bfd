"""A real backend on an event loop of its own: every call is atomic in virtual time.

On the virtual loop itself, a call to a real server would leave the loop running everything else
at that instant while the answer travels: how another worker's steps interleave with the call
would depend on how fast the server answers, and two runs of one simulation could differ. Here
the backend's repositories live on a plain asyncio loop of their own, in the same thread, and each
call is run to completion there while the virtual loop waits, as if it took no time at all:
exactly what a call to the in-memory store does. A simulation runs its backend this way, and so
does a repository factory wrapped in ``track_io``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from pyncette.repository import Repository

from .errors import SimulationStalled
from .loop import VirtualTimeLoop
from .repository import _RepositoryProxy

__all__: list[str] = []

T = TypeVar("T")


class BackendLoop:
    """A plain event loop that :meth:`run` drives until one coroutine has finished, for a backend
    used on ``virtual``; it is closed by its owner (a simulation, a ``track_io`` factory), or else
    with ``virtual``."""

    def __init__(self, virtual: VirtualTimeLoop) -> None:
        self._virtual = virtual
        self._loop = asyncio.new_event_loop()
        virtual._closing_with.append(self.close)
        self._opened: list[contextlib.AbstractAsyncContextManager[Any]] = []  # entered, not exited yet
        self._stalled: str | None = None  # why, once a call has not completed within io_timeout

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result, the calling loop (the virtual one) standing still meanwhile."""
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("the backend is closed: the simulation (or app context) using it has ended")
        if self._stalled is not None:  # its server did not answer: fail fast, not once per io_timeout
            coro.close()
            raise SimulationStalled(self._stalled)
        # Only one loop may be running in a thread: the virtual loop steps aside for the call.
        outer = asyncio._get_running_loop()
        asyncio._set_running_loop(None)
        task = contextvars.Context().run(self._loop.create_task, coro)
        timeout = self._virtual.io_timeout
        timed_out: list[bool] = []
        timer = self._loop.call_later(timeout, lambda: timed_out.append(task.cancel()))
        try:
            return self._loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not timed_out:
                raise
            self._stalled = (
                f"a call to the backend ({getattr(coro, '__qualname__', coro)}) has not completed in {timeout:g} "
                "real seconds (io_timeout); is its server reachable? (set loop.io_timeout to wait longer)\n"
                + self._virtual._describe_state()
            )
            stalled = SimulationStalled(self._stalled)
            if outer is self._virtual:
                outer._abort(stalled)  # the run ends with it, whoever made the call and caught what
            raise stalled from None
        finally:
            timer.cancel()
            asyncio._set_running_loop(outer)

    def open(self, factory: Callable[..., Any], **config: Any) -> BackendRepository:
        """``factory(**config)`` entered on this loop, until :meth:`close`."""
        return self._enter(factory, config)[1]

    @contextlib.asynccontextmanager
    async def opened(self, factory: Callable[..., Any], **config: Any) -> AsyncIterator[Repository]:
        """``factory(**config)`` entered on this loop for the block (or until :meth:`close`, if sooner)."""
        manager, repository = self._enter(factory, config)
        try:
            yield repository
        except BaseException as error:
            if not self._exit(manager, error):
                raise
        else:
            self._exit(manager, None)

    def close(self) -> None:
        """Exit what is still open (a crashed worker's connections too), cancel what is left and
        close the loop (idempotent). After a stall nothing is exited: the server is not answering."""
        if self._loop.is_closed():
            return
        if self.close in self._virtual._closing_with:
            self._virtual._closing_with.remove(self.close)
        try:
            while self._opened and self._stalled is None:
                self._exit(self._opened[-1], None)
        finally:
            self._opened.clear()
            self._stalled = None
            try:
                self.run(self._cancel_leftovers())
            finally:
                self._loop.close()

    def _enter(
        self, factory: Callable[..., Any], config: dict[str, Any]
    ) -> tuple[contextlib.AbstractAsyncContextManager[Any], BackendRepository]:
        manager = factory(**config)
        repository = BackendRepository(self.run(manager.__aenter__()), self)
        self._opened.append(manager)
        return manager, repository

    def _exit(self, manager: contextlib.AbstractAsyncContextManager[Any], error: BaseException | None) -> bool:
        if manager not in self._opened or self._stalled is not None:  # closed already, or unreachable
            return False
        self._opened.remove(manager)
        if error is None:
            return bool(self.run(manager.__aexit__(None, None, None)))
        return bool(self.run(manager.__aexit__(type(error), error, error.__traceback__)))

    async def _cancel_leftovers(self) -> None:
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        await self._loop.shutdown_asyncgens()


class BackendRepository(_RepositoryProxy):
    """A repository whose every call runs on a :class:`BackendLoop` (``inner`` is the backend's own)."""

    def __init__(self, inner: Repository, backend: BackendLoop) -> None:
        super().__init__(inner)
        self.backend = backend

    async def _call(self, operation: str, *args: Any) -> Any:
        return self.backend.run(getattr(self._inner, operation)(*args))
