"""migrator: move objects between S3 locations and rewrite the database that points at them.

The public surface is small: load a config, run a job. Everything else is private. The config
names load on first use, so that ``migrator run`` can start its worker fork server before
pydantic, SQLAlchemy and boto3 are imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from migrator.errors import ConfigError, LedgerError, MigratorError, PreflightError, StorageError

if TYPE_CHECKING:
    from migrator.config import Config, load_config

__all__ = [
    "Config",
    "ConfigError",
    "LedgerError",
    "MigratorError",
    "PreflightError",
    "StorageError",
    "load_config",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Config", "load_config"):
        from migrator import config

        return getattr(config, name)
    raise AttributeError(f"module 'migrator' has no attribute {name!r}")
