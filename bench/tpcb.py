"""pgbench TPC-B: the database (`pgbench -i -s N`), pgbench's own load, and an
application-side TPC-B writer whose refused writes can be timed.

The writer runs pgbench's built-in "tpcb-like" transaction (an account, a
teller and a branch updated by the same random delta, a history row) as the
application role, from several threads at a steady rate. Updates are
uniformly random over all accounts: within seconds every part of the big
table has changed, which is what makes verification hard (issue 13).
pgbench itself cannot be used for the cutover: it aborts a client at its
first error, so the freeze would end the load instead of being measured.

Each transaction is one round trip (psycopg pipeline mode), so that the
writer's Python does not take the machine's second core away from the
servers. The writer keeps the sum and count of what it committed on the
target, so that after the cutover the target's history can be checked
against the frozen source's exactly: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time

import psycopg
from psycopg import sql

from local import workload

# A refused write aborts the pipeline; psycopg then logs "error ignored terminating
# <Pipeline>" for each one, thousands per cutover: the writer counts them itself.
logging.getLogger("psycopg").setLevel(logging.ERROR)

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
# pg_database_size per pgbench scale unit on PostgreSQL 15 (100,000 accounts
# with their index, 10 tellers, 1 branch): scale 70 is 1 GB.
BYTES_PER_SCALE = 15_300_000
TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")

READONLY_SQL = """
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public FROM {role};
ALTER ROLE {role} SET default_transaction_read_only = on;
"""
UNFREEZE_SQL = """
GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
ALTER ROLE {role} RESET default_transaction_read_only;
"""
GRANTS = "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"

UPDATE_ACCOUNT = "UPDATE pgbench_accounts SET abalance = abalance + %s WHERE aid = %s"
SELECT_ACCOUNT = "SELECT abalance FROM pgbench_accounts WHERE aid = %s"
UPDATE_TELLER = "UPDATE pgbench_tellers SET tbalance = tbalance + %s WHERE tid = %s"
UPDATE_BRANCH = "UPDATE pgbench_branches SET bbalance = bbalance + %s WHERE bid = %s"
INSERT_HISTORY = ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                  "VALUES (%s, %s, %s, %s, CURRENT_TIMESTAMP)")


def scale_for(size: int) -> int:
    return max(1, round(size / BYTES_PER_SCALE))


def template_name(size: int) -> str:
    return f"bench_tpcb_{scale_for(size)}"


def initialize(uri: str, scale: int) -> None:
    """pgbench -i with server-side generation (G): the fastest on 2 cores."""
    proc = subprocess.run([PGBENCH, "-i", "-s", str(scale), "-I", "dtGvp", "-q", uri], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench -i -s {scale} failed: {(proc.stderr or proc.stdout).strip()[-1000:]}")
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL(GRANTS).format(role=sql.Identifier(workload.APP_ROLE)))
        # pgbench_history has no key; preflight asks for a replica identity, and this
        # is the fix it names (the table only gets INSERTs, so FULL costs nothing).
        conn.execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")


def freeze_sql_files(directory) -> tuple:
    """readonly.sql and unfreeze.sql for the pgbench tables (schema public)."""
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, template in (("readonly.sql", READONLY_SQL), ("unfreeze.sql", UNFREEZE_SQL)):
        text = sql.SQL(template).format(role=sql.Identifier(workload.APP_ROLE)).as_string(None)
        (d / name).write_text(text.strip() + "\n")
        out.append(d / name)
    return tuple(out)


class TpcbWriter(workload.Writer):
    """local.workload.Writer's threads, pacing and refusal timing, with pgbench's
    TPC-B transaction as the unit of work."""

    def __init__(self, uri: str, scale: int, rate: float, threads: int, seed: int = 11):
        super().__init__(uri, rate=rate, threads=threads, seed=seed)
        self.scale = scale
        self.on_target_commits = 0
        self.on_target_delta = 0
        self._target_port: int | None = None

    def switch_to(self, uri: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        self._target_port = int(conninfo_to_dict(uri).get("port") or 5432)
        super().switch_to(uri)

    def _one(self, conn: psycopg.Connection, rng) -> None:
        aid = rng.randint(1, 100_000 * self.scale)
        tid = rng.randint(1, 10 * self.scale)
        bid = rng.randint(1, self.scale)
        delta = rng.randint(-5000, 5000)
        with conn.pipeline(), conn.transaction():
            conn.execute(UPDATE_ACCOUNT, (delta, aid))
            conn.execute(SELECT_ACCOUNT, (aid,))
            conn.execute(UPDATE_TELLER, (delta, tid))
            conn.execute(UPDATE_BRANCH, (delta, bid))
            conn.execute(INSERT_HISTORY, (tid, bid, aid, delta))
        if self._target_port is not None and conn.info.port == self._target_port:
            with self._lock:
                self.on_target_commits += 1
                self.on_target_delta += delta


def sums(uri: str) -> dict[str, int]:
    """TPC-B's balances and the history, in one snapshot."""
    with psycopg.connect(uri) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        out = {}
        for key, query in (("accounts", "SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts"),
                           ("tellers", "SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers"),
                           ("branches", "SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches"),
                           ("history_delta", "SELECT coalesce(sum(delta), 0) FROM pgbench_history"),
                           ("history_rows", "SELECT count(*) FROM pgbench_history"),
                           ("accounts_rows", "SELECT count(*) FROM pgbench_accounts")):
            out[key] = int(conn.execute(query).fetchone()[0])
        return out


def check(src: str, tgt: str, writer: TpcbWriter | None) -> dict:
    """After the cutover: the frozen source plus what the writer committed on the
    target is exactly the target; TPC-B's invariant holds on both sides."""
    a, b = sums(src), sums(tgt)
    problems = []
    for side, v in (("source", a), ("target", b)):
        if not v["accounts"] == v["tellers"] == v["branches"] == v["history_delta"]:
            problems.append(f"{side}: TPC-B invariant broken {v}")
    extra_rows = writer.on_target_commits if writer else 0
    extra_delta = writer.on_target_delta if writer else 0
    if b["history_rows"] - a["history_rows"] != extra_rows:
        problems.append(f"history rows: target {b['history_rows']} - source {a['history_rows']} != {extra_rows} "
                        "committed on the target")
    if b["history_delta"] - a["history_delta"] != extra_delta:
        problems.append(f"history delta: target - source = {b['history_delta'] - a['history_delta']} != "
                        f"{extra_delta} committed on the target")
    if a["accounts_rows"] != b["accounts_rows"]:
        problems.append(f"accounts rows: source {a['accounts_rows']} target {b['accounts_rows']}")
    return {"ok": not problems, "problems": problems, "source": a, "target": b,
            "on_target_commits": extra_rows}


# --- pgbench's own load (the apply-rate scenario) -------------------------------------------------

_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def parse_pgbench(output: str) -> dict:
    """tps (the first 'tps =' line), processed and failed transactions of pgbench's report."""
    tps = _TPS.search(output)
    processed = _PROCESSED.search(output)
    failed = _FAILED.search(output)
    return {"tps": float(tps.group(1)) if tps else None,
            "processed": int(processed.group(1)) if processed else None,
            "failed": int(failed.group(1)) if failed else 0}


def run_pgbench(uri: str, rate: int, seconds: int, clients: int = 8, jobs: int = 2) -> subprocess.Popen:
    """The built-in TPC-B script (`pgbench -b tpcb-like`), rate-limited, no vacuum."""
    return subprocess.Popen([PGBENCH, "-n", "-b", "tpcb-like", "-c", str(clients), "-j", str(jobs), "-R", str(rate),
                             "-T", str(seconds), uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_quiet(uri: str, timeout: float = 30) -> None:
    """No application transaction left open (a stopped writer's last one)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(uri, autocommit=True) as conn:
        while time.monotonic() < deadline:
            n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state <> 'idle'",
                             (workload.APP_ROLE,)).fetchone()[0]
            if not n:
                return
            time.sleep(0.1)
