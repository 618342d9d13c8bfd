"""Shared helpers for our own tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyncette_testing import VirtualTimeLoop

# Inner pytest runs (pytester) do not need hypothesis' plugin, whose import costs seconds when
# bytecode caching is off, nor random ordering unless a test asks for it.
INNER_ARGS = ("-p", "no:hypothesispytest", "-o", "asyncio_default_fixture_loop_scope=function")


def run_inner(pytester: pytest.Pytester, *args: str, subprocess: bool = False) -> pytest.RunResult:
    """Run pytest on a pytester project with our defaults (no random order unless ``-p randomly``)."""
    extra = () if "randomly" in args else ("-p", "no:randomly")
    runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    return runner(*INNER_ARGS, *extra, *args)


@pytest.fixture
def loop() -> Iterator[VirtualTimeLoop]:
    """A virtual-time loop owned by the test (closed after it), with a short stall grace."""
    loop = VirtualTimeLoop(stall_timeout=0.2)
    yield loop
    loop.close()
