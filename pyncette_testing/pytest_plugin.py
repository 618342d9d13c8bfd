"""pytest plugin (registered through the ``pytest11`` entry point): wiring only, no logic.

A test opts into virtual time with ``@pytest.mark.pyncette(...)`` or by requesting any
``pyncette_*`` fixture. It then runs on a fresh :class:`VirtualTimeLoop` (through
pytest-asyncio's ``pytest_asyncio_loop_factories`` hook) with an active :class:`VirtualClock`.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from typing import Any

import pytest
import pytest_asyncio
from pyncette import Pyncette

from . import faults
from .backends import BACKENDS, backend_unavailable
from .clock import VirtualClock, default_start, stop_active_clocks, to_utc
from .loop import VirtualTimeLoop
from .simulation import Simulation
from .store import InMemoryStore
from .target import load_app

MARKER = "pyncette"
_FIXTURE_PREFIX = "pyncette_"
_START_KEY = pytest.StashKey[datetime.datetime | None]()
_BACKENDS_KEY = pytest.StashKey[tuple[str, ...]]()
_UNAVAILABLE = " backend unavailable: "


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyncette", "pyncette-testing (virtual time for Pyncette apps)")
    group.addoption(
        "--pyncette-start",
        dest="pyncette_start",
        default=None,
        metavar="ISO8601",
        help="virtual start instant for pyncette tests, with an offset, e.g. 2024-01-01T00:00:00Z",
    )
    group.addoption(
        "--pyncette-seed",
        dest="pyncette_seed",
        type=int,
        default=None,
        metavar="N",
        help="seed for pyncette_app simulations (chaos and sim.random); replays a reported chaos run",
    )
    group.addoption(
        "--pyncette-backend",
        dest="pyncette_backend",
        default=None,
        metavar="NAMES",
        help="backend(s) for pyncette_app: memory, sqlite, redis, postgres; several (comma-separated) run each "
        "test once per backend. Servers come from REDIS_URL and POSTGRES_URL",
    )
    parser.addini(
        "pyncette_backend",
        "backend(s) for pyncette_app (memory, sqlite, redis, postgres; several separated by spaces or commas)",
        default="",
    )
    parser.addini("pyncette_start", "virtual start instant for pyncette tests (ISO-8601 with an offset)", default="")
    parser.addini("pyncette_app", "the app pyncette_app simulates by default, as 'package.module:app'", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(start=None, app=None, backend=None, poll_interval=None, seed=0, **config): run this async test on virtual "
        "time (a VirtualTimeLoop and a VirtualClock); the keywords also configure the pyncette_app simulation",
    )
    start = None
    for source, value in (
        ("ini option pyncette_start", config.getini("pyncette_start")),
        ("--pyncette-start", config.getoption("pyncette_start")),
    ):
        if value and start is None:
            start = _parse_start(value, source)
    config.stash[_START_KEY] = start
    config.stash[_BACKENDS_KEY] = _configured_backends(config)


def _configured_backends(config: pytest.Config) -> tuple[str, ...]:
    """The backends from --pyncette-backend, else the ini option, else memory alone."""
    for source, value in (
        ("--pyncette-backend", config.getoption("pyncette_backend")),
        ("ini option pyncette_backend", config.getini("pyncette_backend")),
    ):
        names = tuple(dict.fromkeys(value.replace(",", " ").split())) if value else ()
        if names:
            unknown = [name for name in names if name not in BACKENDS]
            if unknown:
                raise pytest.UsageError(
                    f"unknown backend {unknown[0]!r} in {source}; use one or more of {', '.join(BACKENDS)}"
                )
            return names
    return ("memory",)


def _parse_start(value: Any, source: str) -> datetime.datetime:
    try:
        return to_utc(value, what=f"{source}")
    except (TypeError, ValueError) as error:
        raise pytest.UsageError(f"{error} (from {source})") from None


def _opted_in(item: pytest.Item) -> bool:
    if item.get_closest_marker(MARKER) is not None:
        return True
    return any(name.startswith(_FIXTURE_PREFIX) for name in getattr(item, "fixturenames", ()))


def _marker_options(node: pytest.Item) -> dict[str, Any]:
    options: dict[str, Any] = {}
    # Closest marker wins: apply from the farthest (module) to the closest (function).
    for marker in reversed(list(node.iter_markers(MARKER))):
        if marker.args:
            raise pytest.UsageError(f"{node.nodeid}: @pytest.mark.{MARKER} takes keyword arguments only")
        options.update(marker.kwargs)
    return options


def start_for(item: pytest.Item) -> datetime.datetime:
    """The start instant for a test: marker, else ini option, else command line, else the default."""
    options = _marker_options(item)
    if options.get("start") is not None:
        return _parse_start(options["start"], f"{item.nodeid}: @pytest.mark.{MARKER}(start=...)")
    configured = item.config.stash.get(_START_KEY, None)
    return configured if configured is not None else default_start()


# -- making marked async tests asyncio tests (strict mode) and putting them on virtual time ----------


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Generator[None, Any, None]:
    if inspect.iscoroutinefunction(obj) and _wants_virtual_time(collector, obj):
        marks = getattr(obj, "pytestmark", [])
        if not any(getattr(mark, "name", None) == "asyncio" for mark in marks):
            pytest.mark.asyncio(obj)
    yield


def _wants_virtual_time(collector: pytest.Collector, obj: Any) -> bool:
    if collector.get_closest_marker(MARKER) is not None:
        return True
    if any(getattr(mark, "name", None) == MARKER for mark in getattr(obj, "pytestmark", [])):
        return True
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return any(parameter.startswith(_FIXTURE_PREFIX) for parameter in parameters)


@pytest.hookimpl(wrapper=True, optionalhook=True)
def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Generator[None, Any, Any]:
    result: Mapping[str, Any] | None = yield
    if _opted_in(item):
        return {"pyncette": VirtualTimeLoop}
    # Tests that did not opt in keep whatever loop they had: another plugin's, or the policy's.
    return result if result is not None else {"asyncio": _policy_loop}


def _policy_loop() -> Any:
    import asyncio

    return asyncio.get_event_loop_policy().new_event_loop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Like anyio's backend fixture: several configured backends run each test once per backend;
    # a marker's backend= pins one and is not parametrized.
    if "pyncette_backend" not in metafunc.fixturenames or "backend" in _marker_options(metafunc.definition):
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if "pyncette_backend" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return  # the test chose its backends itself
    backends = metafunc.config.stash[_BACKENDS_KEY]
    if len(backends) > 1:
        metafunc.parametrize("pyncette_backend", backends, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker(MARKER) is None:
            continue
        start_for(item)  # a naive or unparsable start is a usage error at collection time
        fixturenames = getattr(item, "fixturenames", None)
        if fixturenames is not None and "pyncette_clock" not in fixturenames and _is_async(item):
            fixturenames.append("pyncette_clock")


def pytest_runtest_setup(item: pytest.Item) -> None:
    faults.chaos_seeds_used.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed and faults.chaos_seeds_used:
        seeds = ", ".join(str(seed) for seed in dict.fromkeys(faults.chaos_seeds_used))
        report.sections.append(
            (
                "pyncette chaos",
                f"this test used chaos with seed {seeds}; replay it exactly with "
                f"@pytest.mark.pyncette(seed={faults.chaos_seeds_used[0]}) or --pyncette-seed {faults.chaos_seeds_used[0]}",
            )
        )
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # A real backend without a server skips its tests: say so once per backend, not only with -rs.
    unavailable: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
        if _UNAVAILABLE in reason:
            reason = reason.removeprefix("Skipped: ")
            unavailable[reason] = unavailable.get(reason, 0) + 1
    if unavailable:
        terminalreporter.section("pyncette backends", sep="-")
        for reason, count in sorted(unavailable.items()):
            terminalreporter.line(f"{count} test(s) skipped: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    # A loop torn down mid-test (say by SimulationStalled) may never run a clock's exit: undo its
    # wall-clock patches here so that nothing leaks into the next test.
    stop_active_clocks()


def _is_async(item: pytest.Item) -> bool:
    return inspect.iscoroutinefunction(getattr(item, "obj", None))


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def pyncette_store() -> InMemoryStore:
    """A fresh, empty :class:`InMemoryStore` for this test."""
    return InMemoryStore()


@pytest_asyncio.fixture(loop_scope="function")
async def pyncette_clock(request: pytest.FixtureRequest) -> AsyncIterator[VirtualClock]:
    """The active :class:`VirtualClock` of this test's virtual-time loop."""
    _require_async_test(request, "pyncette_clock")
    with VirtualClock(start_for(request.node)) as clock:
        yield clock


@pytest.fixture
def pyncette_target(request: pytest.FixtureRequest) -> Pyncette | None:
    """The app ``pyncette_app`` simulates: marker ``app=``, else the ini option ``pyncette_app``,
    else ``None`` (a fresh app for inline tasks). Override this fixture to point at your app."""
    spec = _marker_options(request.node).get("app") or request.config.getini("pyncette_app")
    if not spec:
        return None
    if isinstance(spec, Pyncette):
        return spec
    try:
        return load_app(spec)
    except ValueError as error:
        raise pytest.UsageError(f"{request.node.nodeid}: pyncette app {error}") from None


@pytest.fixture
def pyncette_backend(request: pytest.FixtureRequest) -> str | Callable[..., Any]:
    """The backend ``pyncette_app`` runs on: the marker's ``backend=``, else the configured one(s)
    (``--pyncette-backend``, the ini option ``pyncette_backend``), else ``"memory"``. A real backend
    whose server cannot be reached skips the test with the reason, and fails it when ``CI`` is set."""
    marked = _marker_options(request.node).get("backend")
    backend: str | Callable[..., Any] = (
        marked if marked is not None else getattr(request, "param", request.config.stash[_BACKENDS_KEY][0])
    )
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise pytest.UsageError(
                f"{request.node.nodeid}: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}"
            )
        reason = backend_unavailable(backend)
        if reason is not None:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(f"the {backend} backend is required under CI but unavailable: {reason}", pytrace=False)
            pytest.skip(f"{backend}{_UNAVAILABLE}{reason}")
    return backend


@pytest_asyncio.fixture(loop_scope="function")
async def pyncette_app(
    request: pytest.FixtureRequest,
    pyncette_clock: VirtualClock,
    pyncette_target: Pyncette | None,
    pyncette_backend: str | Callable[..., Any],
) -> AsyncIterator[Simulation]:
    """An entered :class:`Simulation` of ``pyncette_target`` on ``pyncette_backend``, on this test's virtual loop."""
    _require_async_test(request, "pyncette_app")
    options = {
        key: value for key, value in _marker_options(request.node).items() if key not in ("start", "app", "backend")
    }
    seed = request.config.getoption("pyncette_seed")
    if seed is not None and "seed" not in options:
        options["seed"] = seed
    async with Simulation(pyncette_target, backend=pyncette_backend, **options) as simulation:
        yield simulation


def _require_async_test(request: pytest.FixtureRequest, fixture: str) -> None:
    if not inspect.iscoroutinefunction(getattr(request, "function", None)):
        requested = [name for name in request.fixturenames if name.startswith(_FIXTURE_PREFIX)]
        fixture = "pyncette_app" if "pyncette_app" in requested else fixture
        pytest.fail(
            f"{fixture} runs on virtual time and needs an async test (async def); "
            "from synchronous code use pyncette_testing.simulate()",
            pytrace=False,
        )
