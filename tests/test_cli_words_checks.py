"""The command as a user types it from the docs, with the usual slips, against a Drive
folder that was damaged by hand: one line that says what, where and what to do, and the
documented exit status.

Every study is a real Optuna study in a real SQLite file, backed up by a real store into
a Drive folder on local disk, and every command runs in a real subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from cli_support import TINY_OBJECTIVE, assert_one_error_line, finished_numbers, run_cli
from drive_support import simulated_drive
from sweepsafe.testing import FaultPlan, FuseDrive, fuse_unavailable_reason, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Backed:
    """A study backed up as generations 1 (a base) to 3 (patches), with its trial folder."""

    local: Path
    drive: Path
    database: Path

    @property
    def roots(self) -> list[str]:
        return ["--local-root", str(self.local), "--drive-root", str(self.drive)]

    @property
    def history(self) -> Path:
        return self.drive / "study-1" / ".sweepsafe" / "history" / "study.db"

    def newest_patch(self) -> Path:
        return max(self.history.glob("*.patch"))


@pytest.fixture
def backed(tmp_path: Path) -> Backed:
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "study-1"
        database = folder / "study.db"
        (folder / "trials" / "trial-00000").mkdir(parents=True)
        (folder / "trials" / "trial-00000" / "weights.txt").write_text("w\n")
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        for round_ in range(3):
            study.tell(study.ask(), float(10 - round_))
            result = setup.store.backup(database)
            assert result.ok, result.error
        del study
        assert setup.store.backup(folder, is_directory=True).ok
        setup.store.release()  # the sweep is over: the command may take the study
    return Backed(setup.local, setup.drive, database)


def test_status_of_a_drive_copy_whose_newest_generation_cannot_be_rebuilt_exits_1(
    backed: Backed,
) -> None:
    """``status`` marks the copy INCOMPLETE and, as ``verify`` does, exits 1: a status of 0
    would tell a script the Drive copy is fine to resume from."""
    backed.newest_patch().write_bytes(b"")

    result = run_cli("status", backed.drive)
    assert result.returncode == 1, result
    assert "INCOMPLETE" in result.stdout
    assert "cannot be rebuilt" in result.stdout

    as_json = run_cli("status", "--json", backed.drive)
    assert as_json.returncode == 1, as_json
    (database,) = json.loads(as_json.stdout)["databases"]
    assert (database["check"], database["complete"]) == ("INCOMPLETE", False)

    verified = run_cli("verify", backed.drive / "study-1")
    assert verified.returncode == 1
    assert_one_error_line(verified, "cannot be rebuilt")


def test_status_and_verify_say_when_their_counts_are_of_an_older_generation(
    backed: Backed,
) -> None:
    """Mid-sweep, the plain study.db on Drive is the last full copy (1 trial) while the
    newest generation holds 3: the counts shown must not read as the study's state."""
    result = run_cli("status", backed.drive)
    assert result.returncode == 0, result
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("study-1 ")]
    assert row.split()[-2:] == ["1/3", "ok"], row
    assert (
        "study-1: the counts are of generation 1, the plain study.db (written whole at the end "
        "of each sweep); the newest generation is 3, which holds 3 finished trials, and a "
        "restore rebuilds it." in result.stdout
    ), result.stdout
    (database,) = json.loads(run_cli("status", "--json", backed.drive).stdout)["databases"]
    assert (database["generation"], database["newest_generation"]) == (1, 3)
    assert database["newest_finished_trials"] == 3

    verified = run_cli("verify", backed.drive / "study-1")
    assert verified.returncode == 0, verified
    assert "the newest generation is 3, which holds 3 finished trials" in verified.stdout


def test_restore_of_a_study_already_in_sync_counts_its_finished_trials(backed: Backed) -> None:
    """Restoring a study the local disk already holds in full keeps it, and says how many
    finished trials it holds, not 0."""
    result = run_cli("restore", backed.database, *backed.roots)
    assert result.returncode == 0, result.stderr
    assert "3 finished trials" in result.stdout, result.stdout
    assert "0 finished trials" not in result.stdout
    assert "kept the local study.db" in result.stdout
    assert finished_numbers(backed.database) == [0, 1, 2]


def test_folder_restore_past_a_damaged_newest_generation_names_the_command_that_works(
    backed: Backed,
) -> None:
    """The way out it suggests is a command that runs as written: ``--generation`` with
    the database's path (a folder's restore refuses ``--generation``), and it does not
    claim that nothing was restored when the folder's other files were."""
    backed.newest_patch().write_bytes(b"")
    shutil.rmtree(backed.database.parent)

    result = run_cli("restore", backed.database.parent, *backed.roots)
    assert result.returncode == 1
    line = assert_one_error_line(result, "generation 2 is the newest that can")
    assert f"sweepsafe restore {backed.database} --generation 2" in line, line
    assert "Nothing was restored" not in line
    assert (backed.database.parent / "trials" / "trial-00000" / "weights.txt").exists()
    assert not backed.database.exists()

    # The suggested command, as printed, with the roots it was run with.
    again = run_cli("restore", backed.database, *backed.roots, "--generation", "2")
    assert again.returncode == 0, again.stderr
    assert finished_numbers(backed.database) == [0, 1]


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--generation", "0", "0 is not at least 1"),
        ("--generation", "-1", "-1 is not at least 1"),
        ("--drive-timeout", "nan", "'nan' is not a number"),
    ],
)
def test_restore_with_an_option_value_that_names_nothing_is_bad_input(
    backed: Backed, option: str, value: str, fragment: str
) -> None:
    before = backed.database.read_bytes()
    result = run_cli("restore", backed.database, *backed.roots, option, value)
    assert result.returncode == 2
    assert_one_error_line(result, f"argument {option}", fragment)
    assert backed.database.read_bytes() == before
    assert not list(backed.database.parent.glob("study.db.before-restore-*"))


def test_status_refuses_a_negative_grace_period(backed: Backed) -> None:
    result = run_cli("status", backed.drive, "--grace-period", "-5")
    assert result.returncode == 2
    assert_one_error_line(result, "argument --grace-period", "-5 is negative")


def test_verify_of_a_folder_that_holds_studies_says_to_give_one_of_them(backed: Backed) -> None:
    """``verify`` given the whole Drive folder instead of one study's: the error says to
    give one study and how to list them, instead of only "DIR/study.db does not exist"."""
    result = run_cli("verify", backed.drive)
    assert result.returncode == 2
    assert_one_error_line(
        result, f"{backed.drive} holds no study.db", f"`sweepsafe status {backed.drive}`"
    )
    assert "does not exist" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--seed", "-1", "-1 is not at least 0"),
        ("--seed", str(2**32), f"{2**32} is more than {2**32 - 1}"),
        ("--max-retry", "-3", "-3 is not at least 0"),
    ],
)
def test_run_with_an_option_value_optuna_would_refuse_later_is_bad_input(
    tmp_path: Path, option: str, value: str, fragment: str
) -> None:
    """Refused before the sweep starts, naming the option (exit 2), not as a sweep that
    stopped on Optuna's ValueError (exit 1)."""
    (tmp_path / "train.py").write_text(TINY_OBJECTIVE)
    result = run_cli(
        "run",
        "train:objective",
        "--output-dir",
        tmp_path / "sweeps",
        "--study-key",
        "k",
        "--no-backup",
        "--trials",
        "1",
        option,
        value,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert_one_error_line(result, f"argument {option}", fragment)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_study_another_runtime_holds_is_refused_naming_the_flag_this_command_takes(
    backed: Backed, command: str
) -> None:
    """The way to take over is a flag the command in use has, and it works there: not only
    ``sweepsafe run --takeover`` for a backup, nor a flag ``restore`` lacks."""
    extra = ["--generation", "2"] if command == "restore" else []
    before = backed.database.read_bytes()
    with simulated_store(backed.local, backed.drive, FaultPlan()) as store:
        store.acquire(backed.database.parent)  # a sweep on another runtime holds it
        refused = run_cli(command, backed.database, *backed.roots, *extra)
        line = assert_one_error_line(refused, "another runtime", "--takeover")
        assert command in line.split("on the command line", 1)[1], line
        assert backed.database.read_bytes() == before

        taken = run_cli(command, backed.database, *backed.roots, *extra, "--takeover")
    assert taken.returncode == 0, taken.stderr
    if command == "restore":
        assert finished_numbers(backed.database) == [0, 1]


def test_ctrl_c_during_a_restore_from_a_hung_drive_exits_130_leaving_nothing_half_restored(
    tmp_path: Path,
) -> None:
    """A user who gives up on a restore from a stalled mount gets the prompt back at once,
    with exit status 130, one line, and no partial study folder to mistake for the study."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    local = tmp_path / "local"
    database = local / "study-1" / "study.db"
    (database.parent / "trials" / "trial-00000").mkdir(parents=True)
    (database.parent / "trials" / "trial-00000" / "weights.bin").write_bytes(b"w" * 4096)
    study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    study.tell(study.ask(), 1.0)
    del study
    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    with FuseDrive(tmp_path / "backing", tmp_path / "mnt", plan) as drive:
        roots = ["--local-root", str(local), "--drive-root", str(drive.mount_point / "sweeps")]
        backed_up = run_cli("backup", database.parent, *roots)
        assert backed_up.returncode == 0, backed_up.stderr
        shutil.rmtree(database.parent)
        FaultPlan(hang=True).write(plan)
        env = {k: v for k, v in os.environ.items() if k != "SWEEPSAFE_STUDY_DIR"}
        with subprocess.Popen(
            [sys.executable, "-m", "sweepsafe", "restore", str(database.parent), *roots],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as restore:
            # Against a hung Drive it cannot finish: still running after a while, it is
            # waiting on the mount, where the user gives up on it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                restore.wait(timeout=2.0)
            assert restore.returncode is None, "the restore finished against a hung Drive"
            restore.send_signal(signal.SIGINT)
            stdout, stderr = restore.communicate(timeout=30.0)  # never a hang
        result = subprocess.CompletedProcess(restore.args, restore.returncode, stdout, stderr)
        assert result.returncode == 130
        assert_one_error_line(result, "interrupted")
        assert stdout == ""
        assert not database.parent.exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--no-backup", "--takeover"), "--takeover does nothing with --no-backup"),
        (("--no-backup", "--drive-dir", "drive"), "--drive-dir does nothing with --no-backup"),
        (("--no-backup", "--max-retry", "5"), "--max-retry applies to a study shared through"),
        (("--no-backup", "--export-interval", "9"), "--export-interval applies to a study"),
    ],
)
def test_run_with_an_option_the_rest_of_the_line_makes_meaningless_is_bad_input(
    tmp_path: Path, options: tuple[str, ...], fragment: str
) -> None:
    """An option that would be silently ignored is named before anything runs (exit 2):
    the user gave it expecting it to act."""
    (tmp_path / "tiny.py").write_text(TINY_OBJECTIVE)
    result = run_cli(
        "run",
        "tiny:objective",
        "--output-dir",
        tmp_path / "sweeps",
        "--study-key",
        "k",
        "--trials",
        "1",
        *options,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "sweeps").exists()
