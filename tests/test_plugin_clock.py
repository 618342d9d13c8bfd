"""The pytest plugin's virtual-time wiring, exercised on throw-away test projects (pytester)."""

from __future__ import annotations

import pytest

from .conftest import run_inner

TESTS = """
import asyncio, datetime, time
import pytest
from pyncette_testing import VirtualTimeLoop

UTC = datetime.timezone.utc

@pytest.mark.pyncette
async def test_marker_alone():
    assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
    before = time.time()
    await asyncio.sleep(3600)
    assert time.time() - before == 3600

async def test_fixture_alone(pyncette_clock):
    assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
    await pyncette_clock.advance(datetime.timedelta(days=1))
    assert pyncette_clock.elapsed == datetime.timedelta(days=1)

@pytest.mark.asyncio
async def test_not_opted_in_keeps_its_loop():
    assert not isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
    assert abs(time.time() - datetime.datetime.now(UTC).timestamp()) < 5
    assert datetime.datetime.now(UTC).year >= 2025
"""


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_opt_in_by_marker_or_fixture_in_both_modes(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makepyfile(test_it=TESTS)
    result = run_inner(pytester, f"--asyncio-mode={mode}")
    result.assert_outcomes(passed=3)


def test_start_comes_from_marker_then_ini_then_command_line_then_default(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_start="""
        import datetime
        import pytest

        @pytest.mark.pyncette(start="2030-05-06T07:08:09+02:00")
        async def test_marker(pyncette_clock):
            assert pyncette_clock.start == datetime.datetime(2030, 5, 6, 5, 8, 9, tzinfo=datetime.timezone.utc)
            assert datetime.datetime.now(datetime.timezone.utc) == pyncette_clock.start

        async def test_configured(pyncette_clock, expected_start):
            assert pyncette_clock.start == expected_start
        """
    )
    conftest = """
        import datetime, os, pytest

        @pytest.fixture
        def expected_start():
            return datetime.datetime.fromisoformat(os.environ["EXPECTED_START"])
        """
    pytester.makeconftest(conftest)

    def run(expected: str, *args: str) -> None:
        pytester._monkeypatch.setenv("EXPECTED_START", expected)  # type: ignore[attr-defined]
        run_inner(pytester, *args).assert_outcomes(passed=2)

    run("2024-01-01T00:00:00+00:00")
    run("2011-01-01T00:00:00+00:00", "--pyncette-start=2011-01-01T00:00:00Z")
    pytester.makeini("[pytest]\npyncette_start = 2012-06-01T00:00:00+00:00\n")
    run("2012-06-01T00:00:00+00:00", "--pyncette-start=2011-01-01T00:00:00Z")


@pytest.mark.parametrize(
    ("where", "value"),
    [("marker", "2024-01-01T00:00:00"), ("marker", "yesterday"), ("cli", "2024-01-01 00:00"), ("ini", "soon")],
)
def test_naive_or_unparsable_start_is_a_usage_error(pytester: pytest.Pytester, where: str, value: str) -> None:
    marker = f"@pytest.mark.pyncette(start={value!r})" if where == "marker" else "@pytest.mark.pyncette"
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        {marker}
        async def test_it():
            pass
        """
    )
    args: list[str] = []
    if where == "cli":
        args.append(f"--pyncette-start={value}")
    if where == "ini":
        pytester.makeini(f"[pytest]\npyncette_start = {value}\n")
    result = run_inner(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ERROR:*" + ("naive" if "T00" in value or ":" in value else "ISO-8601") + "*"])


def test_other_loop_factories_pass_through_for_tests_that_do_not_opt_in(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import asyncio, pytest

        class CustomLoop(asyncio.SelectorEventLoop):
            pass

        def pytest_asyncio_loop_factories(config, item):
            return {"custom": CustomLoop}
        """
    )
    pytester.makepyfile(
        test_it="""
        import asyncio, pytest
        from pyncette_testing import VirtualTimeLoop

        @pytest.mark.asyncio
        async def test_custom():
            assert type(asyncio.get_running_loop()).__name__ == "CustomLoop"

        @pytest.mark.pyncette
        async def test_virtual():
            assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
        """
    )
    run_inner(pytester).assert_outcomes(passed=2)


def test_sync_test_requesting_the_clock_gets_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_sync="""
        def test_sync(pyncette_clock):
            pass
        """
    )
    result = run_inner(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs an async test*simulate()*"])


def test_each_test_gets_a_fresh_loop_and_clock_in_random_order_and_in_parallel(pytester: pytest.Pytester) -> None:
    body = "\n".join(
        f"""
@pytest.mark.pyncette(start="20{10 + i}-01-01T00:00:00Z")
async def test_{i}(pyncette_clock):
    loop = asyncio.get_running_loop()
    assert all(loop is not seen for seen in SEEN_LOOPS)
    SEEN_LOOPS.append(loop)  # kept alive: a collected loop's id() could be reused by the next one
    assert loop.time() < 1
    assert datetime.datetime.now(datetime.timezone.utc).year == {2010 + i}
    await pyncette_clock.advance(datetime.timedelta(days=400))
    assert datetime.datetime.now(datetime.timezone.utc).year == {2011 + i}

def test_sync_{i}():
    assert datetime.datetime.now(datetime.timezone.utc).year >= 2025
"""
        for i in range(8)
    )
    pytester.makepyfile(test_many="import asyncio, datetime, pytest\nSEEN_LOOPS = []\n" + body)
    result = run_inner(pytester, "-p", "randomly", "-n", "2", subprocess=True)
    result.assert_outcomes(passed=16)


def test_marker_in_strict_mode_selects_our_loop_factory_by_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_it="""
        import asyncio, pytest
        from pyncette_testing import VirtualTimeLoop

        @pytest.mark.pyncette
        @pytest.mark.asyncio(loop_factories=["pyncette"])
        async def test_it():
            assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
        """
    )
    run_inner(pytester).assert_outcomes(passed=1)
