"""Stage notifications: a small JSON document POSTed to ``notify.webhook_url`` when a run
starts, a stage completes, or the run fails or finishes.

A notification must never slow or fail a migration: events go through a bounded queue to one
background thread, which POSTs each with a short timeout and a few retries (on a connection
error, 429 or 5xx) and then drops it; a full queue drops new events. The document carries a
``text`` line, which Slack's incoming webhooks show as the message. The URL of a webhook is a
secret (whoever has it may post): only its host is ever logged.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from migrator import __version__
from migrator.config import NotifyConfig

log = logging.getLogger("migrator.notify")

TRIES = 3
BACKOFF_SECONDS = 0.5
QUEUE_SIZE = 100
STAGES = ("copy", "rewrite", "delete")


def host_of(url: str) -> str:
    """What may be shown of a webhook URL: its host (the path often is the secret)."""
    return urlsplit(url).hostname or "webhook"


class Notifier:
    """Sends the job's events that ``notify.events`` asks for; does nothing without a
    webhook."""

    def __init__(self, cfg: NotifyConfig | None, job: str) -> None:
        self.cfg = cfg
        self.job = job
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        if cfg is not None:
            self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return self.cfg is not None

    def send(self, event: str, text: str, **fields: Any) -> None:
        """Queue ``event`` (one of ``started``, ``stage_completed``, ``failed``,
        ``finished``) unless the config leaves it out; never blocks."""
        if self.cfg is None or event not in self.cfg.events:
            return
        doc = {
            "event": event,
            "job": self.job,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "text": f"migrator: job {self.job}: {text}",
            "migrator": __version__,
            **fields,
        }
        try:
            self._queue.put_nowait(doc)
        except queue.Full:
            self.dropped += 1
            log.warning("notification %s dropped: the webhook is not keeping up", event)

    def close(self, wait_seconds: float = 10.0) -> None:
        """Let queued events go out for up to ``wait_seconds``, then stop waiting (the
        thread is a daemon: a webhook that hangs cannot keep the process alive)."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=wait_seconds)
        except queue.Full:
            return
        self._thread.join(wait_seconds)

    def _run(self) -> None:
        assert self.cfg is not None
        while (doc := self._queue.get()) is not None:
            if deliver(self.cfg.webhook_url, doc, self.cfg.timeout_seconds):
                self.sent += 1
            else:
                self.dropped += 1


def deliver(
    url: str,
    doc: dict[str, Any],
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST ``doc``; True once the webhook answered 2xx. Retries a connection error, 429 and
    5xx up to ``TRIES`` times; any other answer is final."""
    body = json.dumps(doc).encode()
    for attempt in range(1, TRIES + 1):
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"migrator/{__version__}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read(1024)
            return True
        except urllib.error.HTTPError as exc:
            retry = exc.code == 429 or exc.code >= 500
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            retry = True
            reason = type(exc).__name__ if isinstance(exc, ValueError) else _reason(exc)
        if not retry or attempt == TRIES:
            log.warning(
                "notification %s to %s not delivered: %s", doc["event"], host_of(url), reason
            )
            return False
        sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
    return False


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", None)
    return str(inner) if inner is not None else type(exc).__name__


class StageWatch:
    """Tells, from the counts the supervisor reads every second, when a stage has completed:
    every object that can pass it has (failed and skipped ones cannot). Only once the plan is
    complete, since the total still grows before."""

    def __init__(self, stages: tuple[str, ...]) -> None:
        self.stages = stages
        self.reported: set[str] = set()

    def completed(self, counts: dict[str, int], planned: bool) -> list[str]:
        if not planned:
            return []
        total = sum(counts.values())
        settled = counts.get("failed", 0) + counts.get("skipped", 0)
        done = counts.get("done", 0)
        past = {
            "delete": done,
            "rewrite": done + counts.get("rewritten", 0),
            "copy": done + counts.get("rewritten", 0) + counts.get("copied", 0),
        }
        new = [
            s
            for s in self.stages
            if s not in self.reported and total and past[s] + settled == total
        ]
        self.reported.update(new)
        return new
