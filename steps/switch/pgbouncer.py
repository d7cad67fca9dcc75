"""pgbouncer: the applications stay connected to PgBouncer and see a stall, not an error.

hold() sends `PAUSE db` on PgBouncer's admin console: PgBouncer waits for the
transactions running through it (transaction pooling: until each ends), then
holds every new one. switch() rewrites the database's line in the include file
(temp file + rename), RELOADs, checks with SHOW DATABASES that the entry points
at the target, and RESUMEs: the held transactions run on the target.

PAUSE of one database, not of the whole PgBouncer: other databases it serves
never notice. The pause outlives our admin connection (PgBouncer keeps it until
RESUME), so release() is idempotent and the exit handler may call it again.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import pq

from steps.errors import StepError
from steps.log import log
from steps.pg import describe as describe_uri
from steps.pg import scrub
from steps.switch import include
from steps.switch import pgbouncer_login_race as login_race
from steps.switch.base import Switch
from steps.switch.settings import PgBouncerSettings, TargetEntry

# --- the admin console's commands (pure) --------------------------------------

def quote_name(name: str) -> str:
    """A database name as the admin console parses it (admin.c WORD: "..." with "" for ")."""
    return '"' + name.replace('"', '""') + '"'


def pause_command(name: str) -> str:
    return f"PAUSE {quote_name(name)}"


def resume_command(name: str) -> str:
    return f"RESUME {quote_name(name)}"


def entry_label(row: dict) -> str:
    user = row.get("force_user")
    return f"{user + '@' if user else ''}{row.get('host')}:{row.get('port')}/{row.get('database')}"


def row_points_at(row: dict, target: TargetEntry) -> bool:
    return (row.get("host") == target.host and row.get("port") == target.port
            and row.get("database") == target.dbname
            and (target.user is None or row.get("force_user") == target.user))


def row_matches_entry(row: dict, entry: dict[str, str]) -> bool:
    """Does PgBouncer's live entry (SHOW DATABASES) say what the file says?"""
    return (row.get("host") == entry.get("host") and str(row.get("port")) == entry.get("port", "5432")
            and row.get("database") == entry.get("dbname", row.get("name"))
            and row.get("force_user") == entry.get("user"))


# --- the admin console ----------------------------------------------------------

class Admin:
    """One connection to PgBouncer's admin console. It speaks only the simple query
    protocol (psycopg's ClientCursor) and has no transactions (autocommit)."""

    def __init__(self, conn: psycopg.Connection, uri: str):
        self.conn = conn
        self.uri = uri

    def rows(self, command: str) -> list[dict]:
        try:
            cur = self.conn.execute(command)
        except psycopg.Error as exc:
            raise StepError(f"PgBouncer's admin console refused {command}: {_first_line(exc, self.uri)}") from None
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def command(self, command: str) -> str | None:
        """Runs an admin command; returns PgBouncer's error message instead of raising."""
        try:
            self.conn.execute(command)
            return None
        except psycopg.Error as exc:
            if self.conn.broken:
                raise StepError(f"lost PgBouncer's admin console during {command}: "
                                f"{_first_line(exc, self.uri)}") from None
            return _first_line(exc, self.uri)

    def databases(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.rows("SHOW DATABASES")}

    def config(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.rows("SHOW CONFIG")}

    def send_waiting(self, command: str, timeout: float) -> str | None:
        """Sends a command that may block (PAUSE waits for running transactions) and waits
        at most `timeout` seconds: "" when done, an error message, or None on timeout
        (the command is still pending on this connection: close it)."""
        pgconn = self.conn.pgconn
        deadline = time.monotonic() + timeout
        try:
            pgconn.send_query(command.encode())
            while True:
                pgconn.consume_input()
                if not pgconn.is_busy():
                    error = ""
                    while (res := pgconn.get_result()) is not None:
                        if res.status == pq.ExecStatus.FATAL_ERROR:
                            error = scrub((res.error_message or b"").decode(errors="replace"), self.uri) or "error"
                    return " ".join(error.split())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                select.select([pgconn.socket], [], [], min(remaining, 1.0))
        except psycopg.Error as exc:
            return f"lost the admin console: {_first_line(exc, self.uri)}"


def _first_line(exc: BaseException, uri: str) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return scrub(first, uri).removeprefix("connection failed: ")


@contextmanager
def admin(s: PgBouncerSettings) -> Iterator[Admin]:
    uri = s.admin_uri()
    try:
        conn = psycopg.connect(uri, autocommit=True, connect_timeout=s.connect_timeout,
                               cursor_factory=psycopg.ClientCursor)
    except psycopg.Error as exc:
        raise StepError(f"cannot connect to PgBouncer's admin console ({describe_uri(uri, 'PgBouncer admin')}): "
                        f"{_first_line(exc, uri)}; check DB_UPGRADE_PGBOUNCER_ADMIN_PGURI") from None
    try:
        yield Admin(conn, uri)
    finally:
        conn.close()


# --- the strategy -------------------------------------------------------------------

class PgBouncerSwitch(Switch):
    name = "pgbouncer"

    def __init__(self, s: PgBouncerSettings):
        self.s = s
        self.db = s.database or ""
        self.target = s.target()
        self.include_file = Path(s.include_file or "")
        self.held_at: float | None = None  # monotonic, when PAUSE returned

    def describe(self) -> str:
        return (f"pgbouncer: PAUSE database {self.db} on {describe_uri(self.s.admin_uri(), 'PgBouncer admin')}, "
                f"repoint it to {self.target.label()} ({self.include_file}, RELOAD), then RESUME")

    def _entry_row(self, a: Admin) -> dict:
        dbs = a.databases()
        row = dbs.get(self.db)
        if row is None:
            known = ", ".join(sorted(n for n in dbs if n != "pgbouncer")) or "none"
            raise StepError(f"PgBouncer has no database {self.db!r} (SHOW DATABASES lists: {known}): "
                            "set DB_UPGRADE_PGBOUNCER_DATABASE to the entry the applications use")
        return row

    def check(self) -> None:
        text = self._read_include()
        entry = include.current(text, self.db, self.include_file)
        if not os_access_dir(self.include_file):
            raise StepError(f"cannot replace {self.include_file}: its directory is not writable by this pod "
                            "(mount the include file's directory from a writable volume; ConfigMaps are read-only)")
        with admin(self.s) as a:
            row = self._entry_row(a)
            if row.get("paused"):
                raise StepError(f"PgBouncer database {self.db} is already paused (by someone else?): "
                                f"RESUME {self.db} on the admin console, then retry")
            if row.get("disabled"):
                raise StepError(f"PgBouncer database {self.db} is disabled: ENABLE {self.db} first")
            # No read-only way to ask "am I an admin?": RESUME of a database that is not
            # paused changes nothing and answers "not paused" to an admin only.
            answer = a.command(resume_command(self.db)) or ""
            if "admin access needed" in answer:
                raise StepError("the user of DB_UPGRADE_PGBOUNCER_ADMIN_PGURI is not in PgBouncer's admin_users: "
                                "PAUSE, RELOAD and RESUME need it")
            if answer and "not paused" not in answer:
                raise StepError(f"PgBouncer's admin console: {answer}")
            config = a.config()
            mode = row.get("pool_mode") or config.get("pool_mode", "session")
            if mode == "session":
                raise StepError(f"PgBouncer database {self.db} uses pool_mode=session: PAUSE would wait for every "
                                "client to disconnect; use pool_mode=transaction for it, or DB_UPGRADE_SWITCH=restart")
            if row_points_at(row, self.target):
                log(f"pgbouncer: {self.db} already points at {self.target.label()}")
            elif not row_matches_entry(row, entry):
                raise StepError(f"PgBouncer's live entry for {self.db} ({entry_label(row)}) is not what "
                                f"{self.include_file} says ({_label(entry)}): is that the file PgBouncer "
                                "%includes, with a RELOAD since its last edit?")
        log(f"pgbouncer: {self.db} -> {entry_label(row)} now; the switch repoints it to {self.target.label()}; "
            f"held transactions wait at most query_wait_timeout={config.get('query_wait_timeout', '?')}s")

    def _read_include(self) -> str:
        try:
            return self.include_file.read_text()
        except OSError as exc:
            raise StepError(f"DB_UPGRADE_PGBOUNCER_INCLUDE_FILE={self.include_file} cannot be read: "
                            f"{exc.strerror}") from None

    # hold and its undo, side by side ---------------------------------------------

    def hold(self) -> None:
        """PAUSE: waits for the running transactions, then new ones wait in PgBouncer.
        Past the timeout: RESUME and fail (before the freeze: nothing else changed)."""
        started = time.monotonic()
        deadline = started + self.s.pause_timeout
        with admin(self.s) as a:
            if not login_race.wait_no_login(a, self.db, deadline):
                raise StepError(f"PgBouncer kept logging in to the server for {self.db} for {self.s.pause_timeout:g}s: "
                                "PAUSE now would make it refuse clients after RESUME (see steps/switch/"
                                "pgbouncer_login_race.py); nothing changed: is the old database slow to accept logins?")
            log(f"pgbouncer: PAUSE {self.db}: waiting for its running transactions "
                f"(at most {self.s.pause_timeout:g}s)")
            outcome = a.send_waiting(pause_command(self.db), max(0.0, deadline - time.monotonic()))
            if outcome is None:
                running = self._running()  # before RESUME, while they still run
                self.release()
                raise StepError(f"PgBouncer PAUSE {self.db} did not finish within {self.s.pause_timeout:g}s: "
                                f"{running} (RESUMEd: the applications go on with the old database); end long "
                                "transactions or raise DB_UPGRADE_PGBOUNCER_PAUSE_TIMEOUT")
            if outcome:
                # The PAUSE may have been applied before the answer was lost: undo it.
                raise self._fail_resumed(f"PgBouncer PAUSE {self.db} failed: {outcome}")
        self.held_at = time.monotonic()
        log(f"pgbouncer: {self.db} paused after {self.held_at - started:.2f}s; "
            "new transactions wait in PgBouncer")

    def release(self) -> None:
        """RESUME where the entry points (before switch(): the old database). Idempotent."""
        with admin(self.s) as a:
            answer = login_race.resume(a, self.db, resume_command(self.db))
            if answer and "not paused" not in answer:
                raise StepError(f"PgBouncer RESUME {self.db} failed: {answer}; run RESUME {self.db} on its "
                                "admin console: the applications are held until then")
            row = self._entry_row(a)
        held = f" after {time.monotonic() - self.held_at:.2f}s held" if self.held_at is not None else ""
        self.held_at = None
        log(f"pgbouncer: RESUME {self.db}{held}: the applications go on with {entry_label(row)}")

    # ---------------------------------------------------------------------------------

    def _running(self) -> str:
        try:
            with admin(self.s) as a:
                pools = [p for p in a.rows("SHOW POOLS") if p.get("database") == self.db]
        except StepError:
            return "still waiting"
        active = sum(int(p.get("sv_active") or 0) for p in pools)
        return f"{active} transaction(s) still running through it"

    def _fail_resumed(self, message: str) -> StepError:
        """The error for a hold or switch that did not complete: RESUME first (on the old
        database), so that no application is left held until query_wait_timeout."""
        try:
            self.release()
            return StepError(f"{message}; RESUMEd on the old database")
        except StepError as exc:
            return StepError(f"{message}; and RESUME failed too: {exc}")

    def switch(self) -> None:
        try:
            old_text = self._read_include()
            new_text = include.repoint(old_text, self.db, self.target)
        except StepError as exc:
            raise self._fail_resumed(str(exc)) from None
        with admin(self.s) as a:
            try:
                include.write_atomically(self.include_file, new_text)
            except OSError as exc:
                raise self._fail_resumed(f"cannot write {self.include_file}: {exc.strerror}") from None
            log(f"pgbouncer: {self.include_file}: {self.db} -> {self.target.label()}; RELOAD")
            problem = a.command("RELOAD")
            row = self._entry_row(a)
            if problem or not row_points_at(row, self.target):
                # PgBouncer did not take it: put the old line back so that nothing moves
                # later by surprise, and let the applications go on where they were.
                try:
                    include.write_atomically(self.include_file, old_text)
                    restored = "restored it"
                    a.command("RELOAD")
                except OSError as exc:
                    restored = f"could not restore it ({exc.strerror})"
                raise self._fail_resumed(
                    f"PgBouncer did not repoint {self.db}: SHOW DATABASES says {entry_label(row)} after RELOAD"
                    f"{' (' + problem + ')' if problem else ''}; is {self.include_file} the file it %includes? "
                    f"{restored}") from None
            answer = login_race.resume(a, self.db, resume_command(self.db))
            if answer and "not paused" not in answer:
                raise StepError(f"PgBouncer RESUME {self.db} failed: {answer}; it points at the target: "
                                f"run RESUME {self.db} on its admin console")
            row = self._entry_row(a)
        if not row_points_at(row, self.target) or row.get("paused"):
            raise StepError(f"after RESUME, PgBouncer shows {self.db} -> {entry_label(row)}"
                            f"{' (paused)' if row.get('paused') else ''}, not {self.target.label()}")
        held = f" after {time.monotonic() - self.held_at:.2f}s held" if self.held_at is not None else ""
        self.held_at = None
        log(f"pgbouncer: RESUME {self.db}{held}: the applications go on with {entry_label(row)}")


def _label(entry: dict[str, str]) -> str:
    user = entry.get("user")
    return f"{user + '@' if user else ''}{entry.get('host')}:{entry.get('port', '5432')}/{entry.get('dbname')}"


def os_access_dir(path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return os.access(real.parent, os.W_OK | os.X_OK)
