"""Run ``sweep.py`` in a child process, follow its events, and kill it like a runtime.

The child runs in its own session, so killing its process group with SIGKILL takes
every process of the "runtime" with it (the sweep and any Drive helper it started), as
when Colab or a preemptible VM dies. Descendants are also found through ``/proc`` and
killed by pid, in case one of them left the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SWEEP_SCRIPT = Path(__file__).with_name("sweep.py")


@dataclass(frozen=True)
class ChildEvent:
    """One line the child printed, with the campaign's own clock when it arrived."""

    name: str
    fields: dict[str, Any]
    received: float

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class ChildSweep:
    """A running ``sweep.py``: its events, its stderr file, and how to end it.

    Starting one starts the process; ``wait`` or ``kill_like_a_dead_runtime`` ends it.
    """

    def __init__(
        self, args: list[str], stderr_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.stderr_path = stderr_path
        self.events: list[ChildEvent] = []
        self._condition = threading.Condition()
        self._ended = False
        self._stderr: IO[bytes] = stderr_path.open("wb")
        environment = {**os.environ, **(env or {})}
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, str(SWEEP_SCRIPT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=environment,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            received = time.monotonic()
            text = raw.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                fields = json.loads(text)
                name = str(fields.pop("event"))
            except (ValueError, KeyError, AttributeError):
                fields, name = {"text": text}, "stdout"
            with self._condition:
                self.events.append(ChildEvent(name, fields, received))
                self._condition.notify_all()
        with self._condition:
            self._ended = True
            self._condition.notify_all()

    def wait_for(
        self, predicate: Callable[[ChildEvent], bool], timeout: float
    ) -> ChildEvent | None:
        """The first event matching ``predicate``; None if the child ended or time ran out."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._condition:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    return None
                self._condition.wait(remaining)

    def wait_for_event(self, name: str, timeout: float, **match: Any) -> ChildEvent | None:
        """The first event called ``name`` whose fields equal ``match``."""
        return self.wait_for(
            lambda event: (
                event.name == name and all(event.get(key) == value for key, value in match.items())
            ),
            timeout,
        )

    def first(self, name: str) -> ChildEvent | None:
        with self._condition:
            return next((event for event in self.events if event.name == name), None)

    def snapshot(self) -> list[ChildEvent]:
        with self._condition:
            return list(self.events)

    def send_line(self, text: str = "go") -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((text + "\n").encode())
        self.process.stdin.flush()

    def kill_like_a_dead_runtime(self) -> float:
        """SIGKILL the child and everything it started; returns when it happened."""
        pids = descendants(self.process.pid)
        killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self._finish()
        return killed_at

    def wait(self, timeout: float) -> int | None:
        """Wait for the child to exit; on timeout kill it and return None."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_like_a_dead_runtime()
            return None
        self._finish()
        return code

    def _finish(self) -> None:
        self._reader.join(timeout=10)
        if self.process.stdin is not None:
            # The child may be gone with input still buffered for it.
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def descendants(root_pid: int) -> list[int]:
    """Every process below ``root_pid`` in the process tree, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the ppid follows it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def pause(seconds: float) -> None:
    """Let ``seconds`` pass before the next step of a campaign (a chosen kill instant)."""
    threading.Event().wait(max(0.0, seconds))
