"""Short versions of the kill and Drive fault campaigns (the full ones live in tools/).

Real child processes, real SIGKILL, real Optuna studies in real SQLite files; only the
Drive is simulated. The checks are the campaigns' own, made with sqlite3 and Optuna.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.campaigns import fault as fault_campaign
from tools.campaigns import kill as kill_campaign


@pytest.mark.timeout(240)
def test_killed_sweeps_leave_a_sound_drive_copy_and_resume_on_a_fresh_disk() -> None:
    summary = kill_campaign.run_campaign(runs=4, seed=7, quick=True, verbose=False)

    assert summary.failures == [], kill_campaign.describe_summary(summary)
    assert summary.corrupt == 0
    assert summary.resumes_ok == 4
    # One kill aimed at each phase: starting up, first trial, between trials, final flush.
    assert [run.aimed for run in summary.runs] == list(kill_campaign.AIMED_PHASES)
    # Three restarts on a fresh disk (restored from Drive), one on the same disk.
    assert [run.restart for run in summary.runs] == list(kill_campaign.RESTARTS[:4])
    for run in summary.runs:
        assert run.lost is None or run.lost >= 0


QUICK_TRIALS = fault_campaign.campaign_settings(quick=True)[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "fault",
    [scenario.name for scenario in fault_campaign.scenarios(QUICK_TRIALS, quick=True)],
)
def test_drive_fault_is_survived_and_repaired_by_a_later_backup(fault: str) -> None:
    (result,) = fault_campaign.run_campaign(quick=True, verbose=False, only=[fault])

    assert result.failures == [], fault_campaign.table([result])
    assert result.trials_finished == QUICK_TRIALS
    assert result.fail_trials == 0
    assert result.later_backup_ok
    counts = [count for _, count in result.drive_counts if count is not None]
    if fault != "replaced":  # counting starts again in the new, empty folder
        assert counts == sorted(counts), result.drive_counts
