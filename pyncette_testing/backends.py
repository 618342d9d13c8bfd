"""Backends by name, each simulation in its own namespace on a shared server.

``"memory"`` is the in-memory store; ``"sqlite"``, ``"redis"`` and ``"postgres"`` are Pyncette's own
backends, run under :func:`track_io`. Servers come from the usual environment variables
(``REDIS_URL``; ``POSTGRES_URL``, else ``DATABASE_URL``). Unless the caller names the namespace
itself, every :func:`isolated_backend` gets a fresh one (a sqlite file in a temporary folder, a
redis key prefix, a postgres table) and removes it on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import random
import shutil
import socket
import string
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from .repository import memory_repository
from .store import InMemoryStore
from .tracking import held, track_io

__all__ = ["BACKENDS", "IsolatedBackend", "backend_unavailable", "isolated_backend"]

RepositoryFactory = Callable[..., Any]

BACKENDS = ("memory", "sqlite", "redis", "postgres")
"""The backends known by name, in the order the conformance suite runs them."""

_FACTORIES = {
    "sqlite": ("pyncette.sqlite", "sqlite_repository", "aiosqlite"),
    "redis": ("pyncette.redis", "redis_repository", "redis"),
    "postgres": ("pyncette.postgres", "postgres_repository", "postgres"),
}
_URLS = {
    "redis": (("REDIS_URL",), "redis_url", "redis://localhost:6379/0"),
    "postgres": (("POSTGRES_URL", "DATABASE_URL"), "postgres_url", "postgresql://postgres@localhost:5432/postgres"),
}
_DEFAULT_PORTS = {"redis": 6379, "postgres": 5432}


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; use one of {', '.join(BACKENDS)} or pass a Pyncette repository factory"
        )


def server_url(name: str) -> str:
    """The server URL for ``name`` ("redis" or "postgres"), from the environment or the local default."""
    variables, _, default = _URLS[name]
    for variable in variables:
        if os.environ.get(variable):
            return os.environ[variable]
    return default


def _factory(name: str) -> RepositoryFactory:
    if name == "memory":
        return memory_repository
    module_name, attribute, extra = _FACTORIES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"the {name} backend needs its driver ({error.name} is missing): pip install 'pyncette[{extra}]'"
        ) from error
    factory: RepositoryFactory = getattr(module, attribute)
    return factory


def _name_of(factory: RepositoryFactory) -> str | None:
    """The backend name of one of Pyncette's own factories (tracked or not), else None."""
    inner = getattr(factory, "__wrapped__", factory)
    if inner is memory_repository:
        return "memory"
    for name, (module_name, attribute, _) in _FACTORIES.items():
        if getattr(inner, "__module__", None) == module_name and getattr(inner, "__name__", None) == attribute:
            return name
    return None


_unavailable_cache: dict[tuple[str, str], str | None] = {}


def backend_unavailable(name: str) -> str | None:
    """Why the backend ``name`` cannot be used here (driver missing, server unreachable), or None."""
    _check_name(name)
    if name in ("memory", "sqlite"):
        return None
    url = server_url(name)
    key = (name, url)
    if key not in _unavailable_cache:
        _unavailable_cache[key] = _probe(name, url)
    return _unavailable_cache[key]


def _probe(name: str, url: str) -> str | None:
    try:
        _factory(name)
    except ImportError as error:
        return str(error)
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or _DEFAULT_PORTS[name]
    variable = _URLS[name][0][0]
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as error:
        return f"no {name} server at {url} ({error.strerror or error}); start one or set {variable}"


@dataclasses.dataclass
class IsolatedBackend:
    """A repository factory and the configuration that points it at a private namespace."""

    name: str | None
    """"memory", "sqlite", "redis", "postgres", or None for a custom factory."""
    factory: RepositoryFactory
    """The factory to give Pyncette: under ``track_io`` unless it is the in-memory one."""
    config: dict[str, Any]
    """Pyncette configuration for the factory (URL, namespace), the caller's keys included."""


@contextlib.asynccontextmanager
async def isolated_backend(
    backend: str | RepositoryFactory = "memory", **config: Any
) -> AsyncIterator[IsolatedBackend]:
    """Resolve ``backend`` (a name or a factory) and give it a namespace of its own for the block.

    ``async with isolated_backend("redis") as b: app = Pyncette(repository_factory=b.factory, **b.config)``.
    A namespace the caller sets (``sqlite_database``, ``redis_namespace``, ``postgres_table_name``) is
    used as it is and left in place; one made here is removed on exit.
    """
    if isinstance(backend, str):
        _check_name(backend)
        name: str | None = backend
        factory = _factory(backend)
    elif callable(backend):
        factory = backend
        name = _name_of(backend)
    else:
        raise TypeError(f"backend must be a backend name or a Pyncette repository factory, got {backend!r}")
    if name == "postgres" and _name_of(factory) == "postgres":
        factory = _postgres_repository
    config = dict(config)
    if name == "memory":
        # the in-memory namespace: one store that every app given this config shares
        config.setdefault("memory_store", InMemoryStore())
    if name in _URLS:
        _, key, _ = _URLS[name]
        config.setdefault(key, server_url(name))
    cleanup = _claim_namespace(name, config)
    try:
        yield IsolatedBackend(name, factory if name == "memory" else track_io(factory), config)
    finally:
        if cleanup is not None:
            await held(cleanup())


@contextlib.asynccontextmanager
async def _postgres_repository(**kwargs: Any) -> AsyncIterator[Any]:
    """Pyncette's ``postgres_repository`` with a pool fit for virtual time: one connection to start
    with, and no expiry of idle connections or cached statements (asyncpg's timers run in real time,
    and reconnecting would cost real time in the middle of a run)."""
    import asyncpg
    from pyncette.postgres import PostgresRepository

    pool = await asyncpg.create_pool(
        kwargs["postgres_url"], min_size=1, max_inactive_connection_lifetime=0, max_cached_statement_lifetime=0
    )
    try:
        repository = PostgresRepository(pool, **kwargs)
        if not kwargs.get("postgres_skip_table_create", False):
            await repository.initialize()
        yield repository
    finally:
        await pool.close()


def _claim_namespace(name: str | None, config: dict[str, Any]) -> Callable[[], Any] | None:
    """Set a fresh namespace in ``config`` unless the caller chose one; return how to remove it."""
    if name == "sqlite" and "sqlite_database" not in config:
        # A file, not ":memory:": every worker of a simulation must see the same database.
        folder = tempfile.mkdtemp(prefix="pyncette-testing-")
        config["sqlite_database"] = os.path.join(folder, "pyncette.db")

        async def remove_folder() -> None:
            shutil.rmtree(folder, ignore_errors=True)

        return remove_folder
    if name == "redis" and "redis_namespace" not in config:
        namespace = config["redis_namespace"] = f"pyncette-testing-{uuid.uuid4().hex}"
        return lambda: _delete_redis_namespace(config["redis_url"], namespace)
    if name == "postgres" and "postgres_table_name" not in config:
        # Pyncette accepts only lower-case letters and underscores in table names.
        suffix = "".join(random.SystemRandom().choices(string.ascii_lowercase, k=16))
        table = config["postgres_table_name"] = f"pyncette_testing_{suffix}"
        return lambda: _drop_postgres_table(config["postgres_url"], table)
    return None


async def _delete_redis_namespace(url: str, namespace: str) -> None:
    import redis.asyncio

    async with redis.asyncio.from_url(url) as client:
        keys = [key async for key in client.scan_iter(match=f"pyncette:{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)


async def _drop_postgres_table(url: str, table: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await connection.close()


async def force_lease(
    repository: Any, name: str, locked_until: datetime.datetime, locked_by: str | None, *, new_holder: bool
) -> None:
    """Write the lease of the stored task ``name`` straight into a real backend, as a lease running
    out (``new_holder=False``: only ``locked_until`` changes) or passing to another worker
    (``new_holder=True``: ``locked_by`` too, and redis's record version, as another worker's poll would).
    The lease faults' way into sqlite, redis and postgres; nothing in Pyncette's API can do it."""
    inner = getattr(repository, "_inner", repository)
    module = type(inner).__module__
    if module == "pyncette.sqlite":
        async with inner._transaction():
            await inner._connection.execute_fetchall(
                f"UPDATE {inner._table_name} SET locked_until = ?, locked_by = COALESCE(?, locked_by) WHERE name = ?",
                (locked_until.timestamp(), locked_by, name),
            )
    elif module == "pyncette.postgres":
        async with inner._pool.acquire() as connection:
            await connection.execute(
                f"UPDATE {inner._table_name} SET locked_until = $1, locked_by = COALESCE($2::uuid, locked_by) "
                "WHERE name = $3",
                locked_until,
                locked_by,
                name,
            )
    elif module.startswith("pyncette.redis"):
        await _force_redis_lease(inner, name, locked_until, locked_by, new_holder)
    else:
        raise NotImplementedError(
            f"lease faults write the stored lease directly, which is not supported for {type(inner).__name__}; "
            "they work on memory, sqlite, redis and postgres"
        )


async def _force_redis_lease(
    inner: Any, name: str, locked_until: datetime.datetime, locked_by: str | None, new_holder: bool
) -> None:
    client = inner._redis_client
    key = f"pyncette:{inner._namespace}:task:{name}"
    version, execute_after, old_until = await client.hmget(key, "version", "execute_after", "locked_until")
    if version is None:
        return
    until = locked_until.astimezone(datetime.timezone.utc).isoformat().encode()

    # The index entry is "<max(locked_until, execute_after)>_<record key>", as manage.lua keeps it.
    def member(until_value: bytes | None) -> bytes:
        due = until_value if until_value and until_value >= execute_after else execute_after
        return due + b"_" + key.encode()

    old = member(old_until)
    index = None
    async for candidate in client.scan_iter(match=f"pyncette:{inner._namespace}:index*"):
        if await client.zscore(candidate, old) is not None:
            index = candidate
            break
    fields: dict[str, Any] = {"locked_until": until}
    if new_holder:
        fields.update(locked_by=locked_by, version=int(version) + 1)
    async with client.pipeline(transaction=True) as pipe:
        if index is not None:
            pipe.zrem(index, old)
            pipe.zadd(index, {member(until): 0})
        pipe.hset(key, mapping=fields)
        await pipe.execute()
