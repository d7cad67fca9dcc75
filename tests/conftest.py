"""Real servers for the tests: a PostgreSQL 15 source and a PostgreSQL 17 target
(from the project's trixie root filesystem), started once per session. Each test
gets its own databases on them."""

import os
import secrets
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from local.servers import Pair

ROOT = Path(__file__).resolve().parents[1]
DB_UPGRADE = str(Path(sys.executable).parent / "db-upgrade")


@pytest.fixture(scope="session")
def pair():
    # Not under pytest's tmp dir: that is private to root, and the servers run as postgres.
    p = Pair.start()
    yield p
    p.cleanup()


def create_database(server_uri: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(**{**conninfo_to_dict(server_uri), "dbname": name})


@pytest.fixture
def dbs(pair, request):
    """A fresh source and target database pair for one test."""
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:40] + "_" + secrets.token_hex(2)
    return create_database(pair.source.uri(), name), create_database(pair.target.uri(), name)


def step_env(source: str, target: str, workdir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
    env.update(PGCOPYDB_SOURCE_PGURI=source, PGCOPYDB_TARGET_PGURI=target, DB_UPGRADE_DIR=str(workdir))
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def sample(pair, dbs, tmp_path):
    """The tiny sample on the source, the application role on both servers, and its freeze SQL."""
    from local import workload
    from tests.test_faults import reset_app_role

    src, tgt = dbs
    workload.ensure_app_role(pair.target.uri())
    workload.ensure_app_role(src)
    reset_app_role(src)  # another test's freeze may have left the (server-wide) role default
    workload.load_sample(src, "tiny")
    readonly, unfreeze = workload.freeze_sql_files(tmp_path / "sql")
    return src, tgt, readonly, unfreeze


@pytest.fixture
def kube(tmp_path, monkeypatch):
    """tests/fakes/kube.py, with the kubernetes client's kubeconfig pointing at it."""
    from tests.fakes.kube import FakeKube

    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield fake


@contextmanager
def tmpfs_volume(path: Path, size: str):
    """A small work volume (a tmpfs at `path`) to fill up; skips the test where mounting needs root."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])
