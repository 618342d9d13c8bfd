"""pytest plugin: fixtures and markers for testing Pyncette apps (registered via ``pytest11``)."""

from __future__ import annotations

import pytest

from .store import InMemoryStore


@pytest.fixture
def pyncette_store() -> InMemoryStore:
    """A fresh, empty :class:`InMemoryStore` for this test."""
    return InMemoryStore()
