"""A property test that finds the double charge: hypothesis searches the crashes and faults."""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import invariant

from examples.charging import app as charging
from pyncette_testing.strategies import PyncetteStateMachine, no_overlapping_runs


class Billing(PyncetteStateMachine):
    """Two workers, any schedule of time, crashes, restarts and storage faults: nobody is ever
    charged twice for the same month."""

    workers = 2

    def __init__(self) -> None:
        charging.PROVIDER.__init__()  # a fresh provider for each example
        super().__init__()

    @invariant()
    def nobody_is_charged_twice_for_a_slot(self) -> None:
        charges = collections.Counter(charging.PROVIDER.charges)
        twice = {charge: count for charge, count in charges.items() if count > 1}
        assert not twice, f"charged more than once: {twice}\n{self.simulation.timeline()}"


class BuggyBilling(Billing):
    app = charging.buggy_app
    checks = (no_overlapping_runs("charge_subscriptions"),)
    fault_kinds = ("crash",)  # crashes alone are enough to find it


class FixedBilling(Billing):
    app = charging.fixed_app
    checks = (no_overlapping_runs("charge_subscriptions"),)


# the ci or dev profile (see conftest.py) sets how many examples; each runs up to 12 steps
PROPERTY = settings(settings.default, stateful_step_count=12, suppress_health_check=list(HealthCheck))

TestFixedBilling = FixedBilling.TestCase
TestFixedBilling.settings = PROPERTY


@pytest.mark.xfail(
    raises=AssertionError, strict=True, reason="the buggy app double-charges after a crash between charge and commit"
)
def test_the_buggy_app_double_charges() -> None:
    # Derandomized, with room to search: the same search on every run, so that finding the bug does
    # not depend on luck, on pytest-randomly's seed or on a local example database. It stops at the
    # first failure, which comes early; shrinking it (to "advance(3600); crash_worker(0); advance(30)",
    # as the README's version of this search does) would take four times as long as finding it.
    BuggyBilling.TestCase.settings = settings(
        PROPERTY, max_examples=1000, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate]
    )
    BuggyBilling.TestCase().runTest()
