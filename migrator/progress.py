"""Progress of a run: a rich display on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from migrator.config import Config

PLAIN_INTERVAL = 5.0
RATE_WINDOW = 60.0


@dataclass(frozen=True)
class Snapshot:
    total: int
    copied: int
    rewritten: int
    deleted: int
    done: int
    failed: int  # failed or skipped: will not move on in this run

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> Snapshot:
        done = counts.get("done", 0)
        rewritten = counts.get("rewritten", 0) + done
        return cls(
            total=sum(counts.values()),
            copied=counts.get("copied", 0) + rewritten,
            rewritten=rewritten,
            deleted=done,
            done=done,
            failed=counts.get("failed", 0) + counts.get("skipped", 0),
        )


class RateMeter:
    """Objects finished per second over the last minute, and the time left at that rate."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunDisplay:
    """Shows a run's progress; ``update`` is called about once a second."""

    def __init__(self, cfg: Config, console: Console | None = None, quiet: bool = False) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.copy_meter = RateMeter()
        self.done_meter = RateMeter()
        self.live = self.console.is_terminal and not quiet
        self.last_plain = -PLAIN_INTERVAL
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def stages(self) -> list[str]:
        names = ["copied"]
        if self.cfg.app_db is not None:
            names.append("rewritten")
        if self.cfg.delete_source != "never":
            names.append("deleted")
        return names

    def start(self) -> None:
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            refresh_per_second=4,
        )
        for name in self.stages():
            self.tasks[name] = self.progress.add_task(name, total=None, info="")
        self.progress.start()

    def update(
        self, snap: Snapshot, workers_alive: int, now: float | None = None, planning: bool = False
    ) -> None:
        """``planning``: the job is still being listed, so its total is still growing and no
        ETA can be given yet."""
        now = time.monotonic() if now is None else now
        self.copy_meter.add(snap.copied, now)
        self.done_meter.add(snap.done, now)
        # The rate of the stage doing the bulk of the work: copies until every object is
        # copied (under after_all nothing is done before then), then finished objects.
        if snap.copied + snap.failed < snap.total:
            rate, left = self.copy_meter.rate(), snap.total - snap.copied - snap.failed
        else:
            rate, left = self.done_meter.rate(), snap.total - snap.done - snap.failed
        eta = "planning" if planning else fmt_eta(left / rate if rate > 0 else None)
        info = f"{rate:,.0f} obj/s · ETA {eta} · failed {snap.failed} · workers {workers_alive}"
        if self.progress is not None:
            for name, task in self.tasks.items():
                self.progress.update(
                    task,
                    total=snap.total,
                    completed=getattr(snap, name),
                    info=info if name == self.stages()[-1] else "",
                )
            return
        if not self.quiet and now - self.last_plain >= PLAIN_INTERVAL:
            self.last_plain = now
            self.plain(snap, info)

    def plain(self, snap: Snapshot, info: str) -> None:
        parts = " · ".join(f"{n} {getattr(snap, n)}" for n in self.stages())
        self.console.print(
            f"{self.cfg.job}: {snap.done}/{snap.total} done · {parts} · {info}",
            highlight=False,
            soft_wrap=True,
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
