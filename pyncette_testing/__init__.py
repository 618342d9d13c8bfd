"""pyncette-testing: test Pyncette apps without waiting for real time and without a database."""

from __future__ import annotations

import pytest

# The assertion helpers (sim.assert_executed, the journal invariants) get pytest's assertion rewriting;
# this must come before those modules are imported.
pytest.register_assert_rewrite("pyncette_testing.simulation", "pyncette_testing.strategies")

from .backends import BACKENDS, IsolatedBackend, backend_unavailable, isolated_backend
from .clock import VirtualClock
from .errors import SimulationStalled
from .journal import Event, Execution, Outcome, Settlement
from .loop import VirtualTimeLoop
from .repository import InMemoryRepository, memory_repository
from .simulation import Simulation, SimulationReport, TaskSummary, Worker, simulate
from .store import InMemoryStore, TaskRecord
from .tracking import track_io

__all__ = [
    "BACKENDS",
    "Event",
    "Execution",
    "InMemoryRepository",
    "InMemoryStore",
    "IsolatedBackend",
    "Outcome",
    "Simulation",
    "SimulationReport",
    "SimulationStalled",
    "Settlement",
    "TaskRecord",
    "TaskSummary",
    "VirtualClock",
    "VirtualTimeLoop",
    "Worker",
    "backend_unavailable",
    "isolated_backend",
    "memory_repository",
    "simulate",
    "track_io",
]
