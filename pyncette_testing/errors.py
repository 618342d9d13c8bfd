"""Exceptions raised by pyncette-testing."""

from __future__ import annotations

__all__ = ["SimulationStalled"]


class SimulationStalled(RuntimeError):
    """The simulation can never make progress: the message lists what every task is waiting on."""
