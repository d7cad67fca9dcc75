"""preflight: every known blocker in one scan, reported all at once.

Each check logs one line saying what it looked at (ok or PROBLEM), sometimes
followed by notes (worth knowing, nothing to fix); the step fails with one line
listing every problem, so that an operator fixes everything in one round
instead of one per run. Only when nothing is wrong does it begin the run's
record (steps.state.begin).

preflight changes nothing on either database: everything it tries for real
(the readonly and unfreeze SQL, the native engine's test subscription) runs in
a transaction that is rolled back.

Layout: the SQL (pure, built apart from the code that runs it), the verdicts
(pure: facts in, findings out; both unit-tested without a database in
tests/test_preflight_unit.py), then the checks that run the one and feed the
other. The engine-specific checks live with their engines:
steps/engines/native/preflight.py and steps/engines/pgcopydb_follow/preflight.py.
Long notes: docs/preflight.md.
"""

from __future__ import annotations

import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import psycopg
from psycopg import sql

from steps import fence, pgcopydb, state
from steps.errors import StepError
from steps.log import log
from steps.pg import (
    USER_SCHEMAS,
    connect,
    describe,
    lsn,
    pretty_bytes,
    scrub,
    server_major,
)
from steps.settings import StepSettings

MiB = 1024 * 1024

# Free space on pgcopydb's work volume (pgcopydb-follow), as a share of the source
# size: it keeps the decoded changes of the whole copy window there as JSON and SQL.
MIN_FREE_SHARE = 0.25
MIN_FREE_BYTES = 64 * MiB

# For the WAL a run keeps on the source: the copy rate assumed (the bench copied
# 1 GB in 13 s on 2 vCPUs, README Performance; production networks and disks are
# often slower) and the time after the copy until the change stream has caught up
# and verification is prepared.
COPY_BYTES_PER_SECOND = 50 * MiB
AFTER_COPY_SECONDS = 15 * 60
WAL_SAMPLE_SECONDS = 1.0  # the WAL rate is measured over at least this long

# The dry run of the readonly and unfreeze SQL must not wait on the application.
DRY_RUN_LOCK_TIMEOUT = "2s"
DRY_RUN_STATEMENT_TIMEOUT = "10s"


# -- the report ---------------------------------------------------------------------------

Kind = Literal["ok", "problem", "note"]


class Finding(NamedTuple):
    kind: Kind
    text: str


def fine(text: str) -> Finding:
    return Finding("ok", text)


def problem(text: str) -> Finding:
    return Finding("problem", text)


def note(text: str) -> Finding:
    return Finding("note", text)


@dataclass
class Report:
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def good(self, text: str) -> None:
        self.ok.append(text)
        log(f"  ok       {text}")

    def bad(self, text: str) -> None:
        self.problems.append(text)
        log(f"  PROBLEM  {text}")

    def note(self, text: str) -> None:
        """Worth knowing, not a check: nothing to fix before the upgrade."""
        self.notes.append(text)
        log(f"  note     {text}")

    def add(self, *findings: Finding) -> None:
        for f in findings:
            {"ok": self.good, "problem": self.bad, "note": self.note}[f.kind](f.text)


# -- small helpers (pure) --------------------------------------------------------------------

def names(items: list[str], limit: int = 10) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def ident(name: str) -> str:
    """A role or object name as SQL would need it, for fix hints."""
    return sql.Identifier(name).as_string(None)


def shown(name: str) -> str:
    """A name as quote_ident would print it: bare when it can be (for log lines)."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else ident(name)


def like_ours(name: str) -> str:
    """LIKE pattern for our objects' derived names (<slot>_verify, ...)."""
    return name.replace("_", r"\_") + r"\_%"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def unit_bytes(unit: str | None) -> int:
    """pg_settings.unit of a size setting ('MB', '8kB', 'B') in bytes."""
    m = re.fullmatch(r"(\d*)\s*(B|kB|MB|GB|TB)", (unit or "B").strip())
    if not m:
        raise ValueError(f"not a size unit: {unit!r}")
    factor = {"B": 1, "kB": 1024, "MB": MiB, "GB": 1024 * MiB, "TB": 1024 * 1024 * MiB}[m.group(2)]
    return int(m.group(1) or 1) * factor


def setting_bytes(setting: str, unit: str | None) -> int | None:
    """A size setting in bytes; None for -1 (unlimited)."""
    value = int(setting)
    return None if value < 0 else value * unit_bytes(unit)


def plugin_allowed(setting: str, plugin: str) -> bool:
    """Does output_plugin_libraries (a list such as 'pgoutput, test_decoding')
    allow this plugin? Entries may carry $libdir/ or .so."""
    for entry in setting.split(","):
        entry = entry.strip().strip('"').strip()
        entry = entry.removeprefix("$libdir/").removesuffix(".so")
        if entry == plugin:
            return True
    return False


# Calls whose effect a rollback does not undo: such SQL is not dry-run.
_NON_TRANSACTIONAL = re.compile(
    r"\b(pg_terminate_backend|pg_cancel_backend|pg_reload_conf|pg_rotate_logfile|pg_switch_wal|"
    r"pg_create_restore_point|pg_logical_emit_message|pg_stat_reset\w*|setval|nextval|dblink\w*|"
    r"lo_export|lo_import|pg_file_write|pg_file_unlink|pg_file_rename)\s*\(|\bto\s+program\b",
    re.IGNORECASE)
# Transaction control at the start of a statement (strings, comments and
# dollar-quoted bodies removed first): the freeze runs the file as one transaction.
_TRANSACTION_CONTROL = re.compile(
    r"(?:^|;)\s*(begin|commit|end|rollback|abort|start\s+transaction|prepare\s+transaction|commit\s+prepared|"
    r"rollback\s+prepared)\b", re.IGNORECASE)


def strip_sql(text: str) -> str:
    """SQL without comments, string literals and dollar-quoted bodies (for scans)."""
    text = re.sub(r"\$([A-Za-z_]\w*|)\$.*?\$\1\$", " ", text, flags=re.DOTALL)
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    text = re.sub(r"--[^\n]*", " ", text)
    text = re.sub(r"[Ee]?'(?:[^']|'')*'", "''", text)
    return text


def non_transactional_calls(text: str) -> list[str]:
    """What in this SQL a rollback would not undo (searched in the text as written,
    comments included: skipping a dry run wrongly costs less than running one)."""
    return sorted({m.group(0).rstrip("( ").lower() for m in _NON_TRANSACTIONAL.finditer(text)})


def transaction_control(text: str) -> list[str]:
    return sorted({re.sub(r"\s+", " ", m.group(1)).upper() for m in _TRANSACTION_CONTROL.finditer(strip_sql(text))})


# -- SQL (pure) ------------------------------------------------------------------------------
# Run with params (possibly ()) so that psycopg turns %% into %.

IN_RECOVERY = "SELECT pg_is_in_recovery()"
WAL_LEVEL = "SHOW wal_level"
WAL_POSITION = "SELECT pg_current_wal_insert_lsn()::text"
DATABASE_SIZE = "SELECT pg_database_size(current_database())"
WAL_DIR = "SELECT count(*), coalesce(sum(size), 0)::bigint FROM pg_ls_waldir()"
SETTING = "SELECT setting, unit FROM pg_settings WHERE name = %s"
SLOTS_AND_SENDERS = """SELECT current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_replication_slots)::int,
       current_setting('max_wal_senders')::int,
       (SELECT count(*) FROM pg_stat_replication)::int"""

# The connecting role: what it is and may do.
ME = """SELECT r.rolname, r.rolsuper, r.rolreplication, r.rolcreaterole,
       EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication' AND pg_has_role(r.oid, g.oid, 'MEMBER')),
       has_database_privilege(current_database(), 'CREATE'),
       EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'pg_signal_backend' AND pg_has_role(r.oid, g.oid, 'USAGE'))
FROM pg_roles r WHERE r.rolname = current_user"""

# Relations on the target that make it "not empty" (ours and pgcopydb's excluded).
TARGET_RELATIONS = f"""SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {USER_SCHEMAS}
ORDER BY 1"""

# Tables (partitions included: each is copied on its own) and sequences the role cannot read.
UNREADABLE = f"""SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'S') AND {USER_SCHEMAS}
  AND NOT (has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'))
ORDER BY 1"""

EXTENSIONS = "SELECT extname FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1"
AVAILABLE_EXTENSIONS = "SELECT name FROM pg_available_extensions"
ROLE_NAMES = "SELECT rolname FROM pg_roles"
LARGE_OBJECTS = "SELECT count(*) FROM pg_largeobject_metadata"

# Roles that own objects or appear in privileges or policies of the source database:
# restoring the schema on the target fails on a missing one.
REFERENCED_ROLES = f"""WITH objs AS (
  SELECT c.relowner AS owner, c.relacl AS acl FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_SCHEMAS}
  UNION ALL SELECT NULL, a.attacl FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE a.attacl IS NOT NULL AND {USER_SCHEMAS}
  UNION ALL SELECT n.nspowner, n.nspacl FROM pg_namespace n WHERE {USER_SCHEMAS}
  UNION ALL SELECT p.proowner, p.proacl FROM pg_proc p
    JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_SCHEMAS}
  UNION ALL SELECT t.typowner, t.typacl FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {USER_SCHEMAS}
  UNION ALL SELECT d.defaclrole, d.defaclacl FROM pg_default_acl d
  UNION ALL SELECT db.datdba, db.datacl FROM pg_database db WHERE db.datname = current_database()
),
oids AS (
  SELECT owner AS oid FROM objs WHERE owner IS NOT NULL
  UNION SELECT (aclexplode(acl)).grantee FROM objs WHERE acl IS NOT NULL
  UNION SELECT (aclexplode(acl)).grantor FROM objs WHERE acl IS NOT NULL
  UNION SELECT unnest(p.polroles) FROM pg_policy p
)
SELECT r.rolname FROM oids JOIN pg_roles r ON r.oid = oids.oid ORDER BY 1"""

# Plain tables (partitions included, as changes are published per leaf), with
# what identifies their rows for UPDATE/DELETE, their size, and the first index
# the apply could find rows with when the whole row is the key (btree, not
# partial, leftmost a plain column: the subscriber's rule since PostgreSQL 16).
TABLE_IDENTITY = f"""SELECT format('%%I.%%I', n.nspname, c.relname), c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       pg_table_size(c.oid), greatest(c.reltuples, 0)::bigint,
       (SELECT min(ic.relname) FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
          JOIN pg_am am ON am.oid = ic.relam
        WHERE i.indrelid = c.oid AND i.indisvalid AND i.indpred IS NULL AND i.indkey[0] <> 0
          AND am.amname = ANY(%s))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {USER_SCHEMAS}
ORDER BY 1"""

# Not replicated by logical decoding: unlogged tables, materialized views.
UNREPLICATED = f"""SELECT format('%%I.%%I', n.nspname, c.relname), c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE ((c.relkind IN ('r', 'p') AND c.relpersistence = 'u') OR c.relkind = 'm') AND {USER_SCHEMAS}
ORDER BY 1"""

# Non-default collations of pg_catalog the application's columns use (pg_dump
# names them; a collation in an application schema is created by the restore).
COLUMN_COLLATIONS = f"""SELECT DISTINCT co.collname, pg_collation_actual_version(co.oid)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_collation co ON co.oid = a.attcollation
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'm')
  AND co.collnamespace = 'pg_catalog'::regnamespace AND co.collname NOT IN ('default', 'C', 'POSIX')
  AND {USER_SCHEMAS}
ORDER BY 1"""
TARGET_COLLATIONS = """SELECT collname, pg_collation_actual_version(oid) FROM pg_collation
WHERE collname = ANY(%s) AND collnamespace = 'pg_catalog'::regnamespace
  AND collencoding IN (-1, (SELECT encoding FROM pg_database WHERE datname = current_database()))"""

# App roles on the target, with what the connecting role may do to them.
APP_ROLES = """SELECT r.rolname, r.rolsuper, r.rolreplication,
       pg_has_role(current_user, r.oid, 'MEMBER WITH ADMIN OPTION'), pg_has_role(current_user, r.oid, 'USAGE'),
       r.rolcanlogin
FROM pg_roles r WHERE r.rolname = ANY(%s)"""
ROLES_PRESENT = "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)"

# What a freeze can change, in parts: compared before and after a dry run of the
# readonly SQL (and then the unfreeze SQL) inside one rolled-back transaction.
# An absent ACL counts as its default, so a REVOKE that only materialises the
# default is no change.
PRIVILEGE_STATE = f"""SELECT
 (SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
   SELECT format('%%s %%s %%s %%s', c.oid, a.grantee, a.privilege_type, a.is_grantable) AS x
   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
        aclexplode(coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a
   WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {USER_SCHEMAS}) t),
 (SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
   SELECT format('%%s %%s %%s %%s', n.oid, a.grantee, a.privilege_type, a.is_grantable) AS x
   FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a WHERE {USER_SCHEMAS}) t),
 (SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
   SELECT format('%%s %%s %%s %%s %%s', a.grantee, a.privilege_type, a.is_grantable, d.datallowconn, d.datconnlimit) AS x
   FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
   WHERE d.datname = current_database()) t),
 (SELECT md5(coalesce(string_agg(format('%%s %%s %%s', setdatabase, setrole, setconfig), ',' ORDER BY setdatabase, setrole), ''))
   FROM pg_db_role_setting),
 (SELECT md5(coalesce(string_agg(format('%%s %%s %%s %%s', oid, rolcanlogin, rolconnlimit, rolvaliduntil), ',' ORDER BY oid), ''))
   FROM pg_roles)"""
PRIVILEGE_PARTS = ("table privileges", "schema privileges", "database privileges",
                   "role and database settings", "role logins")


def database_locale_sql(major: int) -> str:
    """The current database's encoding and locale; columns differ by version
    (provider and ICU locale since 15, datlocale since 17, versions since 15)."""
    if major >= 17:
        extra = "datlocprovider::text, datlocale, datcollversion, pg_database_collation_actual_version(oid)"
    elif major >= 15:
        extra = "datlocprovider::text, daticulocale, datcollversion, pg_database_collation_actual_version(oid)"
    else:
        extra = "'c', NULL::text, NULL::text, NULL::text"
    return (f"SELECT pg_encoding_to_char(encoding), datcollate, datctype, {extra} "
            "FROM pg_database WHERE datname = current_database()")


def apply_index_methods(target_major: int) -> list[str]:
    """Index methods the target's apply can find a REPLICA IDENTITY FULL row with
    (PostgreSQL 16: btree; 17: hash too); before 16, none (a scan per change)."""
    if target_major >= 17:
        return ["btree", "hash"]
    if target_major >= 16:
        return ["btree"]
    return []


def dry_run_sql(text: str) -> sql.Composed:
    """The file's SQL inside a DO block's EXECUTE: a COMMIT or ROLLBACK in it is
    refused there ("EXECUTE of transaction commands is not implemented") instead
    of ending the transaction the dry run rolls back."""
    body = sql.SQL("BEGIN EXECUTE {}; END").format(sql.Literal(text)).as_string(None)
    return sql.SQL("DO {}").format(sql.Literal(body))


# -- facts and verdicts (pure) --------------------------------------------------------------

class RoleFacts(NamedTuple):
    name: str
    superuser: bool
    replication: bool
    createrole: bool
    rds_replication: bool
    db_create: bool
    signal_backend: bool


class DbLocale(NamedTuple):
    encoding: str
    collate: str
    ctype: str
    provider: str  # c (libc), i (icu), b (builtin)
    locale: str | None  # the ICU or builtin locale
    recorded_version: str | None  # datcollversion
    actual_version: str | None


class TableIdentity(NamedTuple):
    name: str
    replident: str  # d(efault), n(othing), f(ull), i(ndex)
    has_pk: bool
    has_ident_index: bool
    size: int
    rows: int
    apply_index: str | None


class AppRole(NamedTuple):
    name: str
    superuser: bool
    replication: bool
    admin: bool  # the connecting role has ADMIN OPTION on it
    privileges: bool  # the connecting role has its privileges (may end its sessions)
    can_login: bool = True


PROVIDERS = {"c": "libc", "i": "icu", "b": "builtin", "d": "default"}


def judge_primary(in_recovery: bool) -> Finding:
    if in_recovery:
        return problem("the source is a standby (in recovery): point PGCOPYDB_SOURCE_PGURI at the primary "
                       "(the slot, the freeze and the run's record need it)")
    return fine("the source is a primary (not in recovery)")


def judge_wal_level(level: str) -> Finding:
    if level == "logical":
        return fine("source wal_level = logical")
    return problem(f"source wal_level = {level}: set wal_level = logical and restart the source")


def judge_majors(source: int, target: int) -> Finding:
    if target > source:
        return fine(f"target PostgreSQL {target} is newer than source PostgreSQL {source}")
    return problem(f"target PostgreSQL {target} is not newer than source PostgreSQL {source}: "
                   "point the target at the new major version")


def judge_target_empty(relations: list[str], mid_run: bool) -> Finding:
    if not relations:
        return fine("target database is empty (the db_upgrade and pgcopydb schemas aside)")
    if mid_run:
        return fine(f"target holds {len(relations)} relation(s) copied by this run, which is under way")
    return problem(f"target database is not empty ({len(relations)} relation(s): {names(relations)}): "
                   "use an empty database created for the upgrade")


def judge_readable(role: str, unreadable: list[str]) -> Finding:
    if not unreadable:
        return fine(f"role {role!r} may SELECT every application table and sequence")
    return problem(f"role {role!r} cannot SELECT {len(unreadable)} table(s) or sequence(s) (the copy and verify "
                   f"read them all): {names(unreadable)}; GRANT USAGE on their schemas and SELECT on them")


def _locale_label(d: DbLocale) -> str:
    provider = PROVIDERS.get(d.provider, d.provider)
    loc = f" {d.locale}" if d.locale and d.provider != "c" else ""
    return f"{provider}{loc}, LC_COLLATE {d.collate}, LC_CTYPE {d.ctype}"


def judge_locale(src: DbLocale, tgt: DbLocale) -> list[Finding]:
    out = []
    if src.encoding != tgt.encoding:
        out.append(problem(f"encoding differs: source {src.encoding}, target {tgt.encoding}; text would be converted "
                           f"or refused: create the target database with ENCODING '{src.encoding}' "
                           "(CREATE DATABASE ... TEMPLATE template0)"))
    else:
        out.append(fine(f"encoding {src.encoding} on both"))
    same = (src.provider, src.collate, src.ctype, src.locale if src.provider != "c" else None) == \
           (tgt.provider, tgt.collate, tgt.ctype, tgt.locale if tgt.provider != "c" else None)
    if not same:
        hint = f"LOCALE_PROVIDER {PROVIDERS.get(src.provider, src.provider)}"
        if src.provider == "i" and src.locale:
            hint += f" ICU_LOCALE '{src.locale}'"
        elif src.provider == "b" and src.locale:
            hint += f" BUILTIN_LOCALE '{src.locale}'"
        hint += f" LC_COLLATE '{src.collate}' LC_CTYPE '{src.ctype}'"
        out.append(problem(f"database locale differs: source {_locale_label(src)}; target {_locale_label(tgt)}: text "
                           f"would sort and compare differently after the switch; create the target database with "
                           f"{hint} (TEMPLATE template0)"))
    else:
        out.append(fine(f"database locale {_locale_label(src)} on both"))
        source_version = src.recorded_version or src.actual_version
        if source_version and tgt.actual_version and source_version != tgt.actual_version:
            out.append(note(f"the collation library version differs (source {source_version}, target "
                            f"{tgt.actual_version}): some strings may sort differently on the target; the copy builds "
                            "the target's indexes there, so they are consistent, but any index or text range "
                            "partition built under the source's version elsewhere (a physical copy, a back-out "
                            "replica) needs REINDEX"))
    return out


def judge_collations(source: list[tuple[str, str | None]], target: dict[str, str | None]) -> list[Finding]:
    if not source:
        return []
    missing = [c for c, _v in source if c not in target]
    out = []
    if missing:
        out.append(problem(f"collation(s) used by the source's columns do not exist on the target: {names(missing)}; "
                           "install the locales on the target server (libc locales, or an ICU build)"))
    else:
        out.append(fine(f"the {len(source)} collation(s) the source's columns use exist on the target"))
    changed = [f"{c} ({v} -> {target[c]})" for c, v in source if c in target and v and target[c] and v != target[c]]
    if changed:
        out.append(note(f"collation version(s) differ between source and target: {names(changed)}; some strings may "
                        "sort differently; indexes built under the old version elsewhere need REINDEX"))
    return out


def judge_extensions(installed: list[str], available: set[str], target_major: int) -> Finding:
    missing = [e for e in installed if e not in available]
    if missing:
        return problem(f"source extension(s) not available on the target: {', '.join(missing)}; install their "
                       f"packages for PostgreSQL {target_major}")
    if not installed:
        return fine("the source uses no extension besides plpgsql")
    return fine(f"all {len(installed)} source extension(s) are available on the target: {', '.join(installed)}")


def judge_roles(needed: list[str], present: set[str]) -> Finding:
    missing = [r for r in needed if r not in present]
    if missing:
        return problem("role(s) that own objects or hold privileges on the source are missing on the target: "
                       f"{', '.join(repr(x) for x in missing)}; create them on the target first (restoring "
                       "ownership and GRANTs fails otherwise)")
    return fine(f"all {len(needed)} role(s) owning objects or holding privileges exist on the target")


def judge_large_objects(count: int) -> Finding:
    if count:
        return problem(f"{count} large object(s) on the source: logical decoding does not replicate them; "
                       "move them to bytea columns first")
    return fine("no large objects")


def _table_line(t: TableIdentity) -> str:
    index = f"the target's apply can use index {t.apply_index}" if t.apply_index else \
        "no index the target's apply can use: each UPDATE/DELETE scans the table"
    return f"{t.name} ({pretty_bytes(t.size)}, ~{t.rows:,} rows; {index})"


def judge_identity(tables: list[TableIdentity]) -> list[Finding]:
    """UPDATE/DELETE replicate when the table has a primary key (identity
    default), a REPLICA IDENTITY USING INDEX whose index exists, or REPLICA
    IDENTITY FULL; with FULL and no key, every change costs a search by the whole row."""
    broken = []
    for t in tables:
        if t.replident == "n" or (t.replident == "d" and not t.has_pk) or (t.replident == "i" and not t.has_ident_index):
            broken.append(t.name)
    out = []
    if not tables:
        return [fine("the source has no application table yet")]
    if broken:
        out.append(problem(f"{len(broken)} table(s) without a primary key, REPLICA IDENTITY USING INDEX or FULL (their "
                           f"UPDATE/DELETE cannot be replicated): {names(broken)}; add a primary key, or ALTER TABLE "
                           "... REPLICA IDENTITY USING INDEX (a unique index on NOT NULL columns) or REPLICA IDENTITY FULL"))
    else:
        out.append(fine(f"all {len(tables)} table(s) have a primary key or a replica identity (USING INDEX or FULL)"))
    keyless = sorted((t for t in tables if t.replident == "f" and not t.has_pk), key=lambda t: (-t.size, t.name))
    if keyless:
        out.append(note(f"{len(keyless)} table(s) without a usable key (REPLICA IDENTITY FULL, no primary key): "
                        + "; ".join(_table_line(t) for t in keyless[:10])
                        + ("; ..." if len(keyless) > 10 else "")
                        + ". verify keeps a checksum of each current from its changes (the frozen window "
                        "re-reads one whole only after a TRUNCATE, over 64 MB of its rows changed since the last "
                        "round, or with a generated or reg* column); a primary key is cheaper for both"))
    return out


def judge_unreplicated(rows: list[tuple[str, str]]) -> list[Finding]:
    unlogged = [n for n, kind in rows if kind != "m"]
    matviews = [n for n, kind in rows if kind == "m"]
    out = []
    if unlogged:
        out.append(note(f"{len(unlogged)} unlogged table(s) are copied once and never kept in sync (logical decoding "
                        f"does not see them): {names(unlogged)}; their changes after the copy are lost on the target"))
    if matviews:
        out.append(note(f"{len(matviews)} materialized view(s) hold the copy's data and are not kept in sync: "
                        f"{names(matviews)}; REFRESH MATERIALIZED VIEW them on the target after the cutover"))
    return out


def judge_replication_grant(me: RoleFacts, major: int) -> Finding:
    if me.replication:
        return fine(f"role {me.name!r} has REPLICATION")
    if me.superuser:
        return fine(f"role {me.name!r} is a superuser: grant-replication gives it REPLICATION (cleanup takes it back)")
    if me.rds_replication:
        return fine(f"role {me.name!r} is a member of rds_replication (RDS): it may replicate")
    who = "only a superuser" if major < 16 else "only a superuser (or a role with CREATEROLE, REPLICATION and ADMIN on it)"
    return problem(f"role {me.name!r} lacks REPLICATION and cannot give it to itself: on PostgreSQL {major} {who} may "
                   f"ALTER ROLE {ident(me.name)} REPLICATION (on RDS: GRANT rds_replication TO {ident(me.name)}); "
                   "have an administrator grant it, then retry")


def judge_create(me: RoleFacts, side: str) -> Finding:
    if me.db_create:
        return fine(f"role {me.name!r} may CREATE in the {side} database")
    why = ("the db_upgrade schema (run record, barrier, verification) lives there" if side == "source"
           else "the copy creates the application's schemas there")
    return problem(f"role {me.name!r} lacks CREATE on the {side} database ({why}): GRANT CREATE ON DATABASE ... "
                   f"TO {ident(me.name)}")


def wal_run_estimate(rate: float, source_bytes: int) -> tuple[float, float]:
    """(seconds, bytes of WAL) a run keeps on the source at this WAL rate: from the
    slot's creation through the copy until the change stream has caught up."""
    seconds = source_bytes / COPY_BYTES_PER_SECOND + AFTER_COPY_SECONDS
    return seconds, rate * seconds


def judge_wal(rate: float, source_bytes: int, keep_bytes: int | None,
              wal_dir: tuple[int, int] | None) -> list[Finding]:
    seconds, retained = wal_run_estimate(rate, source_bytes)
    facts = (f"the source writes {pretty_bytes(rate)}/s of WAL now; a run of ~{duration(seconds)} (the copy of "
             f"{pretty_bytes(source_bytes)} at ~{pretty_bytes(COPY_BYTES_PER_SECOND)}/s, then "
             f"{duration(AFTER_COPY_SECONDS)} to catch up) keeps ~{pretty_bytes(retained)} of it, and each hour the "
             f"change stream stands still ~{pretty_bytes(rate * 3600)} more")
    facts += (f"; pg_wal holds {pretty_bytes(wal_dir[1])} in {wal_dir[0]} file(s) now" if wal_dir else
              "; the size of pg_wal is not readable with this role (pg_ls_waldir needs pg_monitor)")
    if keep_bytes is None:
        return [fine("max_slot_wal_keep_size = -1: the slots keep all the WAL they need"),
                note(facts + "; nothing limits it: watch the source's free disk during the run")]
    if retained > keep_bytes:
        return [problem(f"max_slot_wal_keep_size = {pretty_bytes(keep_bytes)} is less than the ~{pretty_bytes(retained)} "
                        f"of WAL a run keeps at the current rate ({pretty_bytes(rate)}/s over ~{duration(seconds)}): "
                        "the source would invalidate the slot mid-run and the upgrade could not finish; raise it "
                        "(or set -1 and watch the disk)")]
    return [fine(f"max_slot_wal_keep_size = {pretty_bytes(keep_bytes)} covers the ~{pretty_bytes(retained)} a run keeps "
                 "at the current rate"), note(facts)]


def judge_slots(max_slots: int, used: int, need: int, who: str) -> Finding:
    if max_slots - used >= need:
        return fine(f"replication slots: {used} of {max_slots} in use (the upgrade needs {need}: {who})")
    return problem(f"fewer than {need} free replication slot(s) on the source ({used} of {max_slots} in use; the "
                   f"upgrade needs {need}: {who}): raise max_replication_slots (restart) or drop unused slots")


def judge_senders(max_senders: int, used: int, need: int, who: str) -> Finding:
    if max_senders - used >= need:
        return fine(f"WAL senders: {used} of {max_senders} in use (the upgrade needs {need}: {who})")
    return problem(f"fewer than {need} free WAL sender(s) on the source ({used} of {max_senders} in use; the "
                   f"upgrade needs {need}: {who}): raise max_wal_senders (restart)")


def judge_output_plugins(setting: str | None, readable: bool, plugin: str) -> Finding | None:
    """PostgreSQL 15.20 and other recent minors restrict the plugins a slot may use
    (output_plugin_libraries, default 'pgoutput, test_decoding'). None when the
    server has no such setting."""
    if not readable:
        return note(f"output_plugin_libraries is not readable with this role (pg_read_all_settings): if set, it "
                    f"must list {plugin}")
    if setting is None:
        return None
    if plugin_allowed(setting, plugin):
        return fine(f"output_plugin_libraries ({setting}) allows {plugin}")
    return problem(f"output_plugin_libraries = '{setting}' on the source does not allow {plugin}: the slot could "
                   f"not be created; add {plugin} to it and reload the source")


def fence_blocker(target_major: int, me: RoleFacts, role: AppRole) -> str | None:
    """Why the connecting role could not fence this app role (ALTER ROLE ...
    NOLOGIN, then end its sessions on the target); None when it can."""
    if role.name == me.name:
        return "is the role the upgrade connects to the target as: fencing it would lock the upgrade out"
    if me.superuser:
        return None
    if role.superuser:
        return "is a superuser: only a superuser may make it NOLOGIN"
    if not me.createrole:
        return f"cannot be altered: {me.name!r} lacks CREATEROLE (or connect as a superuser)"
    if target_major >= 16 and not role.admin:
        return (f"cannot be altered: on PostgreSQL 16+ CREATEROLE needs ADMIN OPTION on the role "
                f"(GRANT {ident(role.name)} TO {ident(me.name)} WITH ADMIN OPTION)")
    if target_major < 16 and role.replication:
        return "has REPLICATION: only a superuser may alter it"
    if not (role.privileges or me.signal_backend):
        return f"its sessions could not be ended: GRANT pg_signal_backend TO {ident(me.name)}"
    return None


def judge_app_roles(wanted: list[str], on_source: set[str], on_target: dict[str, AppRole], me: RoleFacts | None,
                    target_major: int, fenced_by_this_run: frozenset[str] = frozenset()) -> list[Finding]:
    if not wanted:
        return [note("DB_UPGRADE_APP_ROLES is not set: the target is not fenced, so an application that reaches it "
                     "before the switch writes there while replication still applies")]
    out = []
    missing_t = [r for r in wanted if r not in on_target]
    missing_s = [r for r in wanted if r not in on_source]
    if missing_t:
        out.append(problem(f"application role(s) {', '.join(map(repr, missing_t))} (DB_UPGRADE_APP_ROLES) do not "
                           "exist on the target: create them there before the upgrade"))
    if missing_s:
        out.append(problem(f"application role(s) {', '.join(map(repr, missing_s))} (DB_UPGRADE_APP_ROLES) do not "
                           "exist on the source: name the roles the applications log in as"))
    if me is not None:
        blocked = [(r, fence_blocker(target_major, me, on_target[r])) for r in wanted if r in on_target]
        blocked = [(r, why) for r, why in blocked if why]
        if blocked:
            out.append(problem("the target cannot be fenced: " + "; ".join(f"{r!r} {why}" for r, why in blocked)))
    # The fence gives LOGIN back only to roles that had it: one left NOLOGIN (by an
    # interrupted run's fence, most often) would refuse the applications after the switch.
    nologin = [r for r in wanted if r in on_target and not on_target[r].can_login and r not in fenced_by_this_run]
    if nologin:
        out.append(problem(f"application role(s) {', '.join(map(repr, nologin))} cannot log in to the target "
                           "(NOLOGIN): the applications would be refused there after the switch; if an interrupted "
                           "run fenced them, run its cleanup step (same DB_UPGRADE_RUN_ID), else ALTER ROLE ... LOGIN "
                           "on the target"))
    if not out:
        out.append(fine(f"application role(s) {', '.join(map(repr, wanted))} exist on both sides and role "
                        f"{me.name!r} may fence them on the target (NOLOGIN until the switch)"))
    return out


def judge_leftovers(found: list[tuple[str, str]], mid_run: bool, own: str) -> Finding:
    if mid_run:
        found = [(kind, name) for kind, name in found if name not in (own, f"{own}_verify")]
    if not found:
        return fine(f"no replication slot, publication, subscription or origin named like {own!r} is left over")
    listing = ", ".join(f"{kind} {name!r}" for kind, name in found)
    return problem(f"left over from an earlier run: {listing}; if no upgrade is running, run the cleanup step with "
                   f"DB_UPGRADE_SLOT_NAME={own} (or drop them), else choose another DB_UPGRADE_SLOT_NAME")


def judge_other_runs(run_ids: list[str]) -> Finding:
    if not run_ids:
        return fine("no record of another run on the source")
    return problem(f"the source holds the record of {len(run_ids)} other run(s): {names(run_ids)}; another upgrade "
                   "may be running against this database, or an earlier one was not cleaned up: let it finish, or "
                   "once nothing runs, run its cleanup and report steps (DB_UPGRADE_RUN_ID=<that run>) or delete its "
                   "rows from db_upgrade.run_state")


def judge_sql_file(which: str, text: str) -> Finding | None:
    """A verdict without running it, or None: go on with the dry run."""
    control = transaction_control(text)
    if control:
        return problem(f"{which} SQL contains transaction control ({', '.join(control)}): the freeze runs the file as "
                       "one transaction of its own, so that a failure changes nothing; remove it")
    calls = non_transactional_calls(text)
    if calls:
        return note(f"{which} SQL not dry-run: it calls {', '.join(calls)}, whose effect a rollback cannot undo")
    return None


def judge_dry_run(which: str, error: str | None, seconds: float, changed: list[str],
                  waited: str | None = None) -> Finding:
    if waited:
        return note(f"{which} SQL could not finish its dry run on the source ({waited}; rolled back): the freeze "
                    "would wait as long, with the application's writes refused")
    if error:
        return problem(f"{which} SQL failed in a dry run on the source (rolled back, nothing changed): {error}; "
                       f"fix DB_UPGRADE_{which.upper()}_SQL")
    what = f"it changes {', '.join(changed)}" if changed else "it changes no privilege, setting or login"
    return fine(f"{which} SQL ran in a dry run on the source in {seconds * 1000:.0f} ms ({what}); rolled back")


def judge_freeze_pair(readonly_changed: list[str], restored_differs: list[str]) -> list[Finding]:
    out = []
    if not readonly_changed:
        out.append(note("the readonly SQL changes no privilege, setting or login of the source: make sure it really "
                        "stops the application's writes (the cutover relies on it)"))
    if restored_differs:
        out.append(note(f"after the readonly SQL then the unfreeze SQL, {', '.join(restored_differs)} differ from "
                        "before: check that the unfreeze SQL gives back everything the readonly SQL takes"))
    elif readonly_changed:
        out.append(fine("the unfreeze SQL restores exactly what the readonly SQL changes"))
    return out


# -- running the checks ---------------------------------------------------------------------

def first_line(exc: BaseException, uri: str | None = None) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return scrub(text, uri)


def try_query(conn: psycopg.Connection, query, params=(), fetch: str = "all"):
    """A query that may be refused (privileges, a missing setting or table):
    in a savepoint, None on refusal."""
    try:
        with conn.transaction():
            cur = conn.execute(query, params)
            return cur.fetchall() if fetch == "all" else cur.fetchone()
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedObject, psycopg.errors.UndefinedTable,
            psycopg.errors.UndefinedFunction):
        return None


def role_facts(conn: psycopg.Connection) -> RoleFacts:
    return RoleFacts(*conn.execute(ME).fetchone())


def setting(conn: psycopg.Connection, name: str) -> tuple[str | None, bool]:
    """(value, readable): SHOW in a savepoint; (None, True) when the server has no such setting."""
    try:
        with conn.transaction():
            return conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0], True
    except psycopg.errors.UndefinedObject:
        return None, True
    except psycopg.errors.InsufficientPrivilege:
        return None, False


def check_slots_and_senders(src: psycopg.Connection, r: Report, slots: int, slots_who: str, senders: int,
                            senders_who: str) -> None:
    max_slots, used_slots, max_senders, used_senders = src.execute(SLOTS_AND_SENDERS).fetchone()
    r.add(judge_slots(max_slots, used_slots, slots, slots_who),
          judge_senders(max_senders, used_senders, senders, senders_who))


def check_output_plugin(src: psycopg.Connection, r: Report, plugin: str) -> None:
    value, readable = setting(src, "output_plugin_libraries")
    finding = judge_output_plugins(value, readable, plugin)
    if finding is not None:
        r.add(finding)


def check_pgcopydb(s: StepSettings, r: Report) -> None:
    try:
        tool = pgcopydb.locate(None)  # not the work dir: locate(dir) creates it, and check_workdir judges it
        r.good(f"pgcopydb {tool.version} (>= {pgcopydb.MIN_VERSION[0]}.{pgcopydb.MIN_VERSION[1]}) found")
    except StepError as exc:
        r.bad(str(exc))


def check_workdir(s: StepSettings, source_bytes: int | None, r: Report, share: float = MIN_FREE_SHARE) -> None:
    """pgcopydb's --dir: writable, without a quote, with free space for `share` of the source."""
    try:
        workdir = s.workdir()
    except StepError as exc:
        r.bad(str(exc))
        return
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
    need = max(MIN_FREE_BYTES, int(source_bytes * share))
    if free >= need:
        r.good(f"work dir {workdir} is writable, {pretty_bytes(free)} free for a {pretty_bytes(source_bytes)} source")
    else:
        r.bad(f"work dir {workdir} has {pretty_bytes(free)} free, less than {pretty_bytes(need)} "
              f"({int(share * 100)}% of the {pretty_bytes(source_bytes)} source, at least "
              f"{pretty_bytes(MIN_FREE_BYTES)}): enlarge the volume")


class WalSample:
    """The source's WAL rate, from two positions at least WAL_SAMPLE_SECONDS
    apart: the first taken before the other checks, so that they pay for the wait."""

    def __init__(self, src: psycopg.Connection):
        self.src = src
        self.t0 = time.monotonic()
        self.p0 = lsn(src.execute(WAL_POSITION).fetchone()[0])

    def rate(self) -> float:
        left = WAL_SAMPLE_SECONDS - (time.monotonic() - self.t0)
        if left > 0:
            time.sleep(left)
        p1 = lsn(self.src.execute(WAL_POSITION).fetchone()[0])
        return max(0, p1 - self.p0) / (time.monotonic() - self.t0)


def check_wal(src: psycopg.Connection, sample: WalSample, r: Report) -> None:
    row = src.execute(SETTING, ("max_slot_wal_keep_size",)).fetchone()
    keep = setting_bytes(row[0], row[1]) if row else None  # before PostgreSQL 13: no limit
    wal_dir = try_query(src, WAL_DIR, fetch="one")
    source_bytes = src.execute(DATABASE_SIZE).fetchone()[0]
    r.add(*judge_wal(sample.rate(), source_bytes, keep, tuple(wal_dir) if wal_dir else None))


def _privilege_state(conn: psycopg.Connection) -> tuple:
    return tuple(conn.execute(PRIVILEGE_STATE, ()).fetchone())


def _changed(before: tuple, after: tuple) -> list[str]:
    return [part for part, a, b in zip(PRIVILEGE_PARTS, before, after) if a != b]


def check_freeze_sql(s: StepSettings, src: psycopg.Connection, r: Report) -> None:
    """Dry-run the readonly SQL, then the unfreeze SQL on top of it, on the source,
    in one transaction that is always rolled back."""
    texts: dict[str, str] = {}
    for which in ("readonly", "unfreeze"):
        if getattr(s, f"{which}_sql") is None:
            r.note(f"DB_UPGRADE_{which.upper()}_SQL is not set: not dry-run (the cutover needs it)")
            continue
        try:
            text = s.sql_file(which)  # type: ignore[arg-type]
        except StepError as exc:
            r.bad(str(exc))
            continue
        verdict = judge_sql_file(which, text)
        if verdict is not None:
            r.add(verdict)
        else:
            texts[which] = text
    if not texts:
        return
    results: dict[str, tuple[str | None, float, list[str], str | None]] = {}
    try:
        with src.transaction(force_rollback=True):
            src.execute(f"SET LOCAL lock_timeout = '{DRY_RUN_LOCK_TIMEOUT}'")
            src.execute(f"SET LOCAL statement_timeout = '{DRY_RUN_STATEMENT_TIMEOUT}'")
            before = _privilege_state(src)
            state_now = before
            for which in ("readonly", "unfreeze"):
                if which not in texts:
                    continue
                t0 = time.monotonic()
                try:
                    with src.transaction():  # a savepoint: the unfreeze SQL still runs after a failed readonly SQL
                        src.execute(dry_run_sql(texts[which]))
                        after = _privilege_state(src)
                    results[which] = (None, time.monotonic() - t0, _changed(state_now, after), None)
                    state_now = after
                except psycopg.errors.LockNotAvailable:
                    results[which] = (None, time.monotonic() - t0, [],
                                      f"it waited more than {DRY_RUN_LOCK_TIMEOUT} for a lock")
                except psycopg.errors.QueryCanceled:
                    results[which] = (None, time.monotonic() - t0, [], f"it ran longer than {DRY_RUN_STATEMENT_TIMEOUT}")
                except psycopg.Error as exc:
                    results[which] = (first_line(exc, s.source()), time.monotonic() - t0, [], None)
    except psycopg.Error as exc:  # the dry run itself could not be set up (e.g. no plpgsql)
        r.note(f"the readonly and unfreeze SQL could not be dry-run: {first_line(exc, s.source())}")
        return
    for which, (error, seconds, changed, waited) in results.items():
        r.add(judge_dry_run(which, error, seconds, changed, waited))
    if "readonly" in results and "unfreeze" in results and not any(e or w for e, _s, _c, w in results.values()):
        readonly_changed = results["readonly"][2]
        restored = _changed(before, state_now)
        r.add(*judge_freeze_pair(readonly_changed, restored))


def _leftovers(s: StepSettings, src: psycopg.Connection, tgt: psycopg.Connection | None) -> list[tuple[str, str]]:
    params = (s.slot_name, like_ours(s.slot_name))
    found = [("replication slot on the source", n) for (n,) in src.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s OR slot_name LIKE %s ORDER BY 1", params)]
    found += [("publication on the source", n) for (n,) in src.execute(
        "SELECT pubname FROM pg_publication WHERE pubname = %s OR pubname LIKE %s ORDER BY 1", params)]
    if tgt is not None:
        found += [("subscription on the target", n) for (n,) in tgt.execute(
            "SELECT subname FROM pg_subscription WHERE subname = %s OR subname LIKE %s ORDER BY 1", params)]
        origins = try_query(tgt, "SELECT roname FROM pg_replication_origin WHERE roname = %s OR roname LIKE %s "
                                 "ORDER BY 1", params) or []
        found += [("replication origin on the target", n) for (n,) in origins]
    return found


def check_source(s: StepSettings, src: psycopg.Connection, r: Report, in_recovery: bool) -> RoleFacts:
    r.add(judge_primary(in_recovery))
    r.add(judge_wal_level(src.execute(WAL_LEVEL).fetchone()[0]))
    me = role_facts(src)
    r.add(judge_replication_grant(me, server_major(src)), judge_create(me, "source"))
    r.add(judge_readable(me.name, [n for (n,) in src.execute(UNREADABLE, ())]))
    r.add(judge_large_objects(src.execute(LARGE_OBJECTS).fetchone()[0]))
    return me


def check_pair(s: StepSettings, src: psycopg.Connection, tgt: psycopg.Connection, r: Report, mid_run: bool) -> None:
    sv, tv = server_major(src), server_major(tgt)
    r.add(judge_majors(sv, tv))
    r.add(judge_target_empty([n for (n,) in tgt.execute(TARGET_RELATIONS, ())], mid_run))
    tgt_me = role_facts(tgt)
    r.add(judge_create(tgt_me, "target"))
    r.add(*judge_locale(DbLocale(*src.execute(database_locale_sql(sv)).fetchone()),
                        DbLocale(*tgt.execute(database_locale_sql(tv)).fetchone())))
    colls = [(c, v) for c, v in src.execute(COLUMN_COLLATIONS, ())]
    if colls:
        on_target = {c: v for c, v in tgt.execute(TARGET_COLLATIONS, ([c for c, _v in colls],))}
        r.add(*judge_collations(colls, on_target))
    r.add(judge_extensions([e for (e,) in src.execute(EXTENSIONS)],
                           {e for (e,) in tgt.execute(AVAILABLE_EXTENSIONS)}, tv))
    r.add(judge_roles([n for (n,) in src.execute(REFERENCED_ROLES, ())], {n for (n,) in tgt.execute(ROLE_NAMES)}))
    tables = [TableIdentity(*row) for row in src.execute(TABLE_IDENTITY, (apply_index_methods(tv),))]
    r.add(*judge_identity(tables))
    r.add(*judge_unreplicated([(n, k) for n, k in src.execute(UNREPLICATED, ())]))
    wanted = fence.roles(s)
    on_source = {n for (n,) in src.execute(ROLES_PRESENT, (wanted,))} if wanted else set()
    on_target = {row[0]: AppRole(*row) for row in tgt.execute(APP_ROLES, (wanted,))} if wanted else {}
    st = state.try_load(s) if mid_run else None
    r.add(*judge_app_roles(wanted, on_source, on_target, tgt_me, tv, frozenset((st.fenced_roles if st else None) or {})))
    r.add(judge_leftovers(_leftovers(s, src, tgt), mid_run, s.slot_name))


def engine_checks(s: StepSettings, src: psycopg.Connection, tgt: psycopg.Connection, r: Report) -> None:
    """The engine's own checks, through the engine when its class is there."""
    try:
        from steps import engines

        engine = engines.get(s)
    except ImportError:  # a partial tree: the engine classes are not there yet
        engine = None
    if engine is not None:
        engine.preflight_checks(src, tgt, r)
        return
    if s.engine == "pgcopydb-follow":
        from steps.engines.pgcopydb_follow import preflight as checks_module
    else:
        from steps.engines.native import preflight as checks_module
    checks_module.checks(s, src, tgt, r)


def _mid_run(s: StepSettings) -> bool:
    """Is this run (DB_UPGRADE_RUN_ID) already past preflight, e.g. a retried
    workflow that reran it? Then its objects are expected and its record is kept."""
    rec = state.try_load(s)
    return bool(rec and rec.follow_started_at)


def preflight(s: StepSettings) -> Report:
    r = Report()
    log(f"preflight: checking the source, the target and the {s.engine} engine; every problem is listed at the end")
    mid_run = False
    with ExitStack() as stack:
        conns: dict[str, psycopg.Connection] = {}
        for role, uri in (("source", s.source), ("target", s.target)):
            try:
                target_uri = uri()
                conns[role] = stack.enter_context(connect(target_uri, role, purpose="preflight"))
                # Names as text even from a SQL_ASCII database (psycopg returns bytes there).
                conns[role].execute("SET client_encoding TO 'UTF8'")
                r.good(f"{role} database {describe(target_uri, role)} is reachable")
            except StepError as exc:
                r.bad(str(exc))
        src, tgt = conns.get("source"), conns.get("target")
        if src is not None:
            mid_run = _mid_run(s)
            if mid_run:
                r.note(f"run {s.run_id!r} is under way (follow has started): its own slot, objects and copied "
                       "tables are expected, and its record is kept")
            in_recovery = src.execute(IN_RECOVERY).fetchone()[0]
            sample = None if in_recovery else WalSample(src)
            check_source(s, src, r, in_recovery)
            if tgt is not None:
                check_pair(s, src, tgt, r, mid_run)
            if sample is not None:
                check_wal(src, sample, r)
                check_freeze_sql(s, src, r)
            else:
                r.note("WAL retention and the dry run of the readonly and unfreeze SQL need the primary: not run")
            try:
                r.add(judge_other_runs(state.other_runs(s)))
            except psycopg.Error as exc:
                r.note(f"the records of other runs could not be read: {first_line(exc, s.source())}")
        if src is not None and tgt is not None:
            engine_checks(s, src, tgt, r)
        else:
            r.note(f"the {s.engine} engine's checks need both databases: not run")
    if s.backout:
        from steps import backout

        backout.check(s, r)

    if r.problems:
        raise StepError(f"preflight found {len(r.problems)} problem(s): " + " | ".join(r.problems))
    if not mid_run:
        state.begin(s)
    log(f"preflight: all {len(r.ok)} checks passed ({len(r.notes)} note(s) above); run {s.run_id!r} "
        + ("continues" if mid_run else "begins"))
    return r
