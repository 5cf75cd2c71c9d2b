"""Kill torture: SIGKILL a real ``migrator run`` at random moments, over and over, and check
from outside (S3 listings and the app database, never the ledger) that nothing is lost and no
source goes before its copy is verified and its app rows are committed (invariant I1).

    python -m bench.torture --trials 50 --objects 5000 --workers 4

Each trial: a fresh s3fast server and fresh Postgres databases (ledger and app), N objects
seeded, then rounds of start → random sleep → SIGKILL (the whole process group, or one worker
while the supervisor lives) → check, until a run finishes on its own; then a final check that
everything converged. Figures go to bench/results/torture-<date>.json and are printed as a
markdown table for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from bench.common import (
    PG_ADMIN_URL,
    RESULTS,
    S3Server,
    create_database,
    drop_database,
    s3fast_binary,
)
from tests.acceptance.test_kill import children, start_run
from tests.conftest import s3_client
from tests.helpers import assert_converged, invariant_violations, make_job


@dataclass
class Trial:
    trial: int
    objects: int
    group_kills: int = 0
    worker_kills: int = 0
    runs: int = 0
    lost: int = 0
    early_deletes: int = 0
    converged: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def record(trial: Trial, problems: list[str]) -> None:
    trial.lost += sum(p.startswith("LOST") for p in problems)
    trial.early_deletes += sum(p.startswith("EARLY DELETE") for p in problems)
    trial.problems.extend(problems[:5])


def run_trial(n: int, args: argparse.Namespace, binary: str, admin: sa.Engine) -> Trial:
    rng = random.Random(args.seed + n)
    trial = Trial(n, args.objects)
    server = S3Server(binary)
    names = [f"torture_ledger_{n}", f"torture_app_{n}"]
    ledger, app = (create_database(admin, name) for name in names)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = make_job(
                Path(tmp),
                s3_client(server.endpoint),
                server.endpoint,
                ledger=ledger,
                app=app,
                count=args.objects,
                size=512,
                workers=args.workers,
                concurrency=8,
                chunk_size=50,
                delete_source=rng.choice(["per_chunk", "after_all"]),
                lease_seconds=30,
                max_attempts=20,
            )
            for _ in range(args.max_rounds):
                proc = start_run(job.config_path)
                trial.runs += 1
                time.sleep(rng.uniform(0.3, args.max_sleep))
                if proc.poll() is not None:
                    break
                workers = [w for c in children(proc.pid) for w in children(c)]
                if workers and rng.random() < 0.25:
                    os.kill(rng.choice(workers), signal.SIGKILL)  # the supervisor lives on
                    trial.worker_kills += 1
                    time.sleep(rng.uniform(0.2, 1.0))
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    trial.group_kills += 1
                proc.wait(timeout=60)
                record(trial, invariant_violations(job))
            final = start_run(job.config_path)
            trial.runs += 1
            _, err = final.communicate(timeout=600)
            record(trial, invariant_violations(job))
            try:
                assert final.returncode == 0, err.decode()[-500:]
                assert_converged(job)
                trial.converged = True
            except AssertionError as exc:
                trial.problems.append(f"did not converge: {exc}")
    finally:
        server.stop()
        for name in names:
            drop_database(admin, name)
    trial.seconds = round(time.monotonic() - started, 1)
    return trial


def markdown(trials: list[Trial], args: argparse.Namespace) -> str:
    kills = sum(t.group_kills for t in trials)
    worker_kills = sum(t.worker_kills for t in trials)
    return "\n".join(
        [
            "| trials | objects each | workers | process-group kills | single-worker kills "
            "| runs | lost | early deletes | converged |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {len(trials)} | {args.objects:,} | {args.workers} | {kills} | {worker_kills} "
            f"| {sum(t.runs for t in trials)} | {sum(t.lost for t in trials)} "
            f"| {sum(t.early_deletes for t in trials)} "
            f"| {sum(t.converged for t in trials)}/{len(trials)} |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-rounds", type=int, default=6, help="kills per trial at most")
    parser.add_argument("--max-sleep", type=float, default=6.0, help="seconds before a kill")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg", default=PG_ADMIN_URL)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "torture")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "torture")
    binary = s3fast_binary()
    admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    trials = []
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"torture-{datetime.now(UTC).strftime('%Y-%m-%d')}.json"
    for n in range(args.trials):
        trial = run_trial(n, args, binary, admin)
        trials.append(trial)
        print(json.dumps(asdict(trial)), flush=True)
        # written after every trial, so an interrupted run still leaves its figures
        out.write_text(
            json.dumps({"args": vars(args), "trials": [asdict(t) for t in trials]}, indent=1)
        )
    print(markdown(trials, args))
    bad = [t for t in trials if t.lost or t.early_deletes or not t.converged]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
