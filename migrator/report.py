"""Reports with pandas: one row per object, written as CSV or Parquet in batches."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from migrator.errors import ConfigError
from migrator.ledger.repo import Ledger

_TEXT = (
    "job",
    "source_key",
    "dest_key",
    "etag",
    "dest_etag",
    "storage_class",
    "state",
    "failed_stage",
)
SCHEMA = pa.schema(
    [(c, pa.string()) for c in _TEXT]
    + [("size", pa.int64()), ("attempts", pa.int64()), ("last_error", pa.string())]
    + [(c, pa.timestamp("us")) for c in ("last_modified", "created_at", "updated_at")]
)
COLUMNS = SCHEMA.names


def write_report(ledger: Ledger, out: Path, batch: int = 50_000) -> int:
    """Stream the job's rows into ``out`` (.csv or .parquet); returns the number of rows."""
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ConfigError(f"--out {out}: use a .csv or .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    writer = pq.ParquetWriter(out, SCHEMA) if suffix == ".parquet" else None
    try:
        for rows in ledger.iter_rows(batch=batch):
            frame = pd.DataFrame(rows)[COLUMNS]
            if writer is not None:
                writer.write_table(pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False))
            else:
                frame.to_csv(out, mode="a" if written else "w", header=not written, index=False)
            written += len(frame)
        if writer is None and written == 0:
            pd.DataFrame(columns=COLUMNS).to_csv(out, index=False)
    finally:
        if writer is not None:
            writer.close()
    return written
