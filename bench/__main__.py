"""`python -m bench`: measure the upgrade on this machine.

  python -m bench --quick                       # smoke run: 100MB, 1 run, all scenarios
  python -m bench --sizes 100MB,1GB --runs 3    # medians of 3 runs
  python -m bench --only cutover --rates 100,500 --variants new,head

Scenarios (alternatives always interleaved run by run, figures are medians):
  copy     our follow step up to caught-up vs bare `pgcopydb clone` vs
           pg_dump -Fd -j N + pg_restore -j N (PostgreSQL 17 tools), no writes
  cutover  first refused write on the source -> target verified and writable,
           under the application writer at each rate; `head` is the committed
           code (git HEAD, exported to a temporary directory) for comparison
  apply    highest writer rate the follow apply keeps up with (lag bounded)
           vs native logical replication (publication/subscription 15 -> 17)
Memory (peak RSS of our step process and of pgcopydb's processes) is polled
from /proc during copy and cutover runs.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from bench import data
from local import workload
from local.servers import Pair, PgServer
from steps import pgcopydb

ROOT = Path(__file__).resolve().parents[1]
DB_UPGRADE = str(Path(sys.executable).parent / "db-upgrade")
SERVER_SETTINGS = {"max_wal_size": "'8GB'", "checkpoint_timeout": "'15min'", "maintenance_work_mem": "'256MB'",
                   "max_replication_slots": "20", "max_wal_senders": "20", "max_worker_processes": "16",
                   "max_logical_replication_workers": "8"}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


# --- processes and memory -------------------------------------------------------------------------

class Monitor:
    """Peak RSS (sum over processes) of the python step process and of pgcopydb's, by /proc polling."""

    def __init__(self, root_pid: int):
        self.root = root_pid
        self.peak_ours = 0
        self.peak_pgcopydb = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _tree(self) -> list[int]:
        """The root process and all its descendants (pgcopydb runs in a session of its own)."""
        parent = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                    parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, frontier = {self.root}, [self.root]
        while frontier:
            p = frontier.pop()
            for pid, pp in parent.items():
                if pp == p and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        return list(tree)

    def _run(self):
        while not self._stop.wait(0.2):
            ours = pgc = 0
            for pid in self._tree():
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                    rss = 0
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("VmRSS:"):
                            rss = int(line.split()[1]) * 1024
                            break
                except (OSError, ProcessLookupError, ValueError):
                    continue
                first = cmd.split(" ")[0]
                if "python" in first or "db-upgrade" in first:
                    ours += rss
                elif "pgcopydb" in cmd or "bwrap" in first:
                    pgc += rss
            self.peak_ours = max(self.peak_ours, ours)
            self.peak_pgcopydb = max(self.peak_pgcopydb, pgc)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join(2)
        return {"ours_mb": round(self.peak_ours / (1 << 20), 1), "pgcopydb_mb": round(self.peak_pgcopydb / (1 << 20), 1)}


def start_pair(base: Path) -> Pair:
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    src = PgServer(15, base / "source", settings=dict(SERVER_SETTINGS)).init().start()
    tgt = PgServer(17, base / "target", settings=dict(SERVER_SETTINGS)).init().start()
    return Pair(src, tgt, base)


def step_env(src: str, tgt: str, workdir: Path, variant: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
    env.update(PGCOPYDB_SOURCE_PGURI=src, PGCOPYDB_TARGET_PGURI=tgt, DB_UPGRADE_DIR=str(workdir))
    env.update({k: str(v) for k, v in extra.items()})
    if variant == "head":
        env["PYTHONPATH"] = str(head_tree())
    return env


_HEAD = None


def head_tree() -> Path:
    """git HEAD's steps/ exported (read-only git use) for the before/after comparison."""
    global _HEAD
    if _HEAD is None:
        d = Path(tempfile.mkdtemp(prefix="db-upgrade-head-"))
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "steps", "local"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(d)], input=arch.stdout, check=True)
        _HEAD = d
    return _HEAD


def settings_for(src, tgt, workdir, sqls, slot, jobs):
    from steps.settings import load_settings

    return load_settings(source_pguri=src, target_pguri=tgt, dir=workdir, readonly_sql=sqls[0], unfreeze_sql=sqls[1],
                         lag_threshold_bytes=1024 * 1024, poll_interval=0.3, catchup_timeout=3600,
                         slot_name=slot, table_jobs=jobs[0], index_jobs=jobs[1])


def env_for(s, variant):
    return step_env(s.source(), s.target(), s.workdir(), variant, DB_UPGRADE_READONLY_SQL=s.readonly_sql,
                    DB_UPGRADE_UNFREEZE_SQL=s.unfreeze_sql, DB_UPGRADE_SLOT_NAME=s.slot_name,
                    DB_UPGRADE_LAG_THRESHOLD_BYTES=s.lag_threshold_bytes, DB_UPGRADE_POLL_INTERVAL=s.poll_interval,
                    DB_UPGRADE_TABLE_JOBS=s.table_jobs, DB_UPGRADE_INDEX_JOBS=s.index_jobs)


def prepare(pair, base, size, prefix, tag, jobs, variant="new"):
    """A source cloned from the size's template, an empty target, settings and env for one run."""
    name = f"{prefix}_{tag}"
    src = data.clone_database(pair.source.uri(), size, name)
    tgt = data.empty_database(pair.target.uri(), name)
    s = settings_for(src, tgt, base / f"work_{tag}", workload.freeze_sql_files(base / "sql"), f"s_{tag}", jobs)
    return name, src, tgt, s, env_for(s, variant), base / f"{tag}.log"


def start_follow(env, flog):
    return subprocess.Popen([DB_UPGRADE, "step", "follow"], env=env, stdout=open(flog, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_step(name: str, env: dict, logfile: Path, timeout: float = 1800) -> float:
    t0 = time.time()
    with open(logfile, "a") as f:
        proc = subprocess.run([DB_UPGRADE, "step", name], env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"step {name} failed, see {logfile}")
    return time.time() - t0


# --- scenarios ---------------------------------------------------------------------------------------

def cutover_run(pair, base, size, rate, variant, tag, jobs, keyed_only=False) -> dict:
    from steps import catchup, finish, freeze
    from steps import verify as verify_mod

    name, src, tgt, s, env, flog = prepare(pair, base, size, "c", tag, jobs, variant)
    workdir = s.workdir()
    writer = workload.Writer(workload.app_uri(src), rate=rate, threads=4 if rate > 200 else 2,
                             keyless_changes=not keyed_only).start()
    follow = start_follow(env, flog)
    mon = Monitor(follow.pid)
    out = {"size": data.pretty(size), "rate": rate, "variant": variant + (", keyed writes only" if keyed_only else "")}
    try:
        t0 = time.time()
        catchup.wait_caught_up(s)
        out["copy_s"] = round(time.time() - t0, 2)
        if variant == "new":
            deadline = time.time() + 900
            while verify_mod.prepared(s) is None and time.time() < deadline and follow.poll() is None:
                time.sleep(0.3)
            rec = verify_mod.prepared(s)
            out["prepare_s"] = rec["seconds"] if rec else None
            catchup.wait_caught_up(s)  # the preparation competes with the apply: freeze from caught-up
        time.sleep(3)
        t_approve = time.time()
        freeze.freeze(s)  # waits first (writes allowed) for a low lag, then revokes writes
        t_freeze = float(json.loads((workdir / "db-upgrade-state.json").read_text())["frozen_at"])
        finish.finish(s)
        follow.wait(timeout=600)
        t_follow = time.time()
        run_step("verify", env, flog)
        t_verified = time.time()
        writer.switch_to(workload.app_uri(tgt))
        deadline = time.time() + 30
        while writer.stats.first_ok_on_target_at is None and time.time() < deadline:
            time.sleep(0.01)
        st = writer.stop()
        out.update(settle_s=round(t_freeze - t_approve, 2),
                   freeze_to_follow_exit_s=round(t_follow - t_freeze, 2),
                   freeze_to_verified_s=round(t_verified - t_freeze, 2),
                   verify_s=round(t_verified - t_follow, 2),
                   downtime_s=round(st.first_ok_on_target_at - st.first_refused_at, 2)
                   if st.first_ok_on_target_at and st.first_refused_at else None,
                   writes_ok=st.ok)
        rec = {}
        try:
            rec = json.loads((workdir / "db-upgrade-state.json").read_text())
        except (OSError, ValueError):
            pass
        out["verify_buckets"] = rec.get("verify_rechecked_buckets")
        out["verify_whole_tables"] = rec.get("verify_rechecked_tables")
    finally:
        writer.stop()
        out["memory"] = mon.stop()
        try:
            freeze.unfreeze(s, reason="bench run done")  # the role-level read-only setting is server wide
        except Exception as exc:
            log(f"bench: unfreeze: {exc}")
        if follow.poll() is None:
            follow.kill()
        try:
            run_step("cleanup", env, flog, timeout=120)
        except Exception as exc:
            log(f"bench: cleanup: {exc}")
        data.drop_database(pair.source.uri(), name)
        data.drop_database(pair.target.uri(), name)
    log(f"bench: cutover {out}")
    return out


def copy_run(pair, base, size, tool, tag, jobs) -> dict:
    from steps import catchup, finish

    name, src, tgt, s, env, flog = prepare(pair, base, size, "p", tag, jobs)
    workdir = s.workdir()
    out = {"size": data.pretty(size), "tool": tool}
    try:
        if tool == "ours":
            follow = start_follow(env, flog)
            mon = Monitor(follow.pid)
            t0 = time.time()
            catchup.wait_caught_up(s)
            out["seconds"] = round(time.time() - t0, 2)
            finish.finish(s)
            follow.wait(timeout=600)
            out["memory"] = mon.stop()
            run_step("cleanup", env, flog, timeout=120)
        elif tool == "pgcopydb --follow":
            # What start.sh ran: clone --follow, timed to caught-up as wait-caught-up
            # decides it (copy done, target origin within the threshold), read
            # straight from pgcopydb's catalog and the servers; no step process.
            argv = pgcopydb.locate(workdir).argv(
                "clone", "--follow", "--dir", str(workdir), "--plugin", "test_decoding", "--slot-name", s.slot_name,
                "--origin", s.slot_name, "--table-jobs", str(jobs[0]), "--index-jobs", str(jobs[1]))
            t0 = time.time()
            p = subprocess.Popen(argv, env=env, stdout=open(flog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
            mon = Monitor(p.pid)
            with psycopg.connect(src, autocommit=True) as sc, psycopg.connect(tgt, autocommit=True) as tc:
                while p.poll() is None:
                    if _bare_apply_enabled(workdir) and 0 <= _lag(sc, tc, s.slot_name) <= s.lag_threshold_bytes:
                        break
                    time.sleep(0.05)
            out["seconds"] = round(time.time() - t0, 2)
            out["memory"] = mon.stop()
            from steps.follow import signal_session

            signal_session(p.pid, 15)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                signal_session(p.pid, 9)
                p.wait(timeout=30)
            run_step("cleanup", env, flog, timeout=120)
        elif tool.startswith("pgcopydb"):
            j = jobs if tool == "pgcopydb" else tuple(int(x) for x in tool.split("@")[1].split(","))
            tool_ = pgcopydb.locate(workdir)
            argv = tool_.argv("clone", "--dir", str(workdir), "--table-jobs", str(j[0]), "--index-jobs", str(j[1]))
            t0 = time.time()
            p = subprocess.Popen(argv, env=env, stdout=open(flog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
            mon = Monitor(p.pid)
            rc = p.wait()
            out["seconds"] = round(time.time() - t0, 2)
            out["memory"] = mon.stop()
            if rc != 0:
                raise RuntimeError(f"pgcopydb clone failed, see {flog}")
        else:
            root = pgcopydb.rootfs()
            dumpdir = base / f"dump_{tag}"
            prefix = ["bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev", "--bind", str(base), str(base)]
            binp = "/usr/lib/postgresql/17/bin"
            t0 = time.time()
            with open(flog, "w") as f:
                subprocess.run([*prefix, f"{binp}/pg_dump", "-Fd", "-j", str(jobs[0]), "-f", str(dumpdir), "-d", src],
                               check=True, stdout=f, stderr=subprocess.STDOUT)
                subprocess.run([*prefix, f"{binp}/pg_restore", "-j", str(jobs[0]), "-d", tgt, str(dumpdir)],
                               check=True, stdout=f, stderr=subprocess.STDOUT)
            out["seconds"] = round(time.time() - t0, 2)
            subprocess.run(["rm", "-rf", str(dumpdir)])
    finally:
        data.drop_database(pair.source.uri(), name)
        data.drop_database(pair.target.uri(), name)
    log(f"bench: copy {out}")
    return out


def _bare_apply_enabled(workdir: Path) -> bool:
    import sqlite3

    try:
        conn = pgcopydb.read_catalog(workdir)
        try:
            row = conn.execute("SELECT apply FROM sentinel WHERE id = 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return bool(row) and str(row[0]).lower() in ("1", "true")


def _lag(src_conn, tgt_conn, origin: str) -> int:
    from steps.pg import lsn, origin_progress

    cur = lsn(src_conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
    applied = origin_progress(tgt_conn, origin)
    return max(0, cur - applied) if applied else -1


PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
# One application transaction: 3 row changes in 3 tables (insert, update, insert).
PGBENCH_SCRIPT = """\\set r random(1, 1000)
BEGIN;
INSERT INTO shop.orders (customer_id, amount) VALUES (:r, :r);
UPDATE shop.orders SET status = 'paid', amount = amount + 1 WHERE id = :r * 37;
INSERT INTO shop.events (at, kind, payload) VALUES (now(), 'live', '{"r": 1}');
END;
"""


def apply_run(pair, base, size, kind, rates, tag, jobs, seconds=20) -> dict:
    """Rates the apply keeps up with: after `seconds` of pgbench at a rate, the lag is under 8 MB."""
    from steps import catchup, finish

    name, src, tgt, s, env, flog = prepare(pair, base, size, "a", tag, jobs)
    workdir = s.workdir()
    out = {"size": data.pretty(size), "kind": kind, "steps": []}
    follow = None
    try:
        if kind == "pgcopydb":
            follow = start_follow(env, flog)
            catchup.wait_caught_up(s)
            origin = s.slot_name
        else:
            root = pgcopydb.rootfs()
            prefix = ["bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev"]
            schema = subprocess.run([*prefix, "/usr/lib/postgresql/17/bin/pg_dump", "-s", "-d", src],
                                    check=True, capture_output=True, text=True).stdout
            subprocess.run([*prefix, "/usr/lib/postgresql/17/bin/psql", "-q", "-d", tgt], input=schema, text=True,
                           check=True, capture_output=True)
            with psycopg.connect(src, autocommit=True) as c:
                c.execute("CREATE PUBLICATION bench_pub FOR ALL TABLES")
            with psycopg.connect(tgt, autocommit=True) as c:
                c.execute(f"CREATE SUBSCRIPTION bench_sub CONNECTION '{src}' PUBLICATION bench_pub")
                subid = c.execute("SELECT oid FROM pg_subscription WHERE subname = 'bench_sub'").fetchone()[0]
                origin = f"pg_{subid}"
                while c.execute("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'").fetchone()[0]:
                    time.sleep(0.5)
        script = base / "load.sql"
        script.write_text(PGBENCH_SCRIPT)
        with psycopg.connect(src, autocommit=True) as sc, psycopg.connect(tgt, autocommit=True) as tc:
            for rate in rates:
                t0 = time.time()
                pb = subprocess.run([PGBENCH, "-n", "-f", str(script), "-c", "8", "-j", "2", "-R", str(rate),
                                     "-T", str(seconds), workload.app_uri(src)], capture_output=True, text=True)
                lag = _lag(sc, tc, origin)
                m = re.search(r"tps = ([0-9.]+)", pb.stdout)
                achieved = float(m.group(1)) if m else 0.0
                kept = 0 <= lag < 8 * 1024 * 1024
                out["steps"].append({"rate": rate, "achieved": round(achieved), "lag_mb": round(lag / (1 << 20), 2),
                                     "kept_up": kept})
                log(f"bench: apply {kind} rate {rate}: achieved {achieved:.0f} tx/s, lag {lag / (1 << 20):.1f} MB")
                deadline = time.time() + 120
                while _lag(sc, tc, origin) > 1024 * 1024 and time.time() < deadline:
                    time.sleep(0.5)
                if not kept:
                    break
        good = [st["achieved"] for st in out["steps"] if st["kept_up"]]
        out["max_sustained"] = max(good) if good else 0
    finally:
        if kind == "pgcopydb" and follow is not None:
            try:
                finish.finish(s)
                follow.wait(timeout=120)
            except Exception:
                follow.kill()
            try:
                run_step("cleanup", env, flog, timeout=120)
            except Exception:
                pass
        elif kind == "native":
            try:
                with psycopg.connect(tgt, autocommit=True) as c:
                    c.execute("DROP SUBSCRIPTION IF EXISTS bench_sub")
            except psycopg.Error:
                pass
        data.drop_database(pair.source.uri(), name)
        data.drop_database(pair.target.uri(), name)
    log(f"bench: apply {out}")
    return out


# --- report ---------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) // 1024
    except (OSError, StopIteration):
        mem = 0
    return {"nproc": os.cpu_count(), "memory_mb": mem, "cpu": cpu, "kernel": platform.release()}


def summarize(results: dict) -> list[str]:
    lines = []
    copy = results.get("copy", [])
    if copy:
        lines += ["", "Initial copy (no writes), seconds, median", "| size | ours (follow step to caught-up) | bare pgcopydb clone --follow to caught-up | bare pgcopydb clone | pg_dump -Fd -j + pg_restore -j | ours / bare clone --follow | ours / bare clone | bare pgcopydb, other jobs (table,index) | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for size in dict.fromkeys(r["size"] for r in copy):
            tools = list(dict.fromkeys(r["tool"] for r in copy))
            m = {t: median([r["seconds"] for r in copy if r["size"] == size and r["tool"] == t]) for t in tools}
            ratio = round(m["ours"] / m["pgcopydb"], 2) if m.get("ours") and m.get("pgcopydb") else None
            fol = m.get("pgcopydb --follow")
            ratio_f = round(m["ours"] / fol, 2) if m.get("ours") and fol else None
            alt = "; ".join(f"{t}: {m[t]}" for t in tools if "@" in t)
            n = len([r for r in copy if r["size"] == size and r["tool"] == "ours"])
            lines.append(f"| {size} | {m.get('ours')} | {fol} | {m.get('pgcopydb')} | {m.get('dump')} | {ratio_f} | {ratio} | "
                         f"{alt} | {n} |")
    cut = results.get("cutover", [])
    if cut:
        lines += ["", "Cutover, seconds, median (n runs)",
                  "| size | writes/s | variant | first refused write -> target verified+writable | freeze -> follow exit | freeze -> verified | of which verify step | key ranges re-checked | prepare (before freeze) | settle before freeze (writes allowed) | runs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        keys = dict.fromkeys((r["size"], r["rate"], r["variant"]) for r in cut)
        for size, rate, variant in keys:
            rs = [r for r in cut if (r["size"], r["rate"], r["variant"]) == (size, rate, variant)]
            lines.append(f"| {size} | {rate} | {variant} | {median([r.get('downtime_s') for r in rs])} | "
                         f"{median([r.get('freeze_to_follow_exit_s') for r in rs])} | "
                         f"{median([r.get('freeze_to_verified_s') for r in rs])} | {median([r.get('verify_s') for r in rs])} | "
                         f"{median([r.get('verify_buckets') for r in rs])} | {median([r.get('prepare_s') for r in rs])} | "
                         f"{median([r.get('settle_s') for r in rs])} | {len(rs)} |")
    mem = [(r["size"], "copy " + r["tool"], r["memory"]) for r in copy if r.get("memory")]
    mem += [(r["size"], f"follow+cutover {r['variant']}", r["memory"]) for r in cut if r.get("memory")]
    if mem:
        lines += ["", "Peak RSS, MB, median", "| size | phase | our step process | pgcopydb processes (sum) |", "|---|---|---|---|"]
        for size, phase in dict.fromkeys((m[0], m[1]) for m in mem):
            ms = [m[2] for m in mem if (m[0], m[1]) == (size, phase)]
            lines.append(f"| {size} | {phase} | {median([m['ours_mb'] for m in ms])} | {median([m['pgcopydb_mb'] for m in ms])} |")
    ap = results.get("apply", [])
    if ap:
        lines += ["", "Apply throughput (pgbench transactions/s of 3 row changes kept up with: lag < 8 MB after 20 s), median",
                  "| size | pgcopydb follow | native logical replication | steps |", "|---|---|---|---|"]
        for size in dict.fromkeys(r["size"] for r in ap):
            m = {k: median([r["max_sustained"] for r in ap if r["size"] == size and r["kind"] == k]) for k in ("pgcopydb", "native")}
            detail = "; ".join(f"{r['kind']}: " + ", ".join(f"{st['rate']}->{st['achieved']}/s lag {st['lag_mb']}MB"
                                                            for st in r["steps"]) for r in ap if r["size"] == size)
            lines.append(f"| {size} | {m['pgcopydb']} | {m['native']} | {detail} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100MB,1GB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rates", default="100,500")
    ap.add_argument("--apply-rates", default="1000,1500,2000,3000,4000")
    ap.add_argument("--variants", default="new,head", help="cutover variants: new (this tree), head (git HEAD)")
    ap.add_argument("--only", default="copy,cutover,apply")
    ap.add_argument("--jobs", default="4,4", help="pgcopydb table,index jobs")
    ap.add_argument("--alt-jobs", default="", help="also bare pgcopydb with these table,index jobs (;-separated)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 100MB, 1 run, rate 100")
    ap.add_argument("--keyed-only", action="store_true",
                    help="cutover writer: no UPDATE/DELETE on the table without a primary key (inserts only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--base", default=None, help="directory for the servers (default: a new temp dir)")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.runs, a.rates, a.apply_rates = "100MB", 1, "100", "500,2000"
    sizes = [data.parse_size(x) for x in a.sizes.split(",")]
    rates = [int(x) for x in a.rates.split(",")]
    jobs = tuple(int(x) for x in a.jobs.split(","))
    only = set(a.only.split(","))
    base = Path(a.base or tempfile.mkdtemp(prefix="db-upgrade-bench-"))
    pair = start_pair(base)
    results = {"machine": machine(), "args": vars(a), "copy": [], "cutover": [], "apply": []}
    n = 0
    try:
        workload.ensure_app_role(pair.target.uri())
        for size in sizes:
            data.ensure_template(pair.source.uri(), size, log=log)
            for run in range(a.runs):
                if "copy" in only:
                    tools = ("ours", "pgcopydb --follow", "pgcopydb", "dump") + tuple(f"pgcopydb@{x}" for x in a.alt_jobs.split(";") if x)
                    # Rotate who goes first: the first run of a round meets the
                    # template's fresh writes (checkpoint, cold cache) the others don't.
                    tools = tools[run % len(tools):] + tools[:run % len(tools)]
                    for tool in tools:
                        n += 1
                        results["copy"].append(copy_run(pair, base, size, tool, f"{n}", jobs))
                if "cutover" in only:
                    for rate in rates:
                        for variant in a.variants.split(","):
                            n += 1
                            results["cutover"].append(cutover_run(pair, base, size, rate, variant, f"{n}", jobs,
                                                                  keyed_only=a.keyed_only))
                Path(a.out).write_text(json.dumps(results, indent=1))
        if "apply" in only:
            ar = [int(x) for x in a.apply_rates.split(",")]
            for run in range(max(1, min(a.runs, 2))):
                for kind in ("pgcopydb", "native"):
                    n += 1
                    results["apply"].append(apply_run(pair, base, sizes[0], kind, ar, f"{n}", jobs))
    finally:
        results["table"] = summarize(results)
        Path(a.out).write_text(json.dumps(results, indent=1))
        pair.stop()  # logs stay in the base dir; the data directories go
        import shutil

        for d in ("source", "target"):
            shutil.rmtree(base / d, ignore_errors=True)
    m = results["machine"]
    print(f"machine: {m['nproc']} cpus, {m['memory_mb']} MB, {m['cpu']}")
    print("\n".join(results["table"]))


if __name__ == "__main__":
    main()
