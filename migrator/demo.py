"""``python -m migrator.demo``: a whole migration on this machine, in one command.

Starts an in-memory S3 server (moto) on a free local port, writes a config into ``--dir``,
seeds objects and the application table, runs ``migrator run``, ``status`` and ``verify`` as a
user would (each in its own process, output shown as is) and prints a short summary.

The AWS credentials given to the child processes are dummies that only the local server sees.
Ctrl-C reaches the running step too; the demo waits for it to stop, then exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from migrator.errors import EXIT_INTERRUPTED, EXIT_USAGE

MARKER = ".migrator-demo"  # the demo wipes only directories it made itself
DEMO_FILES = ("config.yaml", "migrator.db", "app.db", "report.")  # what a demo dir may hold
JOB = "avatars"

CONFIG_TEMPLATE = """\
# Written by `python -m migrator.demo`: S3 is a moto server that lives as long as the demo.
job: {job}
ledger: sqlite:///migrator.db          # relative to this file: {dir}/migrator.db
source:
  bucket: legacy
  prefix: image/
  endpoint_url: {endpoint}
  region: us-east-1
destination:
  bucket: production
  prefix: avatar/
  endpoint_url: {endpoint}
  region: us-east-1
app_db:
  url: sqlite:///app.db                # relative to this file: {dir}/app.db
  table: avatars
  column: path
workers: 2
concurrency: 32
chunk_size: 200
delete_source: after_all
"""


class StepFailed(Exception):
    """A step of the demo exited non-zero; ``code`` is what the demo exits with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while a step ran; the step has stopped."""


@dataclass(frozen=True)
class Step:
    """The result of one child process."""

    code: int
    seconds: float
    stdout: str | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment for every step: dummy credentials for the local server, and nothing
    from the caller's environment that could point the demo at a real account or database."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "MIGRATOR_")) or k == "AWS_CA_BUNDLE"
    }
    env.update(
        AWS_ACCESS_KEY_ID="migrator-demo-key-id",
        AWS_SECRET_ACCESS_KEY="migrator-demo-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def prepare_dir(path: Path) -> None:
    """Wipe and create ``path``, but never a directory the demo did not create."""
    if path.exists():
        if not path.is_dir():
            raise StepFailed(f"{path} exists and is not a directory", EXIT_USAGE)
        foreign = [p.name for p in path.iterdir() if not p.name.startswith(DEMO_FILES)]
        if foreign and not (path / MARKER).exists():
            raise StepFailed(
                f"refusing to wipe {path}: it holds {foreign[0]!r} and no {MARKER} file, so "
                "the demo did not make it; choose another --dir",
                EXIT_USAGE,
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by python -m migrator.demo; wiped on the next demo run\n")


class _Signals:
    """While a step runs: Ctrl-C is left to the step (the terminal sends it to the whole
    process group) and SIGTERM is passed on to it; either way the demo stops after the step."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[Any] | None = None
        self.interrupted = False

    def _on_int(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    @contextmanager
    def around(self, proc: subprocess.Popen[Any]) -> Iterator[None]:
        self.proc = proc
        old_int = signal.signal(signal.SIGINT, self._on_int)
        old_term = signal.signal(signal.SIGTERM, self._on_term)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            self.proc = None


def run_step(cmd: Sequence[str], env: dict[str, str], *, capture: bool = False) -> Step:
    """Run one child process to its end, its output shown as is (or captured)."""
    signals = _Signals()
    started = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), env=env, stdout=subprocess.PIPE if capture else None, text=capture
    )
    with signals.around(proc):
        stdout, _ = proc.communicate()
    took = time.monotonic() - started
    if signals.interrupted or proc.returncode == EXIT_INTERRUPTED:
        raise Interrupted
    return Step(proc.returncode, took, stdout)


def heading(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def migrator_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrator", *args]


def demo(directory: Path, objects: int, size: int) -> int:
    """Every step in order; raises StepFailed or Interrupted, returns the exit code."""
    env = child_env()
    prepare_dir(directory)
    config = directory / "config.yaml"

    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise StepFailed(
            "the demo needs moto's S3 server: pip install -e '.[demo]'", EXIT_USAGE
        ) from None

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    heading(f"starting an in-memory S3 server (moto) at {endpoint}")
    server.start()
    try:
        config.write_text(
            CONFIG_TEMPLATE.format(job=JOB, dir=directory, endpoint=endpoint), encoding="utf-8"
        )
        print(f"wrote {config}", flush=True)

        heading(f"seeding {objects:,} objects of {size:,} bytes and the app table")
        seed_args = ["--config", str(config), "--objects", str(objects), "--size", str(size)]
        seed = run_step([sys.executable, "-m", "seed", *seed_args], env)
        if seed.code != 0:
            raise StepFailed(f"seeding failed (exit {seed.code})", seed.code)

        heading("migrator run")
        run = run_step(migrator_cmd("run", "--config", str(config)), env)
        if run.code != 0:
            run_step(migrator_cmd("status", "--config", str(config)), env)
            raise StepFailed(f"migrator run failed (exit {run.code})", run.code)

        heading("migrator status")
        run_step(migrator_cmd("status", "--config", str(config)), env)
        status = run_step(
            migrator_cmd("status", "--config", str(config), "--json"), env, capture=True
        )
        if status.code != 0:
            raise StepFailed(f"migrator status --json failed (exit {status.code})", status.code)
        doc = json.loads(status.stdout or "{}")

        heading("migrator verify")
        verify = run_step(migrator_cmd("verify", "--config", str(config)), env)
    finally:
        server.stop()

    print_summary(directory, config, doc, run, verify)
    return 0 if verify.code == 0 else verify.code


def print_summary(
    directory: Path, config: Path, doc: dict[str, Any], run: Step, verify: Step
) -> None:
    """Counts by state, the run's throughput, the audit's verdict and where the files are."""
    total = int(doc.get("total", 0))
    counts = ", ".join(f"{state} {n:,}" for state, n in doc.get("counts", {}).items())
    rate = total / run.seconds if run.seconds > 0 else 0.0
    verdict = "OK" if verify.code == 0 else f"FAILED (exit {verify.code})"
    print(
        "\n==> summary\n"
        f"  objects   {total:,} in job {doc.get('job', JOB)!r}: {counts}\n"
        f"  run       {run.seconds:.1f} s wall, {rate:,.0f} objects/s "
        "(2 workers x 16 requests in flight, chunks of 200)\n"
        f"  verify    {verdict}\n"
        f"  files     {config}  the job's config\n"
        f"            {directory / 'migrator.db'}  the ledger (SQLite)\n"
        f"            {directory / 'app.db'}  the app database, table avatars\n"
        f"  next      migrator status --config {config}\n"
        f"            migrator report --config {config} --summary\n"
        f"            migrator report --config {config} --out {directory / 'report.csv'}\n"
        f"            migrator jobs --config {config}\n"
        "  (the S3 server has stopped with the demo, so plan, run and verify on this config\n"
        "   need a new one; status, report and jobs read only the ledger)",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m migrator.demo",
        description="Run a complete migration against an in-memory S3 server (moto) and SQLite.",
    )
    parser.add_argument(
        "--dir", default="demo", type=Path, help="work directory, wiped first (default: demo)"
    )
    parser.add_argument(
        "--objects", default=2000, type=int, help="objects to migrate (default: 2000)"
    )
    parser.add_argument("--size", default=2048, type=int, help="bytes per object (default: 2048)")
    args = parser.parse_args(argv)
    if args.objects < 1 or args.size < 0:
        parser.error("--objects must be at least 1 and --size at least 0")
    try:
        return demo(args.dir, args.objects, args.size)
    except StepFailed as exc:
        print(f"\ndemo: {exc}", file=sys.stderr, flush=True)
        return exc.code or 1
    except (Interrupted, KeyboardInterrupt):
        print("\ndemo: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
