"""pyncette-testing: test Pyncette apps without waiting for real time and without a database."""

from __future__ import annotations

from .repository import InMemoryRepository, memory_repository
from .store import InMemoryStore, TaskRecord

__all__ = [
    "InMemoryRepository",
    "InMemoryStore",
    "TaskRecord",
    "memory_repository",
]
