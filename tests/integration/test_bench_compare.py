"""``make bench`` in its quickest form, so the harness cannot rot: 200 objects, migrator
copy-only and one other tool, figures written to a temporary directory and the docs section
regenerated in a scratch copy (the hand-written text around the markers must survive). The
multi-host scenario needs PostgreSQL and minutes, so it is off there; its report is checked
on figures made up here instead."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.compare import latency_ms
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


def multihost_row(supervisors: int, run_s: float) -> dict[str, Any]:
    """A passing multi-host row with the fields the report reads."""
    return {
        "supervisors": supervisors,
        "ok": True,
        "problems": [],
        "plan_s": 2.0,
        "run_s": run_s,
        "objects_per_s": 20000 / run_s,
        "cpu_s_per_1000": 0.5,
        "copy_objects": 20000,
        "delete_requests": 20,
        "double_deletes_at_most": 0,
        "ledger_rows_retried": 0,
        "requests_per_object": 1.001,
        "pg_connections_peak": {"ledger": 3 * supervisors, "app": 3 * supervisors},
        "postgres_cpu_s": 7.0,
        "commands": [[["migrator", "run", "--quiet", "--config", "/tmp/x/run-3/config.yaml"]]],
    }


def test_multihost_latency_variant_is_reported_and_judged() -> None:
    mh = {"objects": 20000, "workers_per_supervisor": 2, "concurrency": 32}
    results: dict[str, Any] = {
        "endpoint": "http://127.0.0.1:4000",
        "multihost": {**mh, "copy_latency_ms": None, "runs": [multihost_row(1, 12.0)]},
        "multihost_latency": {
            **mh,
            "copy_latency_ms": 100.0,
            "s3fast_flags": ["-latency", "100ms", "-fault-ops", "CopyObject"],
            "endpoint": "http://127.0.0.1:40001",
            "runs": [multihost_row(1, 40.0), multihost_row(2, 25.0)],
        },
    }
    results["multihost"]["runs"].append(multihost_row(2, 13.0))
    results["targets"] = report.targets(results)
    target = results["targets"][-1]
    assert target["target"].endswith("(CopyObject latency 100 ms)")
    assert target["value"] == pytest.approx(1.6) and target["op"] == ">" and target["met"]

    text = report.render_tables(results)
    assert (
        "### Two supervisors on one job (stand-ins for two hosts), s3fast without latency" in text
    )
    assert "s3fast with 100 ms per CopyObject" in text
    assert "at most 640 objects/s" in text
    assert "Two supervisors ÷ one: 1.60×" in text
    assert "| > 1 | met |" in text
    # each server's address becomes its own variable, even when one port prefixes the other
    assert report._placeholders("-endpoint 127.0.0.1:40001", results) == (
        "-endpoint $S3_LATENCY_HOST_PORT"
    )
    assert report._placeholders("http://127.0.0.1:4000/x", results) == "$S3/x"

    results["multihost_latency"]["runs"][1]["ok"] = False  # a failed run proves nothing
    assert report.targets(results)[-1]["met"] is None


@pytest.mark.parametrize(
    ("text", "ms"), [("100ms", 100.0), ("0.2s", 200.0), ("50", 50.0), ("0", None), ("none", None)]
)
def test_multihost_latency_option(text: str, ms: float | None) -> None:
    assert latency_ms(text) == ms
