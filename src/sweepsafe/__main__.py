"""``python -m sweepsafe``: the same as the ``sweepsafe`` command."""

from __future__ import annotations

import sys

from sweepsafe.cli import main

if __name__ == "__main__":
    sys.exit(main())
