"""pgcopydb's sentinel (SQLite in --dir since 0.15) and the lag it implies.

`stream sentinel get --json` prints startpos in its endpos field (0.17 bug), so
every value is read with its own single-value flag.
"""

from dataclasses import dataclass
from pathlib import Path

from steps import pgcopydb
from steps.errors import StepError
from steps.pg import connect, lsn


@dataclass(frozen=True)
class Sentinel:
    apply: bool
    endpos: int
    replay_lsn: int

    @property
    def endpos_reached(self) -> bool:
        return self.endpos > 0 and self.replay_lsn >= self.endpos


def exists(workdir: Path) -> bool:
    return (workdir / "schema" / "source.db").exists()


def started(workdir: Path) -> bool:
    """Has the follow step started pgcopydb in this dir (its catalogs may not exist yet)?"""
    from steps import state

    return bool(state.read(workdir).get("follow_started_at")) and exists(workdir)


def _get(s, flag: str) -> str:
    workdir = s.workdir()
    proc = pgcopydb.run(s, "stream", "sentinel", "get", "--dir", str(workdir), flag, check=False)
    if proc.returncode != 0:
        raise StepError(f"cannot read pgcopydb's sentinel in {workdir}: {pgcopydb.last_error(proc.stderr)}")
    return proc.stdout.strip().splitlines()[-1].strip()


def read(s, strict: bool = True) -> Sentinel | None:
    """None while pgcopydb has not created its catalogs yet. With strict=False,
    any read error also gives None (a poller retries; pgcopydb may be mid-setup)."""
    if not started(s.workdir()):
        return None
    try:
        apply = _get(s, "--apply")
    except StepError as exc:
        if not strict or "returned 0 row" in str(exc):  # catalogs created, sentinel row not yet
            return None
        raise
    return Sentinel(
        apply=apply.lower() in ("enabled", "true", "on", "1"),
        endpos=lsn(_get(s, "--endpos")),
        replay_lsn=lsn(_get(s, "--replay-lsn")),
    )


def replay_lsn(s) -> int:
    return lsn(_get(s, "--replay-lsn"))


def source_lsn(source_uri: str) -> int:
    with connect(source_uri, "source") as conn:
        return lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
