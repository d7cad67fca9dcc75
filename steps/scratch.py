"""create-scratch-target / drop-scratch-target: the rehearsal's throwaway target.

The target URI points at the target server's maintenance database; the scratch
database (DB_UPGRADE_SCRATCH_DATABASE) is created fresh there and the other
steps are pointed at it.
"""

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings


def _name(s: StepSettings) -> str:
    if not s.scratch_database:
        raise StepError("DB_UPGRADE_SCRATCH_DATABASE is not set: name the rehearsal's scratch database")
    return s.scratch_database


def scratch_uri(target_uri: str, database: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(target_uri), "dbname": database})


def create_scratch_target(s: StepSettings) -> None:
    name = _name(s)
    with connect(s.target(), "target") as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    log(f"create-scratch-target: created empty database {name!r} on the target server")


def drop_scratch_target(s: StepSettings) -> None:
    name = _name(s)
    with connect(s.target(), "target") as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    log(f"drop-scratch-target: dropped database {name!r} on the target server")
