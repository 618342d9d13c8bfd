"""The pyncette_app fixture: which app it simulates, marker keywords, misuse."""

from __future__ import annotations

import pytest

from .conftest import run_inner

APP_MODULE = """
import datetime
from pyncette import Pyncette

app = Pyncette(poll_interval=datetime.timedelta(seconds=10))

@app.task(interval=datetime.timedelta(minutes=1))
async def heartbeat(context):
    pass

not_an_app = 42
"""


def test_marker_ini_and_target_fixture_choose_the_app(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP_MODULE)
    pytester.makeini("[pytest]\npyncette_app = myapp:app\n")
    pytester.makepyfile(
        test_it="""
        import datetime
        import pytest
        import myapp

        async def test_ini_app(pyncette_app):
            await pyncette_app.advance(minutes=3)
            pyncette_app.assert_executed(myapp.heartbeat, 3)

        @pytest.mark.pyncette(app="myapp.py:app", start="2020-01-01T00:00:00Z", poll_interval=30, seed=5)
        async def test_marker_app_and_keywords(pyncette_app):
            assert pyncette_app.seed == 5
            assert pyncette_app.now == datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
            await pyncette_app.advance(minutes=3)
            runs = pyncette_app.assert_executed("heartbeat", 3)
            assert pyncette_app.workers[0].app._poll_interval == datetime.timedelta(seconds=30)

        class TestOverride:
            @pytest.fixture
            def pyncette_target(self):
                from pyncette import Pyncette
                return Pyncette()

            async def test_fresh_app_for_inline_tasks(self, pyncette_app):
                @pyncette_app.task(interval=datetime.timedelta(seconds=1))
                async def inline(context):
                    pass

                await pyncette_app.advance(seconds=3)
                pyncette_app.assert_executed(inline, 3)
                with pytest.raises(ValueError, match="unknown task 'heartbeat'"):
                    pyncette_app.executions("heartbeat")
        """
    )
    run_inner(pytester).assert_outcomes(passed=3)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule:app", "no module named 'nosuchmodule'"),
        ("myapp:missing", "has no attribute 'missing'"),
        ("myapp:not_an_app", "is a int, not a Pyncette app"),
        ("nowhere/app.py:app", "no such file"),
    ],
)
def test_a_bad_app_target_is_a_clear_usage_error(pytester: pytest.Pytester, target: str, message: str) -> None:
    pytester.makepyfile(myapp=APP_MODULE)
    pytester.makepyfile(
        test_it=f"""
        import pytest

        @pytest.mark.pyncette(app={target!r})
        async def test_it(pyncette_app):
            pass
        """
    )
    result = run_inner(pytester)
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*{message}*"])


def test_a_sync_test_is_pointed_to_simulate(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_it="""
        def test_sync(pyncette_app):
            pass
        """
    )
    result = run_inner(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pyncette_app runs on virtual time and needs an async test*simulate()*"])


def test_the_fixture_simulation_ends_with_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_it="""
        import datetime
        KEPT = []

        async def test_first(pyncette_app):
            KEPT.append(pyncette_app)

        def test_second():
            import pytest
            sim = KEPT[0]
            assert "ended" in repr(sim)
            assert datetime.datetime.now(datetime.timezone.utc).year >= 2025
        """
    )
    run_inner(pytester).assert_outcomes(passed=2)
