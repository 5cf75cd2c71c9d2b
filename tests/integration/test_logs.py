"""``migrator run --log-format json``: stderr is one JSON object per line, with an event name,
the job and, for objects, the key; ``-v`` gives the same events as text lines."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tests.helpers import assert_converged, run_cli, sqlite_job


def test_json_logs_are_one_object_per_line_with_events_and_keys(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, count=12, size=64, max_attempts=2
    )
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    gone = job.objects[0].key
    moto_s3.delete_object(Bucket=job.cfg.source.bucket, Key=gone)  # fails: NoSuchKey
    result = run_cli("run", "--log-format", "json", "--config", str(job.config_path))
    assert result.returncode == 1
    docs = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert docs and all({"ts", "level", "event", "message", "job"} <= set(d) for d in docs)
    assert {d["job"] for d in docs} == {job.cfg.job}
    events = Counter(d["event"] for d in docs)
    assert events["run_started"] == 1 and events["run_failed"] == 1
    assert events["copied"] == 11 and events["rewritten"] == 11
    assert events["deleted"] == 0  # after_all: no delete while a row failed before its rewrite
    assert events["progress"] >= 1
    copied = {d["key"]: d for d in docs if d["event"] == "copied"}
    assert set(copied) == {o.key for o in job.objects[1:]}
    sample = copied[job.objects[1].key]
    assert sample["dest_key"] == job.dest_key(job.objects[1].key) and sample["size"] == 64
    failed = [d for d in docs if d["event"] == "failed"]
    assert [(d["key"], d["stage"], d["level"]) for d in failed] == [(gone, "copy", "warning")]
    assert "NoSuchKey" in failed[0]["error"]
    workers = {d["process"] for d in docs if d["event"] == "copied"}
    assert workers and all(w.count(":") == 2 for w in workers)  # host:pid:n of a worker

    # the source is back: the rest finishes; a bad config in JSON mode is one JSON error line
    moto_s3.put_object(Bucket=job.cfg.source.bucket, Key=gone, Body=job.objects[0].body)
    assert run_cli("retry-failed", "--config", str(job.config_path)).returncode == 0
    again = run_cli("run", "--log-format", "json", "--config", str(job.config_path))
    assert again.returncode == 0, again.stderr
    ends = [json.loads(line) for line in again.stderr.splitlines()]
    assert ends[-1]["event"] in ("message", "run_finished")
    assert any(d["event"] == "run_finished" for d in ends)
    assert sum(d["event"] == "deleted" for d in ends) == 12
    assert_converged(job)

    bad = tmp_path / "bad.yaml"
    bad.write_text("job: [\n")
    rejected = run_cli("run", "--log-format", "json", "--config", str(bad))
    assert rejected.returncode == 2
    (line,) = rejected.stderr.splitlines()
    doc = json.loads(line)
    assert doc["event"] == "error" and doc["level"] == "error" and "YAML" in doc["message"]


def test_verbose_text_logs_name_each_object(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=4)
    result = run_cli("-v", "run", "--quiet", "--config", str(job.config_path))
    assert result.returncode == 0, result.stderr
    for o in job.objects:
        assert f"copied {o.key} -> {job.dest_key(o.key)}" in result.stderr
        assert f"deleted the source of {o.key}" in result.stderr
    # without -v: no line per object, not even for one that failed (status lists those)
    quiet = sqlite_job(tmp_path / "q", moto_s3, moto_endpoint, with_app=False, count=3)
    assert run_cli("plan", "--config", str(quiet.config_path)).returncode == 0
    moto_s3.delete_object(Bucket=quiet.cfg.source.bucket, Key=quiet.objects[0].key)
    plain = run_cli("run", "--quiet", "--config", str(quiet.config_path))
    assert plain.returncode == 1
    assert "copied image/" not in plain.stderr and "copy failed" not in plain.stderr
    assert "1 objects failed" in plain.stderr
    assert run_cli("retry-failed", "--config", str(quiet.config_path)).returncode == 0
    verbose = run_cli("-v", "run", "--quiet", "--config", str(quiet.config_path))
    assert f"WARNING copy failed: {quiet.objects[0].key}: source object" in verbose.stderr
