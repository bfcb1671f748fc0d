"""A simulated slow, failing or stalled Google Drive, for tests and demos."""

from __future__ import annotations

from sweepsafe.testing._simulated import FaultPlan, helper_argv, simulated_store

__all__ = ["FaultPlan", "helper_argv", "simulated_store"]
