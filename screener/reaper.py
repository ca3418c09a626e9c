"""A watchdog that ends the processes of a local Ray whose driver was killed.

A local Ray's GCS and raylet end with the driver that started them, but the agents the raylet
starts (ray::DashboardAgent, ray::RuntimeEnvAgent) then wait for a GCS that is gone and stay
behind. The watchdog runs beside the driver in a session of its own, notes the driver's
descendants every INTERVAL seconds, and when the driver is gone however it ended (the pipe it
holds closes) kills those of them still running.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

INTERVAL = 1.0
_watchdogs: list[subprocess.Popen] = []  # alive as long as this process: its pipe is the signal


def guard() -> None:
    """Start the watchdog of this process (the driver); it exits soon after the driver does."""
    _watchdogs.append(subprocess.Popen([sys.executable, "-m", "screener.reaper", str(os.getpid())],
                                       stdin=subprocess.PIPE, start_new_session=True))


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, by pid, with its start time, so that a reused pid is not
    taken for one of them."""
    children: dict[int, list[int]] = {}
    started = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            started[int(entry.name)] = fields[19]
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = started[child]
        todo += children.get(child, [])
    return found


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def watch(driver: int) -> None:
    """Note the driver's descendants until stdin closes, then kill those still running."""
    seen: dict[int, str] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], INTERVAL)
        if readable and not os.read(sys.stdin.fileno(), 1024):
            break
        seen.update(descendants(driver))
    seen.pop(os.getpid(), None)  # the watchdog is one of the driver's children too
    for pid, start in seen.items():
        if _start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
