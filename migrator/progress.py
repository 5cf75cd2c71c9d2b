"""Progress of a run: a rich display on a terminal (one bar per stage and a status line), a
plain line every few seconds otherwise, or — under ``--log-format json`` — a ``progress``
event with the same figures as fields."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from migrator.config import Config
from migrator.logs import event

PLAIN_INTERVAL = 5.0
RATE_WINDOW = 60.0

log = logging.getLogger("migrator.progress")


@dataclass(frozen=True)
class Snapshot:
    """What the ledger says, as stages: a row counts in every stage it has passed."""

    total: int
    copied: int
    rewritten: int
    deleted: int
    done: int
    failed: int  # failed or skipped: will not move on in this run
    copied_bytes: int = 0
    deleted_bytes: int = 0

    @classmethod
    def from_counts(
        cls, counts: dict[str, int], bytes_by_state: dict[str, int] | None = None
    ) -> Snapshot:
        b = bytes_by_state or {}
        done = counts.get("done", 0)
        rewritten = counts.get("rewritten", 0) + done
        return cls(
            total=sum(counts.values()),
            copied=counts.get("copied", 0) + rewritten,
            rewritten=rewritten,
            deleted=done,
            done=done,
            failed=counts.get("failed", 0) + counts.get("skipped", 0),
            copied_bytes=sum(b.get(s, 0) for s in ("copied", "rewritten", "done")),
            deleted_bytes=b.get("done", 0),
        )


@dataclass(frozen=True)
class Workers:
    """The health of this run's worker processes."""

    alive: int
    expected: int
    restarts: int = 0

    def __str__(self) -> str:
        text = f"workers {self.alive}/{self.expected}"
        return text + (f" ({self.restarts} restarted)" if self.restarts else "")


class RateMeter:
    """Per second over the last minute, from samples of a growing count."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, value: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, value))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return max(d1 - d0, 0) / (t1 - t0) if t1 > t0 else 0.0


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_mb(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e6:,.1f} MB/s"


class _StageProgress(Progress):
    """rich's progress bars, with the run's status line under them."""

    status: RenderableType = Text("")

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield self.status


class RunDisplay:
    """Shows a run's progress; ``update`` is called about once a second."""

    def __init__(
        self,
        cfg: Config,
        console: Console | None = None,
        quiet: bool = False,
        structured: bool = False,
    ) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.structured = structured  # --log-format json: progress events, not lines
        self.meters = {name: RateMeter() for name in ("copied", "rewritten", "deleted")}
        self.byte_meters = {name: RateMeter() for name in ("copied", "deleted")}
        self.live = self.console.is_terminal and not quiet and not structured
        self.last_plain = -PLAIN_INTERVAL
        self.progress: _StageProgress | None = None
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
        self.progress = _StageProgress(
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
        self,
        snap: Snapshot,
        workers: Workers | int,
        now: float | None = None,
        planning: bool = False,
        s3_retries: int | None = None,
    ) -> None:
        """``planning``: the job is still being listed, so its total is still growing and no
        ETA can be given yet."""
        if isinstance(workers, int):
            workers = Workers(workers, workers)
        now = time.monotonic() if now is None else now
        for name, meter in self.meters.items():
            meter.add(getattr(snap, name), now)
        self.byte_meters["copied"].add(snap.copied_bytes, now)
        self.byte_meters["deleted"].add(snap.deleted_bytes, now)
        # The rate of the stage doing the bulk of the work: copies until every object is
        # copied (under after_all nothing is done before then), then finished objects.
        if snap.copied + snap.failed < snap.total:
            rate, left = self.meters["copied"].rate(), snap.total - snap.copied - snap.failed
        else:
            last = self.stages()[-1]
            rate, left = self.meters[last].rate(), snap.total - getattr(snap, last) - snap.failed
        eta = "planning" if planning else fmt_eta(left / rate if rate > 0 else None)
        copy_rate = self.meters["copied"].rate()
        status = (
            f"{copy_rate:,.0f} obj/s · {fmt_mb(self.byte_meters['copied'].rate())} · ETA {eta} · "
            f"failed {snap.failed} · {workers}"
            + (f" · S3 retries {s3_retries:,}" if s3_retries else "")
        )
        if self.progress is not None:
            for name, task in self.tasks.items():
                self.progress.update(
                    task, total=snap.total, completed=getattr(snap, name), info=self._info(name)
                )
            self.progress.status = Text(status, style="dim")
            return
        if not self.quiet and now - self.last_plain >= PLAIN_INTERVAL:
            self.last_plain = now
            self.plain(snap, status, eta=eta, workers=workers)

    def _info(self, name: str) -> str:
        """A stage's own rate over the last minute, next to its bar."""
        text = f"{self.meters[name].rate():,.0f} obj/s"
        if name in self.byte_meters:
            text += f" · {fmt_mb(self.byte_meters[name].rate())}"
        return text

    def plain(
        self, snap: Snapshot, info: str, eta: str | None = None, workers: Workers | None = None
    ) -> None:
        parts = " · ".join(f"{n} {getattr(snap, n)}" for n in self.stages())
        line = f"{self.cfg.job}: {snap.done}/{snap.total} done · {parts} · {info}"
        if self.structured:
            event(
                log,
                logging.INFO,
                "progress",
                line,
                total=snap.total,
                **{n: getattr(snap, n) for n in self.stages()},
                done=snap.done,
                failed=snap.failed,
                objects_per_second=round(self.meters["copied"].rate(), 1),
                bytes_per_second=round(self.byte_meters["copied"].rate()),
                eta=eta,
                workers_alive=workers.alive if workers else None,
            )
            return
        self.console.print(line, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
