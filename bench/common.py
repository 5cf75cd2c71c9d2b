"""What the bench scripts share: the s3fast server (built by ``../shared/s3fast/build.sh``) and
throw-away PostgreSQL databases on the local server."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.conftest import S3Fast

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
S3FAST_BUILD = REPO.parent / "shared" / "s3fast" / "build.sh"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def s3fast_binary() -> str:
    """Build s3fast if its sources changed (``build.sh`` caches the binary); its path."""
    out = subprocess.run(["bash", str(S3FAST_BUILD)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


class S3Server(S3Fast):
    """An s3fast process on a free port (``-quiet``), with the admin calls the benches use."""

    def __init__(self, binary: str, *flags: str) -> None:
        super().__init__(binary, *flags)
        self.binary = binary

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _post(self, path: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}{path}", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def reset_all(self) -> None:
        """Drop every bucket, object and upload, and zero the counters."""
        self._post("/_s3fast/reset?stats=1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/_s3fast/stats", timeout=10) as r:
            return json.loads(r.read())

    def cpu_seconds(self) -> float:
        """User + system CPU the server process has used so far (``/proc/<pid>/stat``)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def create_database(admin: sa.Engine, name: str) -> str:
    """A fresh, empty database ``name`` (dropped first if left over); its URL."""
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return admin.url.set(database=name).render_as_string(hide_password=False)


def drop_database(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
