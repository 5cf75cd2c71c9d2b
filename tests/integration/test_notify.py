"""Stage notifications against a local HTTP server: what a run POSTs, and that a webhook
that fails, hangs or is not there never slows or fails the migration."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from migrator.notify import StageWatch
from tests.helpers import assert_converged, run_cli, sqlite_job

SECRET = "T000/B000/XXXXsecretXXXX"


class Hook:
    """A webhook receiver: records each POSTed document; ``status`` and ``delay`` say how it
    answers."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status, self.delay = status, delay
        self.received: list[dict[str, Any]] = []
        self.requests = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests += 1
                time.sleep(hook.delay)
                if hook.status == 200:
                    hook.received.append(json.loads(body))
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/{SECRET}"

    def events(self) -> list[str]:
        return [d["event"] for d in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def notify_job(tmp_path: Path, moto_s3: Any, moto_endpoint: str, notify: dict[str, Any]) -> Any:
    return sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, count=30, size=64, notify=notify
    )


def test_a_run_posts_start_each_stage_and_the_end(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, hook: Hook
) -> None:
    job = notify_job(tmp_path, moto_s3, moto_endpoint, {"webhook_url": hook.url})
    result = run_cli("run", "--config", str(job.config_path))
    assert result.returncode == 0, result.stderr
    assert_converged(job)
    assert hook.events() == [
        "started",
        "stage_completed",
        "stage_completed",
        "stage_completed",
        "finished",
    ]
    stages = [d["stage"] for d in hook.received if d["event"] == "stage_completed"]
    assert stages == ["copy", "rewrite", "delete"]
    end = hook.received[-1]
    assert end["job"] == job.cfg.job and end["counts"]["done"] == 30
    assert end["text"] == f"migrator: job {job.cfg.job}: finished: all 30 objects done"
    assert SECRET not in result.stderr + result.stdout


def test_only_the_events_asked_for(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, hook: Hook
) -> None:
    job = notify_job(
        tmp_path, moto_s3, moto_endpoint, {"webhook_url": hook.url, "events": ["finished"]}
    )
    assert run_cli("run", "--quiet", "--config", str(job.config_path)).returncode == 0
    assert hook.events() == ["finished"]


def test_failed_rows_send_failed(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, hook: Hook
) -> None:
    job = notify_job(tmp_path, moto_s3, moto_endpoint, {"webhook_url": hook.url})
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    gone = job.objects[0].key
    moto_s3.delete_object(Bucket=job.cfg.source.bucket, Key=gone)  # deleted after plan
    result = run_cli("run", "--quiet", "--config", str(job.config_path))
    assert result.returncode == 1, result.stderr
    assert hook.events()[0] == "started" and hook.events()[-1] == "failed"
    assert "1 failed" in hook.received[-1]["text"]
    # after_all: the delete stage never completes while a row failed before its rewrite
    assert "delete" not in [d.get("stage") for d in hook.received]


@pytest.mark.parametrize("trouble", ["http500", "hangs", "nobody"])
def test_a_broken_webhook_never_fails_or_stalls_the_run(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, trouble: str
) -> None:
    hook = Hook(status=500) if trouble == "http500" else Hook(delay=30 if trouble == "hangs" else 0)
    url = hook.url
    if trouble == "nobody":
        hook.close()  # the port is closed: connection refused
    try:
        job = notify_job(
            tmp_path, moto_s3, moto_endpoint, {"webhook_url": url, "timeout_seconds": 0.5}
        )
        started = time.monotonic()
        result = run_cli("run", "--quiet", "--config", str(job.config_path), timeout=120)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert_converged(job)
        assert "not delivered" in result.stderr and "127.0.0.1" in result.stderr
        assert SECRET not in result.stderr
        # five events, each tried three times with 0.5 s timeouts and short backoffs: the run
        # waits at most ten seconds for the queue at its end, however the webhook behaves
        assert elapsed < 60
        if trouble == "http500":
            assert hook.requests == 5 * 3  # every event retried, then dropped
    finally:
        if trouble != "nobody":
            hook.close()


def test_the_webhook_url_may_come_from_the_environment(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, hook: Hook
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=5)
    result = run_cli(
        "run", "--quiet", "--config", str(job.config_path), env={"MIGRATOR_WEBHOOK_URL": hook.url}
    )
    assert result.returncode == 0, result.stderr
    # no app DB: copy (recorded straight past the rewrite) and delete
    assert hook.events() == ["started", "stage_completed", "stage_completed", "finished"]


def test_a_bad_webhook_url_is_one_line_without_the_value(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "job: j\nsource: {bucket: legacy, prefix: image/}\n"
        "destination: {bucket: production, prefix: avatar/}\n"
        f"notify: {{webhook_url: 'ftp://hooks.example.com/{SECRET}'}}\n"
    )
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 2
    assert "notify.webhook_url: must be an http(s) URL" in result.stderr
    assert SECRET not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_stage_watch_reports_each_stage_once_when_every_object_passed_it() -> None:
    watch = StageWatch(("copy", "rewrite", "delete"))
    counts = {"pending": 0, "copied": 2, "rewritten": 5, "done": 2, "failed": 1, "skipped": 0}
    assert watch.completed(counts, planned=False) == []  # the total may still grow
    assert watch.completed(counts, planned=True) == ["copy"]
    assert watch.completed(counts, planned=True) == []
    counts.update(copied=0, rewritten=7)
    assert watch.completed(counts, planned=True) == ["rewrite"]
    counts.update(rewritten=0, done=9)
    assert watch.completed(counts, planned=True) == ["delete"]
    assert watch.completed({}, planned=True) == []
