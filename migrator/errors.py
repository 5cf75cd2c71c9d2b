"""Exceptions raised by migrator, and the exit code each one maps to.

    MigratorError            base; carries a one-line message that says what to do next
    ├── ConfigError          config.yaml or the environment is wrong          → exit 2
    ├── PreflightError       a bucket, endpoint, table or column is unusable  → exit 2
    │   └── UnreachableError the app database cannot be reached (a worker waits) → exit 2
    ├── LedgerError          the ledger database cannot be used               → exit 2
    │   └── NoLedgerError    there is no ledger yet (nothing was planned)      → exit 2
    └── StorageError         S3 refused or failed an operation                → exit 1

Workers never let these escape for a single object: per-object failures are recorded in the
ledger (attempts, last error) and the run goes on.
"""

from __future__ import annotations

import os
import re


class MigratorError(Exception):
    """Base class; ``str(err)`` is a single line fit for the terminal."""

    exit_code = 1


class ConfigError(MigratorError):
    exit_code = 2


class PreflightError(MigratorError):
    exit_code = 2


class UnreachableError(PreflightError):
    """A database could not be reached: fatal at start, worth waiting for mid-run."""


class LedgerError(MigratorError):
    exit_code = 2


class NoLedgerError(LedgerError):
    """The ledger does not exist yet: a command that only reads it has nothing to read."""


class StorageError(MigratorError):
    exit_code = 1


EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


_URL_PASSWORD = re.compile(r"(://[^/\s:@]*):([^@\s/]+)@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """Mask passwords in URLs and AWS credentials from the environment (invariant I5)."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def db_reason(exc: BaseException) -> str:
    """The first line of a database driver's message (not SQLAlchemy's statement dump),
    with secrets masked."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return redact(lines[0] if lines else type(exc).__name__)
