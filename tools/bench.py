"""Run every benchmark and both campaigns in one go and write BENCHMARKS.md.

Each module under tools/ that defines ``measure(quick: bool = False) -> list[dict]``
(rows with the keys name, value, unit, reference, ratio, goal, met) runs in its own
child process, so that one module's threads, workers or crash cannot spoil another's
figures. The expected modules are always listed in the report: one that is missing,
fails or times out is reported as such, never dropped.

    python tools/bench.py                    # the full run; writes BENCHMARKS.md
    python tools/bench.py --quick            # small and fast; same report
    python tools/bench.py --kill-runs 40     # fewer kills than the full 100
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
EXPECTED = (
    "tools.bench_copy",
    "tools.bench_worker",
    "tools.bench_sweep",
    "tools.campaigns.kill",
    "tools.campaigns.fault",
)
ROW_KEYS = ("name", "value", "unit", "reference", "ratio", "goal", "met")
RESULT_MARK = "@@bench-rows@@ "
TIMEOUT_S = {"tools.campaigns.kill": 4 * 3600.0}
DEFAULT_TIMEOUT_S = 1800.0

_RUNNER = """
import importlib, json, sys
sys.path.insert(0, {repo!r})
bench = importlib.import_module({module!r})
kwargs = {kwargs!r}
rows = bench.measure(**kwargs)
print({mark!r} + json.dumps(rows, default=str), flush=True)
"""


@dataclass
class ModuleRun:
    """One module's rows, or why there are none."""

    module: str
    status: str = "ok"
    """ok, missing, failed or timed out."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""
    duration_s: float = 0.0


def discover() -> list[str]:
    """The expected modules first, then any other tools/ module that defines measure()."""
    found: list[str] = []
    for path in sorted(TOOLS.glob("*.py")):
        if f"tools.{path.stem}" in EXPECTED or path.stem in ("bench", "__init__"):
            continue
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError:
            continue
        if any(isinstance(node, ast.FunctionDef) and node.name == "measure" for node in tree.body):
            found.append(f"tools.{path.stem}")
    return [*EXPECTED, *found]


def run_module(module: str, quick: bool, kill_runs: int | None) -> ModuleRun:
    """Run ``module.measure`` in a child process and collect its rows."""
    path = REPO.joinpath(*module.split(".")).with_suffix(".py")
    if not path.exists():
        return ModuleRun(module, "missing", detail=f"{path.relative_to(REPO)} does not exist")
    kwargs: dict[str, Any] = {"quick": quick}
    if module == "tools.campaigns.kill" and kill_runs is not None:
        kwargs["runs"] = kill_runs
    code = _RUNNER.format(repo=str(REPO), module=module, kwargs=kwargs, mark=RESULT_MARK)
    timeout = TIMEOUT_S.get(module, DEFAULT_TIMEOUT_S)
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return ModuleRun(
            module,
            "timed out",
            detail=f"no result within {timeout:.0f} s",
            duration_s=time.perf_counter() - started,
        )
    duration = time.perf_counter() - started
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-12:]
        return ModuleRun(
            module,
            "failed",
            detail=f"exit code {completed.returncode}: " + "\n".join(tail),
            duration_s=duration,
        )
    try:
        rows = json.loads(lines[-1][len(RESULT_MARK) :])
    except ValueError as exc:
        return ModuleRun(module, "failed", detail=f"unreadable rows: {exc}", duration_s=duration)
    malformed = [
        row for row in rows if not isinstance(row, dict) or not all(key in row for key in ROW_KEYS)
    ]
    if malformed:
        return ModuleRun(
            module,
            "failed",
            rows=[row for row in rows if row not in malformed],
            detail=f"{len(malformed)} row(s) lack some of {ROW_KEYS}",
            duration_s=duration,
        )
    return ModuleRun(module, rows=rows, duration_s=duration)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "OS": platform.platform(),
    }


def _without_local_paths(text: str) -> str:
    """Paths of this machine say nothing to a reader: the repository and temp folders go."""
    text = text.replace(str(REPO), ".")
    return re.sub(re.escape(tempfile.gettempdir()) + r"/[^\s'\"):]*", "<tmp>", text)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _without_local_paths(str(value)).replace("|", "\\|").replace("\n", " ")


def _met(value: Any) -> str:
    if value is None:
        return "n/a"
    return "**yes**" if value else "**NO**"


def render(runs: list[ModuleRun], command: str, started: dt.datetime, quick: bool) -> str:
    """BENCHMARKS.md."""
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC"
        + (" (quick mode: small sizes, not the reference figures)." if quick else "."),
        "Every ratio is against a reference measured side by side in the same run, on the "
        "same machine. The Drive is a local folder with injected latency and faults (see "
        "each module's docstring); a real Drive mount is slower and noisier.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {_cell(value)} |" for key, value in machine().items()]
    total = sum(run.duration_s for run in runs)
    met = sum(1 for run in runs for row in run.rows if row.get("met") is True)
    missed = sum(1 for run in runs for row in run.rows if row.get("met") is False)
    broken = [run.module for run in runs if run.status != "ok"]
    lines += [
        "",
        "## Summary",
        "",
        f"{met} goals met, {missed} missed; modules missing or failed: "
        + (", ".join(broken) if broken else "none")
        + f". Total time {total / 60:.1f} min.",
    ]
    for run in runs:
        lines += ["", f"## {run.module} ({run.status}, {run.duration_s:.0f} s)", ""]
        if run.status != "ok":
            lines += [f"**{run.status.upper()}**: `tools/{run.module}.py`", "", "```"]
            lines += _without_local_paths(run.detail or "(no detail)").splitlines()
            lines += ["```"]
            if not run.rows:
                continue
            lines.append("")
        lines += [
            "| figure | value | reference | ratio | goal | met |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        notes = []
        for row in run.rows:
            unit = f" {row.get('unit')}" if row.get("unit") else ""
            value = _cell(row.get("value"))
            reference = _cell(row.get("reference"))
            reference_unit = unit if reference and not isinstance(row.get("reference"), str) else ""
            lines.append(
                f"| {_cell(row.get('name'))} | {value}{unit if value else ''} "
                f"| {reference}{reference_unit} "
                f"| {_cell(row.get('ratio'))} | {_cell(row.get('goal'))} | {_met(row.get('met'))} |"
            )
            if row.get("note"):
                notes.append(f"- {_cell(row.get('name'))}: {_cell(row.get('note'))}")
        if notes:
            lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast versions")
    parser.add_argument("--kill-runs", type=int, default=None, help="kills (default 100)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these modules")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    given = argv if argv is not None else sys.argv[1:]
    # A path of this machine says nothing to a reader; its name is enough.
    command = " ".join(
        [
            "python tools/bench.py",
            *(Path(arg).name if arg.startswith("/") else arg for arg in given),
        ]
    )
    runs = []
    for module in discover():
        if args.only and module not in args.only:
            continue
        print(f"{module} ...", flush=True)
        run = run_module(module, args.quick, args.kill_runs)
        print(f"{module}: {run.status} in {run.duration_s:.0f} s", flush=True)
        for row in run.rows:
            if not isinstance(row, dict):
                continue
            print(
                f"  {row.get('name')}: {row.get('value')} {row.get('unit') or ''}"
                f" ratio {row.get('ratio')} met {row.get('met')}",
                flush=True,
            )
        if run.status != "ok":
            print(f"  {run.detail}", flush=True)
        runs.append(run)
        # Written after every module, so that a failure later keeps what was measured.
        args.output.write_text(render(runs, command.strip(), started, args.quick))
    print(f"wrote {args.output.name}", flush=True)
    return 0 if all(run.status == "ok" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
