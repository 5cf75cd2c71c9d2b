"""``make bench`` in its quickest form, so the harness cannot rot: 200 objects, migrator
copy-only and one other tool, figures written to a temporary directory and the docs section
regenerated in a scratch copy (the hand-written text around the markers must survive)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.s3fast

HAND_WRITTEN = "## Where the time goes\n\nwritten by hand, kept\n"


def test_quick_bench_measures_checks_and_regenerates(tmp_path: Path, s3fast_bin: str) -> None:
    other = "rclone-tuned" if shutil.which("rclone") else "aws" if shutil.which("aws") else None
    tools = ["migrator-copy", *([other] if other else [])]
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        f"# Benchmarks\n\n<!-- bench:begin -->\nstale\n<!-- bench:end -->\n\n{HAND_WRITTEN}"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.compare",
            "--quick",
            "--sets",
            "2k",
            "--tools",
            ",".join(tools),
            "--no-multihost",
            "--results-dir",
            str(tmp_path),
            "--docs",
            str(doc),
            "--s3fast-bin",
            s3fast_bin,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    (raw,) = tmp_path.glob("bench-*.json")
    results = json.loads(raw.read_text())
    runs = results["sets"]["2k"]["tools"]
    assert sorted(runs) == sorted(tools)
    for tool in tools:
        run = runs[tool]
        assert run["ok"], run["problems"]
        assert run["objects"] == 200
        assert run["ops"]["CopyObject"] == 200  # s3fast's counters, reset before the tool
        assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["peak_rss_mib"] > 0
    copy = runs["migrator-copy"]
    assert copy["plan_s"] is None  # one `migrator run`, which plans the job itself
    assert copy["peak_processes"] >= 3  # supervisor, fork server, workers: the tree is seen
    assert {t["target"] for t in results["targets"]}  # computed, if not measured (no 20k set)

    text = doc.read_text()
    assert "stale" not in text
    assert text.endswith(HAND_WRITTEN)
    assert "| migrator copy-only |" in text
