"""The bench's PostgreSQL 15 (source) and 17 (target) servers, and the machine.

Throwaway servers as the tests' (local.servers), with settings for volume:
a large max_wal_size so that checkpoints do not land in the middle of a
timing, and room for the slots of two engines plus verify's tracking.

`--base DIR --keep` keeps the stopped servers (and their template databases,
which take minutes to generate at 5 GB) for the next invocation with the same
base: the ports and the throwaway superuser password are kept in DIR, mode 0600.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

from local.servers import Pair, PgServer

SERVER_SETTINGS = {"max_wal_size": "'8GB'", "checkpoint_timeout": "'15min'", "maintenance_work_mem": "'256MB'",
                   "max_replication_slots": "20", "max_wal_senders": "20", "max_worker_processes": "16",
                   "max_logical_replication_workers": "8", "max_connections": "200"}
STATE_FILE = "bench-servers.json"


def _server(version: int, base: Path, known: dict | None) -> PgServer:
    if known is not None:
        return PgServer(version, base, port=known["port"], password=known["password"],
                        settings=dict(SERVER_SETTINGS))
    return PgServer(version, base, settings=dict(SERVER_SETTINGS))


def start_pair(base: Path) -> Pair:
    """Start the pair in base, reusing servers a --keep run left there."""
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    saved = base / STATE_FILE
    known = json.loads(saved.read_text()) if saved.exists() else {}
    servers = []
    for version, sub in ((15, "source"), (17, "target")):
        server = _server(version, base / sub, known.get(sub))
        if not server.datadir.exists():
            server.init()
        server.start()
        servers.append(server)
        known[sub] = {"port": server.port, "password": server.password}
    saved.write_text(json.dumps(known))
    os.chmod(saved, 0o600)
    return Pair(servers[0], servers[1], base)


def stop_pair(pair: Pair, keep: bool) -> None:
    pair.stop()
    if not keep:  # the logs stay in the base dir; the data directories go
        for d in ("source", "target"):
            shutil.rmtree(pair.base / d, ignore_errors=True)
        (pair.base / STATE_FILE).unlink(missing_ok=True)


def machine() -> dict:
    cpu = "?"
    mem = 0
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) // 1024
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "memory_mb": mem, "cpu": cpu, "kernel": platform.release()}


def load_average() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def drop_leftovers(pair: Pair, log) -> None:
    """What a crashed or killed bench run left on kept servers: its databases (r<tag>),
    their subscriptions, inactive replication slots. Logged: a leftover after a run
    that ended normally is a finding, not housekeeping (bench/upgrade.py logs those)."""
    import psycopg
    from psycopg import sql

    from bench import data

    for server in (pair.target, pair.source):
        with psycopg.connect(server.uri(), autocommit=True) as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname ~ '^r[0-9]+$'")]
        for name in names:
            with psycopg.connect(data.with_db(server.uri(), name), autocommit=True) as conn:
                for (sub,) in conn.execute("SELECT subname FROM pg_subscription WHERE subdbid = "
                                           "(SELECT oid FROM pg_database WHERE datname = current_database())"
                                           ).fetchall():
                    ident = sql.Identifier(sub)
                    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                    conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
            log(f"bench: dropping database {name} left by an earlier run")
            data.drop_database(server.uri(), name)
    with psycopg.connect(pair.source.uri(), autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE NOT active").fetchall():
            log(f"bench: dropping replication slot {slot} left by an earlier run")
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
