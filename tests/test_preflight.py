"""preflight against real servers: the shared PostgreSQL 15 -> 17 pair, plus one
misconfigured PostgreSQL 15 server and a standby of it, started once for the
module. Each check that can fail is made to fail here (or, for the server
settings, in the one run on the misconfigured server), the happy paths pass, and
nothing preflight tries for real (the freeze SQL, the test subscription) is left
behind. The pure verdicts are in tests/test_preflight_unit.py."""

import os
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from local import workload
from local.servers import RUN_AS, PgServer
from steps import pgcopydb, preflight, state
from steps.errors import StepError
from steps.settings import StepSettings
from tests.conftest import create_database, step_env
from tests.test_bad_input import MARK, closed_port, fingerprint, one_error, run_step

pytestmark = pytest.mark.slow


# -- helpers -----------------------------------------------------------------------------------

def settings(src: str, tgt: str, tmp_path: Path, **kw) -> StepSettings:
    base = {"source_pguri": src, "target_pguri": tgt, "dir": tmp_path / "work",
            "slot_name": "pf_" + secrets.token_hex(4), "run_id": "pf-" + secrets.token_hex(4)}
    return StepSettings(**{**base, **kw})


def run(s: StepSettings, capsys) -> tuple[str | None, str]:
    """(the step's error line or None, its log)."""
    capsys.readouterr()
    try:
        preflight.preflight(s)
        error = None
    except StepError as exc:
        error = str(exc)
    out = capsys.readouterr().err
    assert MARK not in out and (error is None or MARK not in error)
    return error, out


def lines(out: str, kind: str) -> list[str]:
    tag = {"ok": "  ok       ", "problem": "  PROBLEM  ", "note": "  note     "}[kind]
    return [ln.split(tag, 1)[1] for ln in out.splitlines() if tag in ln]


def has(items: list[str], *needles: str) -> bool:
    return any(all(n in item for n in needles) for item in items)


# Subscriptions are per server: count only preflight's test subscriptions.
PREFLIGHT_SUBSCRIPTIONS = r"SELECT count(*) FROM pg_subscription WHERE subname LIKE 'db\_upgrade\_preflight\_%'"


def privileges_now(uri: str) -> tuple:
    """What a freeze SQL can change, for before/after comparisons."""
    with psycopg.connect(uri) as conn:
        return (
            conn.execute("SELECT coalesce(array_agg(format('%s %s %s', setdatabase, setrole, setconfig) "
                         "ORDER BY setdatabase, setrole), '{}') FROM pg_db_role_setting").fetchone(),
            conn.execute("SELECT array_agg(rolname || rolcanlogin::text ORDER BY rolname) FROM pg_roles").fetchone(),
            conn.execute("SELECT array_agg(relname || coalesce(relacl::text, '') ORDER BY relname) FROM pg_class "
                         "WHERE relnamespace::regnamespace::text NOT IN ('pg_catalog', 'information_schema', "
                         "'pg_toast', 'db_upgrade')").fetchone(),  # db_upgrade: the run's record
            conn.execute("SELECT datacl::text FROM pg_database WHERE datname = current_database()").fetchone(),
        )


def app_can_write(src: str) -> None:
    with psycopg.connect(workload.app_uri(src), autocommit=True) as app:
        app.execute(sql.SQL("INSERT INTO {} (actor, detail) VALUES ('preflight test', %s)").format(
            sql.Identifier(workload.SCHEMA, workload.AUDIT)), ("it's \\ still 'null' writable ✓",))


def new_database(server_uri: str, options: str) -> str:
    name = "pf_" + secrets.token_hex(4)
    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ").format(sql.Identifier(name)) + sql.SQL(options))
    return make_conninfo(**{**conninfo_to_dict(server_uri), "dbname": name})


def as_role(uri: str, role: str, password: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(uri), "user": role, "password": password})


@contextmanager
def role_on(server_uri: str, name: str, attributes: str, password: str):
    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} ").format(sql.Identifier(name), sql.Literal(password))
                     + sql.SQL(attributes))
    try:
        yield name
    finally:
        with psycopg.connect(server_uri, autocommit=True) as conn:
            dbs = [d for (d,) in conn.execute("SELECT datname FROM pg_database WHERE datallowconn "
                                              "AND datname NOT LIKE 'template%'")]
        for db in dbs:  # its privileges live in each database
            with psycopg.connect(make_conninfo(**{**conninfo_to_dict(server_uri), "dbname": db}), autocommit=True) as c:
                c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        with psycopg.connect(server_uri, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def sample_settings(sample, tmp_path, **kw) -> StepSettings:
    src, tgt, readonly, unfreeze = sample
    return settings(src, tgt, tmp_path, readonly_sql=readonly, unfreeze_sql=unfreeze, app_roles=workload.APP_ROLE, **kw)


# -- the misconfigured PostgreSQL 15 server and its standby ----------------------------------

ODD_SETTINGS = {
    "wal_level": "replica",
    "max_replication_slots": "1",
    "max_wal_senders": "1",  # taken by the standby
    "max_slot_wal_keep_size": "'1MB'",
    "output_plugin_libraries": "'test_decoding'",
    "max_logical_replication_workers": "0",
}


def _as_server_user(base: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam(RUN_AS)
        os.chown(base, user.pw_uid, user.pw_gid)
    os.chmod(base, 0o755)


def start_standby(primary: PgServer, base: Path) -> PgServer:
    base.mkdir(parents=True)
    _as_server_user(base)
    standby = PgServer(15, base, password=primary.password)
    primary._run("pg_basebackup", "-D", str(standby.datadir), "-h", str(primary.base), "-p", str(primary.port),
                 "-U", "postgres", "-X", "fetch", "-R", "-c", "fast")
    with open(standby.datadir / "postgresql.conf", "a") as f:
        f.write(f"port = {standby.port}\nunix_socket_directories = '{base}'\n")
    standby.start()
    deadline = time.monotonic() + 30
    with psycopg.connect(primary.uri(), autocommit=True) as conn:
        while not conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]:
            assert time.monotonic() < deadline, "the standby never connected"
            time.sleep(0.2)
    return standby


@pytest.fixture(scope="module")
def odd15():
    """(a PostgreSQL 15 server with every engine-relevant setting wrong, a standby of it)."""
    base = Path(tempfile.mkdtemp(prefix="db-upgrade-odd15-"))
    _as_server_user(base)
    server = PgServer(15, base / "primary", settings=ODD_SETTINGS).init().start()
    standby = None
    try:
        standby = start_standby(server, base / "standby")
        yield server, standby
    finally:
        if standby is not None:
            standby.stop()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def wal_writer(uri: str):
    """Writes a steady ~1-2 MB/s of WAL while preflight measures the rate."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_filler (id bigserial PRIMARY KEY, pad text)")
    stop = threading.Event()

    def write():
        with psycopg.connect(uri, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO wal_filler (pad) SELECT repeat(md5(g::text), 60) FROM generate_series(1, 20) g")
                time.sleep(0.02)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_misconfigured_server_every_problem_at_once(odd15, tmp_path):
    """wal_level=replica, the same major version, too few slots and WAL senders,
    output_plugin_libraries without pgoutput, no logical replication workers, a
    max_slot_wal_keep_size a run would exceed, a table without a key: one run
    through the command line names them all, in one line, and changes nothing."""
    server, _standby = odd15
    src = create_database(server.uri(), "misconfigured_source")
    tgt = create_database(server.uri(), "misconfigured_target")
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TABLE no_pk (id int, note text)")
        conn.execute("INSERT INTO no_pk VALUES (1, 'null'), (2, 'it''s')")
    env = step_env(src, tgt, tmp_path / "work", DB_UPGRADE_SLOT_NAME="pf_misconfigured")
    with wal_writer(src):
        before = fingerprint(src), fingerprint(tgt)
        proc = run_step("preflight", env)
        assert (fingerprint(src), fingerprint(tgt)) == before
    needles = ["wal_level = replica", "is not newer", "no_pk", "max_slot_wal_keep_size = 1.0 MB",
               "free replication slot", "free WAL sender", "does not allow pgoutput",
               "max_logical_replication_workers = 0", "the target server cannot connect to the source"]
    line = one_error(proc, f"{len(needles)} problem(s)", *needles)
    assert proc.stderr.count("PROBLEM") == len(needles), proc.stderr
    print(f"\n{line}")


def test_standby_as_source(odd15, dbs, tmp_path, capsys):
    _server, standby = odd15
    error, out = run(settings(standby.uri(), dbs[1], tmp_path), capsys)
    assert error and has(lines(out, "problem"), "the source is a standby (in recovery)")
    assert has(lines(out, "note"), "need the primary: not run")


# -- the happy paths -------------------------------------------------------------------------

def test_native_happy_path(sample, tmp_path, capsys):
    src, tgt = sample[:2]
    s = sample_settings(sample, tmp_path)
    before = privileges_now(src), fingerprint(tgt)
    error, out = run(s, capsys)
    assert error is None, out
    ok = lines(out, "ok")
    for needle in ("source database", "target database", "is a primary", "wal_level = logical", "has REPLICATION",
                   "may SELECT every application table", "no large objects", "is newer than source",
                   "target database is empty", "encoding UTF8 on both", "database locale", "role(s) owning objects",
                   "replica identity", "may fence them", "is left over", "max_slot_wal_keep_size",
                   "readonly SQL ran in a dry run", "unfreeze SQL ran in a dry run", "restores exactly",
                   "no record of another run", "pgcopydb 0.17", "work dir", "replication slots:", "WAL senders:",
                   "allows pgoutput", "may create the publication", "may create the subscription", "target workers",
                   "the target server connects to the source"):
        assert has(ok, needle), (needle, out)
    assert has(lines(out, "note"), 'shop."Audit ""Log"""', "no index the target's apply can use")
    assert not lines(out, "problem")
    # The run began; nothing else changed (the test subscription and the dry runs were rolled back).
    assert state.load(s).started_at is not None
    assert (privileges_now(src), fingerprint(tgt)) == before
    with psycopg.connect(tgt) as conn:
        assert conn.execute(PREFLIGHT_SUBSCRIPTIONS).fetchone()[0] == 0
    app_can_write(src)


def test_pgcopydb_follow_happy_path_notes_its_data_limits(sample, tmp_path, capsys):
    error, out = run(sample_settings(sample, tmp_path, engine="pgcopydb-follow"), capsys)
    assert error is None, out
    assert has(lines(out, "ok"), "output plugin test_decoding is installed")
    assert has(lines(out, "ok"), "allows test_decoding")
    assert has(lines(out, "ok"), "session_replication_role")
    notes = lines(out, "note")
    assert has(notes, "unchanged-toast-datum", "'null'", "single quote")
    assert has(notes, "columns at risk", "TOAST-able", "shop.customers.email")


# -- the freeze SQL's dry run ----------------------------------------------------------------

AWKWARD_READONLY = """-- a comment with 'quotes' and a unicode ✓
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA {schema} FROM {role};
ALTER ROLE {role} SET default_transaction_read_only = on;
ALTER ROLE {role} NOLOGIN;
ALTER DATABASE {db} SET application_name = E'froze\\\\it''s';
COMMENT ON SCHEMA {schema} IS $c$frozen 'null' \\ $c$;
"""
AWKWARD_UNFREEZE = """GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
ALTER ROLE {role} RESET default_transaction_read_only;
ALTER ROLE {role} LOGIN;
ALTER DATABASE {db} RESET application_name;
"""


def test_dry_run_of_the_freeze_sql_changes_nothing(sample, tmp_path, capsys):
    src = sample[0]
    db = conninfo_to_dict(src)["dbname"]
    names = {"schema": sql.Identifier(workload.SCHEMA), "role": sql.Identifier(workload.APP_ROLE),
             "db": sql.Identifier(db)}
    readonly, unfreeze = tmp_path / "ro.sql", tmp_path / "un.sql"
    readonly.write_text(sql.SQL(AWKWARD_READONLY).format(**names).as_string(None))
    unfreeze.write_text(sql.SQL(AWKWARD_UNFREEZE).format(**names).as_string(None))
    with psycopg.connect(src) as conn:
        comment = conn.execute("SELECT obj_description(%s::regnamespace)", (workload.SCHEMA,)).fetchone()
    before = privileges_now(src)
    s = settings(src, sample[1], tmp_path, readonly_sql=readonly, unfreeze_sql=unfreeze, app_roles=workload.APP_ROLE)
    error, out = run(s, capsys)
    assert error is None, out
    ok = lines(out, "ok")
    # It ran for real (what it changes is seen inside the transaction) ...
    assert has(ok, "readonly SQL ran in a dry run", "table privileges", "role and database settings", "role logins")
    # ... and the comment's change is not among what a freeze is judged by, but is rolled back too.
    assert has(ok, "unfreeze SQL restores exactly")
    assert privileges_now(src) == before
    with psycopg.connect(src) as conn:
        assert conn.execute("SELECT obj_description(%s::regnamespace)", (workload.SCHEMA,)).fetchone() == comment
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (workload.APP_ROLE,)).fetchone()[0]
    app_can_write(src)


def test_a_commit_in_the_dry_run_cannot_end_its_transaction(sample):
    """Even SQL the scans miss cannot commit the dry run: it runs inside a DO
    block's EXECUTE, which refuses transaction control."""
    src = sample[0]
    before = privileges_now(src)
    text = sql.SQL("ALTER ROLE {r} SET default_transaction_read_only = on; COMMIT; ALTER ROLE {r} NOLOGIN").format(
        r=sql.Identifier(workload.APP_ROLE)).as_string(None)
    with psycopg.connect(src, autocommit=True) as conn, pytest.raises(psycopg.Error, match="transaction commands"), \
            conn.transaction(force_rollback=True):
        conn.execute(preflight.dry_run_sql(text))
    assert privileges_now(src) == before


def test_bad_freeze_sql(sample, tmp_path, capsys):
    src, tgt = sample[:2]
    role = sql.Identifier(workload.APP_ROLE).as_string(None)
    failing, committing, killing = tmp_path / "failing.sql", tmp_path / "commit.sql", tmp_path / "kill.sql"
    failing.write_text(f"ALTER ROLE {role} SET default_transaction_read_only = on;\nREVOKE ALL ON TABLE shop.gone "
                       f"FROM {role};\n")
    committing.write_text(f"BEGIN;\nALTER ROLE {role} RESET default_transaction_read_only;\nCOMMIT;\n")
    killing.write_text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'nobody';\n")
    before = privileges_now(src)
    error, out = run(settings(src, tgt, tmp_path, readonly_sql=failing, unfreeze_sql=committing), capsys)
    problems = lines(out, "problem")
    assert error and "2 problem(s)" in error, out
    assert has(problems, "readonly SQL failed in a dry run", 'relation "shop.gone" does not exist', "nothing changed")
    assert has(problems, "unfreeze SQL contains transaction control (BEGIN, COMMIT)")
    error, out = run(settings(src, tgt, tmp_path, readonly_sql=tmp_path / "missing.sql", unfreeze_sql=killing), capsys)
    assert error and "1 problem(s)" in error and "DB_UPGRADE_READONLY_SQL" in error and "cannot be read" in error
    assert has(lines(out, "note"), "unfreeze SQL not dry-run", "pg_terminate_backend")
    # A lock the application holds: the dry run gives up after a moment instead of waiting behind it.
    locking = tmp_path / "lock.sql"
    locking.write_text("LOCK TABLE shop.orders IN EXCLUSIVE MODE;\n")
    with psycopg.connect(src) as app:
        app.execute("LOCK TABLE shop.orders IN ROW EXCLUSIVE MODE")
        started = time.monotonic()
        error, out = run(settings(src, tgt, tmp_path, readonly_sql=locking), capsys)
        assert time.monotonic() - started < 10
    assert error is None and has(lines(out, "note"), "readonly SQL could not finish its dry run", "for a lock"), out
    assert privileges_now(src) == before
    app_can_write(src)


# -- tables ----------------------------------------------------------------------------------

TABLES = '''
CREATE TABLE public."no key ""here""" (id int, note text);
INSERT INTO public."no key ""here""" VALUES (1, 'null'), (2, 'back\\slash');
CREATE TABLE public.nothing (id int PRIMARY KEY);
ALTER TABLE public.nothing REPLICA IDENTITY NOTHING;
CREATE TABLE public.by_index (id int NOT NULL, v text);
CREATE UNIQUE INDEX by_index_id ON public.by_index (id);
ALTER TABLE public.by_index REPLICA IDENTITY USING INDEX by_index_id;
CREATE TABLE public.keyless_indexed (at timestamptz NOT NULL, body text);
CREATE INDEX keyless_at ON public.keyless_indexed (at);
ALTER TABLE public.keyless_indexed REPLICA IDENTITY FULL;
INSERT INTO public.keyless_indexed SELECT now(), repeat(md5(g::text), 200) FROM generate_series(1, 200) g;
CREATE UNLOGGED TABLE public.cache (k int PRIMARY KEY);
CREATE MATERIALIZED VIEW public.totals AS SELECT count(*) AS n FROM public.keyless_indexed;
ANALYZE;
'''


def test_replica_identity(dbs, tmp_path, capsys):
    """REPLICA IDENTITY USING INDEX passes (the seed flagged it); no key or
    NOTHING fails; keyless FULL tables are listed with their size and index."""
    src, tgt = dbs
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute(TABLES)
    error, out = run(settings(src, tgt, tmp_path), capsys)
    problems = lines(out, "problem")
    assert error and "1 problem(s)" in error, out
    assert has(problems, "2 table(s) without a primary key", 'public."no key ""here"""', "public.nothing")
    assert not has(problems, "by_index")
    notes = lines(out, "note")
    assert has(notes, "without a usable key", "public.keyless_indexed (", "the target's apply can use index keyless_at")
    assert has(notes, "unlogged", "public.cache") and has(notes, "REFRESH MATERIALIZED VIEW", "public.totals")
    # pgcopydb 0.17's test_decoding apply cannot use a replica identity index.
    error, out = run(settings(src, tgt, tmp_path, engine="pgcopydb-follow"), capsys)
    assert has(lines(out, "problem"), "REPLICA IDENTITY USING INDEX", "public.by_index", "native engine")


# -- the databases themselves ----------------------------------------------------------------

def test_locale_and_encoding_differences(pair, tmp_path, capsys):
    icu = "LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C.UTF-8'"
    src = new_database(pair.source.uri(), icu)
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute('CREATE TABLE names (id int PRIMARY KEY, name text COLLATE "en-x-icu")')
    ascii_target = new_database(pair.target.uri(), "ENCODING 'SQL_ASCII' LOCALE 'C'")
    error, out = run(settings(src, ascii_target, tmp_path), capsys)
    problems = lines(out, "problem")
    assert has(problems, "encoding differs: source UTF8, target SQL_ASCII", "ENCODING 'UTF8'")
    assert has(problems, "database locale differs", "LOCALE_PROVIDER icu ICU_LOCALE 'und'")
    # The same locale, built with another ICU version: fine, with a note.
    icu_target = new_database(pair.target.uri(), icu)
    error, out = run(settings(src, icu_target, tmp_path), capsys)
    assert error is None, out
    notes = lines(out, "note")
    assert has(notes, "collation library version differs") and has(notes, "en-x-icu (")


def test_every_database_problem_at_once(sample, pair, tmp_path, capsys):
    """Large objects, an extension the target lacks, a role only the source has,
    leftovers of an earlier run on both sides, another run's record, an app role
    that does not exist: one run, one line each."""
    src, tgt = sample[:2]
    s = sample_settings(sample, tmp_path)
    only_here = "pf_only_" + secrets.token_hex(3)
    ghost = "pf_ghost_" + secrets.token_hex(3)
    s = s.model_copy(update={"app_roles": f"{workload.APP_ROLE}, {ghost}"})
    with role_on(pair.source.uri(), only_here, "", "x"):
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("SELECT lo_from_bytea(0, 'large')")
            conn.execute("CREATE EXTENSION old_snapshot")
            conn.execute(sql.SQL("GRANT SELECT ON shop.customers TO {}").format(sql.Identifier(only_here)))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (f"{s.slot_name}_verify",))
        with psycopg.connect(tgt, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SUBSCRIPTION {} CONNECTION 'host=127.0.0.1 port=1' PUBLICATION p "
                                 "WITH (connect = false)").format(sql.Identifier(f"{s.slot_name}_old")))
        state.record(s.model_copy(update={"run_id": "wf-earlier"}), started_at=1.0)
        try:
            error, out = run(s, capsys)
        finally:
            with psycopg.connect(src, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (f"{s.slot_name}_verify",))
            with psycopg.connect(tgt, autocommit=True) as conn:
                for q in ("ALTER SUBSCRIPTION {} SET (slot_name = NONE)", "DROP SUBSCRIPTION {}"):
                    conn.execute(sql.SQL(q).format(sql.Identifier(f"{s.slot_name}_old")))
    problems = lines(out, "problem")
    expected = [("large object",), ("old_snapshot", "not available on the target"), (only_here, "missing on the target"),
                (f"replication slot on the source '{s.slot_name}_verify'", f"subscription on the target '{s.slot_name}_old'"),
                ("other run(s): wf-earlier",), (ghost, "do not exist on the target"), (ghost, "do not exist on the source")]
    for needles in expected:
        assert has(problems, *needles), (needles, out)
    assert error.startswith(f"preflight found {len(expected)} problem(s): "), error
    assert state.load(s).started_at is None  # not begun


def test_unprivileged_roles(sample, pair, tmp_path, capsys):
    """A migration role that is not a superuser on either side: everything it
    could not do is named (and nothing it may not read breaks the scan)."""
    src, tgt = sample[:2]
    role, password = "pf_mig_" + secrets.token_hex(3), "pw-" + secrets.token_hex(4)
    with role_on(pair.source.uri(), role, "", password), role_on(pair.target.uri(), role, "CREATEROLE", password):
        with psycopg.connect(src, autocommit=True) as conn:
            r = sql.Identifier(role)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA shop TO {}").format(r))
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA shop TO {}").format(r))
            conn.execute(sql.SQL("GRANT SELECT ON ALL SEQUENCES IN SCHEMA shop TO {}").format(r))
            conn.execute(sql.SQL("REVOKE SELECT ON shop.orders FROM {}").format(r))
        s = sample_settings(sample, tmp_path, source_pguri=as_role(src, role, password),
                            target_pguri=as_role(tgt, role, password))
        error, out = run(s, capsys)
        problems = lines(out, "problem")
        expected = [("lacks REPLICATION", "only a superuser"), ("lacks CREATE on the source",),
                    ("cannot SELECT", "shop.orders"), ("lacks CREATE on the target",),
                    ("cannot be fenced", "ADMIN OPTION"), ("readonly SQL failed in a dry run",),
                    ("unfreeze SQL failed in a dry run",), ("does not own", "shop.customers (owner postgres)"),
                    ("pg_create_subscription",)]
        for needles in expected:
            assert has(problems, *needles), (needles, out)
        assert error.startswith(f"preflight found {len(expected)} problem(s)"), out
        notes = lines(out, "note")
        assert has(notes, "pg_monitor") and has(notes, "output_plugin_libraries is not readable")
        assert has(notes, "connection to the source was not tried")
        error, out = run(s.model_copy(update={"engine": "pgcopydb-follow"}), capsys)
        assert has(lines(out, "problem"), "may not run pgcopydb's apply", "session_replication_role")
        assert has(lines(out, "note"), "output plugin test_decoding: not checkable")


# -- the native engine's test subscription ---------------------------------------------------

@pytest.mark.parametrize("case", ["unreachable", "no-replication"])
def test_test_subscription_fails_clearly(case, sample, pair, tmp_path, capsys):
    src, tgt = sample[:2]
    norep = "pf_norep_" + secrets.token_hex(3)
    if case == "unreachable":
        uri = make_conninfo(**{**conninfo_to_dict(src), "port": str(closed_port()), "password": MARK})
        needles = ["cannot connect to the source with DB_UPGRADE_SUBSCRIPTION_PGURI", "pg_hba.conf", "passfile"]
    else:
        uri = as_role(src, norep, MARK)
        needles = ["DB_UPGRADE_SUBSCRIPTION_PGURI", "lacks REPLICATION"]
    with role_on(pair.source.uri(), norep, "", MARK):
        error, out = run(sample_settings(sample, tmp_path, subscription_pguri=uri), capsys)
    assert error and "1 problem(s)" in error and all(n in error for n in needles), out
    with psycopg.connect(tgt) as conn:
        assert conn.execute(PREFLIGHT_SUBSCRIPTIONS).fetchone()[0] == 0
    try:  # the statement, CONNECTION and its password included, stays out of the target's server log
        assert MARK not in pair.target.logfile.read_text(errors="replace")
    except PermissionError:
        pass


# -- pgcopydb-follow's own problems ----------------------------------------------------------

def test_pgcopydb_follow_problems(sample, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("DB_UPGRADE_ROOTFS", str(tmp_path / "no-rootfs"))
    pgcopydb._locate.cache_clear()
    try:
        error, out = run(sample_settings(sample, tmp_path, engine="pgcopydb-follow", plugin="wal2json",
                                         dir=tmp_path / "a-file" / "work"), capsys)
    finally:
        monkeypatch.undo()
        pgcopydb._locate.cache_clear()
    problems = lines(out, "problem")
    expected = [("pgcopydb >= 0.16 not found",), ("wal2json is not installed",),
                ("does not allow wal2json",), ("is not writable",)]
    for needles in expected:
        assert has(problems, *needles), (needles, out)
    assert error.startswith(f"preflight found {len(expected)} problem(s)"), out
    assert has(lines(out, "note"), "6 decimals") and has(lines(out, "note"), "shop.orders.amount")


# -- a run under way -------------------------------------------------------------------------

def test_rerun_during_a_run_keeps_its_record(sample, tmp_path, capsys):
    """Preflight run again for a run whose follow has started (a retried
    workflow): its slot and copied tables are expected, and its record stays."""
    src, tgt = sample[:2]
    s = sample_settings(sample, tmp_path)
    state.record(s, started_at=1.0, follow_started_at=2.0)
    with psycopg.connect(tgt, autocommit=True) as conn:
        conn.execute("CREATE TABLE copied (id int PRIMARY KEY)")
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (s.slot_name,))
    try:
        error, out = run(s, capsys)
    finally:
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (s.slot_name,))
    assert error is None, out
    assert has(lines(out, "note"), "is under way")
    assert has(lines(out, "ok"), "copied by this run")
    rec = state.load(s)
    assert (rec.started_at, rec.follow_started_at) == (1.0, 2.0)


def test_an_application_role_left_nologin_on_the_target(sample, tmp_path, capsys):
    """An interrupted run's fence (or a mistake) left the application role NOLOGIN on the
    target: the fence gives LOGIN back only to roles that had it, so the applications
    would be refused after the switch. Preflight says so, unless this run's own fence did it."""
    src, tgt = sample[:2]
    s = sample_settings(sample, tmp_path)
    role = sql.Identifier(workload.APP_ROLE)
    with psycopg.connect(tgt, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(role))
    try:
        error, out = run(s, capsys)
        assert error and has(lines(out, "problem"), repr(workload.APP_ROLE), "cannot log in to the target",
                             "run its cleanup step"), out
        state.record(s, follow_started_at=2.0, fenced_roles={workload.APP_ROLE: True})  # this run fenced it
        error, out = run(s, capsys)
        assert not has(lines(out, "problem"), "cannot log in to the target"), out
    finally:
        with psycopg.connect(tgt, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(role))
