"""A throwaway real PgBouncer (Debian's package) for tests and rehearsals.

It listens on a free loopback port in transaction pooling mode, with an admin
user, an auth_file for the application roles (plain-text passwords: PgBouncer
then logs in to PostgreSQL with SCRAM like any client), and a [databases]
section that %includes `databases.ini`, the file the pgbouncer switch rewrites.

As root (CI) it runs as the `postgres` system user, like local/servers.py does
for PostgreSQL: `pgbouncer -u postgres` drops privileges itself, so the process
we start is PgBouncer's own and stop() signals it directly.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from local.servers import RUN_AS, free_port
from steps.switch.include import entry_line
from steps.switch.settings import TargetEntry

BINARY = "/usr/sbin/pgbouncer"
ADMIN_USER = "db_upgrade_admin"


def auth_line(user: str, password: str) -> str:
    """One auth_file line: both fields double-quoted, " written twice (PgBouncer's loader.c)."""
    return '"{}" "{}"'.format(user.replace('"', '""'), password.replace('"', '""'))


def entry_params(target: TargetEntry) -> list[tuple[str, str]]:
    pairs = [("host", target.host), ("port", str(target.port)), ("dbname", target.dbname)]
    return pairs + ([("user", target.user)] if target.user else [])


@dataclass
class PgBouncer:
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="db-upgrade-pgbouncer-")))
    # name -> where PgBouncer connects for it (written to the include file): an entry,
    # or a connection string as PgBouncer reads it (for extra parameters)
    databases: dict[str, TargetEntry | str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)  # role -> password, for the auth_file
    port: int = field(default_factory=free_port)
    admin_password: str = field(default_factory=lambda: secrets.token_hex(12))
    pool_mode: str = "transaction"
    settings: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def config_file(self) -> Path:
        return self.base / "pgbouncer.ini"

    @property
    def include_file(self) -> Path:
        return self.base / "databases.ini"

    @property
    def auth_file(self) -> Path:
        return self.base / "userlist.txt"

    @property
    def logfile(self) -> Path:
        return self.base / "pgbouncer.log"

    def _write(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.include_file.write_text("".join(
            (f"{name} = {t}" if isinstance(t, str) else entry_line(name, entry_params(t))) + "\n"
            for name, t in self.databases.items()))
        users = {ADMIN_USER: self.admin_password, **self.users}
        self.auth_file.write_text("".join(auth_line(u, p) + "\n" for u, p in users.items()))
        conf = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # loopback TCP only: no socket in a shared /tmp
            "auth_type": "scram-sha-256",
            "auth_file": str(self.auth_file),
            "admin_users": ADMIN_USER,
            "pool_mode": self.pool_mode,
            "max_client_conn": "200",
            "default_pool_size": "20",
            "logfile": str(self.logfile),
            "pidfile": str(self.base / "pgbouncer.pid"),
            # Fail a client held longer than this (default 120 s): bounds a test that goes wrong.
            "query_wait_timeout": "60",
            **self.settings,
        }
        self.config_file.write_text(
            f"[databases]\n%include {self.include_file}\n\n[pgbouncer]\n"
            + "".join(f"{k} = {v}\n" for k, v in conf.items()))
        os.chmod(self.base, 0o755)
        os.chmod(self.auth_file, 0o600)
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            for p in (self.base, self.config_file, self.include_file, self.auth_file):
                os.chown(p, user.pw_uid, user.pw_gid)

    def start(self, timeout: float = 15) -> PgBouncer:
        if not Path(BINARY).exists():
            raise RuntimeError(f"{BINARY} not found: install Debian's pgbouncer package (make deps)")
        self._write()
        argv = [BINARY, *(["-u", RUN_AS] if os.geteuid() == 0 else []), str(self.config_file)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        import psycopg

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"PgBouncer exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                psycopg.connect(self.admin_uri(), autocommit=True, connect_timeout=2,
                                cursor_factory=psycopg.ClientCursor).close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"PgBouncer did not accept connections within {timeout:g}s: "
                                       f"{self.log_tail()}")
                time.sleep(0.1)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # immediate shutdown
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def uri(self, dbname: str, user: str, password: str) -> str:
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/"
                f"{quote(dbname, safe='')}")

    def admin_uri(self) -> str:
        return self.uri("pgbouncer", ADMIN_USER, self.admin_password)

    def switch_env(self, database: str, target: TargetEntry, **extra: str) -> dict[str, str]:
        """The DB_UPGRADE_* variables of `DB_UPGRADE_SWITCH=pgbouncer` for this PgBouncer
        (the admin URI holds a password: pass it in the environment, never on a command line)."""
        env = {
            "DB_UPGRADE_SWITCH": "pgbouncer",
            "DB_UPGRADE_PGBOUNCER_ADMIN_PGURI": self.admin_uri(),
            "DB_UPGRADE_PGBOUNCER_DATABASE": database,
            "DB_UPGRADE_PGBOUNCER_INCLUDE_FILE": str(self.include_file),
            "DB_UPGRADE_PGBOUNCER_TARGET_HOST": target.host,
            "DB_UPGRADE_PGBOUNCER_TARGET_PORT": str(target.port),
            "DB_UPGRADE_PGBOUNCER_TARGET_DBNAME": target.dbname,
        }
        if target.user:
            env["DB_UPGRADE_PGBOUNCER_TARGET_USER"] = target.user
        return {**env, **extra}

    def switch_settings(self, database: str, target: TargetEntry, **overrides):
        from steps.switch.settings import load_pgbouncer_settings

        given = dict(admin_pguri=self.admin_uri(), database=database, include_file=self.include_file,
                     target_host=target.host, target_port=target.port, target_dbname=target.dbname,
                     target_user=target.user)
        return load_pgbouncer_settings(**{**given, **overrides})


def measure(window: float = 0.5, rounds: int = 3, threads: int = 8, rate: float = 200, size: str = "tiny") -> dict:
    """The stall an application sees through PgBouncer at a switch: a writer runs through
    it while each round holds, freezes the side it writes to (the readonly SQL), waits
    `window` seconds and switches to the other side. `python -m local.pgbouncer`."""
    import psycopg
    from psycopg import sql

    from local.servers import Pair
    from local.workload import (
        APP_PASSWORD,
        APP_ROLE,
        READONLY_SQL,
        SCHEMA,
        UNFREEZE_SQL,
        Writer,
        load_sample,
    )
    from steps.switch.pgbouncer import PgBouncerSwitch

    def run(uri: str, template: str) -> None:
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute(sql.SQL(template).format(schema=sql.Identifier(SCHEMA), role=sql.Identifier(APP_ROLE)))

    pair = Pair.start()
    bouncer = None
    try:
        sides = []
        for server in (pair.source, pair.target):
            with psycopg.connect(server.uri(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE shop")
            sides.append(server.uri("shop"))
            load_sample(sides[-1], size)
        bouncer = PgBouncer(databases={"shop": TargetEntry.from_uri(sides[0])}, users={APP_ROLE: APP_PASSWORD})
        bouncer.start()
        writer = Writer(bouncer.uri("shop", APP_ROLE, APP_PASSWORD), rate=rate, threads=threads, pooled=True).start()
        results = []
        try:
            time.sleep(1)
            for i in range(rounds):
                frm, to = sides[i % 2], sides[(i + 1) % 2]
                sw = PgBouncerSwitch(bouncer.switch_settings("shop", TargetEntry.from_uri(to)))
                sw.check()
                time.sleep(0.5)
                writer.stats.max_write_stall_seconds = 0.0
                failed_before, ok_before = writer.stats.failed_transactions, writer.stats.ok
                t0 = time.monotonic()
                sw.hold()
                t1 = time.monotonic()
                run(frm, READONLY_SQL)
                time.sleep(max(0.0, window - (time.monotonic() - t1)))
                sw.switch()
                t2 = time.monotonic()
                time.sleep(1)  # let every thread commit on the new side
                run(frm, UNFREEZE_SQL)
                results.append({"round": i + 1, "pause_seconds": round(t1 - t0, 3), "held_seconds": round(t2 - t1, 3),
                                "max_write_stall_seconds": round(writer.stats.max_write_stall_seconds, 3),
                                "failed_transactions": writer.stats.failed_transactions - failed_before,
                                "committed": writer.stats.ok - ok_before})
        finally:
            stats = writer.stop()
        return {"window_seconds": window, "threads": threads, "rate": rate, "transactions": stats.ok,
                "application_failed_transactions": stats.failed_transactions, "errors": stats.errors[:5],
                "rounds": results,
                "max_write_stall_seconds": max((r["max_write_stall_seconds"] for r in results), default=None)}
    finally:
        if bouncer is not None:
            bouncer.cleanup()
        pair.cleanup()


def main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m local.pgbouncer", description=measure.__doc__)
    p.add_argument("--window", type=float, default=0.5, help="seconds between hold and switch (the frozen window)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rate", type=float, default=200, help="transactions per second, all threads")
    a = p.parse_args()
    print(json.dumps(measure(a.window, a.rounds, a.threads, a.rate), indent=2))


if __name__ == "__main__":
    main()
