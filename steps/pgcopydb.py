"""Finding and running pgcopydb (>= 0.16), in the pod or locally.

In the step image pgcopydb 0.17 is on PATH. On a developer machine or in CI it
usually is not (Debian 12 ships 0.10, which loses rows), so we run the one in the
project's trixie root filesystem under bwrap, binding in the work directory and
any libpq files the environment points at. Connection strings travel in the
environment (PGCOPYDB_SOURCE_PGURI, ...), never on the command line.
"""

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from steps.errors import StepError

MIN_VERSION = (0, 16)
DEFAULT_ROOTFS = Path("/var/cache/db-upgrade/rootfs")


def rootfs() -> Path:
    return Path(os.environ.get("DB_UPGRADE_ROOTFS", DEFAULT_ROOTFS))


def bwrap_prefix(root: Path, binds: list[Path]) -> list[str]:
    cmd = ["bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev"]
    # The host's users, so that a uid running here has a name inside too.
    for f in ("/etc/passwd", "/etc/group"):
        cmd += ["--ro-bind", f, f]
    seen: set[Path] = set()
    for path in binds:
        path = path.resolve()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        cmd += ["--bind", str(path), str(path)]
    return cmd


@dataclass(frozen=True)
class Pgcopydb:
    prefix: tuple[str, ...]  # () when pgcopydb is on PATH
    version: str

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, "pgcopydb", *args]


def _version_of(prefix: list[str]) -> str | None:
    try:
        out = subprocess.run([*prefix, "pgcopydb", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"pgcopydb version (\d+)\.(\d+)", out.stdout + out.stderr)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _new_enough(version: str) -> bool:
    major, minor = (int(x) for x in version.split("."))
    return (major, minor) >= MIN_VERSION


def binds_for(workdir: Path | None) -> list[Path]:
    binds = [Path("/tmp")]
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        binds.append(workdir)
    for var in ("PGSERVICEFILE", "PGPASSFILE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"):
        if os.environ.get(var):
            binds.append(Path(os.environ[var]).parent)
    return binds


@functools.lru_cache(maxsize=8)
def _locate(binds: tuple[Path, ...]) -> Pgcopydb:
    found = []
    if shutil.which("pgcopydb"):
        v = _version_of([])
        if v and _new_enough(v):
            return Pgcopydb((), v)
        found.append(f"pgcopydb {v or '?'} on PATH is too old")
    root = rootfs()
    if (root / "usr/bin/pgcopydb").exists():
        prefix = bwrap_prefix(root, list(binds))
        v = _version_of(prefix)
        if v and _new_enough(v):
            return Pgcopydb(tuple(prefix), v)
        found.append(f"pgcopydb {v or '?'} in {root} is unusable")
    else:
        found.append(f"no root filesystem at {root}")
    raise StepError(
        f"pgcopydb >= {MIN_VERSION[0]}.{MIN_VERSION[1]} not found ({'; '.join(found)}): "
        "install it (Debian 13 ships 0.17) or run 'make rootfs'"
    )


def locate(workdir: Path | None = None) -> Pgcopydb:
    return _locate(tuple(binds_for(workdir)))


def environment(s) -> dict[str, str]:
    """pgcopydb reads its connection strings from the environment: never argv."""
    env = dict(os.environ)
    if s.source_pguri is not None:
        env["PGCOPYDB_SOURCE_PGURI"] = s.source_pguri.get_secret_value()
    if s.target_pguri is not None:
        env["PGCOPYDB_TARGET_PGURI"] = s.target()  # the scratch database in rehearsal mode
    return env


def run(s, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `pgcopydb ARGS` with the step settings' connections and work dir."""
    tool = locate(s.dir)
    proc = subprocess.run(tool.argv(*args), capture_output=True, text=True, timeout=timeout, env=environment(s))
    if check and proc.returncode != 0:
        raise StepError(f"pgcopydb {' '.join(args[:3])} failed (exit {proc.returncode}): {last_error(proc.stderr)}")
    return proc


def catalog_path(workdir: Path) -> Path:
    """pgcopydb's SQLite catalog (sentinel, setup, tables) since 0.15."""
    return workdir / "schema" / "source.db"


def read_catalog(workdir: Path, timeout: float = 2):
    """A read-only connection to the catalog: never via pgcopydb itself, which
    would initialise it and race with a starting clone."""
    import sqlite3

    return sqlite3.connect(f"file:{catalog_path(workdir)}?mode=ro", uri=True, timeout=timeout)


def session_pids(sid: int) -> list[int]:
    """Every process of pgcopydb's session. It is started with start_new_session,
    so its session id is its pid; under bwrap its process group may differ."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def last_error(stderr: str) -> str:
    """The most telling line of pgcopydb's log: its last ERROR, else its last line."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if " ERROR " in ln or " FATAL " in ln]
    line = (errors or lines or ["no output"])[-1]
    # Drop the timestamp, pid and source location pgcopydb prefixes.
    m = re.search(r"(ERROR|FATAL)\s+\S+\.c:\d+\s+(.*)", line)
    return m.group(2) if m else line.strip()


def signal_session(sid: int, signum: int) -> None:
    """Signal every process group in pgcopydb's session. pgcopydb is started
    with start_new_session, so its session id is its pid; its process group may
    differ (under bwrap, pgcopydb runs in a group of its own inside the session)."""
    groups = {sid}
    for pid in session_pids(sid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for pgid in groups:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class Session:
    """pgcopydb running in a session of its own while the step streams its log:
    SIGTERM and SIGINT to the step are forwarded to every process group of that
    session (pgcopydb's top-level wait loop may not act on a signal to one pid);
    the first ERROR line (the cause, not the cascade) and a full disk are noted.

        with Session(argv, env, "follow") as run:
            for line in run.lines():
                ...
        run.rc, run.stopping, run.first_error, run.disk_full
    """

    def __init__(self, argv: list[str], env: dict[str, str], who: str):
        import threading

        self.argv, self.env, self.who = argv, env, who
        self.stopping = threading.Event()
        self.first_error: str | None = None
        self.disk_full = False
        self.rc: int | None = None
        self.proc: subprocess.Popen | None = None
        self._old: dict = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> "Session":
        import signal

        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

        def forward(signum, _frame):
            from steps.log import log

            self.stopping.set()
            log(f"{self.who}: got {signal.Signals(signum).name}, stopping pgcopydb (every process group of its "
                "session)")
            signal_session(self.proc.pid, signal.SIGTERM)

        self._old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def lines(self):
        import sys

        for line in self.proc.stdout:  # pgcopydb's own log, for the pod log
            sys.stderr.write(line)
            if (" ERROR " in line or " FATAL " in line) and self.first_error is None:
                self.first_error = last_error(line)
            if "No space left on device" in line or "database or disk is full" in line:  # the latter: SQLite
                self.disk_full = True
            yield line

    def stop(self) -> None:
        import signal

        signal_session(self.proc.pid, signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        import signal

        try:
            self.rc = self.proc.wait()
        finally:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)
