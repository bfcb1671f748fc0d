"""Drive fault campaign: a sweep against a Drive that fails in each way a Drive mount can.

Each scenario runs ``sweep.py`` in a child process against a simulated Drive
and changes the faults while the sweep runs (the simulated Drive re-reads its plan file
before every operation), at the end of given trials:

* eio: every k-th write fails with EIO;
* enospc: the Drive is full for a while, then has room again;
* disconnected: "Transport endpoint is not connected" for a while, then back;
* unmounted: the Drive folder itself vanishes (moved away, as when the mount goes) until
  after the sweep, then comes back;
* replaced: the sweep's Drive folder is deleted and an empty one made in its place (a
  user tidying Drive in the browser): what was already copied must be copied again;
* hang: every Drive operation hangs, longer than the flush timeout, until after the sweep;
* hang at exit: the same, but the process simply exits while the Drive still hangs;
* slow: several seconds per file.

For each, checked with sqlite3 and Optuna: the sweep finishes every trial with no
exception and no FAIL trial ("database is locked" never reaches Optuna); the
end-of-sweep report names what failed (or is complete); after the fault is cleared, a
later ``backup_hpo_study_to_drive`` makes the Drive copy complete; the Drive copy is
never replaced by a worse one (after every phase it passes the integrity check and its
finished-trial count never goes down); and the final flush and the process exit stay
within the flush timeout plus a small margin.

    python -m tools.campaigns.fault          # 20 trials a scenario
    python -m tools.campaigns.fault --quick  # 10 trials, shorter timeouts
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from sweepsafe.testing import FaultPlan
from tools.campaigns.checks import check_database, file_hashes, read_versions, temp_files
from tools.campaigns.child import ChildEvent, ChildSweep

BASE_LATENCY_S = 0.02
EXIT_MARGIN_S = 5.0
"""How far past its timeout a flush, or the process exit, may run."""
CHILD_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Phase:
    """From the end of trial ``after_trial`` on (-1: from the start), Drive behaves so."""

    after_trial: int
    plan: FaultPlan
    mounted: bool = True
    replace_folder: bool = False
    """Move the sweep's Drive folder away for good and leave an empty one in its place."""
    label: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    phases: tuple[Phase, ...]
    fault_at_end: bool
    """The fault is still there when the sweep's final backup runs."""
    report_must_fail: bool
    """The end-of-sweep report must say the copy is incomplete (the fault makes it so)."""
    exit_while_faulty: bool = False
    """The process exits with the fault still there; a new process backs up later."""


@dataclass
class ScenarioResult:
    name: str
    flush_timeout: float
    trials_finished: int = 0
    fail_trials: int = 0
    report_ok: bool | None = None
    report_names: str = ""
    later_backup_ok: bool | None = None
    drive_counts: list[tuple[str, int | None]] = field(default_factory=list)
    flush_s: float | None = None
    exit_s: float | None = None
    max_trial_s: float | None = None
    shadow_files: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def scenarios(n_trials: int, quick: bool) -> list[Scenario]:
    base = FaultPlan(latency_s=BASE_LATENCY_S)
    late = max(3, n_trials - 4)
    slow_s = 1.5 if quick else 3.0
    return [
        Scenario(
            "eio",
            (Phase(-1, FaultPlan(latency_s=BASE_LATENCY_S, fail_every_kth_write=4), label="EIO"),),
            fault_at_end=True,
            report_must_fail=False,
        ),
        Scenario(
            "enospc",
            (
                Phase(-1, base),
                Phase(1, FaultPlan(latency_s=BASE_LATENCY_S, enospc=True), label="ENOSPC"),
                Phase(n_trials // 2, base, label="room again"),
            ),
            fault_at_end=False,
            report_must_fail=False,
        ),
        Scenario(
            "disconnected",
            (
                Phase(-1, base),
                Phase(1, FaultPlan(latency_s=BASE_LATENCY_S, disconnected=True), label="ENOTCONN"),
                Phase(n_trials // 2, base, label="reconnected"),
            ),
            fault_at_end=False,
            report_must_fail=False,
        ),
        Scenario(
            "unmounted",
            (
                Phase(-1, base),
                Phase(1, FaultPlan(latency_s=BASE_LATENCY_S, disconnected=True), label="ENOTCONN"),
                Phase(3, base, mounted=False, label="folder gone"),
            ),
            fault_at_end=True,
            report_must_fail=True,
        ),
        Scenario(
            "replaced",
            (
                Phase(-1, base),
                Phase(n_trials // 2, base, replace_folder=True, label="folder replaced"),
            ),
            fault_at_end=False,
            report_must_fail=False,
        ),
        Scenario(
            "hang",
            (Phase(-1, base), Phase(late, FaultPlan(hang=True), label="hang")),
            fault_at_end=True,
            report_must_fail=True,
        ),
        Scenario(
            "hang at exit",
            (Phase(-1, base), Phase(late, FaultPlan(hang=True), label="hang")),
            fault_at_end=True,
            report_must_fail=True,
            exit_while_faulty=True,
        ),
        Scenario(
            "slow",
            (Phase(-1, base), Phase(1, FaultPlan(latency_s=slow_s), label=f"{slow_s} s a file")),
            fault_at_end=True,
            report_must_fail=False,
        ),
    ]


class DriveWatch:
    """Checks the Drive copy after every phase: sound, and never fewer trials than before.

    Every trial file on Drive must also be a version the local file had (the child logs
    each version's hash before writing it).
    """

    def __init__(
        self, result: ScenarioResult, mount: Path, drive_root: Path, versions_log: Path
    ) -> None:
        self._result = result
        self._mount = mount
        self._drive_root = drive_root
        self._versions_log = versions_log
        self._best = 0
        self._drive_study: Path | None = None

    def forget(self) -> None:
        """The Drive folder was replaced on purpose: counting starts again."""
        self._best = 0

    def locate(self, study_dir: Path, local_root: Path) -> None:
        self._drive_study = self._drive_root / study_dir.relative_to(local_root)

    @property
    def drive_study(self) -> Path | None:
        return self._drive_study

    def check(self, label: str) -> int | None:
        if self._drive_study is None:
            return None
        database = self._drive_study / "study.db"
        if not self._drive_root.exists():
            self._result.drive_counts.append((label, None))
            return None
        versions = read_versions(self._versions_log)
        for relative, digest in file_hashes(self._drive_study / "trials").items():
            if digest not in versions.get(f"trials/{relative}", set()):
                self._result.failures.append(
                    f"{label}: Drive file trials/{relative} matches no version the local file had"
                )
        found = check_database(database)
        if not found.exists:
            if self._best > 0:
                self._result.failures.append(f"{label}: the Drive copy of study.db disappeared")
            self._result.drive_counts.append((label, None))
            return None
        if not found.sound:
            self._result.failures.append(
                f"{label}: Drive study.db unsound: {found.integrity} {found.load_error}"
            )
            return None
        if found.count < self._best:
            self._result.failures.append(
                f"{label}: Drive copy went back from {self._best} to {found.count} trials"
            )
        self._best = max(self._best, found.count)
        self._result.drive_counts.append((label, found.count))
        return found.count


def _set_mounted(mount: Path, aside: Path, shadow: Path, mounted: bool) -> int:
    """Take the Drive folder away or bring it back; returns files written while it was gone."""
    if not mounted:
        if mount.exists():
            mount.rename(aside)
        return 0
    shadow_files = 0
    if aside.exists():
        if mount.exists():
            # Something wrote under the vanished mount: on Colab those files would land on
            # local disk and vanish behind the remounted Drive.
            shadow_files = sum(1 for path in mount.rglob("*") if path.is_file())
            mount.rename(shadow)
        aside.rename(mount)
    return shadow_files


def run_scenario(
    scenario: Scenario, root: Path, n_trials: int, flush_timeout: float, drive_timeout: float
) -> ScenarioResult:
    """Run one scenario in a child process and check it; keep its files if it failed."""
    result = ScenarioResult(name=scenario.name, flush_timeout=flush_timeout)
    work = root / scenario.name.replace(" ", "-")
    _run_and_check(result, scenario, work, n_trials, flush_timeout, drive_timeout)
    for stderr in sorted(work.glob("*.stderr")):
        _check_stderr(result, stderr.read_text(errors="replace"))
    if result.trials_finished != n_trials:
        result.failures.append(f"{result.trials_finished} of {n_trials} trials finished")
    if result.ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        kept = Path(tempfile.gettempdir()) / f"sweepsafe-fault-failed-{work.name}"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(work, kept, symlinks=True)
        (kept / "failure.txt").write_text("\n".join(result.failures) + "\n")
        result.failures.append(f"(its files were kept in {kept})")
    return result


def _run_and_check(
    result: ScenarioResult,
    scenario: Scenario,
    work: Path,
    n_trials: int,
    flush_timeout: float,
    drive_timeout: float,
) -> None:
    local = work / "local"
    # The mount point stays; what vanishes is the folder inside it, as with Drive's MyDrive.
    mount = work / "drive" / "MyDrive"
    drive_root = mount / "sweeps"
    aside, shadow = work / "MyDrive-unmounted", work / "MyDrive-shadow"
    for folder in (local, drive_root):
        folder.mkdir(parents=True)
    plan_path = work / "fault-plan.json"
    scenario.phases[0].plan.write(plan_path)
    versions_log = work / "versions.jsonl"
    watch = DriveWatch(result, mount, drive_root, versions_log)
    backup_timeout = max(30.0, 4 * flush_timeout)
    args = [
        "--local-root",
        str(local),
        "--drive-root",
        str(drive_root),
        "--plan",
        str(plan_path),
        "--n-trials",
        str(n_trials),
        "--max-kib",
        "64",
        "--versions-log",
        str(versions_log),
        "--flush-timeout",
        str(flush_timeout),
        "--drive-timeout",
        str(drive_timeout),
        "--backup-timeout",
        str(backup_timeout),
        "--pause-after",
        *(str(phase.after_trial) for phase in scenario.phases if phase.after_trial >= 0),
        "--after-sweep",
        "exit" if scenario.exit_while_faulty else "backup-on-go",
    ]
    child = ChildSweep(args, stderr_path=work / "child.stderr")
    called = child.wait_for_event("run_sweep_called", CHILD_START_TIMEOUT_S)
    if called is None:
        child.wait(5)
        result.failures.append(f"the sweep did not start: {child.stderr_text()[-800:]}")
        return
    watch.locate(Path(called.get("study_dir")), local)

    for previous, phase in zip(scenario.phases, scenario.phases[1:], strict=False):
        # The child waits after this trial until told to go on: no race with the sweep.
        event = child.wait_for_event("paused", CHILD_START_TIMEOUT_S, number=phase.after_trial)
        if event is None:
            result.failures.append(f"trial {phase.after_trial} never finished")
            break
        watch.check(f"after {previous.label or 'start'}")
        phase.plan.write(plan_path)
        result.shadow_files += _set_mounted(mount, aside, shadow, phase.mounted)
        if phase.replace_folder:
            drive_root.rename(work / "sweeps-deleted")
            drive_root.mkdir()
            watch.forget()
        child.send_line("go")

    sweep_timeout = n_trials * 2.0 + flush_timeout + 60
    returned = child.wait_for_event("sweep_returned", sweep_timeout)
    final_flush = child.first("final_flush")
    if returned is None:
        child.wait(5)
        result.failures.append(
            f"the sweep did not return within {sweep_timeout:.0f} s: {child.stderr_text()[-800:]}"
        )
        _set_mounted(mount, aside, shadow, True)
        return
    if final_flush is not None:
        result.flush_s = returned.received - final_flush.received
    watch.check(f"end of sweep ({scenario.phases[-1].label or 'no fault'})")
    _check_sweep(result, scenario, returned, child, flush_timeout)

    # The fault goes away; a later backup must make the Drive copy complete.
    FaultPlan().write(plan_path)
    result.shadow_files += _set_mounted(mount, aside, shadow, True)
    if scenario.exit_while_faulty:
        code = child.wait(flush_timeout + 120)
        exit_from = final_flush or returned
        result.exit_s = time.monotonic() - exit_from.received if code is not None else None
        _check_exit(result, code, flush_timeout)
        later = ChildSweep([*args[:-1], "exit"], stderr_path=work / "later.stderr")
        later_code = later.wait(backup_timeout + 60)
        later_returned = later.first("sweep_returned")
        later_report = later_returned.get("report") if later_returned is not None else None
        if later_code != 0:
            result.failures.append(f"the later run failed: {later.stderr_text()[-800:]}")
    else:
        child.send_line("go")
        backup = child.wait_for_event("backup_returned", backup_timeout + 30)
        later_report = backup.get("report") if backup is not None else None
        if backup is None:
            result.failures.append("the later backup did not return")
        code = child.wait(flush_timeout + 120)
        if backup is not None and code is not None:
            result.exit_s = time.monotonic() - backup.received
        _check_exit(result, code, flush_timeout)
    result.later_backup_ok = bool(later_report and later_report.get("ok"))
    if not result.later_backup_ok:
        text = later_report.get("text") if later_report else None
        result.failures.append(f"the later backup did not complete the Drive copy: {text}")
    final = watch.check("after the later backup")
    if final is not None and final != n_trials:
        result.failures.append(f"the Drive copy holds {final} finished trials, not {n_trials}")
    if watch.drive_study is not None:
        _check_final_files(result, watch.drive_study, Path(called.get("study_dir")), drive_root)
    if result.shadow_files:
        result.failures.append(
            f"{result.shadow_files} file(s) were written under the vanished Drive folder"
        )


def _check_sweep(
    result: ScenarioResult,
    scenario: Scenario,
    returned: ChildEvent,
    child: ChildSweep,
    flush_timeout: float,
) -> None:
    states: dict[str, int] = returned.get("states") or {}
    result.trials_finished = states.get("COMPLETE", 0)
    result.fail_trials = states.get("FAIL", 0)
    if result.fail_trials:
        result.failures.append(f"{result.fail_trials} trial(s) FAILED")
    durations = [
        event.get("duration_s")
        for event in child.snapshot()
        if event.name == "trial_done" and event.get("duration_s") is not None
    ]
    result.max_trial_s = max(durations, default=None)
    report = returned.get("report") or {}
    result.report_ok = bool(report.get("ok"))
    text = str(report.get("text") or "")
    if not result.report_ok:
        failed = [target for target in report.get("targets", []) if not target.get("ok")]
        named = [Path(target["target"]).name for target in failed if target["target"] in text]
        result.report_names = ", ".join(named) or text.splitlines()[0] if text else ""
        unnamed = [target["target"] for target in failed if target["target"] not in text]
        if unnamed:
            result.failures.append(f"the report does not name {unnamed}")
        if not failed and "INCOMPLETE" not in text:
            result.failures.append(f"the report is not ok but does not say why: {text}")
    elif scenario.report_must_fail:
        result.failures.append(f"the report claims a complete copy despite the fault: {text}")
    if result.flush_s is not None and result.flush_s > flush_timeout + EXIT_MARGIN_S:
        result.failures.append(
            f"the final backup took {result.flush_s:.1f} s, past its {flush_timeout} s timeout"
        )


def _check_exit(result: ScenarioResult, code: int | None, flush_timeout: float) -> None:
    if code is None:
        result.failures.append("the process did not exit (killed)")
    elif code != 0:
        result.failures.append(f"the process exited with {code}")
    limit = flush_timeout + EXIT_MARGIN_S
    if result.exit_s is not None and result.exit_s > limit:
        result.failures.append(
            f"the process took {result.exit_s:.1f} s to exit (limit {limit:.0f} s)"
        )


def _check_final_files(
    result: ScenarioResult, drive_study: Path, study_dir: Path, drive_root: Path
) -> None:
    local_files = file_hashes(study_dir / "trials")
    drive_files = file_hashes(drive_study / "trials")
    differing = [name for name, digest in local_files.items() if drive_files.get(name) != digest]
    if differing:
        result.failures.append(
            f"{len(differing)} trial file(s) missing or different on Drive: {differing[:3]}"
        )
    leftovers = temp_files(drive_root)
    if leftovers:
        result.failures.append(f"{len(leftovers)} temporary file(s) left on Drive")


def _check_stderr(result: ScenarioResult, stderr: str) -> None:
    for needle in ("Traceback", "database is locked"):
        if needle in stderr:
            result.failures.append(f"stderr holds {needle!r}")


def campaign_settings(quick: bool) -> tuple[int, float, float]:
    """(trials a scenario, flush timeout, Drive step timeout)."""
    return (10, 3.0, 1.5) if quick else (20, 8.0, 4.0)


def run_campaign(
    quick: bool = False, verbose: bool = True, only: Sequence[str] | None = None
) -> list[ScenarioResult]:
    """Run every scenario (or those named in ``only``); print a table."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_trials, flush_timeout, drive_timeout = campaign_settings(quick)
    results = []
    with tempfile.TemporaryDirectory(prefix="sweepsafe-faults-") as tmp:
        root = Path(tmp)
        for scenario in scenarios(n_trials, quick):
            if only is not None and scenario.name not in only:
                continue
            result = run_scenario(scenario, root, n_trials, flush_timeout, drive_timeout)
            results.append(result)
            if verbose:
                print(_describe(result), flush=True)
    if verbose:
        print(table(results), flush=True)
    return results


def _describe(result: ScenarioResult) -> str:
    counts = ", ".join(f"{label}: {count}" for label, count in result.drive_counts)
    verdict = "ok" if result.ok else "FAILED: " + " | ".join(result.failures)
    return f"{result.name}: Drive trials [{counts}]  {verdict}"


def table(results: list[ScenarioResult]) -> str:
    header = (
        f"{'fault':<13} {'trials':>6} {'FAIL':>4} {'report at end':<34} {'later':>5} "
        f"{'flush s':>7} {'exit s':>6} {'max trial s':>11}  verdict"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        report = "complete" if r.report_ok else f"names: {r.report_names}"[:34]
        later = "ok" if r.later_backup_ok else "NO"
        flush = "-" if r.flush_s is None else f"{r.flush_s:.2f}"
        exit_s = "-" if r.exit_s is None else f"{r.exit_s:.2f}"
        trial = "-" if r.max_trial_s is None else f"{r.max_trial_s:.3f}"
        lines.append(
            f"{r.name:<13} {r.trials_finished:>6} {r.fail_trials:>4} {report:<34} {later:>5} "
            f"{flush:>7} {exit_s:>6} {trial:>11}  {'ok' if r.ok else 'FAILED'}"
        )
    if results:
        lines.append(f"flush timeout {results[0].flush_timeout} s, margin {EXIT_MARGIN_S} s")
    return "\n".join(lines)


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """One benchmark row per fault: survived or not, and its flush time vs the timeout."""
    results = run_campaign(quick=quick, verbose=False)
    rows = []
    for r in results:
        rows.append(
            {
                "name": f"fault campaign: {r.name} (final flush vs flush timeout)",
                "value": None if r.flush_s is None else round(r.flush_s, 2),
                "unit": "s",
                "reference": r.flush_timeout,
                "ratio": None if r.flush_s is None else round(r.flush_s / r.flush_timeout, 2),
                "goal": "survived: every trial, no FAIL, named in report, later backup complete",
                "met": r.ok,
                "note": "; ".join(r.failures),
            }
        )
        if r.exit_s is not None and r.name == "hang at exit":
            rows.append(
                {
                    "name": "fault campaign: process exit with Drive hung, from the final "
                    "flush, vs flush timeout",
                    "value": round(r.exit_s, 2),
                    "unit": "s",
                    "reference": r.flush_timeout,
                    "ratio": round(r.exit_s / r.flush_timeout, 2),
                    "goal": f"<= timeout + {EXIT_MARGIN_S:g} s",
                    "met": r.exit_s <= r.flush_timeout + EXIT_MARGIN_S,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, shorter timeouts")
    parser.add_argument("--only", nargs="*", default=None, help="run only these scenarios")
    args = parser.parse_args(argv)
    results = run_campaign(quick=args.quick, only=args.only)
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
