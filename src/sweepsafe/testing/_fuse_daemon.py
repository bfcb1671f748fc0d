"""The daemon that serves a FuseDrive mount, run as a script by file path.

:class:`~sweepsafe.testing.FuseDrive` starts it with ``python -I``, so it must not
import the sweepsafe package (it would find another copy, or none): it loads the two
modules it needs beside it, ``_fuse_ops`` (the file system operations) and
``_fuse_drive`` (the mount table), by their file paths. Their top levels, like its own,
import only the standard library, and the daemon imports only fusepy besides.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any


def _load_sibling(name: str) -> Any:
    """The module ``name`` of this folder, loaded by its file path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from sweepsafe.testing._fuse_drive import _INSTALL_HINT, _mounts, _unmount_commands
    from sweepsafe.testing._fuse_ops import _Passthrough, _Plan, _Stats
else:
    _drive = _load_sibling("_fuse_drive")
    _INSTALL_HINT = _drive._INSTALL_HINT
    _mounts = _drive._mounts
    _unmount_commands = _drive._unmount_commands
    _ops = _load_sibling("_fuse_ops")
    _Passthrough = _ops._Passthrough
    _Plan = _ops._Plan
    _Stats = _ops._Stats


def _watch_lifeline(
    fd: int, mount_point: str, fsname: str, stats: _Stats, state_dir: str | None
) -> None:
    """Unmounts and exits once the FuseDrive that started this daemon is gone.

    ``state_dir``, if given, is a temporary folder its owner would have removed.
    """
    while os.read(fd, 1):
        pass
    if state_dir is not None:
        # Before unmounting: once unmounted, the main thread may end the process.
        stats.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    for command in _unmount_commands():
        # A lazy unmount only detaches the mount, so it does not wait on hung requests;
        # exiting then aborts the connection and frees them.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [*command, mount_point],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=5,
                check=False,
            )
        if all(source != fsname for source, _ in _mounts()):
            break
    os._exit(0)


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Serve a FuseDrive mount.")
    parser.add_argument("--backing", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--fsname", required=True)
    parser.add_argument("--lifeline-fd", type=int, default=-1)
    parser.add_argument("--remove-state-when-orphaned", action="store_true")
    args = parser.parse_args(argv)

    # Blocked before any thread starts, so every thread inherits the mask and only the
    # stats thread (sigtimedwait) ever takes SIGUSR1.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        # Imported here, never by the library side: fusepy loads libfuse on import.
        fuse: Any = importlib.import_module("fuse")
    except (ImportError, OSError) as exc:
        print(f"cannot import fusepy: {exc}; {_INSTALL_HINT}", file=sys.stderr)
        return 3
    if not hasattr(fuse, "FUSE"):
        print(f"the module named fuse at {fuse.__file__} is not fusepy", file=sys.stderr)
        return 3

    stats = _Stats(args.stats)
    stats.write()
    threading.Thread(target=stats.serve, name="stats", daemon=True).start()
    if args.lifeline_fd >= 0:
        threading.Thread(
            target=_watch_lifeline,
            args=(
                args.lifeline_fd,
                args.mount,
                args.fsname,
                stats,
                os.path.dirname(args.stats) if args.remove_state_when_orphaned else None,
            ),
            daemon=True,
        ).start()
    operations = _Passthrough(args.backing, _Plan(args.plan), stats)
    fuse.FUSE(
        operations,
        args.mount,
        foreground=True,
        raw_fi=True,
        fsname=args.fsname,
        # Without big_writes libfuse 2 gets writes 4 KiB at a time.
        big_writes=True,
        hard_remove=True,
        # No kernel caching of names or attributes: every lookup reaches the daemon,
        # so a fault takes effect on the very next operation.
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )
    stats.write()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
