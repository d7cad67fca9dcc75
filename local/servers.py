"""Throwaway PostgreSQL servers: source 15 from the host, target 17 from the
project's trixie root filesystem (run under bwrap). Used by the tests,
`db-upgrade rehearse` and the benchmarks.

PostgreSQL refuses to run as root, and CI runs as root: there the servers run as
the `postgres` system user that Debian's postgresql package creates.
"""

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from steps.pgcopydb import bwrap_prefix, rootfs

HOST_BINDIR = {15: Path("/usr/lib/postgresql/15/bin")}
RUN_AS = "postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", RUN_AS, "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class PgServer:
    version: int
    base: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(8))
    settings: dict = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.base / f"pg{self.version}"

    @property
    def logfile(self) -> Path:
        return self.base / f"pg{self.version}.log"

    def _bin(self, name: str) -> list[str]:
        host = HOST_BINDIR.get(self.version)
        if host is not None and (host / name).exists():
            return _as_server_user([str(host / name)])
        root = rootfs()
        inner = f"/usr/lib/postgresql/{self.version}/bin/{name}"
        if not (root / inner.lstrip("/")).exists():
            raise RuntimeError(f"PostgreSQL {self.version} not found on the host nor in {root}: run 'make deps'")
        return _as_server_user([*bwrap_prefix(root, [self.base]), inner])

    def _run(self, name: str, *args: str) -> None:
        proc = subprocess.run([*self._bin(name), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"PostgreSQL {self.version} {name} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")

    def init(self) -> "PgServer":
        self.base.mkdir(parents=True, exist_ok=True)
        pwfile = self.base / f"pw{self.version}"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.base, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        os.chmod(self.base, 0o755)
        self._run("initdb", "-N", "-D", str(self.datadir), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            # Throwaway servers: durability costs time and proves nothing here.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "max_connections": "100",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        return self

    def start(self) -> "PgServer":
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run([*self._bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
                           capture_output=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def uri(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        from urllib.parse import quote

        pw = self.password if password is None else password
        return f"postgresql://{quote(user, safe='')}:{quote(pw, safe='')}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"


@dataclass
class Pair:
    """A source PostgreSQL 15 and a target PostgreSQL 17, started together."""

    source: PgServer
    target: PgServer
    base: Path

    @classmethod
    def start(cls, base: Path | None = None, source_version: int = 15, target_version: int = 17,
              source_settings: dict | None = None) -> "Pair":
        base = Path(base or tempfile.mkdtemp(prefix="db-upgrade-"))
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        src = PgServer(source_version, base / "source", settings=source_settings or {})
        tgt = PgServer(target_version, base / "target")
        src.init().start()
        try:
            tgt.init().start()
        except Exception:
            src.stop()
            raise
        return cls(src, tgt, base)

    def stop(self) -> None:
        self.source.stop()
        self.target.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def wait_ready(uri: str, timeout: float = 30) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(uri, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
