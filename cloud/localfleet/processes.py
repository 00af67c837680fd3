"""Start prunefleet processes, wait for their "serving on HOST:PORT" line, stop them cleanly; start a
cloud and its edges as one cluster. Their argument lists come from `cloud.localfleet.commands`."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from common.errors import PrunefleetError

SERVING = re.compile(r"serving on (\S+:\d+)(?: metrics on (\S+:\d+))?")


class ProcessError(PrunefleetError, RuntimeError):
    """A child process that did not come up; the message carries the tail of its log."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    address: str
    metrics_address: str
    log_path: Path

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _drain(stream, log_path: Path) -> None:
    """Keep reading the child's stdout so it never blocks on a full pipe."""
    with open(log_path, "ab") as log:
        for line in stream:
            log.write(line)
            log.flush()


def pin_this_process(cpus: Iterable[int]) -> set[int]:
    """Run every thread of this process, and so every thread they start later, on `cpus` only;
    returns the CPUs the calling thread could run on before."""
    before = os.sched_getaffinity(0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cpus))
        except ProcessLookupError:  # a thread that has just ended
            pass
    return before


def start(
    name: str,
    args: list[str],
    log_dir: Path,
    timeout_s: float = 120.0,
    env: dict | None = None,
    affinity: Iterable[int] = (),
) -> Child:
    """Run `python -m ARGS...`; stderr goes to LOG_DIR/NAME.log; wait for the serving line on stdout.
    With `affinity`, the process and every thread it starts run on those CPUs only."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    cpus = set(affinity)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    if cpus:  # the interpreter is still starting, before any thread of its own exists
        os.sched_setaffinity(process.pid, cpus)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    buffer = b""
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=0.2):
            chunk = os.read(process.stdout.fileno(), 4096)
            buffer += chunk
            match = SERVING.search(buffer.decode(errors="replace"))
            if match:
                threading.Thread(target=_drain, args=(process.stdout, log_path), daemon=True).start()
                return Child(name, process, match.group(1), match.group(2) or "", log_path)
    process.kill()
    process.wait()
    raise ProcessError(
        f"{name} did not start within {timeout_s:.0f} s (exit code {process.returncode}); "
        f"log {log_path}:\n{_tail(log_path)}"
    )


@dataclass(frozen=True)
class Launch:
    """One process `start_cluster` starts: `start`'s name, arguments, timeout and CPUs."""

    name: str
    args: list[str]
    timeout_s: float = 120.0
    affinity: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.args:
            raise ValueError("a launch needs a name and the arguments of `python -m`")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    def start(self, log_dir: Path) -> Child:
        return start(self.name, self.args, log_dir, self.timeout_s, affinity=self.affinity)


def stop_all(children: Iterable[Child]) -> None:
    """Stop every child, the last started first (edges before the cloud they report to)."""
    for child in reversed(list(children)):
        child.stop()


def start_cluster(cloud: Launch, edges: Callable[[str], Iterable[Launch]], log_dir: Path) -> list[Child]:
    """Start the cloud, then each edge that `edges(the cloud's HOST:PORT)` lists, each serving before
    the next starts; returns the children in that order, the cloud first. If one does not come up,
    those already started are stopped before the error goes on, so a failed start leaves nothing running."""
    children = [cloud.start(log_dir)]
    try:
        for edge in edges(children[0].address):
            children.append(edge.start(log_dir))
    except BaseException:
        stop_all(children)
        raise
    return children
