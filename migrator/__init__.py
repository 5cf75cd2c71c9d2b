"""migrator: move objects between S3 locations and rewrite the database that points at them.

The public surface is small: load a config, run a job. Everything else is private.
"""

from migrator.config import Config, load_config
from migrator.errors import ConfigError, LedgerError, MigratorError, PreflightError, StorageError

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
