"""pyncette-testing: test Pyncette apps without waiting for real time and without a database."""

from __future__ import annotations

from .clock import VirtualClock
from .errors import SimulationStalled
from .io import track_io
from .loop import VirtualTimeLoop
from .repository import InMemoryRepository, memory_repository
from .store import InMemoryStore, TaskRecord

__all__ = [
    "InMemoryRepository",
    "InMemoryStore",
    "SimulationStalled",
    "TaskRecord",
    "VirtualClock",
    "VirtualTimeLoop",
    "memory_repository",
    "track_io",
]
