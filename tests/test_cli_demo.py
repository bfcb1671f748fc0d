"""``sweepsafe demo``: the README's first command, run small as a real subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cli_support import finished_numbers, run_cli, study_databases


def test_demo_runs_a_backed_up_sweep_and_reports_a_sound_drive_copy(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"

    result = run_cli(
        "demo",
        "--trials",
        "8",
        "--trial-seconds",
        "0.01",
        "--drive-latency",
        "0.05",
        "--workdir",
        workdir,
    )

    assert result.returncode == 0, result.stderr
    summary = result.stdout
    assert "sound: integrity check ok, 8 of 8 trials, 8 trial folders" in summary
    ratio = re.search(r"overhead ratio (\d+\.\d+)", summary)
    assert ratio is not None, summary
    copies = re.search(r"Drive copies made\s+(\d+)", summary)
    assert copies is not None
    assert int(copies.group(1)) >= 2
    assert f"sweepsafe status {workdir / 'drive'}" in summary
    assert "sweepsafe run mymodule:objective" in summary
    # What the summary claims is on disk, and the status command agrees.
    (copy,) = study_databases(workdir / "drive")
    assert finished_numbers(copy) == list(range(8))
    status = run_cli("status", workdir / "drive", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["databases"][0]["trial_counts"] == {"COMPLETE": 8}


def test_demo_in_a_temporary_folder_cleans_up_after_itself(tmp_path: Path) -> None:
    result = run_cli(
        "demo",
        "--trials",
        "3",
        "--trial-seconds",
        "0",
        "--drive-latency",
        "0",
        env={"TMPDIR": str(tmp_path)},
    )

    assert result.returncode == 0, result.stderr
    assert "3 of 3 trials" in result.stdout
    assert "--keep" in result.stdout
    assert list(tmp_path.iterdir()) == []
