"""Bad input through the command line, as the pods run it: every case ends with
one `error: ...` line naming the problem, a non-zero exit, and no change on
either database."""

import socket
import subprocess

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from local import workload
from tests.conftest import DB_UPGRADE, step_env

pytestmark = pytest.mark.slow

MARK = "Pw-marker-7c1e"  # a password that must never be printed


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def fingerprint(uri: str) -> tuple:
    """What any step could have changed on a database."""
    with psycopg.connect(uri) as conn:
        return (
            conn.execute("SELECT coalesce(array_agg(slot_name ORDER BY slot_name), '{}') FROM pg_replication_slots").fetchone(),
            conn.execute("SELECT coalesce(array_agg(roname ORDER BY roname), '{}') FROM pg_replication_origin").fetchone(),
            conn.execute("SELECT coalesce(array_agg(nspname::text ORDER BY nspname), '{}') FROM pg_namespace").fetchone(),
            conn.execute("SELECT count(*) FROM pg_class").fetchone(),
            conn.execute("SELECT coalesce(array_agg(rolname || rolreplication::text || coalesce(rolconfig::text, '') "
                         "ORDER BY rolname), '{}') FROM pg_roles").fetchone(),
            conn.execute("SELECT coalesce(array_agg(relname || coalesce(relacl::text, '') ORDER BY relname), '{}') "
                         "FROM pg_class WHERE relkind = 'r' AND relnamespace::regnamespace::text <> 'pg_catalog'"
                         ).fetchone(),
        )


def run_step(name: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([DB_UPGRADE, "step", name], env=env, capture_output=True, text=True, timeout=120)


def one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    assert MARK not in proc.stdout + proc.stderr
    return errors[0]


def with_password(uri: str, password: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(uri), "password": password})


@pytest.mark.parametrize("case", ["malformed", "wrong-password", "unreachable", "missing-service"])
def test_bad_connection(sample, tmp_path, case):
    src, tgt, readonly, unfreeze = sample
    params = conninfo_to_dict(src)
    extra = {}
    if case == "malformed":
        bad, needles = f"postgres://postgres:{MARK}@[127.0.0.1:{params['port']}/x", ["source", "not a valid libpq URI"]
    elif case == "wrong-password":
        bad, needles = with_password(src, MARK), ["source", "password authentication failed"]
    elif case == "unreachable":
        bad = f"postgres://postgres:{MARK}@127.0.0.1:{closed_port()}/postgres"
        needles = ["source", "connect"]
    else:
        services = tmp_path / "pg_service.conf"
        services.write_text(f"[other]\nhost=127.0.0.1\nport={params['port']}\nuser=postgres\npassword={MARK}\n")
        bad, needles = "postgres://?service=missing", ["source", "missing"]
        extra["PGSERVICEFILE"] = str(services)
    before = fingerprint(src), fingerprint(tgt)
    env = step_env(bad, tgt, tmp_path / "work", DB_UPGRADE_READONLY_SQL=readonly,
                   DB_UPGRADE_UNFREEZE_SQL=unfreeze, DB_UPGRADE_SLOT_NAME=f"bad_{case.replace('-', '_')}",
                   DB_UPGRADE_CATCHUP_TIMEOUT=20, **extra)
    lines = []
    for step in ("preflight", "follow", "freeze", "wait-caught-up", "cleanup"):
        lines.append(one_error(run_step(step, env), *needles))
    assert (fingerprint(src), fingerprint(tgt)) == before
    print(f"\n{case}: {lines[0]}")


def test_readonly_sql_failing_halfway_changes_nothing(sample, tmp_path):
    src, tgt, readonly, unfreeze = sample
    broken = tmp_path / "sql" / "broken.sql"
    broken.write_text(readonly.read_text() + "\nSELECT 1 / 0;\n")
    env = step_env(src, tgt, tmp_path / "work", DB_UPGRADE_READONLY_SQL=broken, DB_UPGRADE_UNFREEZE_SQL=unfreeze)
    before = fingerprint(src), fingerprint(tgt)
    line = one_error(run_step("freeze", env), "readonly SQL failed", "rolled back", "division by zero")
    assert (fingerprint(src), fingerprint(tgt)) == before
    with psycopg.connect(workload.app_uri(src), autocommit=True) as app:  # the app role still writes
        app.execute(sql.SQL("INSERT INTO {} (actor) VALUES ('still writable')").format(
            sql.Identifier(workload.SCHEMA, workload.AUDIT)))
    print(f"\n{line}")


def test_target_not_empty(sample, tmp_path):
    src, tgt, readonly, unfreeze = sample
    with psycopg.connect(tgt, autocommit=True) as conn:
        conn.execute("CREATE TABLE leftover (id int)")
    env = step_env(src, tgt, tmp_path / "work", DB_UPGRADE_SLOT_NAME="bad_not_empty")
    before = fingerprint(src), fingerprint(tgt)
    line = one_error(run_step("preflight", env), "target database is not empty", "leftover")
    assert (fingerprint(src), fingerprint(tgt)) == before
    print(f"\n{line}")


# The misconfigured-server cases (wal_level=replica, the same major version, every
# problem at once) are in tests/test_preflight.py, with the other preflight checks.
