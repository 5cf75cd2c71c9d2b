"""Logging for the CLI and the worker processes: one setup for both, and no secret in any
line (invariant I5) — libraries that log requests stay at WARNING, and every message passes
through :func:`migrator.errors.redact` on its way out."""

from __future__ import annotations

import logging

from migrator.errors import redact

# These log signed request headers and credentials at DEBUG.
QUIET_LIBRARIES = ("botocore", "boto3", "urllib3", "s3transfer")


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def setup_logging(level: int, who: str = "") -> None:
    prefix = f"{who} " if who else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(levelname)s %(message)s")
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
