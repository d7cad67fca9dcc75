"""cleanup: leave nothing of the run on the databases.

`pgcopydb stream cleanup` drops the slot, the pgcopydb schema on the source and
the replication origin on the target; then a sweep by SQL makes sure, since an
orphaned slot keeps WAL on the source until its disk is full. Replication is
revoked if grant-replication granted it. Running it twice is harmless.
"""

import time

from psycopg import sql

from steps import grant, pgcopydb, sentinel
from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings

ACTIVE_WAIT = 30.0


def _slot_state(s: StepSettings) -> tuple[bool, int | None]:
    with connect(s.source(), "source") as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (s.slot_name,)).fetchone()
    return (row is not None, row[0] if row else None)


def cleanup(s: StepSettings) -> None:
    workdir = s.workdir()
    if s.keep_slot:
        log(f"cleanup: keeping replication slot {s.slot_name!r} and {workdir} for a retry (keep-slot-on-failure); "
            "run cleanup without DB_UPGRADE_KEEP_SLOT to drop them")
        return
    # verify's change tracking (a second slot, target triggers) is dropped first:
    # on an abort it was never torn down, and its slot would keep WAL too.
    from steps import verify

    verify.drop_tracking(s)
    exists, pid = _slot_state(s)
    deadline = time.monotonic() + ACTIVE_WAIT
    while exists and pid is not None:
        # follow may still be shutting down after its endpos or a SIGTERM.
        if time.monotonic() >= deadline:
            raise StepError(f"cleanup: replication slot {s.slot_name!r} is still in use by pid {pid} "
                            f"after {ACTIVE_WAIT:.0f}s: stop the follow step first")
        time.sleep(1)
        exists, pid = _slot_state(s)
    if sentinel.started(workdir):
        proc = pgcopydb.run(s, "stream", "cleanup", "--dir", str(workdir), "--slot-name", s.slot_name,
                            check=False)
        if proc.returncode != 0:
            log(f"cleanup: pgcopydb stream cleanup said: {pgcopydb.last_error(proc.stderr)}; sweeping by SQL")
    with connect(s.source(), "source") as src:
        if src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (s.slot_name,)).fetchone():
            src.execute("SELECT pg_drop_replication_slot(%s)", (s.slot_name,))
            log(f"cleanup: dropped replication slot {s.slot_name!r} on the source")
        for schema in ("pgcopydb", "db_upgrade"):  # db_upgrade: the drain's heartbeat table
            src.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        left = src.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name IN (%s, %s)",
                           (s.slot_name, f"{s.slot_name}_verify")).fetchone()[0]
    with connect(s.target(), "target") as tgt:
        if tgt.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (s.slot_name,)).fetchone():
            tgt.execute("SELECT pg_replication_origin_drop(%s)", (s.slot_name,))
            log(f"cleanup: dropped replication origin {s.slot_name!r} on the target")
        for schema in ("pgcopydb", "db_upgrade"):
            tgt.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    grant.revoke_replication(s)
    if left:
        raise StepError(f"cleanup: replication slot {s.slot_name!r} is still on the source")
    log(f"cleanup: no replication slot {s.slot_name!r} on the source, no origin on the target")
