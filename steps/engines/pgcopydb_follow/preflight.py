"""Preflight checks of the pgcopydb-follow engine (pgcopydb 0.17 `clone --follow`),
called by `PgcopydbFollow.preflight_checks` after the common checks of
steps/preflight.py.

Besides what pgcopydb needs (itself, its output plugin, a slot and a WAL
sender, a work volume with room for the decoded changes, the target-side
privileges of its apply), this states the data limits measured with pgcopydb
0.17 (issue 11, shared/research/pgcopydb.md), and whether the schema has
columns they can hit. verify catches every one of them, so such a cutover is
blocked rather than wrong: the run cannot finish.
"""

from __future__ import annotations

import psycopg

from steps import preflight as p
from steps.pg import USER_SCHEMAS, server_major
from steps.settings import StepSettings

SLOTS = 2  # pgcopydb's slot and verify's
SENDERS = 1  # pgcopydb's change stream

# -- SQL (pure) ------------------------------------------------------------------------------

PKGLIBDIR = "SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'"
PLUGIN_FILE = "SELECT count(*) FROM pg_ls_dir(%s) f WHERE f = %s"

# The application's columns and what pgcopydb 0.17 can get wrong in them:
# TOAST-able (varlena, not PLAIN storage), text-like (string category, json,
# jsonb: the 'null' prefix and trailing quote), numeric and floating point.
COLUMN_CLASSES = f"""SELECT format('%%I.%%I', n.nspname, c.relname), a.attname,
       t.typlen = -1 AND a.attstorage <> 'p',
       t.typcategory = 'S' OR a.atttypid IN ('json'::regtype, 'jsonb'::regtype),
       a.atttypid IN ('numeric'::regtype, 'float4'::regtype, 'float8'::regtype)
          OR t.typbasetype IN ('numeric'::regtype, 'float4'::regtype, 'float8'::regtype)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND c.relpersistence = 'p' AND {USER_SCHEMAS}
ORDER BY 1, a.attnum"""

# What pgcopydb's apply on the target needs: it sets session_replication_role
# and drives a replication origin.
TARGET_APPLY = """SELECT r.rolsuper,
       has_parameter_privilege('session_replication_role', 'SET'),
       has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE')
         AND has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE')
         AND has_function_privilege('pg_replication_origin_advance(text, pg_lsn)', 'EXECUTE')
FROM pg_roles r WHERE r.rolname = current_user"""


# -- verdicts (pure) -------------------------------------------------------------------------

def judge_apply_privileges(superuser: bool, set_replication_role: bool, origin_functions: bool) -> p.Finding:
    if superuser:
        return p.fine("the target role is a superuser: pgcopydb's apply may set session_replication_role and use "
                      "replication origins")
    missing = []
    if not set_replication_role:
        missing.append("GRANT SET ON PARAMETER session_replication_role TO <role>")
    if not origin_functions:
        missing.append("GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), "
                       "pg_replication_origin_session_setup(text), pg_replication_origin_advance(text, pg_lsn) TO <role>")
    if missing:
        return p.problem("the target role may not run pgcopydb's apply (it sets session_replication_role and drives a "
                         "replication origin): " + "; ".join(missing) + ", or connect as a superuser")
    return p.fine("the target role may set session_replication_role and use replication origins (pgcopydb's apply)")


def judge_identity_index(tables: list[p.TableIdentity], plugin: str) -> p.Finding | None:
    """pgcopydb 0.17's test_decoding parser finds the WHERE clause of an UPDATE by
    primary key columns only: a table keyed by REPLICA IDENTITY USING INDEX stops
    the apply ("WHERE clause columns not found"; fixed after 0.17, pgcopydb #946)."""
    by_index = [t.name for t in tables if t.replident == "i" and t.has_ident_index and not t.has_pk]
    if not by_index:
        return None
    if plugin == "test_decoding":
        return p.problem(f"{len(by_index)} table(s) replicate by REPLICA IDENTITY USING INDEX without a primary key: "
                         f"{p.names(by_index)}; pgcopydb 0.17 with test_decoding cannot apply their UPDATEs (\"WHERE "
                         "clause columns not found\", fixed after 0.17): use the native engine, or REPLICA IDENTITY FULL")
    return p.note(f"{len(by_index)} table(s) replicate by REPLICA IDENTITY USING INDEX without a primary key "
                  f"({p.names(by_index)}): not measured with pgcopydb 0.17 and wal2json; verify will tell")


def _columns(rows: list[tuple[str, str]]) -> str:
    tables = sorted({t for t, _c in rows})
    examples = ", ".join(f"{t}.{p.shown(c)}" for t, c in rows[:3])
    return f"{len(rows)} column(s) in {len(tables)} table(s), e.g. {examples}"


def data_limit_notes(plugin: str, columns: list[tuple[str, str, bool, bool, bool]]) -> list[p.Finding]:
    """pgcopydb 0.17's measured value corruption (issue 11), and the columns of
    this schema it can reach. verify blocks such a cutover."""
    toastable = [(t, c) for t, c, toast, _text, _num in columns if toast]
    textlike = [(t, c) for t, c, _toast, text, _num in columns if text]
    numeric = [(t, c) for t, c, _toast, _text, num in columns if num]
    if plugin == "test_decoding":
        out = [p.note("pgcopydb 0.17 with test_decoding, measured: an UPDATE that leaves a TOASTed column unchanged "
                      "writes the text 'unchanged-toast-datum' into it on the target; a text value starting with "
                      "'null' ('null', 'nullable', 'null:1') arrives as NULL (or stops the apply on a NOT NULL "
                      "column); a text value ending in a single quote loses it, and an UPDATE or DELETE whose key "
                      "or old row ends in one silently matches nothing; quotes inside jsonb and arrays arrive "
                      "doubled. Its apply crashes (exit 12) on an unchanged TOASTed jsonb, an enum label with a "
                      "quote, or 'null' in a NOT NULL column, and a resume replays the same change. verify blocks "
                      "such a cutover, so the run cannot finish: use engine native (docs/fidelity.md)")]
        at_risk = []
        if toastable:
            at_risk.append(f"TOAST-able: {_columns(toastable)}")
        if textlike:
            at_risk.append(f"text-like: {_columns(textlike)}")
        out.append(p.note("columns at risk in this schema: " + "; ".join(at_risk)) if at_risk else
                   p.note("this schema has no TOAST-able or text-like column: those limits do not reach it"))
        return out
    out = [p.note("pgcopydb 0.17 with wal2json 2.5, measured: float4, float8 and numeric values arrive cut to 6 "
                  "decimals (7.180783208205241 -> 7.180783); --wal2json-numeric-as-string needs wal2json >= 2.6. "
                  "verify blocks such a cutover, so the run cannot finish: the native engine keeps full precision")]
    out.append(p.note(f"columns at risk in this schema: numeric or floating point: {_columns(numeric)}") if numeric else
               p.note("this schema has no numeric or floating-point column: that limit does not reach it"))
    return out


# -- running them ----------------------------------------------------------------------------

def check_plugin_installed(src: psycopg.Connection, plugin: str, r: p.Report) -> None:
    # The plugin is a shared library of the server; reading the directory needs
    # pg_read_server_files, so an unprivileged role gets a note instead of a verdict.
    try:
        with src.transaction():
            libdir = src.execute(PKGLIBDIR).fetchone()[0]
            found = src.execute(PLUGIN_FILE, (libdir, f"{plugin}.so")).fetchone()[0]
    except psycopg.errors.InsufficientPrivilege:
        r.note(f"output plugin {plugin}: not checkable with this role's privileges (test_decoding ships with "
               "PostgreSQL; wal2json is the postgresql-NN-wal2json package)")
        return
    if found:
        r.good(f"output plugin {plugin} is installed on the source")
    else:
        r.bad(f"output plugin {plugin} is not installed on the source (no {plugin}.so in {libdir}): install it, or "
              "use the native engine (pgoutput is built in)")


def checks(s: StepSettings, src: psycopg.Connection, tgt: psycopg.Connection, r: p.Report) -> None:
    p.check_pgcopydb(s, r)
    check_plugin_installed(src, s.plugin, r)
    p.check_output_plugin(src, r, s.plugin)
    p.check_output_plugin(src, r, "pgoutput")  # verify's change tracking decodes with pgoutput
    p.check_slots_and_senders(src, r, SLOTS, "pgcopydb's slot and verify's", SENDERS, "pgcopydb's change stream")
    # verify's change tracking publishes the application's tables: the same privilege as native's.
    from steps.engines.native import preflight as native_preflight

    r.add(native_preflight.judge_publication(p.role_facts(src),
                                             [(t_, o) for t_, o in src.execute(native_preflight.NOT_OWNED, ())]))
    p.check_workdir(s, src.execute(p.DATABASE_SIZE).fetchone()[0], r)
    r.add(judge_apply_privileges(*tgt.execute(TARGET_APPLY).fetchone()))
    tables = [p.TableIdentity(*row) for row in src.execute(p.TABLE_IDENTITY,
                                                           (p.apply_index_methods(server_major(tgt)),))]
    finding = judge_identity_index(tables, s.plugin)
    if finding is not None:
        r.add(finding)
    r.add(*data_limit_notes(s.plugin, [tuple(row) for row in src.execute(COLUMN_CLASSES, ())]))
