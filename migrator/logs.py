"""Logging for the CLI and the worker processes: one setup for both, and no secret in any
line (invariant I5) — libraries that log requests stay at WARNING, and every message passes
through :func:`migrator.errors.redact` on its way out.

Two formats: ``text`` (a time stamp, the process, the level, the message) and ``json``, one
JSON object per line for log shippers. A log call made through :func:`event` carries an event
name (``copied``, ``retry``, ``failed``, ``progress``, ``run_finished`` …) and fields (``key``,
``error``, counts …) that the JSON format writes as keys of their own; in text they are only
the message.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime
from typing import Any

from migrator.errors import redact

# These log signed request headers and credentials at DEBUG.
QUIET_LIBRARIES = ("botocore", "boto3", "urllib3", "s3transfer")
LOG_FORMATS = ("text", "json")


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    """Log one event: ``message`` for people, ``name`` and ``fields`` for machines."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"event": name, "fields": fields})


class ObjectEventsNeedVerbose(logging.Filter):
    """Text logs without ``-v``: no line per object (a failed object is also a warning in
    JSON logs, but a million of them would bury a terminal and its progress display; the
    failed count, ``migrator status`` and the report list them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "key" not in (getattr(record, "fields", None) or {})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, job, process, event, message, fields."""

    def __init__(self, job: str, who: str) -> None:
        super().__init__()
        self.job, self.who = job, who

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
        }
        if self.job:
            doc["job"] = self.job
        if self.who:
            doc["process"] = self.who
        doc["message"] = record.getMessage()
        for name, value in (getattr(record, "fields", None) or {}).items():
            doc[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``setup_logging`` installs (and replaces when called again)."""


def setup_logging(level: int, who: str = "", log_format: str = "text", job: str = "") -> None:
    """Configure the root logger of this process (again, if called again: ``run`` switches
    to JSON once it has read its options)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)  # ours from an earlier call; a test framework's stay
    handler = _Handler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(job, who))
    else:
        prefix = f"{who} " if who else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s"))
        if level > logging.INFO:
            handler.addFilter(ObjectEventsNeedVerbose())
    handler.addFilter(RedactFilter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # A failed refresh of assumed-role credentials is logged there with a traceback: a
    # refresh that must succeed raises, and migrator reports it in one line; one that may fail
    # is tried again at the next request.
    logging.getLogger("botocore.credentials").setLevel(logging.ERROR)


class EventWriter(io.TextIOBase):
    """A file for a rich ``Console`` under ``--log-format json``: each line printed becomes
    one log event, so that stderr carries nothing but JSON."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO, name: str = "message"):
        super().__init__()
        self.logger, self.level, self.name = logger, level, name
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                event(self.logger, self.level, self.name, line.strip())
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            event(self.logger, self.level, self.name, self.pending.strip())
        self.pending = ""
