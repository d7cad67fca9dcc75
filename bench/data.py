"""Databases for the bench: the project's sample of a given size in bytes,
generated server side, and the template/clone helpers every workload uses.

The schema is local.workload's (foreign keys, jsonb, bytea, a partitioned
table, a table without a primary key...). Rows come from generate_series in a
few parallel INSERT ... SELECT, so 1 GB takes about a minute on 2 cores. A
loaded database is kept as a template (bench_tmpl_<bytes>) and each run gets a
file-level copy of it (CREATE DATABASE ... TEMPLATE, STRATEGY FILE_COPY).
"""

import threading
import time

import psycopg
from psycopg import sql

from local import workload

# pg_database_size growth per customer for the sample (customers, 4 orders,
# 8 events, 1 audit row, with indexes), measured on PostgreSQL 15.
BYTES_PER_CUSTOMER = 2400

PARTS = [
    """INSERT INTO {schema}.orders (customer_id, amount, status, receipt, placed_at)
  SELECT 1 + (g % {n}), round((random() * 1000)::numeric, 4), (ARRAY['new','paid','done'])[1 + g % 3],
         CASE WHEN g % 4 = 0 THEN decode(md5(g::text), 'hex') END, now() - (g || ' seconds')::interval
  FROM generate_series({lo} * 4 + 1, {hi} * 4) g""",
    """INSERT INTO {schema}.events (at, kind, payload)
  SELECT timestamptz '2024-06-01' + (g || ' minutes')::interval, 'k' || (g % 9),
         jsonb_build_object('n', g, 'pad', repeat('x', 60))
  FROM generate_series({lo} * 8 + 1, {hi} * 8) g""",
    """INSERT INTO {schema}.{audit} (actor, detail)
  SELECT 'seed', 'row ' || g FROM generate_series({lo} + 1, {hi}) g""",
]
CUSTOMERS = """INSERT INTO {schema}.customers (email, profile, created_at)
  SELECT 'c' || g || '@example.com', jsonb_build_object('tier', g % 5, 'tags', jsonb_build_array('a', g % 7)),
         now() - (g || ' minutes')::interval
  FROM generate_series(1, {n}) g"""


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def pretty(n: int) -> str:
    return f"{n / (1 << 30):.0f}GB" if n >= 1 << 30 else f"{n / (1 << 20):.0f}MB"


def with_db(uri: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo(**{**conninfo_to_dict(uri), "dbname": dbname})


def template_name(size: int) -> str:
    return f"bench_tmpl_{size}"


def ensure_template(server_uri: str, size: int, log=print) -> int:
    """The sample's template database for this size; returns its pg_database_size."""
    n = max(500, size // BYTES_PER_CUSTOMER)
    return ensure_database(server_uri, template_name(size), lambda uri: load_sample(uri, n), log,
                           what=f"sample, {n} customers")


def load_sample(uri: str, n: int) -> None:
    """local.workload's schema with n customers, 4n orders, 8n events, n audit rows."""
    names = {"schema": sql.Identifier(workload.SCHEMA), "audit": sql.Identifier(workload.AUDIT)}
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL(workload.DDL).format(**names))
        conn.execute(sql.SQL(CUSTOMERS).format(n=sql.Literal(n), **names))
    errors = []

    def part(template: str, lo: int, hi: int) -> None:
        try:
            with psycopg.connect(uri, autocommit=True) as c:
                c.execute(sql.SQL(template).format(n=sql.Literal(n), lo=sql.Literal(lo), hi=sql.Literal(hi), **names))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = []
    chunks = 2
    for template in PARTS:
        for i in range(chunks):
            lo, hi = n * i // chunks, n * (i + 1) // chunks
            threads.append(threading.Thread(target=part, args=(template, lo, hi)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL("SELECT setval(pg_get_serial_sequence('shop.orders', 'id'), max(id)) FROM shop.orders"))
        conn.execute(sql.SQL("SELECT setval(pg_get_serial_sequence('shop.events', 'id'), max(id)) FROM shop.events"))
        conn.execute(sql.SQL(workload.GRANTS).format(role=sql.Identifier(workload.APP_ROLE), **names))


def ensure_database(server_uri: str, name: str, load, log=print, what: str = "") -> int:
    """A template database made once by load(uri); returns its pg_database_size.
    A half-made one (the load failed or was interrupted) is dropped first: it is
    marked complete only at the end, by a comment on the database."""
    with psycopg.connect(server_uri, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(d.oid), shobj_description(d.oid, 'pg_database') "
                           "FROM pg_database d WHERE datname = %s", (name,)).fetchone()
        if row and row[1] == "bench template":
            return row[0]
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    t0 = time.time()
    workload.ensure_app_role(server_uri)
    load(with_db(server_uri, name))
    with psycopg.connect(with_db(server_uri, name), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        got = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS 'bench template'").format(sql.Identifier(name)))
    log(f"bench: generated {name} ({what}, {got / (1 << 20):.0f} MB) in {time.time() - t0:.0f}s")
    return got


def clone_database(server_uri: str, template: str, name: str) -> str:
    """A file-level copy of a template: seconds, where generating takes minutes."""
    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
            sql.Identifier(name), sql.Identifier(template)))
    return with_db(server_uri, name)


def database_size(uri: str) -> int:
    with psycopg.connect(uri) as conn:
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def empty_database(server_uri: str, name: str) -> str:
    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_db(server_uri, name)


def drop_database(server_uri: str, name: str) -> None:
    try:
        with psycopg.connect(server_uri, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error:
        pass
