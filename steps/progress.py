"""Progress of the initial copy: the Argo `progress` field, a log line, the local progress bar.

The follow step calls `copy_progress(done_bytes, total_bytes)` every few seconds
while the copy runs. It

- rewrites $ARGO_PROGRESS_FILE. Argo's executor reads the file's LAST line and
  accepts only `N/M` with 0 <= N <= M and M > 0 (pkg/apis/workflow/v1alpha1/progress.go,
  workflow/executor/executor.go monitorProgress); it shows N/M on the node. So
  the last line is `N/M` in MiB, and a first line carries the exact bytes, rate
  and ETA for the local display (local/display.py reads it with `read_file`).
  The file is replaced by a rename in its directory: the executor watches the
  directory (util/file/watch.go) and a rename is a Create event there, so it
  never reads half a file;
- logs one line with percent, rate and ETA for the Argo UI's log, at most every
  LOG_EVERY seconds (and at 100 %), so an hour-long copy is a readable page.

The rate is measured over a sliding window (WINDOW seconds), not since the start:
a copy slows down on big tables and speeds up on small ones, and an ETA from the
overall average would be wrong by the difference for the whole hour.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from steps.log import duration, log
from steps.pg import pretty_bytes

MiB = 1024 * 1024
WINDOW = 60.0  # seconds of samples the rate is measured over
LOG_EVERY = 30.0
_BYTES_LINE = re.compile(r"^bytes (\d+)/(\d+)(?: rate (\d+(?:\.\d+)?))?(?: eta (\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Progress:
    """One reading of the copy: bytes, and the rate and ETA when two samples exist."""

    done: int
    total: int
    rate: float | None = None  # bytes per second over the window
    eta: float | None = None  # seconds to the end at that rate

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    def argo(self) -> str | None:
        """`N/M` in MiB as Argo accepts it (N <= M, M > 0), or None when there is no total yet."""
        if self.total <= 0:
            return None
        m = max(1, math.ceil(self.total / MiB))
        n = min(m, self.done // MiB)
        return f"{n}/{m}"

    def file_text(self) -> str:
        first = f"bytes {self.done}/{self.total}"
        if self.rate is not None:
            first += f" rate {self.rate:.0f}"
        if self.eta is not None:
            first += f" eta {self.eta:.0f}"
        return f"{first}\n{self.argo()}\n"

    def line(self) -> str:
        """For the log: `copy 31% (12.0 GB of 40.0 GB), 50.0 MB/s, about 9m33s left`."""
        text = f"copy {self.fraction * 100:.0f}% ({pretty_bytes(self.done)} of {pretty_bytes(self.total)})"
        if self.rate is not None and self.rate > 0:
            text += f", {pretty_bytes(self.rate)}/s"
        if self.done >= self.total:
            return text + ", data copied (indexes and constraints may follow)"
        if self.rate is None:
            return text + ", measuring the rate"
        if self.eta is None:
            return text + ", no progress in the last minute"
        return text + f", about {format_eta(self.eta)} left"


format_eta = duration


class CopyProgress:
    """The sliding window behind copy_progress; one per copy (tests make their own)."""

    def __init__(self, window: float = WINDOW, log_every: float = LOG_EVERY, clock=time.monotonic):
        self.window = window
        self.log_every = log_every
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque()
        self.last_log: float | None = None
        self.logged_done = False

    def update(self, done: int, total: int) -> Progress:
        now = self.clock()
        done, total = max(0, int(done)), max(0, int(total))
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # the copy started over (follow restarts an interrupted copy)
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()  # keep one sample at least a window old
        rate = eta = None
        t0, d0 = self.samples[0]
        if now > t0:
            rate = (done - d0) / (now - t0)
            if rate > 0:
                eta = max(0.0, total - done) / rate
        return Progress(done, total, rate, eta)

    def report(self, done: int, total: int, progress_file: str | None = None) -> Progress:
        p = self.update(done, total)
        path = progress_file if progress_file is not None else os.environ.get("ARGO_PROGRESS_FILE")
        if path and p.argo() is not None:
            write_file(Path(path), p)
        now = self.clock()
        finished = total > 0 and done >= total
        if (self.last_log is None or now - self.last_log >= self.log_every
                or (finished and not self.logged_done)):
            if total > 0:
                self.last_log = now
                self.logged_done = finished
                log(f"follow: {p.line()}")
        return p


def write_file(path: Path, p: Progress) -> None:
    """Replace the progress file (rename in the same directory: never half a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(p.file_text())
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass  # progress is for watching; it never stops the copy


def read_file(path: Path) -> Progress | None:
    """What copy_progress wrote; a plain `N/M` (e.g. tables) gives (N, M) with no rate."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    if not lines:
        return None
    m = _BYTES_LINE.match(lines[0])
    if m:
        return Progress(int(m[1]), int(m[2]), float(m[3]) if m[3] else None, float(m[4]) if m[4] else None)
    return None


def read_argo(path: Path) -> str | None:
    """The `N/M` line Argo would show (whatever wrote it), or None."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines and re.fullmatch(r"\d+/\d+", lines[-1]) else None


_default = CopyProgress()


def copy_progress(done_bytes: int, total_bytes: int) -> Progress:
    """Called by the follow step every few seconds during the copy (see the module's docstring)."""
    return _default.report(done_bytes, total_bytes)


def reset() -> None:
    """A new copy in the same process: forget the old window."""
    global _default
    _default = CopyProgress()
