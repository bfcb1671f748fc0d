"""The ``sweepsafe`` command."""

from __future__ import annotations

from sweepsafe.cli._main import main

__all__ = ["main"]
