"""Wall time, CPU and memory of a whole process tree, for commands that fork helpers.

``migrator run`` is a supervisor, a ``multiprocessing`` fork server, a resource tracker and
worker processes forked by the fork server. When the supervisor exits, the fork server and the
resource tracker are re-parented to init (pid 1) and reaped there, so their CPU — and that of
the workers the fork server reaped — never reaches ``getrusage(RUSAGE_CHILDREN)`` of whoever
started ``migrator``. Counting that way would miss almost all of migrator's CPU.

So each measured command runs in its own cgroup v2 (a directory made under the cgroup2 mount,
the command writes its own pid into ``cgroup.procs`` before ``exec``); every descendant stays
in that cgroup whoever reaps it, and ``cpu.stat`` has their user and system time. The
``RUSAGE_CHILDREN`` delta is recorded next to it, to show the difference.

Where no cgroup can be made (not root, no cgroup2 mount), this process becomes a child
subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): orphaned descendants are re-parented to it, and
it reaps every process it saw in the tree, so ``RUSAGE_CHILDREN`` then counts them all.

Memory is sampled every ``SAMPLE_SECONDS``: the sum over the tree of PSS (``smaps_rollup``;
pages shared by forked workers are split between them, not counted once per process) and of
RSS. A process that lives less than a sample period can be missed; all the tools measured here
hold their peak for much longer.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_SECONDS = 0.1
DRAIN_SECONDS = 15.0  # how long helpers (fork server, resource tracker) may outlive the command
PR_SET_CHILD_SUBREAPER = 36
PAGE = os.sysconf("SC_PAGE_SIZE")
_serial = itertools.count()


@dataclass
class StepResult:
    commands: list[list[str]]
    wall_s: float
    exit_codes: list[int]
    output_tail: list[str]


@dataclass
class Usage:
    """One measured run: its steps ran one after the other, the commands of a step at once."""

    wall_s: float
    steps: list[StepResult]
    cpu_user_s: float
    cpu_system_s: float
    cpu_method: str
    rusage_children_cpu_s: float  # what RUSAGE_CHILDREN saw, for comparison
    peak_pss_mib: float
    peak_rss_mib: float
    peak_processes: int
    leftovers_killed: list[int] = field(default_factory=list)

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_system_s

    @property
    def ok(self) -> bool:
        return all(code == 0 for s in self.steps for code in s.exit_codes)


def _cgroup2_mount() -> Path | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    return None


class _Cgroup:
    """A leaf cgroup v2 for one measured run; ``None`` from ``make`` when we may not create one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def make(cls) -> _Cgroup | None:
        mount = _cgroup2_mount()
        if mount is None:
            return None
        name = f"migrator-bench-{os.getpid()}-{next(_serial)}"
        with contextlib.suppress(OSError):
            path = mount / name
            path.mkdir()
            if (path / "cpu.stat").exists():
                return cls(path)
            path.rmdir()
        return None

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        procs = str(self.path / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *cmd]

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        return []

    def cpu(self) -> tuple[float, float]:
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["user_usec"]) / 1e6, int(stat["system_usec"]) / 1e6

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(Path(entry.path, "stat").read_text().rpartition(")")[2].split()[1])
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(roots: Sequence[int]) -> list[int]:
    kids = _children_map()
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(kids.get(pid, ()))
    return found


def _memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes; (0, 0) when it is gone or a zombie."""
    pss = rss = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    return pss, rss


class _Sampler(threading.Thread):
    """Peak summed PSS/RSS of the tree; remembers every pid seen (the subreaper reaps them)."""

    def __init__(self, cgroup: _Cgroup | None) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.cgroup = cgroup
        self.roots: list[int] = []
        self.seen: set[int] = set()
        self.peak_pss = self.peak_rss = self.peak_procs = 0
        self.done = threading.Event()

    def sample(self) -> None:
        pids = self.cgroup.pids() if self.cgroup else _descendants(list(self.roots))
        self.seen.update(pids)
        pss = rss = 0
        for pid in pids:
            p, r = _memory(pid)
            pss, rss = pss + p, rss + r
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(pids))

    def run(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            self.sample()


def _become_subreaper() -> bool:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


def _reap(pids: set[int], deadline: float) -> None:
    """Wait for the orphans re-parented to us (subreaper) so RUSAGE_CHILDREN counts them."""
    left = set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child: its own parent reaps it, or gone
                if not Path(f"/proc/{pid}").exists():
                    left.discard(pid)
                continue
            if done:
                left.discard(pid)
        time.sleep(0.02)


def _children_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime


def _wait(
    procs: list[subprocess.Popen[bytes]], deadline: float, cgroup: _Cgroup | None
) -> list[int]:
    """Exit codes; past the deadline the whole tree is killed (code -9) instead of hanging."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pids = cgroup.pids() if cgroup else _descendants([p.pid for p in procs])
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            codes.append(proc.wait())
    return codes


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_measured(
    steps: Sequence[Sequence[Sequence[str]]],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float = 1800,
) -> Usage:
    """Run ``steps`` (each a list of commands started together) and measure the whole tree."""
    cgroup = _Cgroup.make()
    subreaper = cgroup is None and _become_subreaper()
    sampler = _Sampler(cgroup)
    cpu0 = cgroup.cpu() if cgroup else (0.0, 0.0)
    rusage0 = _children_cpu()
    results: list[StepResult] = []
    killed: list[int] = []
    started = time.monotonic()
    sampler.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-out-") as tmp:
            for n, step in enumerate(steps):
                outs = [Path(tmp, f"{n}-{i}.log") for i in range(len(step))]
                t0 = time.monotonic()
                procs = []
                for cmd, out in zip(step, outs, strict=True):
                    with out.open("wb") as fh:
                        argv = cgroup.wrap(cmd) if cgroup else list(cmd)
                        procs.append(
                            subprocess.Popen(
                                argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT
                            )
                        )
                sampler.roots = [p.pid for p in procs]
                sampler.sample()
                codes = _wait(procs, time.monotonic() + timeout, cgroup)
                results.append(
                    StepResult(
                        [list(c) for c in step],
                        time.monotonic() - t0,
                        codes,
                        [_tail(o) for o in outs],
                    )
                )
                if any(codes):
                    break
    finally:
        wall = time.monotonic() - started
        sampler.done.set()
        sampler.join()
        deadline = time.monotonic() + DRAIN_SECONDS
        if cgroup is not None:
            while cgroup.pids() and time.monotonic() < deadline:
                time.sleep(0.02)
            for pid in cgroup.pids():  # helpers that outlived their command by far: ours
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            while cgroup.pids() and time.monotonic() < deadline + 5:
                time.sleep(0.02)
        elif subreaper:
            _reap(sampler.seen, deadline)
    if cgroup is not None:
        cpu1 = cgroup.cpu()
        cgroup.remove()
        user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        method = "cgroup v2 cpu.stat (every descendant)"
    else:
        now = _children_cpu()
        user, system = now[0] - rusage0[0], now[1] - rusage0[1]
        method = (
            "RUSAGE_CHILDREN with this process as child subreaper"
            if subreaper
            else "RUSAGE_CHILDREN (orphaned descendants are missed)"
        )
    return Usage(
        wall_s=wall,
        steps=results,
        cpu_user_s=user,
        cpu_system_s=system,
        cpu_method=method,
        rusage_children_cpu_s=sum(_children_cpu()) - sum(rusage0),
        peak_pss_mib=sampler.peak_pss / 2**20,
        peak_rss_mib=sampler.peak_rss / 2**20,
        peak_processes=sampler.peak_procs,
        leftovers_killed=killed,
    )
