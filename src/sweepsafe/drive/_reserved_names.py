"""The names sweepsafe reserves in a folder, locally and on Drive.

Its temporaries (a file is written under one, then renamed over its target) and its own
state folder. Standard library only: the Drive helper process, run by file path, imports
this module from its own folder.
"""

from __future__ import annotations

import secrets

__all__ = ["STATE_DIR_NAME", "TEMP_PREFIX", "is_temp_name", "new_token", "temp_name"]

TEMP_PREFIX = ".sweepsafe-tmp-"
"""Every temporary file sweepsafe writes is named ``.sweepsafe-tmp-{token}``: a fixed
length (35 bytes), so a temporary never makes a legal name too long."""
STATE_DIR_NAME = ".sweepsafe"
"""sweepsafe's own folder, locally and in every study folder on Drive; never copied."""


def temp_name(token: str) -> str:
    """The name of a temporary written before it replaces its target in the same folder."""
    return TEMP_PREFIX + token


def is_temp_name(name: str) -> bool:
    """True for a sweepsafe temporary (left behind by a killed or failed copy)."""
    return name.startswith(TEMP_PREFIX)


def new_token(tag: str) -> str:
    """A random temporary-name token that starts with the writing runtime's ``tag``."""
    return tag + secrets.token_hex(6)
