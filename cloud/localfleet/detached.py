"""Processes that outlive the command that started them.

Each runs in its own session with stdout and stderr in one log file. It is known by its pid *and* its
start time, so a pid the system has since given to another program is never signalled.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from common.errors import PrunefleetError


class DetachedError(PrunefleetError, RuntimeError):
    """A process that did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class Proc:
    name: str
    role: str  # cloud, edge, load, prometheus
    pid: int
    started: float  # the process's start time (psutil.Process.create_time)
    log: str
    address: str = ""
    metrics_address: str = ""
    cpus: float = 0.0  # the CPU limit it mimics (0 = none)
    affinity: tuple[int, ...] = ()
    threads: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "affinity": list(self.affinity)}

    @classmethod
    def from_json(cls, raw: dict) -> Proc:
        return cls(**{**raw, "affinity": tuple(raw.get("affinity", ()))})


@dataclass
class Spawned:
    """A process just started, before it is known to be healthy."""

    name: str
    process: subprocess.Popen
    log: Path
    started: float
    affinity: tuple[int, ...] = field(default_factory=tuple)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def spawn(name: str, argv: Sequence[str], log: Path, env: dict | None = None, affinity: Sequence[int] = ()) -> Spawned:
    """Start ARGV in a new session; output to LOG (truncated). Pin it to AFFINITY when given.

    The interpreter is still starting when the affinity is set, before any thread exists, so every
    thread it creates later inherits the pinning.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    if affinity:
        os.sched_setaffinity(process.pid, set(affinity))
    return Spawned(name, process, log, psutil.Process(process.pid).create_time(), tuple(affinity))


def abandon(spawned: Spawned) -> None:
    """Kill a process that did not come up, with anything it started."""
    if spawned.process.poll() is None:
        _signal_group(spawned.process.pid, signal.SIGKILL)
    spawned.process.wait()


def _scan(spawned: Spawned, pattern: re.Pattern, deadline: float) -> re.Match | None:
    while time.monotonic() < deadline:
        exited = spawned.process.poll() is not None
        try:
            text = spawned.log.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines(keepends=True):
            if line.endswith("\n") and (match := pattern.search(line)):
                return match
        if exited:
            raise DetachedError(
                f"{spawned.name} exited with code {spawned.process.returncode}; log {spawned.log}:\n{tail(spawned.log)}"
            )
        time.sleep(0.2)
    return None


def wait_for_line(spawned: Spawned, pattern: re.Pattern, timeout_s: float) -> re.Match:
    """Poll the log for a complete line matching PATTERN while the process lives; kill it otherwise."""
    try:
        match = _scan(spawned, pattern, time.monotonic() + timeout_s)
    except BaseException:
        abandon(spawned)
        raise
    if match is None:
        abandon(spawned)
        raise DetachedError(
            f"{spawned.name} did not come up within {timeout_s:.0f} s; log {spawned.log}:\n{tail(spawned.log)}"
        )
    return match


def _process(pid: int, started: float) -> psutil.Process | None:
    """The running process with this pid and start time, or None."""
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) > 0.5 or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


def alive(proc: Proc) -> bool:
    return _process(proc.pid, proc.started) is not None


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (otherwise init does)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """The process leads its own session, so its group holds it and anything it started."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(procs: Sequence[Proc], grace_s: float = 10.0) -> dict[str, str]:
    """SIGTERM every process still ours, wait up to GRACE_S, then SIGKILL what is left.

    Returns how each one ended: "stopped", "killed" or "not running".
    """
    outcome = {p.name: "not running" for p in procs}
    running = [p for p in procs if alive(p)]
    for p in running:
        _signal_group(p.pid, signal.SIGTERM)
        outcome[p.name] = "stopped"
    deadline = time.monotonic() + grace_s
    while running and time.monotonic() < deadline:
        for p in running:
            _reap(p.pid)
        running = [p for p in running if alive(p)]
        if running:
            time.sleep(0.1)
    for p in running:
        _signal_group(p.pid, signal.SIGKILL)
        outcome[p.name] = "killed"
    for p in running:
        for _ in range(50):
            _reap(p.pid)
            if not alive(p):
                break
            time.sleep(0.1)
    return outcome
