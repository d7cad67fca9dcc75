"""create-scratch-target / drop-scratch-target: the rehearsal's throwaway target.

The target URI points at the target server's maintenance database; the scratch
database (DB_UPGRADE_SCRATCH_DATABASE) is created fresh there and the other
steps are pointed at it.
"""

from psycopg import sql

from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings


def _name(s: StepSettings) -> str:
    if not s.scratch_database:
        raise StepError("DB_UPGRADE_SCRATCH_DATABASE is not set: name the rehearsal's scratch database")
    if len(s.scratch_database.encode()) > 63:
        # PostgreSQL would silently truncate it and create (or drop) another name.
        raise StepError(f"DB_UPGRADE_SCRATCH_DATABASE is {len(s.scratch_database.encode())} bytes long: "
                        "PostgreSQL database names have at most 63 bytes")
    return s.scratch_database


def create_scratch_target(s: StepSettings) -> None:
    name = _name(s)
    with connect(s.target_server(), "target") as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    log(f"create-scratch-target: created empty database {name!r} on the target server")


def drop_scratch_target(s: StepSettings) -> None:
    name = _name(s)
    with connect(s.target_server(), "target") as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    log(f"drop-scratch-target: dropped database {name!r} on the target server")


def scratch_uri(target_uri: str, database: str) -> str:
    """The same connection with another database; a URI stays a URI (pgcopydb
    and the operator's logs expect the form they were given)."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if target_uri.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(target_uri)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
        q = f"?{urlencode(query)}" if query else ""
        return f"{parts.scheme}://{parts.netloc}/{quote(database, safe='')}{q}"
    return make_conninfo(**{**conninfo_to_dict(target_uri), "dbname": database})
