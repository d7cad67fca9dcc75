"""A realistic sample database and a steady application write load.

The sample covers what an upgrade must carry: foreign keys, indexes, jsonb,
numeric, bytea, timestamptz, a serial and an identity column, a partitioned
table, a table without a primary key (REPLICA IDENTITY FULL), and names with
quotes and spaces. The writers connect as the application role, as a real
application would, so the freeze's REVOKE is what stops them.
"""

import random
import threading
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

APP_ROLE = 'app "rw" user'
APP_PASSWORD = "app-password"
SCHEMA = "shop"
AUDIT = 'Audit "Log"'

SIZES = {  # customers; orders are 4x, events 8x
    "tiny": 500,
    "small": 5_000,
    "medium": 100_000,
    "large": 1_000_000,
}

DDL = """
CREATE SCHEMA {schema};
CREATE TABLE {schema}.customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    profile jsonb NOT NULL DEFAULT '{{}}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {schema}.orders (
    id serial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES {schema}.customers (id) ON DELETE CASCADE,
    amount numeric(14, 4) NOT NULL,
    status text NOT NULL DEFAULT 'new',
    receipt bytea,
    placed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer_idx ON {schema}.orders (customer_id);
CREATE INDEX orders_status_idx ON {schema}.orders (status) WHERE status <> 'done';
CREATE TABLE {schema}.events (
    id bigserial,
    at timestamptz NOT NULL,
    kind text NOT NULL,
    payload jsonb,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE TABLE {schema}.events_old PARTITION OF {schema}.events FOR VALUES FROM ('2000-01-01') TO ('2025-01-01');
CREATE TABLE {schema}.events_new PARTITION OF {schema}.events DEFAULT;
CREATE TABLE {schema}.{audit} (
    happened_at timestamptz NOT NULL DEFAULT now(),
    actor text,
    detail text
);
ALTER TABLE {schema}.{audit} REPLICA IDENTITY FULL;
"""

LOAD = """
INSERT INTO {schema}.customers (email, profile, created_at)
  SELECT 'c' || g || '@example.com', jsonb_build_object('tier', g % 5, 'tags', jsonb_build_array('a', g % 7)),
         now() - (g || ' minutes')::interval
  FROM generate_series(1, {n}) g;
INSERT INTO {schema}.orders (customer_id, amount, status, receipt, placed_at)
  SELECT 1 + (g % {n}), round((random() * 1000)::numeric, 4), (ARRAY['new','paid','done'])[1 + g % 3],
         CASE WHEN g % 4 = 0 THEN decode(md5(g::text), 'hex') END, now() - (g || ' seconds')::interval
  FROM generate_series(1, {n} * 4) g;
INSERT INTO {schema}.events (at, kind, payload)
  SELECT timestamptz '2024-06-01' + (g || ' minutes')::interval, 'k' || (g % 9),
         jsonb_build_object('n', g, 'pad', repeat('x', 60))
  FROM generate_series(1, {n} * 8) g;
INSERT INTO {schema}.{audit} (actor, detail)
  SELECT 'seed', 'row ' || g FROM generate_series(1, {n}) g;
ANALYZE;
"""


def ensure_app_role(uri: str) -> None:
    """The application role, on source and target alike (as platform teams do)."""
    with psycopg.connect(uri, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(APP_ROLE), sql.Literal(APP_PASSWORD)))


def load_sample(uri: str, size: str = "small") -> None:
    n = SIZES[size]
    names = {"schema": sql.Identifier(SCHEMA), "audit": sql.Identifier(AUDIT)}
    ensure_app_role(uri)
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL(DDL).format(**names))
        conn.execute(sql.SQL(LOAD).format(n=sql.Literal(n), **names))
        conn.execute(sql.SQL(GRANTS).format(role=sql.Identifier(APP_ROLE), **names))


GRANTS = """
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role};
"""

# The freeze and its inverse for the sample: privileges are checked at every
# statement, so a REVOKE also stops sessions that were connected before it.
READONLY_SQL = """
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA {schema} FROM {role};
ALTER ROLE {role} SET default_transaction_read_only = on;
"""
UNFREEZE_SQL = """
GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
ALTER ROLE {role} RESET default_transaction_read_only;
"""


def freeze_sql_files(directory) -> tuple:
    """Write readonly.sql and unfreeze.sql for the sample into directory."""
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, template in (("readonly.sql", READONLY_SQL), ("unfreeze.sql", UNFREEZE_SQL)):
        text = sql.SQL(template).format(schema=sql.Identifier(SCHEMA), role=sql.Identifier(APP_ROLE)).as_string(None)
        (d / name).write_text(text.strip() + "\n")
        out.append(d / name)
    return tuple(out)


def app_uri(server_uri: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(server_uri)
    params.update(user=APP_ROLE, password=APP_PASSWORD)
    return make_conninfo(**params)


@dataclass
class WriterStats:
    ok: int = 0
    refused: int = 0
    first_refused_at: float | None = None
    last_ok_before_refusal: float | None = None
    first_ok_on_target_at: float | None = None
    errors: list[str] = field(default_factory=list)
    # Every transaction that raised, whatever the error (refused counts psycopg's only).
    failed_transactions: int = 0
    # The longest wait for a write, in any thread: from the start of an attempt to the
    # commit of that write, retries included (a held transaction, or errors until one commits).
    max_write_stall_seconds: float = 0.0


class Writer:
    """Threads inserting, updating and deleting at a steady rate as the app role."""

    def __init__(self, uri: str, rate: float = 50, threads: int = 2, seed: int = 7, keyless_changes: bool = True,
                 pooled: bool = False):
        self.uri = uri
        # Through a transaction pooler (PgBouncer 1.18): no server-side prepared statements,
        # which a pooler cannot carry from one server connection (or database) to another.
        self.pooled = pooled
        self.rate = rate
        self.threads = threads
        # False: only INSERTs on the table without a primary key (its UPDATE and
        # DELETE cost the apply a scan of the whole table on the target).
        self.keyless_changes = keyless_changes
        self.stats = WriterStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._seed = seed
        self._target_uri: str | None = None

    def start(self) -> "Writer":
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(random.Random(self._seed + i),), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def switch_to(self, uri: str) -> None:
        """The application restarted onto the new database."""
        self._target_uri = uri

    def stop(self) -> WriterStats:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=30)
        return self.stats

    def _connect(self, uri: str):
        if self.pooled:
            return psycopg.connect(uri, autocommit=True, connect_timeout=5, prepare_threshold=None)
        return psycopg.connect(uri, autocommit=True, connect_timeout=5)

    def _run(self, rng: random.Random) -> None:
        interval = self.threads / self.rate if self.rate > 0 else 1.0
        conn, conn_uri = None, None
        next_at = time.monotonic()
        pending_since: float | None = None  # the first attempt of the write not yet committed
        while not self._stop.is_set():
            uri = self._target_uri or self.uri
            if pending_since is None:
                pending_since = time.monotonic()
            try:
                if conn is None or conn_uri != uri or conn.closed:
                    if conn is not None:
                        conn.close()
                    conn, conn_uri = self._connect(uri), uri
                self._one(conn, rng)
                now = time.time()
                stall, pending_since = time.monotonic() - pending_since, None
                with self._lock:
                    self.stats.ok += 1
                    self.stats.max_write_stall_seconds = max(self.stats.max_write_stall_seconds, stall)
                    if uri == self._target_uri and self.stats.first_ok_on_target_at is None:
                        self.stats.first_ok_on_target_at = now
                    if self.stats.first_refused_at is None and uri != self._target_uri:
                        self.stats.last_ok_before_refusal = now
            except psycopg.Error as exc:
                now = time.time()
                with self._lock:
                    self.stats.refused += 1
                    self.stats.failed_transactions += 1
                    if self.stats.first_refused_at is None and uri != self._target_uri:
                        self.stats.first_refused_at = now
                    if len(self.stats.errors) < 20:
                        self.stats.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                if conn is not None and (conn.closed or conn.broken):
                    conn = None
                time.sleep(0.02)
            except Exception as exc:  # not the database's: count it as a failed transaction all the same
                with self._lock:
                    self.stats.failed_transactions += 1
                    if len(self.stats.errors) < 20:
                        self.stats.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if conn is not None and (conn.closed or conn.broken):
                    conn = None
                time.sleep(0.02)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()
        if conn is not None:
            conn.close()

    def _one(self, conn: psycopg.Connection, rng: random.Random) -> None:
        s, a = sql.Identifier(SCHEMA), sql.Identifier(AUDIT)
        op = rng.random()
        with conn.transaction():
            if op < 0.35:
                conn.execute(sql.SQL(
                    "INSERT INTO {}.orders (customer_id, amount, receipt) "
                    "SELECT id, %s, %s FROM {}.customers ORDER BY id DESC LIMIT 1 OFFSET %s").format(s, s),
                    (round(rng.random() * 500, 4), rng.randbytes(16), rng.randint(0, 50)))
            elif op < 0.55:
                conn.execute(sql.SQL(
                    "UPDATE {}.orders SET status = 'paid', amount = amount + 1 WHERE id = "
                    "(SELECT max(id) - %s FROM {}.orders)").format(s, s), (rng.randint(0, 200),))
            elif op < 0.65:
                conn.execute(sql.SQL(
                    "DELETE FROM {}.orders WHERE id = (SELECT min(id) + %s FROM {}.orders)").format(s, s),
                    (rng.randint(0, 200),))
            elif op < 0.75:
                conn.execute(sql.SQL(
                    "INSERT INTO {}.customers (email, profile) VALUES (%s, %s)").format(s),
                    (f"w{rng.getrandbits(48)}@example.com", Jsonb({"w": rng.random()})))
            elif op < 0.85:
                conn.execute(sql.SQL("INSERT INTO {}.events (at, kind, payload) VALUES (now(), 'live', %s)").format(s),
                             (Jsonb({"r": rng.random()}),))
            elif op < 0.93 or not self.keyless_changes:
                conn.execute(sql.SQL("INSERT INTO {}.{} (actor, detail) VALUES ('writer', %s)").format(s, a),
                             (f"d{rng.getrandbits(32)}",))
            elif op < 0.97:
                conn.execute(sql.SQL(
                    "UPDATE {}.{} SET detail = detail || '+' WHERE ctid = (SELECT ctid FROM {}.{} "
                    "WHERE actor = 'writer' LIMIT 1)").format(s, a, s, a))
            else:
                conn.execute(sql.SQL(
                    "DELETE FROM {}.{} WHERE ctid = (SELECT ctid FROM {}.{} WHERE actor = 'seed' LIMIT 1)").format(
                    s, a, s, a))
