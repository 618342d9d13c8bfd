"""Hypothesis profiles for every property test here: ``ci`` (the default, bounded so that the suite
stays fast) and ``dev`` (many more examples). Choose with ``HYPOTHESIS_PROFILE=dev pytest``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
