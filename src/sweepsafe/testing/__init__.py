"""Stand-ins for a slow, failing or stalled Google Drive, for your tests and ours.

Two of them obey the same :class:`FaultPlan` (latency, I/O errors, a full or
disconnected Drive, a hang), re-read before every operation so faults can change while
a sweep runs:

- :func:`simulated_store`: a real :class:`~sweepsafe.DriveStore` whose helper processes
  inject the faults into a local folder. No privileges needed.
- :class:`FuseDrive`: a real FUSE mount serving a local folder, whose faults happen in
  the kernel as on a stalled Drive mount: a process stuck on it survives ``SIGKILL``.
  Needs ``/dev/fuse``, Debian's ``fuse3`` and ``libfuse2``, and ``fusepy``
  (see :func:`fuse_unavailable_reason`).

:func:`reset_default_worker` closes and forgets the process-wide backup worker, for an
autouse fixture, so that no test inherits another's worker.

Example:
    >>> plan = tmp_path / "plan.json"  # doctest: +SKIP
    >>> FaultPlan(latency_s=0.5).write(plan)  # doctest: +SKIP
    >>> store = simulated_store(tmp_path / "local", tmp_path / "drive", plan)  # doctest: +SKIP
    >>> FaultPlan(disconnected=True).write(plan)   # Drive drops out  # doctest: +SKIP
"""

from __future__ import annotations

from sweepsafe.testing._fuse_drive import FuseDrive, fuse_unavailable_reason
from sweepsafe.testing._simulated import FaultPlan, helper_argv, simulated_store
from sweepsafe.worker._worker import reset_default_worker

__all__ = [
    "FaultPlan",
    "FuseDrive",
    "fuse_unavailable_reason",
    "helper_argv",
    "reset_default_worker",
    "simulated_store",
]
