"""Reports with pandas: one row per object, written as CSV or Parquet in batches."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Summary:
    """``report --summary``: where the job stands and how it went."""

    job: str
    counts: dict[str, int]
    bytes: dict[str, int]
    errors: dict[str, Any]  # ``status.error_summary``: attempts and top errors by code
    minutes: pd.DataFrame  # per minute: copied/done objects and bytes (index: UTC start)

    @property
    def moved_bytes(self) -> int:
        """Bytes of the objects copied and verified (those past ``pending``)."""
        return sum(self.bytes.get(s, 0) for s in ("copied", "rewritten", "done"))

    @property
    def first(self) -> pd.Timestamp | None:
        return self.minutes.index[0] if len(self.minutes) else None

    @property
    def last(self) -> pd.Timestamp | None:
        return self.minutes.index[-1] + pd.Timedelta(minutes=1) if len(self.minutes) else None

    def as_dict(self) -> dict[str, Any]:
        per_minute = [
            {"minute": t.isoformat(), **{k: int(v) for k, v in row.items()}}
            for t, row in self.minutes.iterrows()
        ]
        return {
            "job": self.job,
            "total": sum(self.counts.values()),
            "counts": self.counts,
            "bytes": self.bytes,
            "moved_bytes": self.moved_bytes,
            "first_activity": self.first.isoformat() if self.first is not None else None,
            "last_activity": self.last.isoformat() if self.last is not None else None,
            **self.errors,
            "per_minute": per_minute,
        }


MINUTE_COLUMNS = ["copied", "copied_bytes", "done", "done_bytes"]


def summarize(ledger: Ledger) -> Summary:
    """Counts, bytes, errors by code and the per-minute throughput, from the count rows and
    the rows that carry an error: quick on a ledger of millions."""
    from migrator.status import ERROR_SAMPLE, error_summary

    errors = ledger.error_rows(ERROR_SAMPLE)
    activity = ledger.activity_by_minute()
    minutes = pd.DataFrame(activity, columns=["minute", *MINUTE_COLUMNS])
    minutes.index = pd.to_datetime(minutes.pop("minute"), unit="s", utc=True)
    if len(minutes):  # quiet minutes in between are zeros, not gaps
        minutes = minutes.resample("1min").sum()
    return Summary(
        ledger.job,
        ledger.counts(),
        ledger.bytes_by_state(),
        error_summary(errors, sampled=len(errors) == ERROR_SAMPLE),
        minutes,
    )


def write_html(summary: Summary, out: Path) -> None:
    """A self-contained page: the counts, the errors by code, and copies and finished
    objects per minute as an inline SVG chart (no script, nothing fetched)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = pd.DataFrame(
        {"objects": summary.counts, "bytes": summary.bytes}, index=list(summary.counts)
    )
    errors = pd.DataFrame(
        [
            {
                "code": g["code"],
                "objects": g["objects"],
                "failed": g["failed"],
                "example": f"{g['example']['key']}: {g['example']['error']}",
            }
            for g in summary.errors["top_errors"]
        ],
        columns=["code", "objects", "failed", "example"],
    )
    per_minute = summary.minutes.copy()
    per_minute.index = per_minute.index.strftime("%Y-%m-%d %H:%M")
    span = (
        f"{summary.first:%Y-%m-%d %H:%M} – {summary.last:%H:%M} UTC"
        if summary.first is not None and summary.last is not None
        else "no activity recorded"
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>migrator: {escape(summary.job)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head>
<body>
<h1>Job {escape(summary.job)}</h1>
<p>{sum(summary.counts.values()):,} objects; {summary.moved_bytes:,} bytes copied; {span}</p>
<h2>Objects per minute</h2>
{_svg_chart(summary.minutes)}
<h2>By state</h2>
{counts.to_html(border=0)}
<h2>Errors by code</h2>
{errors.to_html(index=False, border=0) if len(errors) else "<p>none</p>"}
<h2>Per minute</h2>
{per_minute.to_html(border=0)}
</body></html>
"""
    out.write_text(page, encoding="utf-8")


def _svg_chart(minutes: pd.DataFrame, width: int = 720, height: int = 220) -> str:
    """Copies and finished objects per minute as two polylines (a few lines of SVG: no
    plotting library is worth its weight for one chart)."""
    if len(minutes) == 0:
        return "<p>no activity recorded</p>"
    top = max(int(minutes[["copied", "done"]].to_numpy().max()), 1)
    n = len(minutes)

    def points(column: str) -> str:
        xs = [0.0] if n == 1 else [i * width / (n - 1) for i in range(n)]
        return " ".join(
            f"{x:.1f},{height - v * height / top:.1f}"
            for x, v in zip(xs, minutes[column], strict=True)
        )

    return (
        f'<svg width="{width + 60}" height="{height + 40}" viewBox="-50 -10 {width + 60} '
        f'{height + 40}" role="img" aria-label="objects per minute">'
        f'<text x="-45" y="5" font-size="11">{top:,}</text>'
        f'<text x="-45" y="{height}" font-size="11">0</text>'
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#888"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points("copied")}"/>'
        f'<polyline fill="none" stroke="#2ca02c" stroke-width="2" points="{points("done")}"/>'
        f'<text x="0" y="{height + 25}" font-size="12" fill="#1f77b4">copied</text>'
        f'<text x="70" y="{height + 25}" font-size="12" fill="#2ca02c">done</text></svg>'
    )


_BUCKETS = (1, 5, 10, 15, 30, 60, 120, 360, 720, 1440)


def over_time(minutes: pd.DataFrame, rows: int = 20) -> tuple[int, pd.DataFrame]:
    """The per-minute throughput in at most about ``rows`` rows, for a terminal: the
    smallest of 1, 5, 10, 15, 30 … minutes per row that fits; returns that size too."""
    size = next((b for b in _BUCKETS if len(minutes) <= rows * b), _BUCKETS[-1])
    if size == 1 or len(minutes) == 0:
        return 1, minutes
    return size, minutes.resample(f"{size}min").sum()
