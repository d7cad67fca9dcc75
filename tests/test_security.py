"""Secrets stay secret and values stay values.

- A whole step sequence runs with passwords set to a known marker; the marker
  must appear in no step's stdout or stderr, no file pgcopydb leaves in the work
  dir (its SQLite catalogs included), the state file, nor the outputs dir.
- Values carrying shell or template syntax (`$(...)`, quotes, `{{...}}`) are
  data: the scratch database is created under exactly that name, and a work dir
  and SQL file path with such characters work as plain paths.
"""

import os
import secrets
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from local import workload
from tests.conftest import DB_UPGRADE, step_env
from tests.test_bad_input import one_error, run_step

pytestmark = pytest.mark.slow

MARKER = "Sekr3t-marker-" + secrets.token_hex(4)
USER = "sec migrator"


def as_user(uri: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(uri), "user": USER, "password": MARKER})


def setup_user(server_uri: str) -> None:
    with psycopg.connect(server_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (USER,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(sql.SQL(verb + " ROLE {} LOGIN SUPERUSER NOREPLICATION PASSWORD {}").format(
            sql.Identifier(USER), sql.Literal(MARKER)))


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def server_log_hits(pair, needle: str) -> list[str]:
    hits = []
    for server in (pair.source, pair.target):
        try:
            if needle in server.logfile.read_text(errors="replace"):
                hits.append(str(server.logfile))
        except OSError:
            pass
    return hits


@pytest.mark.parametrize("engine", ["native", "pgcopydb-follow"])
def test_passwords_never_leave_the_secret(pair, dbs, tmp_path, engine):
    src_db, tgt_db = dbs
    for server in (pair.source, pair.target):
        setup_user(server.uri())
        workload.ensure_app_role(server.uri())
    from tests.test_faults import reset_app_role

    reset_app_role(pair.source.uri())
    source, target = as_user(src_db), as_user(tgt_db)
    workload.load_sample(source, "tiny")
    # Paths with shell and template syntax in them: plain paths to us and pgcopydb.
    # (No single quote in the work dir: pgcopydb 0.17 cannot use one; see test_quote_in_work_dir_refused.)
    odd = "odd $(touch PWNED) \"dq\" {{workflow.name}} ;x"
    sql_dir = tmp_path / odd / "sql"
    readonly, unfreeze = workload.freeze_sql_files(sql_dir)
    workdir = tmp_path / odd / "work"
    outputs = tmp_path / "outputs"
    env = step_env(source, target, workdir, DB_UPGRADE_READONLY_SQL=readonly, DB_UPGRADE_UNFREEZE_SQL=unfreeze,
                   DB_UPGRADE_OUTPUTS=outputs, DB_UPGRADE_SLOT_NAME="sec_marker", DB_UPGRADE_POLL_INTERVAL=0.3,
                   DB_UPGRADE_LAG_THRESHOLD_BYTES=256 * 1024, DB_UPGRADE_CATCHUP_TIMEOUT=120,
                   DB_UPGRADE_TABLE_JOBS=2, DB_UPGRADE_INDEX_JOBS=2, DB_UPGRADE_ENGINE=engine,
                   DB_UPGRADE_SWITCH="none")
    outs: dict[str, str] = {}

    def step(name: str, ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([DB_UPGRADE, "step", name], env=env, capture_output=True, text=True, timeout=180)
        outs[f"{name}#{len(outs)}"] = proc.stdout + proc.stderr
        if ok:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    writer = workload.Writer(workload.app_uri(src_db), rate=50, threads=1).start()
    follow = None
    try:
        step("preflight")
        step("grant-replication")
        follow = subprocess.Popen([DB_UPGRADE, "step", "follow"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        step("wait-caught-up")
        prepare = subprocess.Popen([DB_UPGRADE, "step", "verify-prepare"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        step("cutover")
        outs["follow"] = follow.communicate(timeout=180)[0]
        assert follow.returncode == 0, outs["follow"][-3000:]
        outs["verify-prepare"] = prepare.communicate(timeout=60)[0]
        writer.stop()
        with psycopg.connect(source) as conn:  # the run's record: every value it holds
            record = " ".join(v for (v,) in conn.execute("SELECT value::text FROM db_upgrade.run_state"))
        assert record and MARKER not in record
        step("cleanup")
        step("unfreeze")
        # Failures print connection errors: still no password.
        bad = dict(env, PGCOPYDB_TARGET_PGURI=make_conninfo(**{**conninfo_to_dict(target), "port": "1"}))
        proc = subprocess.run([DB_UPGRADE, "step", "preflight"], env=bad, capture_output=True, text=True)
        outs["preflight-bad-target"] = proc.stdout + proc.stderr
        assert proc.returncode != 0
    finally:
        writer.stop()
        if follow is not None and follow.poll() is None:
            follow.kill()
            follow.communicate()
        with psycopg.connect(pair.source.uri(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = 'sec_marker' AND active_pid IS NULL")
        for name, text in outs.items():  # kept for reading after a failure
            (tmp_path / f"out-{name.replace('#', '-')}.log").write_text(text)
    leaked = [name for name, text in outs.items() if MARKER in text]
    assert not leaked, leaked
    assert any("pgcopydb" in text for text in outs.values())  # pgcopydb's own log was among them
    for root in (workdir, outputs):
        assert root.exists() and any(root.iterdir())
        assert not files_containing(root, MARKER.encode()), files_containing(root, MARKER.encode())
    # Nor the servers' logs (a failed CREATE SUBSCRIPTION would log its CONNECTION there).
    assert not server_log_hits(pair, MARKER)
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()
    print(f"\nsecurity: {len(outs)} step outputs and {sum(1 for _ in workdir.rglob('*'))} work dir entries "
          f"searched; marker absent")


def test_scratch_database_name_is_data(pair, tmp_path):
    name = "s $(touch /tmp/PWNED-dbu) 'q' \"d\" {{wf.name}};DROP DATABASE x"
    env = step_env(pair.source.uri(), pair.target.uri(), tmp_path / "work", DB_UPGRADE_SCRATCH_DATABASE=name)
    before = Path("/tmp/PWNED-dbu").exists()
    try:
        proc = subprocess.run([DB_UPGRADE, "step", "create-scratch-target"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        with psycopg.connect(pair.target.uri()) as conn:
            names = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        assert name in names and "postgres" in names
        # The scratch URI the other steps get points at exactly that database.
        from steps.scratch import scratch_uri

        with psycopg.connect(scratch_uri(pair.target.uri(), name)) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == name
    finally:
        proc = subprocess.run([DB_UPGRADE, "step", "drop-scratch-target"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(pair.target.uri()) as conn:
        assert not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert Path("/tmp/PWNED-dbu").exists() == before is False


def test_quote_in_work_dir_refused(pair, dbs, tmp_path):
    """pgcopydb 0.17 splices --dir into SQLite SQL: follow refuses such a dir with one line."""
    env = step_env(*dbs, tmp_path / "it's" / "work", DB_UPGRADE_SLOT_NAME="sec_quote")
    one_error(run_step("follow", env), "single quote")
    with psycopg.connect(pair.source.uri()) as conn:
        assert not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sec_quote'").fetchone()


def test_scratch_database_name_too_long(pair, tmp_path):
    """PostgreSQL would truncate a name over 63 bytes and create another database."""
    env = step_env(pair.source.uri(), pair.target.uri(), tmp_path / "work", DB_UPGRADE_SCRATCH_DATABASE="x" * 64)
    one_error(run_step("create-scratch-target", env), "63 bytes")
    with psycopg.connect(pair.target.uri()) as conn:
        assert not conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE 'xxxx%'").fetchone()
