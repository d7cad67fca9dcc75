"""Connections to the source and target, with errors that never carry a secret."""

import re
from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict

from steps.errors import StepError

CONNECT_TIMEOUT = 10

# The application's schemas: not the system's, not pgcopydb's, not ours (the
# db_upgrade heartbeat and verification bookkeeping). In queries run with
# params=() so that psycopg turns %% into %.
USER_SCHEMAS = ("n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcopydb', 'db_upgrade') "
                "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'")


def _parse(uri: str, role: str) -> dict:
    try:
        return conninfo_to_dict(uri)
    except psycopg.ProgrammingError as exc:
        raise StepError(
            f"the {role} connection string is not a valid libpq URI ({scrub(str(exc), uri)}): "
            "expected postgres://user@host:port/dbname or postgres://?service=NAME"
        ) from None


def describe(uri: str, role: str = "database") -> str:
    """A password-free label for log lines: service=db or user@host:port/dbname."""
    params = _parse(uri, role)
    if "service" in params:
        return f"service={params['service']}"
    user = params.get("user", "")
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    return f"{user + '@' if user else ''}{host}:{port}/{params.get('dbname', user)}"


def scrub(message: str, uri: str | None = None) -> str:
    """Remove anything that could be a password from a driver message."""
    if uri:
        try:
            password = conninfo_to_dict(uri).get("password")
        except psycopg.ProgrammingError:
            password = None
        if password:
            message = message.replace(password, "***")
        message = message.replace(uri, "***")
    message = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", message)
    message = re.sub(r"(password\s*=\s*)\S+", r"\1***", message, flags=re.I)
    return " ".join(message.split())


def application_name(purpose: str | None) -> str:
    """Our sessions are named db-upgrade or db-upgrade-<purpose>: freeze tells them from the application's."""
    return "db-upgrade" if not purpose else f"db-upgrade-{purpose}"


def read_write_options(uri: str) -> str:
    """libpq `options` that keep our sessions read-write while the application's writes are frozen
    (a readonly SQL may set default_transaction_read_only for the database or the role)."""
    extra = "-c default_transaction_read_only=off"
    try:
        given = conninfo_to_dict(uri).get("options") or ""
    except psycopg.ProgrammingError:
        given = ""
    return f"{given} {extra}".strip()


def open_connection(uri: str, role: str, autocommit: bool = True, purpose: str | None = None,
                    **kwargs) -> psycopg.Connection:
    """A connection the caller closes (steps.pg.connect closes it for you)."""
    _parse(uri, role)
    kwargs.setdefault("options", read_write_options(uri))
    try:
        return psycopg.connect(
            uri, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT, application_name=application_name(purpose),
            **kwargs
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StepError(f"cannot connect to the {role} database: {scrub(first, uri)}") from None


@contextmanager
def connect(uri: str, role: str, autocommit: bool = True, purpose: str | None = None,
            **kwargs) -> Iterator[psycopg.Connection]:
    conn = open_connection(uri, role, autocommit, purpose, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def lsn(text: str | None) -> int:
    """'16/B374D848' -> integer byte position."""
    if not text:
        return 0
    hi, _, lo = text.strip().partition("/")
    return (int(hi, 16) << 32) + int(lo or "0", 16)


def origin_progress(conn: psycopg.Connection, origin: str, flush: bool = False) -> int:
    """The source position a replication origin on this (target) server has
    applied; with flush, only what is durably flushed. 0 when the origin does not
    exist (yet, or any more): pg_replication_origin_progress() raises then."""
    row = conn.execute("SELECT pg_replication_origin_progress(roname, %s)::text FROM pg_replication_origin "
                       "WHERE roname = %s", (flush, origin)).fetchone()
    return lsn(row[0]) if row and row[0] else 0


def fmt_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def pretty_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def server_major(conn: psycopg.Connection) -> int:
    return conn.info.server_version // 10000
