"""Peak memory of the step processes, as a pod's limit would meet it.

Each watched step is a process tree (the step's Python, and for follow the
pgcopydb processes it starts under bwrap, in a session of their own but still
its descendants). Every POLL seconds the tree's RSS and PSS are summed; the
peaks are kept. RSS counts pages shared between the tree's processes (libpq,
pgcopydb's forked workers) once per process, so it overstates; PSS shares them
out and is the closer figure for a container's memory.
"""

from __future__ import annotations

import os
import threading

POLL = 0.25


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def tree(root: int, parents: dict[int, int]) -> list[int]:
    """root and all its descendants, from a pid -> parent pid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, frontier = [], [root] if root in parents else []
    while frontier:
        p = frontier.pop()
        out.append(p)
        frontier.extend(children.get(p, ()))
    return out


def _kb(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _is_pgcopydb(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            first = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return b"pgcopydb" in first or b"bwrap" in first


class Monitor:
    """Peaks per watched step: {"follow": {"rss_mb", "pss_mb", "pgcopydb_rss_mb", ...}}."""

    def __init__(self):
        self.roots: dict[str, int] = {}
        self.peaks: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-monitor")
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.roots[name] = pid

    def _sample(self) -> None:
        with self._lock:
            roots = dict(self.roots)
        if not roots:
            return
        parents = _parents()
        for name, root in roots.items():
            rss = pss = pgc_rss = pgc_pss = 0
            for pid in tree(root, parents):
                r = _kb(f"/proc/{pid}/status", "VmRSS:")
                p = _kb(f"/proc/{pid}/smaps_rollup", "Pss:")
                rss, pss = rss + r, pss + p
                if _is_pgcopydb(pid):
                    pgc_rss, pgc_pss = pgc_rss + r, pgc_pss + p
            if rss == 0:
                continue
            peak = self.peaks.setdefault(name, {})
            for key, kb in (("rss_mb", rss), ("pss_mb", pss), ("pgcopydb_rss_mb", pgc_rss),
                            ("pgcopydb_pss_mb", pgc_pss)):
                peak[key] = max(peak.get(key, 0.0), round(kb / 1024, 1))

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            self._sample()

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.peaks
