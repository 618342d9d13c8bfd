"""``track_io``: I/O that virtual time does not jump over.

Pyncette's sqlite backend (aiosqlite) and other drivers finish their work on their own threads or
on sockets, which the loop cannot see. A repository factory wrapped in ``track_io`` opens its
repositories on an event loop of their own, where each call runs to completion while the virtual
loop waits (see ``backend_loop``): atomic and instantaneous in virtual time, as on the in-memory
store. A coroutine function or a repository already opened is awaited with time held still
while its call is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pyncette.repository import Repository

from .backend_loop import BackendLoop
from .loop import VirtualTimeLoop
from .repository import _RepositoryProxy

__all__ = ["track_io"]

T = TypeVar("T")


async def held(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` with virtual time held still (when running on a VirtualTimeLoop)."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        return await awaitable
    with loop._holding_time():
        return await awaitable


class _TrackedRepository(_RepositoryProxy):
    async def _call(self, operation: str, *args: Any) -> Any:
        return await held(getattr(self._inner, operation)(*args))


def _track_factory(factory: Callable[..., Any]) -> Callable[..., contextlib.AbstractAsyncContextManager[Repository]]:
    @contextlib.asynccontextmanager
    @functools.wraps(factory)
    async def tracked(**kwargs: Any) -> AsyncIterator[Repository]:
        loop = asyncio.get_running_loop()
        if not isinstance(loop, VirtualTimeLoop):  # in real time there is nothing to hold
            async with factory(**kwargs) as repository:
                yield _TrackedRepository(repository)
            return
        backend = BackendLoop(loop)
        try:
            async with backend.opened(factory, **kwargs) as repository:
                yield repository
        finally:
            backend.close()

    return tracked


def track_io(obj: Any) -> Any:
    """Wrap a repository factory, a repository or a coroutine function so that virtual time does
    not move while one of its calls is in flight; a factory's calls also let nothing else run
    meanwhile, so they are atomic, as on the in-memory store.

    ``Pyncette(repository_factory=track_io(sqlite_repository))`` runs Pyncette's real sqlite
    backend under virtual time with the same results as the in-memory store.
    """
    if isinstance(obj, _TrackedRepository):
        return obj
    if isinstance(obj, Repository):
        return _TrackedRepository(obj)
    if inspect.iscoroutinefunction(obj):

        @functools.wraps(obj)
        async def tracked_call(*args: Any, **kwargs: Any) -> Any:
            return await held(obj(*args, **kwargs))

        return tracked_call
    if callable(obj):
        if hasattr(obj, "_pyncette_untracked"):
            return obj
        factory = _track_factory(obj)
        factory._pyncette_untracked = obj  # type: ignore[attr-defined]
        return factory
    raise TypeError(
        f"track_io() takes a repository factory, a Repository or a coroutine function, got {type(obj).__name__}"
    )


def untracked(factory: Callable[..., Any]) -> Callable[..., Any]:
    """The repository factory that ``track_io`` wrapped, or ``factory`` itself if it is not one."""
    original: Callable[..., Any] = getattr(factory, "_pyncette_untracked", factory)
    return original
