"""The Colab notebook runs, backs up every trial and resumes on a fresh runtime.

Its Python cells run in a real subprocess, without the ``!`` shell lines and the
``google.colab`` cells, with ``DRIVE_MOUNT`` and ``LOCAL`` pointed at temporary folders.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cli_support import finished_numbers, study_databases

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "colab_sweep.ipynb"


def notebook_script(drive_mount: Path, local: Path) -> str:
    """The notebook's code cells as one script, with the folders replaced after the settings."""
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    parts: list[str] = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if "google.colab" in source:
            continue
        lines = [line for line in source.splitlines() if not line.lstrip().startswith("!")]
        parts.append("\n".join(lines))
        if "DRIVE_MOUNT =" in source:
            parts.append(f"DRIVE_MOUNT = {str(drive_mount)!r}\nLOCAL = {str(local)!r}")
    return "\n\n".join(parts) + "\n"


def run_notebook(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "notebook_cells.py"
    script.write_text(notebook_script(tmp_path / "content-drive", tmp_path / "local"))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def n_trials() -> int:
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        for line in cell["source"]:
            if line.startswith("N_TRIALS ="):
                return int(line.split("=")[1])
    raise AssertionError("the notebook sets no N_TRIALS")


def test_notebook_is_clean_nbformat_4_with_the_colab_cells() -> None:
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    markdown = "".join(
        "".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "markdown"
    )

    assert notebook["nbformat"] == 4
    assert all(
        cell["outputs"] == [] and cell["execution_count"] is None
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
    )
    assert any(
        "drive.mount('/content/drive')" in c or 'drive.mount("/content/drive")' in c for c in code
    )
    assert any(c.startswith("!pip install") and "#" not in c for c in code)
    assert any("DriveStore.for_colab(" in c and "run_sweep(" in c for c in code)
    assert "run the same cells again: the sweep resumes from Drive" in markdown


def test_notebook_backs_up_all_trials_and_resumes_after_the_local_folder_is_lost(
    tmp_path: Path,
) -> None:
    (tmp_path / "content-drive" / "MyDrive").mkdir(parents=True)
    wanted = list(range(n_trials()))
    drive = tmp_path / "content-drive" / "MyDrive" / "sweepsafe"

    first = run_notebook(tmp_path)

    assert first.returncode == 0, first.stderr
    assert first.stdout.count("Drive copy complete") == 2, first.stdout
    (sweep_copy,) = study_databases(drive / "my-sweep")
    (plain_copy,) = study_databases(drive / "plain-optuna")
    assert finished_numbers(sweep_copy) == wanted
    assert finished_numbers(plain_copy) == wanted
    assert len(list((sweep_copy.parent / "trials").iterdir())) == len(wanted)

    shutil.rmtree(tmp_path / "local")
    second = run_notebook(tmp_path)

    assert second.returncode == 0, second.stderr
    assert f"{len(wanted)} trials were already done" in second.stdout
    assert second.stdout.count("Drive copy complete") == 2, second.stdout
    for database in (
        *study_databases(tmp_path / "local"),
        *study_databases(tmp_path / "local" / "plain"),
        sweep_copy,
        plain_copy,
    ):
        assert finished_numbers(database) == wanted, database
