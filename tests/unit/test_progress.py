"""Progress arithmetic: stage counts from ledger states, rates over the last minute, ETA text."""

from __future__ import annotations

import io

from rich.console import Console

from migrator.config import Config
from migrator.progress import RateMeter, RunDisplay, Snapshot, fmt_eta


def test_snapshot_counts_a_row_in_every_stage_it_passed() -> None:
    snap = Snapshot.from_counts({"pending": 5, "copied": 4, "rewritten": 3, "done": 2, "failed": 1})
    assert (snap.total, snap.copied, snap.rewritten, snap.deleted, snap.failed) == (
        15,
        9,
        5,
        2,
        1,
    )


def test_rate_meter_uses_the_last_minute_only() -> None:
    meter = RateMeter()
    meter.add(0, now=0.0)
    meter.add(100, now=10.0)
    assert meter.rate() == 10.0
    meter.add(100, now=100.0)  # stalled: the old samples fall out of the window
    meter.add(100, now=130.0)
    assert meter.rate() == 0.0


def test_fmt_eta() -> None:
    assert fmt_eta(None) == "--"
    assert fmt_eta(65) == "1m05s"
    assert fmt_eta(7200) == "2h00m"


def _config() -> Config:
    return Config.model_validate(
        {
            "job": "j",
            "source": {"bucket": "legacy", "prefix": "image/"},
            "destination": {"bucket": "production", "prefix": "avatar/"},
        }
    )


def test_plain_lines_show_the_copy_rate_and_eta_before_anything_is_done() -> None:
    out = io.StringIO()
    display = RunDisplay(_config(), Console(file=out, force_terminal=False, width=200))
    display.update(Snapshot.from_counts({"pending": 100}), 2, now=0.0)
    # after_all: 50 copied (and rewritten) in 5 s, nothing deleted yet.
    display.update(Snapshot.from_counts({"pending": 50, "rewritten": 50}), 2, now=5.0)
    first, second = out.getvalue().splitlines()
    assert "0/100 done" in first and "ETA --" in first
    assert "0/100 done" in second and "copied 50" in second
    assert "10 obj/s" in second and "ETA 0m05s" in second


def test_quiet_display_prints_nothing() -> None:
    out = io.StringIO()
    display = RunDisplay(_config(), Console(file=out, force_terminal=False), quiet=True)
    display.update(Snapshot.from_counts({"pending": 1}), 1, now=0.0)
    assert out.getvalue() == ""


def test_no_eta_while_the_job_is_still_being_planned() -> None:
    """While ``run`` still lists the job its total grows: an ETA from it would be wrong."""
    out = io.StringIO()
    display = RunDisplay(_config(), Console(file=out, force_terminal=False, width=200))
    display.update(Snapshot.from_counts({"pending": 100}), 2, now=0.0, planning=True)
    display.update(Snapshot.from_counts({"pending": 950, "done": 50}), 2, now=5.0, planning=True)
    display.update(Snapshot.from_counts({"pending": 900, "done": 100}), 2, now=10.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "ETA planning" in lines[0] and "ETA planning" in lines[1]
    assert "ETA planning" not in lines[2] and "ETA " in lines[2]
