"""A key rule that maps two sources to one destination, through the CLI: ``migrator run``
refuses it with one line naming both keys (exit 2) before anything is copied, even when the
two keys are in different listing pages, and the job runs once the rule is fixed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.acceptance.test_bad_input import edit_config, snapshot
from tests.helpers import app_paths, expected_untouched, list_keys, make_job, read, run_cli

# 1,000 keys fill the first listing page; image/b/0000.png comes on the second.
KEYS = [f"image/a/{i:04d}.png" for i in range(1000)] + ["image/b/0000.png"]
BAD = {"pattern": r"^image/[ab]/(.*)$", "replace": r"avatar/\1"}
FIXED = {"pattern": r"^image/([ab])/(.*)$", "replace": r"avatar/\1/\2"}


def test_colliding_rule_is_refused_across_pages_and_a_fixed_rule_recovers(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}",
        keys=KEYS,
        key_rule=BAD,
        chunk_size=250,
    )
    before = snapshot(job)
    config = ("--config", str(job.config_path))

    proc = run_cli("run", *config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.splitlines()[-1]], proc.stderr
    assert "'image/a/0000.png' and 'image/b/0000.png' both map to 'avatar/0000.png'" in errors[0]
    assert list_keys(moto_s3, job.cfg.destination.bucket) == set(), "copied before refusing"
    assert list_keys(moto_s3, job.cfg.source.bucket) == before.sources
    assert app_paths(job) == before.app

    edit_config(job, lambda data, _dir: data.update(keys=FIXED))
    plan = run_cli("plan", *config)
    assert plan.returncode == 0, plan.stderr
    assert "1,001 listed, 1 new, 0 changed, 0 unchanged, 1,000 given a new destination" in (
        plan.stderr
    )
    proc = run_cli("run", *config)
    assert proc.returncode == 0, proc.stderr

    dest = {k: "avatar/" + k.removeprefix("image/") for k in KEYS}
    assert list_keys(moto_s3, job.cfg.destination.bucket) == set(dest.values())
    assert list_keys(moto_s3, job.cfg.source.bucket) == set()
    for obj in job.objects[::97] + job.objects[-1:]:
        assert read(moto_s3, job.cfg.destination.bucket, dest[obj.key]) == obj.body
    paths = app_paths(job)
    assert paths[: len(KEYS)] == [dest[o.key] for o in job.objects]
    assert paths[len(KEYS) :] == expected_untouched(job)
    status = json.loads(run_cli("status", "--json", *config).stdout)
    assert status["total"] == 1001 and status["counts"]["done"] == 1001
