"""Pure logic of the switch strategies: the include file's format, its atomic
replacement, the admin commands, the settings. No server."""

from __future__ import annotations

import os
import pwd
import threading

import pytest

from steps.errors import StepError
from steps.switch import get, include
from steps.switch.none import NoSwitch
from steps.switch.pgbouncer import (
    PgBouncerSwitch,
    pause_command,
    resume_command,
    row_matches_entry,
    row_points_at,
)
from steps.switch.restart import RestartSwitch
from steps.switch.settings import (
    TargetEntry,
    load_pgbouncer_settings,
    load_switch_settings,
)

AWKWARD = ["plain", "with space", "it's", "''", "back\\slash", "semi;colon", "#hash", "ünïcødé", "null", "a=b", "'"]


@pytest.mark.parametrize("value", AWKWARD)
def test_connection_values_round_trip(value):
    line = include.format_connstr([("dbname", value), ("port", "5432")])
    assert include.parse_connstr(line) == [("dbname", value), ("port", "5432")]


def test_values_are_quoted_as_pgbouncer_reads_them():
    assert include.quote("shop_1") == "shop_1"
    assert include.quote("it's here") == "'it''s here'"
    assert include.quote("") == "''"
    assert include.parse_connstr("host=10.0.0.1  port=6543 dbname='a b''c' pool_size=5") == [
        ("host", "10.0.0.1"), ("port", "6543"), ("dbname", "a b'c"), ("pool_size", "5")]
    for bad, message in [("host", "expected key=value"), ("dbname='open", "unterminated quote"),
                         ("dbname=''", "empty value"), ("=x", "expected key=value")]:
        with pytest.raises(include.IncludeError, match=message):
            include.parse_connstr(bad)
    with pytest.raises(include.IncludeError, match="line break"):
        include.quote("two\nlines")


FILE = """\
; the databases db-upgrade may repoint
[databases]
other = host=db-other port=5432 dbname=other
app-db = host=old-db port=5432 dbname=shop pool_size=40 pool_mode=transaction
app-db2 = host=old-db dbname=shop2
# done
"""


def test_repoint_changes_only_the_one_line_and_keeps_its_pool_settings():
    target = TargetEntry(host="new-db.internal", port=6000, dbname="shop it's new")
    out = include.repoint(FILE, "app-db", target)
    before, after = FILE.splitlines(), out.splitlines()
    assert len(before) == len(after)
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert changed == [(before[3], "app-db = host=new-db.internal port=6000 dbname='shop it''s new' pool_size=40 "
                                   "pool_mode=transaction")]
    assert include.current(out, "app-db") == {"host": "new-db.internal", "port": "6000", "dbname": "shop it's new",
                                              "pool_size": "40", "pool_mode": "transaction"}
    # A forced user is set when given, and kept when not.
    with_user = include.repoint(FILE, "app-db2", TargetEntry(host="n", dbname="s", user='app "rw" user'))
    assert include.current(with_user, "app-db2") == {"host": "n", "dbname": "s", "port": "5432",
                                                     "user": 'app "rw" user'}
    kept = include.repoint(with_user, "app-db2", TargetEntry(host="m", dbname="s"))
    assert include.current(kept, "app-db2")["user"] == 'app "rw" user'
    # CRLF line endings and a missing final newline survive.
    crlf = "x = host=a dbname=b\r\napp-db = host=a dbname=b"
    assert include.repoint(crlf, "app-db", TargetEntry(host="c", dbname="d")) == (
        "x = host=a dbname=b\r\napp-db = host=c dbname=d port=5432\n")


def test_missing_or_repeated_entry_is_refused():
    with pytest.raises(include.IncludeError, match=r"^/etc/x.ini has no entry for database shop: move its"):
        include.current(FILE, "shop", "/etc/x.ini")
    twice = FILE + "app-db = host=other dbname=shop\n"
    with pytest.raises(include.IncludeError, match=r"defines database app-db 2 times \(lines 4, 7\): keep one"):
        include.repoint(twice, "app-db", TargetEntry(host="n", dbname="s"))
    # Comments, headers and directives are not entries.
    assert include.find(";app-db = x=1\n[app-db]\n%include /x\n", "app-db") == []


def test_write_atomically_a_reader_sees_the_old_or_the_new_file_whole(tmp_path):
    path = tmp_path / "databases.ini"
    texts = [FILE, include.repoint(FILE, "app-db", TargetEntry(host="n" * 200, dbname="s" * 60)) * 50]
    path.write_text(texts[0])
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(path.read_text())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            include.write_atomically(path, texts[i % 2])
    finally:
        stop.set()
        t.join()
    assert seen <= set(texts), "a reader saw a partly written file"
    assert os.listdir(tmp_path) == ["databases.ini"]


def test_write_atomically_keeps_mode_owner_and_symlink(tmp_path):
    real = tmp_path / "real.ini"
    real.write_text("a = host=x\n")
    os.chmod(real, 0o640)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(real, nobody.pw_uid, nobody.pw_gid)
    before = os.stat(real)
    link = tmp_path / "link.ini"
    link.symlink_to(real)
    include.write_atomically(link, "a = host=y\n")
    after = os.stat(real)
    assert link.is_symlink() and real.read_text() == "a = host=y\n"
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # replaced, not rewritten in place


def test_write_atomically_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "databases.ini"
    path.write_text(FILE)

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(include.os, "fsync", full)
    with pytest.raises(OSError):
        include.write_atomically(path, "other")
    assert path.read_text() == FILE and os.listdir(tmp_path) == ["databases.ini"]


def test_admin_commands_and_live_entry_comparison():
    assert pause_command("app-db") == 'PAUSE "app-db"'
    assert resume_command('a"b') == 'RESUME "a""b"'
    row = {"name": "app", "host": "new", "port": 6000, "database": "shop", "force_user": None}
    assert row_points_at(row, TargetEntry(host="new", port=6000, dbname="shop"))
    assert not row_points_at(row, TargetEntry(host="new", port=5432, dbname="shop"))
    assert not row_points_at(row, TargetEntry(host="new", port=6000, dbname="shop", user="u"))
    assert row_matches_entry(row, {"host": "new", "port": "6000", "dbname": "shop"})
    assert not row_matches_entry(row, {"host": "new", "dbname": "shop"})  # port 5432 by default
    assert row_matches_entry({**row, "port": 5432, "database": "app"}, {"host": "new"})  # dbname defaults to the name


# --- settings -------------------------------------------------------------------

ADMIN = "postgres://db_upgrade_admin:s3cret-pw@pgbouncer:6432/pgbouncer"
GOOD = dict(admin_pguri=ADMIN, database="app-db", include_file="/etc/pgbouncer/db-upgrade/databases.ini",
            target_host="pg17.db.svc", target_dbname="shop")


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("DB_UPGRADE_"):
            monkeypatch.delenv(var)
    return monkeypatch


def test_strategy_by_environment(clean_env):
    assert load_switch_settings().switch == "none"
    assert isinstance(get(), NoSwitch)
    clean_env.setenv("DB_UPGRADE_SWITCH", "blue-green")
    with pytest.raises(StepError, match=r"^DB_UPGRADE_SWITCH: Input should be 'none', 'restart', 'pgbouncer' or 'command'$"):
        get()
    clean_env.setenv("DB_UPGRADE_SWITCH", "restart")
    with pytest.raises(StepError, match="DB_UPGRADE_RESTART_NAMESPACE is not set"):
        get()
    clean_env.setenv("DB_UPGRADE_RESTART_NAMESPACE", "shop")
    clean_env.setenv("DB_UPGRADE_RESTART_DEPLOYMENTS", "api,worker")
    sw = get()
    assert isinstance(sw, RestartSwitch)
    assert sw.describe() == ("restart: kubectl rollout restart the deployments (api, worker) in namespace shop "
                             "and wait for them (at most 600s)")
    clean_env.setenv("DB_UPGRADE_SWITCH", "pgbouncer")
    for key, value in GOOD.items():
        clean_env.setenv(f"DB_UPGRADE_PGBOUNCER_{key.upper()}", value)
    clean_env.setenv("DB_UPGRADE_PGBOUNCER_TARGET_PORT", "6000")
    sw = get()
    assert isinstance(sw, PgBouncerSwitch)
    assert sw.target == TargetEntry(host="pg17.db.svc", port=6000, dbname="shop")
    line = sw.describe()
    assert line == ("pgbouncer: PAUSE database app-db on db_upgrade_admin@pgbouncer:6432/pgbouncer, repoint it to "
                    "pg17.db.svc:6000/shop (/etc/pgbouncer/db-upgrade/databases.ini, RELOAD), then RESUME")
    assert "s3cret" not in line and "s3cret" not in repr(sw.s)


@pytest.mark.parametrize("override, message", [
    (dict(admin_pguri=""), r"^DB_UPGRADE_PGBOUNCER_ADMIN_PGURI is not set: it must hold the URI"),
    (dict(admin_pguri="postgres://a:s3cret-pw@h/app"),
     r"^DB_UPGRADE_PGBOUNCER_ADMIN_PGURI must name the database 'pgbouncer' .* not 'app'$"),
    (dict(admin_pguri="host=h password=s3cret-pw dbname='pgbouncer"), r"is not a valid libpq URI"),
    (dict(database=None), r"^DB_UPGRADE_PGBOUNCER_DATABASE is not set"),
    (dict(database="my db"), r"^DB_UPGRADE_PGBOUNCER_DATABASE='my db' is not a PgBouncer database name"),
    (dict(database="pgbouncer"), r"not 'pgbouncer'$"),
    (dict(database="x" * 64), r"is not a PgBouncer database name"),
    (dict(include_file=None), r"^DB_UPGRADE_PGBOUNCER_INCLUDE_FILE is not set"),
    (dict(include_file="databases.ini"), r"^DB_UPGRADE_PGBOUNCER_INCLUDE_FILE=databases.ini must be an absolute"),
    (dict(target_host=None), r"^DB_UPGRADE_PGBOUNCER_TARGET_HOST is not set"),
    (dict(target_host="pg 17"), r"^DB_UPGRADE_PGBOUNCER_TARGET_HOST: must be a host name"),
    (dict(target_dbname=None), r"^DB_UPGRADE_PGBOUNCER_TARGET_DBNAME is not set"),
    (dict(target_dbname="shop\nevil = host=x"), r"^DB_UPGRADE_PGBOUNCER_TARGET_DBNAME: must be 1 to 63 bytes"),
    (dict(target_user="ü" * 40), r"^DB_UPGRADE_PGBOUNCER_TARGET_USER: must be 1 to 63 bytes"),
    (dict(target_port=70000), r"^DB_UPGRADE_PGBOUNCER_TARGET_PORT: Input should be less than or equal to 65535$"),
    (dict(pause_timeout=0), r"^DB_UPGRADE_PGBOUNCER_PAUSE_TIMEOUT: Input should be greater than 0$"),
])
def test_pgbouncer_settings_errors_are_one_line_without_the_password(clean_env, override, message):
    with pytest.raises(StepError, match=message) as exc:
        load_pgbouncer_settings(**{**GOOD, **override})
    assert "\n" not in str(exc.value) and "s3cret" not in str(exc.value)


def test_pgbouncer_settings_from_environment(clean_env):
    for key, value in GOOD.items():
        clean_env.setenv(f"DB_UPGRADE_PGBOUNCER_{key.upper()}", value)
    clean_env.setenv("DB_UPGRADE_PGBOUNCER_TARGET_USER", "")  # an empty Argo input: no forced user
    clean_env.setenv("DB_UPGRADE_PGBOUNCER_PAUSE_TIMEOUT", "2.5")
    s = load_pgbouncer_settings()
    assert (s.database, s.pause_timeout, s.target_user, s.admin_uri()) == ("app-db", 2.5, None, ADMIN)
    assert s.target().label() == "pg17.db.svc:5432/shop"


def test_target_entry_from_uri():
    t = TargetEntry.from_uri("postgresql://u:pw@10.1.2.3:5433/shop%20db")
    assert (t.host, t.port, t.dbname, t.user) == ("10.1.2.3", 5433, "shop db", None)
