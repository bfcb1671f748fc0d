"""A Drive helper that stops for good at one chosen Drive-side operation, for kill tests.

Run as ``python -I kill_point_helper.py CONFIG``. ``CONFIG`` is a JSON file with
``op`` (``"commit"`` for the moment before a written file replaces its target, or an
operation name such as ``"remove"``), ``pattern`` (``fnmatch`` on the Drive path),
``skip`` (matching operations let through first) and ``marker`` (a file). At the chosen
operation the helper writes ``{"pid", "op", "path"}`` to the marker and blocks forever,
so a test can SIGKILL the runtime (or this helper) at exactly that instant. Once the
marker exists, the helper stops nowhere: the next runtime runs against a sound Drive.
Imports only the standard library, like the real helper.
"""

from __future__ import annotations

import fcntl
import fnmatch
import importlib.util
import json
import os
import sys
import threading
from typing import Any


def main(config_path: str) -> int:
    try:
        with open(config_path, encoding="utf-8") as file:
            config: dict[str, Any] = json.load(file)
    except FileNotFoundError:
        config = {"op": "", "pattern": "", "marker": config_path + ".marker"}
    helper_file = os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        os.pardir,
        "src",
        "sweepsafe",
        "drive",
        "_helper_process.py",
    )
    spec = importlib.util.spec_from_file_location("_helper_process", helper_file)
    assert spec is not None
    assert spec.loader is not None
    drive_helper: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drive_helper)
    marker = str(config["marker"])
    counter = marker + ".count"

    def stop_if_chosen(op: str, path: str) -> None:
        if op != config["op"] or not fnmatch.fnmatch(path, config["pattern"]):
            return
        if os.path.exists(marker):
            return
        # Helpers may run side by side: the count is kept under a lock.
        with open(counter, "a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            file.seek(0)
            seen = len(file.read())
            file.write("x")
            file.flush()
        if seen < int(config.get("skip", 0)):
            return
        temp = marker + f".{os.getpid()}"
        with open(temp, "w", encoding="utf-8") as file:
            json.dump({"pid": os.getpid(), "op": op, "path": path}, file)
        os.replace(temp, marker)
        threading.Event().wait()

    class StopAtOneOperation(drive_helper.FaultHooks):  # type: ignore[misc,name-defined]
        def before(self, op: str, path: str) -> None:
            stop_if_chosen(op, path)

        def on_commit(self, path: str) -> None:
            stop_if_chosen("commit", path)

    result: int = drive_helper.serve(StopAtOneOperation())
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
