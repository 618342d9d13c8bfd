"""For every test here: the backend drivers imported up front, and the hypothesis profiles ``ci``
(the default, bounded so that the suite stays fast) and ``dev`` (many more examples); choose with
``HYPOTHESIS_PROFILE=dev pytest``."""

from __future__ import annotations

import contextlib
import importlib
import os

from hypothesis import HealthCheck, settings

# The backend drivers are imported once, here, before any test runs. pytester's in-process runs
# drop every module first imported during them, and asyncpg (0.31 and later) segfaults when it is
# imported again after being dropped (MagicStack/asyncpg#1292): a test that used it inside such a
# run would crash a later one that connects to PostgreSQL.
for _driver in ("asyncpg", "redis.asyncio", "aiosqlite"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_driver)

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
