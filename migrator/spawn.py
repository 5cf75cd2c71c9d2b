"""How the supervisor starts worker processes: forked by a fork server that has imported the
worker code once. Kept free of heavy imports, so that ``migrator run`` starts the fork server
first thing and its imports overlap the supervisor's own."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from typing import Any


def worker_context() -> Any:
    """Workers fork from a fork server that has already imported the worker code, so starting
    one takes milliseconds and inherits no threads, sockets or clients from the supervisor
    (awscrt's event-loop threads do not survive a plain ``fork``)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["migrator.preload"])
    return ctx


def start_fork_server() -> Any:
    """Start the fork server now (it imports the worker code while the caller goes on)."""
    ctx = worker_context()
    multiprocessing.forkserver.ensure_running()
    return ctx
