"""preflight: every known blocker in one scan, reported all at once.

Each check prints what it looked at; the step fails if any check found a problem,
so that an operator fixes everything in one round instead of one per run.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from steps import pgcopydb, sentinel
from steps.errors import StepError
from steps.log import log
from steps.pg import USER_SCHEMAS, connect, pretty_bytes, server_major
from steps.settings import StepSettings

# Free space on the work volume, as a share of the source size: pgcopydb keeps the
# decoded changes of the whole copy window there as JSON and SQL files.
MIN_FREE_SHARE = 0.25
MIN_FREE_BYTES = 64 * 1024 * 1024



@dataclass
class Report:
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def good(self, text: str) -> None:
        self.ok.append(text)
        log(f"  ok       {text}")

    def bad(self, text: str) -> None:
        self.problems.append(text)
        log(f"  PROBLEM  {text}")

    def note(self, text: str) -> None:
        """Worth knowing, not a check: nothing to fix before the upgrade."""
        log(f"  note     {text}")


def _names(rows) -> str:
    names = [r[0] for r in rows]
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def _check_source(conn: psycopg.Connection, s: StepSettings, r: Report, resuming: bool) -> None:
    wal_level = conn.execute("SHOW wal_level").fetchone()[0]
    if wal_level == "logical":
        r.good("source wal_level = logical")
    else:
        r.bad(f"source wal_level = {wal_level}: set wal_level = logical and restart the source")
    slots_max, slots_used, senders_max, senders_used, own_slot = conn.execute(
        """SELECT current_setting('max_replication_slots')::int,
                  (SELECT count(*) FROM pg_replication_slots),
                  current_setting('max_wal_senders')::int,
                  (SELECT count(*) FROM pg_stat_replication),
                  (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s)""",
        (s.slot_name,),
    ).fetchone()
    if own_slot and not resuming:
        r.bad(f"a replication slot named {s.slot_name!r} already exists on the source with no run in "
              f"{s.dir}: a leftover of an earlier run; run the cleanup step or drop it")
    elif slots_used - own_slot + 2 <= slots_max:
        r.good(f"replication slots: {slots_used} of {slots_max} in use (the upgrade needs 2: pgcopydb's and verify's)")
    else:
        r.bad(f"fewer than 2 free replication slots on the source ({slots_used} of {slots_max} in use; "
              "pgcopydb and verify need one each): raise max_replication_slots")
    if not conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()[0]:
        r.bad("the source role lacks CREATE on the database: it needs it for the db_upgrade schema "
              "(heartbeat and verification bookkeeping); GRANT CREATE ON DATABASE ... TO it")
    if senders_used < senders_max:
        r.good(f"WAL senders: {senders_used} of {senders_max} in use")
    else:
        r.bad(f"no free WAL sender on the source ({senders_used} of {senders_max}): raise max_wal_senders")

    # The plugin is a shared library of the server; reading the directory needs
    # pg_read_server_files, so an unprivileged role gets a note instead of a verdict.
    try:
        libdir = conn.execute("SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'").fetchone()[0]
        found = conn.execute("SELECT count(*) FROM pg_ls_dir(%s) f WHERE f = %s", (libdir, f"{s.plugin}.so")).fetchone()[0]
        if found:
            r.good(f"output plugin {s.plugin} is installed on the source")
        else:
            r.bad(f"output plugin {s.plugin} is not installed on the source (no {s.plugin}.so in {libdir})")
    except psycopg.errors.InsufficientPrivilege:
        r.good(f"output plugin {s.plugin}: not checkable with this role's privileges (it ships with PostgreSQL contrib)")

    no_identity = conn.execute(
        f"""SELECT format('%%I.%%I', n.nspname, c.relname)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND {USER_SCHEMAS}
              AND c.relreplident <> 'f'
              AND NOT (c.relreplident = 'd' AND EXISTS (
                    SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
            ORDER BY 1""", ()
    ).fetchall()
    if no_identity:
        r.bad(f"{len(no_identity)} table(s) without a primary key or REPLICA IDENTITY FULL "
              f"(their UPDATE/DELETE cannot be replicated): {_names(no_identity)}; "
              "add a primary key or ALTER TABLE ... REPLICA IDENTITY FULL")
    else:
        r.good("every table has a primary key or REPLICA IDENTITY FULL")
    keyless = conn.execute(
        f"""SELECT format('%%I.%%I', n.nspname, c.relname), greatest(c.reltuples, 0)::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND {USER_SCHEMAS} AND c.relreplident = 'f'
              AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
            ORDER BY 2 DESC, 1""", ()).fetchall()
    if keyless:
        # Measured: at 2.2 M rows such a table held pgcopydb's apply under 500 writes/s (README, Performance).
        r.note(f"{len(keyless)} table(s) replicate with REPLICA IDENTITY FULL and no primary key: "
               + ", ".join(f"{name} (~{rows:,} rows)" for name, rows in keyless[:5])
               + "; pgcopydb applies each UPDATE/DELETE on them as a scan of the whole table on the target, "
               "which slows follow and the cutover as they grow: a primary key avoids it")

    blobs = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0]
    if blobs:
        r.bad(f"{blobs} large object(s) on the source: logical decoding does not replicate them; "
              "move them to bytea columns first")
    else:
        r.good("no large objects")


def _referenced_roles(conn: psycopg.Connection) -> set[str]:
    """Roles that own objects or appear in privileges of the source database."""
    rows = conn.execute(
        f"""WITH objs AS (
              SELECT c.relowner AS owner, c.relacl AS acl FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_SCHEMAS}
              UNION ALL SELECT n.nspowner, n.nspacl FROM pg_namespace n WHERE {USER_SCHEMAS}
              UNION ALL SELECT p.proowner, p.proacl FROM pg_proc p
                JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_SCHEMAS}
              UNION ALL SELECT t.typowner, t.typacl FROM pg_type t
                JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {USER_SCHEMAS}
              UNION ALL SELECT d.defaclrole, d.defaclacl FROM pg_default_acl d
              UNION ALL SELECT db.datdba, db.datacl FROM pg_database db WHERE db.datname = current_database()
            ),
            oids AS (
              SELECT owner AS oid FROM objs
              UNION SELECT (aclexplode(acl)).grantee FROM objs WHERE acl IS NOT NULL
              UNION SELECT (aclexplode(acl)).grantor FROM objs WHERE acl IS NOT NULL
            )
            SELECT r.rolname FROM oids JOIN pg_roles r ON r.oid = oids.oid""", ()
    ).fetchall()
    return {r[0] for r in rows}


def _check_pair(src: psycopg.Connection, tgt: psycopg.Connection, r: Report, resuming: bool) -> None:
    sv, tv = server_major(src), server_major(tgt)
    if tv > sv:
        r.good(f"target PostgreSQL {tv} is newer than source PostgreSQL {sv}")
    else:
        r.bad(f"target PostgreSQL {tv} is not newer than source PostgreSQL {sv}: point the target at the new major version")

    tables = tgt.execute(
        f"""SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {USER_SCHEMAS}
            ORDER BY 1""", ()
    ).fetchall()
    if not tables:
        r.good("target database is empty")
    elif resuming:
        r.good(f"target holds {len(tables)} relation(s) from the interrupted run being resumed")
    else:
        r.bad(f"target database is not empty ({len(tables)} relation(s): {_names(tables)}): "
              "use an empty database created for the upgrade")

    exts = {row[0] for row in src.execute("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'")}
    available = {row[0] for row in tgt.execute("SELECT name FROM pg_available_extensions")}
    missing = sorted(exts - available)
    if missing:
        r.bad(f"source extension(s) not available on the target: {', '.join(missing)}; install their packages for PostgreSQL {tv}")
    else:
        r.good(f"all {len(exts)} source extension(s) are available on the target")

    needed = _referenced_roles(src)
    present = {row[0] for row in tgt.execute("SELECT rolname FROM pg_roles")}
    missing_roles = sorted(needed - present)
    if missing_roles:
        r.bad(f"role(s) that own objects or hold privileges on the source are missing on the target: "
              f"{', '.join(repr(x) for x in missing_roles)}; create them on the target first (restoring GRANTs fails otherwise)")
    else:
        r.good(f"all {len(needed)} role(s) owning objects or holding privileges exist on the target")


def _check_workdir(s: StepSettings, source_bytes: int | None, r: Report) -> None:
    workdir = s.workdir()
    if "'" in str(workdir):
        r.bad(f"work dir {workdir} contains a single quote, which pgcopydb cannot handle: choose another path")
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".db-upgrade-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        r.bad(f"work dir {workdir} is not writable: {exc.strerror}")
        return
    free = shutil.disk_usage(workdir).free
    if source_bytes is None:
        r.good(f"work dir {workdir} is writable, {pretty_bytes(free)} free")
        return
    need = max(MIN_FREE_BYTES, int(source_bytes * MIN_FREE_SHARE))
    if free >= need:
        r.good(f"work dir {workdir} is writable, {pretty_bytes(free)} free for a {pretty_bytes(source_bytes)} source")
    else:
        r.bad(f"work dir {workdir} has {pretty_bytes(free)} free, less than {pretty_bytes(need)} "
              f"({int(MIN_FREE_SHARE * 100)}% of the {pretty_bytes(source_bytes)} source): enlarge the volume")


def preflight(s: StepSettings) -> Report:
    r = Report()
    log("preflight: checking source, target, pgcopydb and the work dir")
    resuming = s.dir is not None and sentinel.started(s.dir)
    if resuming:
        log(f"  note     {s.dir} holds an interrupted run: follow will resume it")
    try:
        tool = pgcopydb.locate(s.dir)
        r.good(f"pgcopydb {tool.version} (>= 0.16)")
    except StepError as exc:
        r.bad(str(exc))

    source_bytes = None
    with_conns: dict[str, psycopg.Connection] = {}
    stack = []
    for role, uri in (("source", s.source()), ("target", s.target())):
        try:
            cm = connect(uri, role)
            with_conns[role] = cm.__enter__()
            stack.append(cm)
            r.good(f"{role} database is reachable")
        except StepError as exc:
            r.bad(str(exc))
    try:
        if "source" in with_conns:
            src = with_conns["source"]
            source_bytes = src.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            _check_source(src, s, r, resuming)
        if len(with_conns) == 2:
            _check_pair(with_conns["source"], with_conns["target"], r, resuming)
    finally:
        for cm in stack:
            cm.__exit__(None, None, None)
    _check_workdir(s, source_bytes, r)

    if r.problems:
        raise StepError(f"preflight found {len(r.problems)} problem(s): " + " | ".join(r.problems))
    log(f"preflight: all {len(r.ok)} checks passed")
    return r
