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
    return pgcopydb.catalog_path(workdir).exists()


def started(workdir: Path) -> bool:
    """Has the follow step started pgcopydb in this dir, far enough that its
    sentinel row exists and its snapshot is registered? Until then any pgcopydb call on the dir (sentinel get,
    list progress) races with clone's catalog setup: it registers the catalogs
    for an empty snapshot and clone fails ("Catalogs ... have been setup for
    snapshot \"\"", measured). Checked read-only with SQLite, never via pgcopydb."""
    import sqlite3

    from steps import state

    if not (state.read(workdir).get("follow_started_at") and exists(workdir)):
        return False
    try:
        conn = pgcopydb.read_catalog(workdir)
        try:
            # The sentinel row is written before clone registers its snapshot in
            # `setup`: both must be there before anyone else runs pgcopydb here.
            registered = conn.execute("SELECT coalesce(snapshot, '') <> '' FROM setup WHERE id = 1").fetchone()
            return bool(registered and registered[0]) and \
                conn.execute("SELECT count(*) FROM sentinel").fetchone()[0] > 0
        finally:
            conn.close()
    except sqlite3.Error:
        return False


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
        endpos, replay = _get(s, "--endpos"), _get(s, "--replay-lsn")
    except StepError as exc:
        if not strict or "returned 0 row" in str(exc):  # catalogs created, sentinel row not yet
            return None
        raise
    return Sentinel(
        apply=apply.lower() in ("enabled", "true", "on", "1"),
        endpos=lsn(endpos),
        replay_lsn=lsn(replay),
    )


def replay_lsn(s) -> int:
    return lsn(_get(s, "--replay-lsn"))


def source_lsn(source_uri: str) -> int:
    with connect(source_uri, "source") as conn:
        return lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
