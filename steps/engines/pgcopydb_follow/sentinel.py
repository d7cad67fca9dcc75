"""pgcopydb's sentinel (SQLite in --dir since 0.15): its endpos, replay_lsn and apply flag.

Read straight from the SQLite catalog, read-only: `stream sentinel get --json`
prints startpos in its endpos field (0.17 bug), and every pgcopydb call costs a
process start. Writes (set endpos) still go through pgcopydb.
"""

from dataclasses import dataclass
from pathlib import Path

from steps import pgcopydb
from steps.errors import StepError
from steps.pg import lsn


@dataclass(frozen=True)
class Sentinel:
    apply: bool
    endpos: int
    replay_lsn: int
    startpos: int = 0

    @property
    def endpos_reached(self) -> bool:
        return self.endpos > 0 and self.replay_lsn >= self.endpos


def exists(workdir: Path) -> bool:
    return pgcopydb.catalog_path(workdir).exists()


def started(workdir: Path) -> bool:
    """Has pgcopydb started in this dir, far enough that its sentinel row exists
    and its snapshot is registered? Until then any pgcopydb call on the dir
    (sentinel set, list progress) races with clone's catalog setup: it registers
    the catalogs for an empty snapshot and clone fails ("Catalogs ... have been
    setup for snapshot \"\"", measured). Checked read-only with SQLite, never
    via pgcopydb. Only the follow step mounts the dir, so only its own threads
    ask (the drain, before it sets the endpos)."""
    import sqlite3

    if not exists(workdir):
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


def row(workdir: Path) -> tuple:
    """(apply, endpos, replay_lsn, startpos) as stored, read from pgcopydb's
    SQLite catalog directly: a poll costs a file read instead of starting
    pgcopydb (under bwrap locally), and it reads every column at once, which
    `stream sentinel get --json` cannot do correctly in 0.17 (it prints
    startpos as the endpos)."""
    import sqlite3

    try:
        conn = pgcopydb.read_catalog(workdir, timeout=10)
        try:
            row = conn.execute("SELECT apply, endpos, replay_lsn, startpos FROM sentinel WHERE id = 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StepError(f"cannot read pgcopydb's sentinel in {pgcopydb.catalog_path(workdir)}: {exc}") from None
    if row is None:
        raise StepError(f"pgcopydb's sentinel in {pgcopydb.catalog_path(workdir)} has no row yet")
    return row


def is_on(value) -> bool:
    """pgcopydb's boolean columns, as SQLite or `sentinel get` print them."""
    return str(value).lower() in ("1", "true", "t", "on", "enabled")


def read(s, strict: bool = True) -> Sentinel | None:
    """None while pgcopydb has not created its catalogs and sentinel yet. With
    strict=False, any read error also gives None (a poller retries)."""
    if not started(s.workdir()):
        return None
    try:
        apply, endpos, replay, startpos = row(s.workdir())
    except StepError:
        if not strict:
            return None
        raise
    return Sentinel(apply=is_on(apply), endpos=lsn(endpos or ""), replay_lsn=lsn(replay or ""),
                    startpos=lsn(startpos or ""))


def replay_lsn(s) -> int:
    return lsn(row(s.workdir())[2] or "")

