"""The pgbouncer switch against a real PgBouncer (Debian's 1.18) in front of real
PostgreSQL 15 (source) and 17 (target), with the application writer going through it.

The frozen window is the real readonly SQL on the source: a transaction PgBouncer
let through to the source during the hold would fail there and be counted.
"""

from __future__ import annotations

import os
import threading
import time

import psycopg
import pytest
from psycopg import sql

from local.pgbouncer import PgBouncer
from local.workload import (
    APP_PASSWORD,
    APP_ROLE,
    AUDIT,
    READONLY_SQL,
    SCHEMA,
    UNFREEZE_SQL,
    Writer,
    load_sample,
)
from steps.errors import StepError
from steps.switch import include
from steps.switch.pgbouncer import PgBouncerSwitch, pause_command
from steps.switch.settings import TargetEntry
from tests.conftest import create_database

pytestmark = pytest.mark.slow

NAME = "app-db"  # the PgBouncer database the application connects to
TABLES = ("customers", "orders", "events", AUDIT)


@pytest.fixture
def app(pair, dbs):
    """The sample on the source and on a target database with an awkward name."""
    source, _ = dbs
    target_name = f"{psycopg.conninfo.conninfo_to_dict(source)['dbname'][:30]} new it's \"x\""
    target = create_database(pair.target.uri(), target_name)
    load_sample(source, "tiny")
    load_sample(target, "tiny")
    return source, target


@pytest.fixture
def bouncer(app):
    source, _ = app
    b = PgBouncer(databases={NAME: TargetEntry.from_uri(source)}, users={APP_ROLE: APP_PASSWORD, "watcher": "w-pw"},
                  settings={"stats_users": "watcher"})
    b.start()
    yield b
    b.cleanup()


def switch_for(bouncer: PgBouncer, target_uri: str, database: str = NAME, **overrides) -> PgBouncerSwitch:
    return PgBouncerSwitch(bouncer.switch_settings(database, TargetEntry.from_uri(target_uri), **overrides))


def app_uri(bouncer: PgBouncer) -> str:
    return bouncer.uri(NAME, APP_ROLE, APP_PASSWORD)


def fingerprint(uri: str) -> tuple:
    """Every row of the application's tables, hashed: equal means nothing was written."""
    with psycopg.connect(uri) as conn:
        return tuple(conn.execute(sql.SQL("SELECT count(*), sum(hashtext(t::text)) FROM {}.{} t").format(
            sql.Identifier(SCHEMA), sql.Identifier(table))).fetchone() for table in TABLES)


def wait_for_commits(writer: Writer, n: int, timeout: float = 30) -> None:
    start = writer.stats.ok
    deadline = time.monotonic() + timeout
    while writer.stats.ok < start + n:
        assert time.monotonic() < deadline, f"the writer committed {writer.stats.ok - start} of {n}: {writer.stats}"
        assert writer.stats.failed_transactions == 0, writer.stats.errors
        time.sleep(0.02)


def live_entry(bouncer: PgBouncer) -> dict:
    with psycopg.connect(bouncer.admin_uri(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        cur = conn.execute("SHOW DATABASES")
        names = [d.name for d in cur.description]
        return next(dict(zip(names, r)) for r in cur.fetchall() if r[0] == NAME)


def run_sample_sql(uri: str, template: str) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL(template).format(schema=sql.Identifier(SCHEMA), role=sql.Identifier(APP_ROLE)))


def test_hold_then_switch_moves_the_writers_without_a_failed_transaction(app, bouncer, capsys):
    source, target = app
    sw = switch_for(bouncer, target)
    sw.check()
    writer = Writer(app_uri(bouncer), rate=200, threads=6, pooled=True).start()
    try:
        wait_for_commits(writer, 40)
        target_before = fingerprint(target)

        sw.hold()
        window_started = time.monotonic()
        source_at_hold = fingerprint(source)
        # A client that connects during the hold waits too, and writes on the target.
        late: list = []

        def late_client():
            try:
                with psycopg.connect(app_uri(bouncer), autocommit=True, prepare_threshold=None) as conn:
                    conn.execute(sql.SQL("INSERT INTO {}.{} (actor, detail) VALUES ('late', 'connected in hold')")
                                 .format(sql.Identifier(SCHEMA), sql.Identifier(AUDIT)))
                late.append("ok")
            except psycopg.Error as exc:
                late.append(exc)

        client = threading.Thread(target=late_client)
        client.start()
        run_sample_sql(source, READONLY_SQL)  # the frozen window: any write reaching the source now fails
        time.sleep(max(0.0, 0.5 - (time.monotonic() - window_started)))
        window = time.monotonic() - window_started
        sw.switch()
        client.join(30)
        wait_for_commits(writer, 60)
    finally:
        stats = writer.stop()
        # The role's default_transaction_read_only is server-wide: give it back to the other tests.
        run_sample_sql(source, UNFREEZE_SQL)

    assert stats.failed_transactions == 0, stats.errors
    assert late == ["ok"]
    assert fingerprint(source) == source_at_hold  # nothing reached the source after the hold
    assert fingerprint(target) != target_before  # the writers went on there
    with psycopg.connect(target) as conn:
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}.{} WHERE actor = 'late'").format(
            sql.Identifier(SCHEMA), sql.Identifier(AUDIT))).fetchone()[0] == 1
    entry = live_entry(bouncer)
    want = TargetEntry.from_uri(target)
    assert (entry["host"], entry["port"], entry["database"], entry["paused"]) == (want.host, want.port, want.dbname, 0)
    assert include.current(bouncer.include_file.read_text(), NAME)["dbname"] == want.dbname
    # The writers were held for the whole window (a stall, not errors).
    assert stats.max_write_stall_seconds >= window * 0.8
    err = capsys.readouterr().err
    assert "paused after" in err and "the applications go on with" in err
    assert bouncer.admin_password not in err
    with capsys.disabled():
        print(f"\npgbouncer switch: window {window:.2f}s, max write stall {stats.max_write_stall_seconds:.2f}s, "
              f"{stats.ok} transactions, {stats.failed_transactions} failed")


def test_release_after_hold_resumes_on_the_old_database(app, bouncer):
    source, target = app
    sw = switch_for(bouncer, target)
    before_file = bouncer.include_file.read_bytes()
    writer = Writer(app_uri(bouncer), rate=200, threads=4, pooled=True).start()
    try:
        wait_for_commits(writer, 30)
        target_before = fingerprint(target)
        sw.hold()
        source_at_hold = fingerprint(source)
        time.sleep(0.5)
        assert fingerprint(source) == source_at_hold  # held: nothing written meanwhile
        sw.release()
        wait_for_commits(writer, 40)
    finally:
        stats = writer.stop()
    assert stats.failed_transactions == 0, stats.errors
    assert fingerprint(source) != source_at_hold
    assert fingerprint(target) == target_before
    assert bouncer.include_file.read_bytes() == before_file
    entry = live_entry(bouncer)
    old = TargetEntry.from_uri(source)
    assert (entry["port"], entry["database"], entry["paused"]) == (old.port, old.dbname, 0)
    sw.release()  # idempotent: the exit handler may RESUME again


def test_pause_timeout_with_a_long_transaction_fails_in_one_line_and_resumes(app, bouncer):
    source, target = app
    sw = switch_for(bouncer, target, pause_timeout=1)
    long = psycopg.connect(app_uri(bouncer), prepare_threshold=None)  # a transaction left open
    long.execute(sql.SQL("INSERT INTO {}.{} (actor, detail) VALUES ('long', 'open')").format(
        sql.Identifier(SCHEMA), sql.Identifier(AUDIT)))
    try:
        started = time.monotonic()
        with pytest.raises(StepError) as exc:
            sw.hold()
        took = time.monotonic() - started
        msg = str(exc.value)
        assert "\n" not in msg
        assert f"PAUSE {NAME} did not finish within 1s" in msg
        assert "1 transaction(s) still running" in msg and "RESUMEd" in msg
        assert took < 10
        assert live_entry(bouncer)["paused"] == 0
        # New transactions go through at once, to the old database.
        with psycopg.connect(app_uri(bouncer), autocommit=True, prepare_threshold=None) as other:
            other.execute(sql.SQL("INSERT INTO {}.{} (actor, detail) VALUES ('after', 'resume')").format(
                sql.Identifier(SCHEMA), sql.Identifier(AUDIT)))
        long.commit()  # the long transaction was never disturbed
    finally:
        long.close()
    with psycopg.connect(source) as conn:
        actors = conn.execute(sql.SQL("SELECT actor FROM {}.{} WHERE actor IN ('long', 'after') ORDER BY 1").format(
            sql.Identifier(SCHEMA), sql.Identifier(AUDIT))).fetchall()
    assert actors == [("after",), ("long",)]


def test_wrong_admin_password_or_non_admin_user_is_one_line(app, bouncer):
    _, target = app
    wrong = bouncer.uri("pgbouncer", "db_upgrade_admin", "not-the-password")
    sw = switch_for(bouncer, target, admin_pguri=wrong)
    for call in (sw.check, sw.hold):
        with pytest.raises(StepError) as exc:
            call()
        msg = str(exc.value)
        assert "\n" not in msg and "not-the-password" not in msg
        assert msg.startswith("cannot connect to PgBouncer's admin console (db_upgrade_admin@127.0.0.1:")
        assert "authentication failed" in msg and "DB_UPGRADE_PGBOUNCER_ADMIN_PGURI" in msg

    watcher = switch_for(bouncer, target, admin_pguri=bouncer.uri("pgbouncer", "watcher", "w-pw"))
    with pytest.raises(StepError, match="^the user of DB_UPGRADE_PGBOUNCER_ADMIN_PGURI is not in PgBouncer's "
                                        "admin_users"):
        watcher.check()
    assert live_entry(bouncer)["paused"] == 0


def test_check_refuses_an_include_file_pgbouncer_does_not_read(app, bouncer, tmp_path):
    _, target = app
    # No entry for the database in the file.
    other = tmp_path / "other.ini"
    other.write_text("; not ours\nelse = host=127.0.0.1 dbname=x\n")
    with pytest.raises(StepError, match=f"has no entry for database {NAME}"):
        switch_for(bouncer, target, include_file=other).check()
    # The entry, edited without a RELOAD: the file is not what PgBouncer runs.
    text = bouncer.include_file.read_text()
    edited = tmp_path / "edited.ini"
    edited.write_text(text.replace("port=", "port=1"))
    with pytest.raises(StepError, match=r"^PgBouncer's live entry for app-db \(127\.0\.0\.1:\d+/.*\) is not what "):
        switch_for(bouncer, target, include_file=edited).check()
    # A database PgBouncer does not know.
    (tmp_path / "nope.ini").write_text(text.replace(NAME, "nope"))
    with pytest.raises(StepError, match=r"^PgBouncer has no database 'nope' \(SHOW DATABASES lists: app-db\)"):
        switch_for(bouncer, target, database="nope", include_file=tmp_path / "nope.ini").check()


def test_check_refuses_session_pooling(app):
    source, target = app
    b = PgBouncer(databases={NAME: TargetEntry.from_uri(source)}, users={APP_ROLE: APP_PASSWORD}, pool_mode="session")
    with b, pytest.raises(StepError, match=rf"^PgBouncer database {NAME} uses pool_mode=session: PAUSE would wait "):
        switch_for(b, target).check()


def test_switch_fails_resumed_when_pgbouncer_does_not_take_the_entry(app, bouncer, tmp_path):
    """A copy of the include file that PgBouncer does not %include: check() cannot tell,
    the verification after RELOAD does; the copy is restored and the hold released."""
    _, target = app
    copy = tmp_path / "copy.ini"
    copy.write_bytes(bouncer.include_file.read_bytes())
    sw = switch_for(bouncer, target, include_file=copy)
    sw.check()
    sw.hold()
    with pytest.raises(StepError) as exc:
        sw.switch()
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"PgBouncer did not repoint {NAME}: SHOW DATABASES says ") and "RESUMEd" in msg
    assert copy.read_bytes() == bouncer.include_file.read_bytes()
    assert live_entry(bouncer)["paused"] == 0


def test_include_file_is_never_half_written(app, bouncer, monkeypatch):
    """The rename fails (a full volume would fail the write before it): the old file is
    intact, no temp file is left beside it, and PgBouncer is RESUMEd on the source."""
    source, target = app
    sw = switch_for(bouncer, target)
    sw.check()
    before = bouncer.include_file.read_bytes()
    sw.hold()

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(include.os, "replace", no_rename)
    with pytest.raises(StepError) as exc:
        sw.switch()
    monkeypatch.undo()
    msg = str(exc.value)
    assert msg == f"cannot write {bouncer.include_file}: No space left on device; RESUMEd on the old database"
    assert bouncer.include_file.read_bytes() == before
    assert sorted(os.listdir(bouncer.base)) == ["databases.ini", "pgbouncer.ini", "pgbouncer.log", "pgbouncer.pid",
                                                "userlist.txt"]
    assert live_entry(bouncer)["paused"] == 0
    with psycopg.connect(app_uri(bouncer), autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == TargetEntry.from_uri(source).dbname


def slow_login_bouncer(source: str) -> PgBouncer:
    """Every server login takes 0.7 s: PgBouncer keeps a server in login state until
    its connect_query has run."""
    entry = include.entry_line(NAME, [*local_entry(source), ("connect_query", "SELECT pg_sleep(0.7)")])
    return PgBouncer(databases={NAME: entry.split(" = ", 1)[1]}, users={APP_ROLE: APP_PASSWORD}).start()


def local_entry(uri: str) -> list[tuple[str, str]]:
    e = TargetEntry.from_uri(uri)
    return [("host", e.host), ("port", str(e.port)), ("dbname", e.dbname)]


def start_login(bouncer: PgBouncer) -> threading.Thread:
    """A client whose query makes PgBouncer open a server connection; returns once it is logging in."""
    def client():
        with psycopg.connect(app_uri(bouncer), autocommit=True, prepare_threshold=None) as conn:
            conn.execute("SELECT 1")

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 5
    while pool(bouncer).get("sv_login", 0) == 0:
        assert time.monotonic() < deadline, "PgBouncer did not start a server login"
        time.sleep(0.005)
    return t


def pool(bouncer: PgBouncer) -> dict:
    with psycopg.connect(bouncer.admin_uri(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        cur = conn.execute("SHOW POOLS")
        names = [d.name for d in cur.description]
        return next((dict(zip(names, r)) for r in cur.fetchall() if r[0] == NAME), {})


def one_transaction(bouncer: PgBouncer) -> None:
    with psycopg.connect(app_uri(bouncer), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT 1")


def test_hold_waits_for_a_server_login_so_that_no_client_is_refused_after(app, capsys):
    source, target = app
    bouncer = slow_login_bouncer(source)
    try:
        sw = switch_for(bouncer, target)
        sw.check()
        client = start_login(bouncer)
        sw.hold()
        assert f"pgbouncer: {NAME}: waited " in capsys.readouterr().err  # PAUSE did not cut the login short
        sw.release()
        one_transaction(bouncer)  # PgBouncer would refuse it: "server login has been failing"
        client.join(10)
    finally:
        bouncer.cleanup()


def test_resume_recovers_a_pool_that_was_paused_mid_login(app):
    """The race the wait before PAUSE narrows but cannot close: PAUSE lands during a
    login. RESUME with server_login_retry at 0 logs in again at once."""
    source, target = app
    bouncer = slow_login_bouncer(source)
    try:
        sw = switch_for(bouncer, target)
        client = start_login(bouncer)
        with psycopg.connect(bouncer.admin_uri(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            conn.execute(pause_command(NAME))
        started = time.monotonic()
        sw.release()
        one_transaction(bouncer)
        client.join(10)
        assert time.monotonic() - started < 5  # not server_login_retry's 15 s
        with psycopg.connect(bouncer.admin_uri(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            config = {r[0]: r[1] for r in conn.execute("SHOW CONFIG").fetchall()}
        assert config["server_login_retry"] == "15"  # put back
    finally:
        bouncer.cleanup()
