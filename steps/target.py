"""The target database before the cutover: emptying what an interrupted copy left.

A copy that was interrupted cannot be resumed safely by either engine (see
steps/engines/*), so it starts over on an emptied target. Only what the copy
created is dropped, and nothing is dropped at all when the target holds a
relation the source does not have: that is somebody's data, not our copy's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psycopg
from psycopg import sql

from steps.errors import StepError
from steps.pg import connect
from steps.settings import StepSettings

# Every schema a copy may have created: the application's and ours (db_upgrade), not pgcopydb's.
COPIED_SCHEMAS = ("n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcopydb') "
                  "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'")
KINDS = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE", "f": "FOREIGN TABLE"}


def _relations(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    return conn.execute(
        f"""SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {COPIED_SCHEMAS}
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = c.oid AND d.deptype IN ('e', 'i', 'a'))
            ORDER BY 1, 2""", ()).fetchall()


def drop_copied_objects(s: StepSettings) -> list[str]:
    """Drop what an interrupted copy created on the target, and nothing else."""
    with connect(s.source(), "source") as src:
        src_schemas = {r[0] for r in src.execute(f"SELECT n.nspname FROM pg_namespace n WHERE {COPIED_SCHEMAS}", ())}
        src_rels = {(r[0], r[1]) for r in _relations(src)}
        src_routines = {(r[0], r[1]) for r in src.execute(
            f"SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            f"WHERE {COPIED_SCHEMAS}", ())}
        src_types = {(r[0], r[1]) for r in src.execute(
            f"SELECT n.nspname, t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            f"WHERE {COPIED_SCHEMAS}", ())}
    dropped = []
    with connect(s.target(), "target") as tgt:
        rels = _relations(tgt)
        unknown = [f"{sc}.{name}" for sc, name, _k in rels if (sc, name) not in src_rels]
        if unknown:
            raise StepError(
                f"follow: the interrupted copy must start over, but the target holds relation(s) that are not on "
                f"the source: {', '.join(unknown[:10])}; refusing to drop anything there. Point the target at an "
                "empty database, or remove those relations, then run follow again")
        tgt_schemas = [r[0] for r in tgt.execute(
            f"SELECT n.nspname FROM pg_namespace n WHERE {COPIED_SCHEMAS} ORDER BY 1", ())]
        with tgt.transaction():
            for schema in tgt_schemas:
                if schema == "public" or schema not in src_schemas:
                    continue
                tgt.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
                dropped.append(f"schema {schema}")
            # public exists in every database: empty it of what came from the source instead.
            for schema, name, kind in _relations(tgt):
                if schema != "public":
                    continue
                tgt.execute(sql.SQL("DROP {} IF EXISTS {} CASCADE").format(
                    sql.SQL(KINDS[kind]), sql.Identifier(schema, name)))
                dropped.append(f"{KINDS[kind].lower()} {schema}.{name}")
            not_ext = "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = x.oid AND d.deptype = 'e')"
            for oid, name in tgt.execute(
                    f"SELECT x.oid::regprocedure::text, x.proname FROM pg_proc x JOIN pg_namespace n "
                    f"ON n.oid = x.pronamespace WHERE n.nspname = 'public' AND {not_ext}", ()).fetchall():
                if ("public", name) in src_routines:
                    tgt.execute(sql.SQL("DROP ROUTINE IF EXISTS {} CASCADE").format(sql.SQL(oid)))
                    dropped.append(f"routine {oid}")
            for name, in tgt.execute(
                    f"SELECT x.typname FROM pg_type x JOIN pg_namespace n ON n.oid = x.typnamespace "
                    f"WHERE n.nspname = 'public' AND x.typrelid = 0 AND x.typcategory <> 'A' AND {not_ext}",
                    ()).fetchall():
                if ("public", name) in src_types:
                    tgt.execute(sql.SQL("DROP TYPE IF EXISTS {} CASCADE").format(sql.Identifier("public", name)))
                    dropped.append(f"type public.{name}")
    return dropped


def empty_dir(workdir: Path) -> int:
    """Remove everything in pgcopydb's work dir (a process finishing beside us may
    still recreate a file: retried until it stays empty)."""
    n = 0
    for attempt in range(20):
        try:
            for entry in workdir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
                n += 1
            return n
        except OSError:
            if attempt == 19:
                raise
            time.sleep(0.5)
    return n
