"""`db-upgrade rehearse`: the whole upgrade on throwaway servers, with a report.

Source PostgreSQL 15 and target 17 (local.servers.Pair), the sample database,
an application writing through its own role the whole time, then `run` with
automatic approval: the same WorkflowTemplate and steps as a cluster. The
application moves to the target at the cutover's switch:

- `--switch restart` (default): it reconnects to the target, as restarted
  deployments would; its writes are refused from the freeze until then;
- `--switch pgbouncer`: it writes through a real PgBouncer all along, which
  the cutover PAUSEs, repoints and RESUMEs; it sees a stall, not an error.

Write-downtime is what the application sees: its first refused write until it
can write again (restart), or its longest stalled write (pgbouncer). The
report also gives the same window as a cluster would make it (the runner's
per-transition model) and the cutover's own measurement. The servers are
removed at the end, also on failure and Ctrl-C (unless --keep).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from steps.pg import pretty_bytes

DATABASE = "shop"
SWITCHES = ("restart", "pgbouncer")
ENGINES = ("native", "pgcopydb-follow")


def _log(console, message: str) -> None:
    console.print(f"{time.strftime('%H:%M:%S', time.gmtime())} rehearse: {message}", markup=False, highlight=False)


def _database(server_uri: str, name: str) -> str:
    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(**{**conninfo_to_dict(server_uri), "dbname": name})


def _remove_half_started(base: Path) -> None:
    """Ctrl-C during Pair.start: stop whichever server had started, then remove the files."""
    from local.servers import PgServer

    # Twice: an initdb or pg_ctl interrupted with us may still be finishing its files.
    for _ in range(2):
        for version, sub in ((15, "source"), (17, "target")):
            PgServer(version, base / sub).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
        time.sleep(1)


def _output(workdir: Path | None, task: str, name: str) -> str | None:
    if workdir is None:
        return None
    try:
        return (workdir / "local-run" / "outputs" / task / name).read_text().strip() or None
    except OSError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def build_report(*, size: str, engine: str, switch: str, db_bytes: int | None, run_report: dict, timings: dict,
                 result, stats, write_rate: float, slots_left: int | None, cutover_seconds: float | None,
                 error: str | None = None) -> dict:
    downtime = None
    if stats is not None:
        if switch == "pgbouncer":
            downtime = round(stats.max_write_stall_seconds, 2) if stats.ok else None
        elif stats.first_refused_at and stats.first_ok_on_target_at:
            downtime = round(stats.first_ok_on_target_at - stats.first_refused_at, 2)
    cluster = result.modelled_window_seconds(downtime) if result is not None and downtime is not None else None
    report = {
        "status": result.status if result else "Failed",
        "error": error,
        "size": size,
        "engine": engine,
        "switch": switch,
        "database_size_bytes": db_bytes,
        "initial_copy_seconds": run_report.get("copy_seconds"),
        "copy_throughput_bytes_per_second": run_report.get("copy_rate_bytes_per_second"),
        "catch_up_seconds": run_report.get("catchup_seconds"),
        "lag_at_catchup_bytes": run_report.get("lag_at_catchup_bytes"),
        "cutover_parts_seconds": timings,
        # The application's view, and the same window as a cluster would make it.
        "write_downtime_seconds": downtime,
        "write_downtime_cluster_seconds": cluster,
        "writes_frozen_seconds": cutover_seconds,  # the cutover's own: freeze committed -> switch done
        "application_failed_transactions": stats.failed_transactions if stats else None,
        "max_write_stall_seconds": round(stats.max_write_stall_seconds, 3) if stats else None,
        "writes": {
            "rate_per_second": write_rate,
            "ok": stats.ok if stats else 0,
            "refused": stats.refused if stats else 0,
            "first_refused_at": stats.first_refused_at if stats else None,
            "first_ok_on_target_at": stats.first_ok_on_target_at if stats else None,
            "sample_errors": (stats.errors[:3] if stats else []),
        },
        "verification": {"ok": run_report.get("verify_ok"), "summary": run_report.get("verify_summary"),
                         "seconds": run_report.get("verify_seconds")},
        "leftover_slots": slots_left,
        "tasks": {n.name: n.phase for nodes in ((result.nodes, result.exit_nodes) if result else ())
                  for n in nodes.values()},
        "run": run_report,
    }
    ok_switch = (downtime is not None or write_rate == 0)
    # With a rollback the application ends on the source again: its last switch is back.
    if switch == "pgbouncer" and stats is not None and write_rate > 0:
        ok_switch = ok_switch and stats.failed_transactions == 0
    report["ok"] = bool(report["status"] == "Succeeded" and not error and run_report.get("verify_ok") is True
                        and slots_left == 0 and ok_switch)
    return report


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


def print_report(console, report: dict) -> None:
    from rich.table import Table

    t = Table(title=f"db-upgrade rehearsal ({report['size']}, {report['engine']} engine, switch "
                    f"{report['switch']}): {'OK' if report['ok'] else 'FAILED'}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    tp = report["copy_throughput_bytes_per_second"]
    v = report["verification"]
    parts = report["cutover_parts_seconds"] or {}
    rows = [
        ("status", report["status"] + (f": {report['error']}" if report["error"] else "")),
        ("database size", pretty_bytes(report["database_size_bytes"]) if report["database_size_bytes"] else "-"),
        ("initial copy", _seconds(report["initial_copy_seconds"])),
        ("copy throughput", f"{pretty_bytes(tp)}/s" if tp else "-"),
        ("catch-up (copy done -> caught up)", _seconds(report["catch_up_seconds"])),
        ("lag at catch-up", pretty_bytes(report["lag_at_catchup_bytes"])
         if report["lag_at_catchup_bytes"] is not None else "-"),
        *((f"cutover: {k}", _seconds(v_)) for k, v_ in parts.items()),
        ("write-downtime (as the application saw it)", _seconds(report["write_downtime_seconds"])),
        ("write-downtime in a cluster (modelled)", _seconds(report["write_downtime_cluster_seconds"])),
        ("writes frozen (the cutover's measure)", _seconds(report["writes_frozen_seconds"])),
        ("application writes ok / refused attempts", f"{report['writes']['ok']} / {report['writes']['refused']}"),
        ("application failed transactions", str(report["application_failed_transactions"])),
        ("max write stall", _seconds(report["max_write_stall_seconds"])),
        ("verification", "-" if v["ok"] is None else f"{'OK' if v['ok'] else 'FAILED'}: {v['summary']}"),
        ("replication slots left on the source", "-" if report["leftover_slots"] is None
         else str(report["leftover_slots"])),
    ]
    rb = report.get("rollback")
    if "rollback" in report:
        rows.append(("rollback", "-" if not rb else
                     f"{rb.get('status')}: {rb.get('verification')}; {rb.get('writes_after_cutover')} writes made on "
                     f"the new database came back; downtime {_seconds(rb.get('write_downtime_seconds'))}"))
    for name, value in rows:
        t.add_row(name, value)
    console.print(t)


ROLLBACK_AFTER = 5.0  # seconds the application writes on the new database before the rollback


def rehearse(*, size: str = "small", write_rate: float = 50, report_path: Path | None = None, keep: bool = False,
             verbose: bool = False, engine: str = "native", switch: str = "restart",
             transition_seconds: float | None = None, rollback: bool = False) -> int:
    from rich.console import Console

    from local import workload
    from local.runner import DEFAULT_TRANSITION_SECONDS, EXIT_INTERRUPTED, execute, load_template
    from local.servers import Pair

    console = Console(stderr=True)
    out = Console()
    pair = writer = result = stats = bouncer = None
    db_bytes = slots_left = None
    error = None
    interrupted = False
    workdir = base = None
    try:
        _log(console, "starting throwaway PostgreSQL 15 (source) and 17 (target)")
        base = Path(tempfile.mkdtemp(prefix="db-upgrade-rehearse-"))
        pair = Pair.start(base)
        workdir = pair.base / "work"
        src = _database(pair.source.uri(), DATABASE)
        tgt = _database(pair.target.uri(), DATABASE)
        workload.ensure_app_role(pair.target.uri())  # the application's role exists on both, as in production
        _log(console, f"loading the {size} sample into the source")
        workload.load_sample(src, size)
        with psycopg.connect(src) as conn:
            db_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        readonly, unfreeze = workload.freeze_sql_files(pair.base / "sql")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
        env.update(DB_UPGRADE_ENGINE=engine, DB_UPGRADE_APP_ROLES=workload.APP_ROLE,
                   DB_UPGRADE_POLL_INTERVAL="0.5", DB_UPGRADE_TABLE_JOBS="2", DB_UPGRADE_INDEX_JOBS="2")
        if rollback:
            env.update(DB_UPGRADE_BACKOUT="true")
        on_switch = None
        if switch == "pgbouncer":
            from local.pgbouncer import PgBouncer
            from steps.switch.settings import TargetEntry

            bouncer = PgBouncer(databases={DATABASE: TargetEntry.from_uri(src)},
                                users={workload.APP_ROLE: workload.APP_PASSWORD}).start()
            app = bouncer.uri(DATABASE, workload.APP_ROLE, workload.APP_PASSWORD)
            env.update(bouncer.switch_env(DATABASE, TargetEntry.from_uri(tgt)))
            _log(console, f"PgBouncer on 127.0.0.1:{bouncer.port} in front of the source: the application "
                          "connects through it")
        else:
            app = workload.app_uri(src)
            target_app = workload.app_uri(tgt)

            def on_switch(task: str) -> None:
                # The cutover's switch: the application now connects to the new database; the
                # rollback's: back to the old one.
                back = task == "rollback"
                if writer is not None:
                    writer.switch_to(app if back else target_app)
                _log(console, f"application switched to the {'source (the rollback' if back else 'target (the cutover'}'s "
                              "switch)")
        if write_rate > 0:
            _log(console, f"application writing {write_rate:g}/s to the source through its own role")
            writer = workload.Writer(app, rate=write_rate, threads=2, pooled=switch == "pgbouncer").start()
            time.sleep(1)
        answers = {}
        if rollback:
            def roll_back(_lag: str) -> str:
                _log(console, f"the back-out window is open: the application writes on the new database for "
                              f"{ROLLBACK_AFTER:g}s, then the rehearsal rolls back")
                time.sleep(ROLLBACK_AFTER)
                return "rollback"

            answers["backout"] = roll_back
        result = execute(load_template(), console=console, approve="auto", verbose=verbose,
                         source=src, target=tgt, workdir=workdir, readonly_sql=readonly, suspend_answers=answers,
                         unfreeze_sql=unfreeze, on_restart=on_switch, base_env=env,
                         transition_seconds=DEFAULT_TRANSITION_SECONDS if transition_seconds is None
                         else transition_seconds)
        interrupted = result.interrupted
        if writer is not None and not interrupted:
            deadline = time.monotonic() + 10  # let the application land a few writes on the target
            while (time.monotonic() < deadline and switch != "pgbouncer"
                   and writer.stats.first_ok_on_target_at is None):
                time.sleep(0.1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
        error = "interrupted (Ctrl-C)"
    except Exception as exc:  # the report still gets written, the servers still removed
        from steps.pg import scrub

        error = scrub(f"{type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        # Another Ctrl-C here would leave the servers running: finish removing them first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if writer is not None:
            stats = writer.stop()
        if bouncer is not None:
            bouncer.cleanup()
        if pair is None and base is not None:
            _remove_half_started(base)
            _log(console, "servers stopped and removed")
        if pair is not None:
            try:
                with psycopg.connect(pair.source.uri(DATABASE), connect_timeout=5) as conn:
                    slots_left = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0]
            except psycopg.Error:
                pass
            logs = workdir / "local-run" / "logs" if workdir is not None else None
            if logs is not None and (error or result is None or result.status != "Succeeded") and logs.is_dir() \
                    and not keep:
                # The servers go, the evidence stays: each step's full log, pgcopydb's included.
                kept = Path(tempfile.mkdtemp(prefix="db-upgrade-rehearse-logs-"))
                shutil.copytree(logs, kept, dirs_exist_ok=True)
                _log(console, f"the run failed: step logs kept in {kept}")
            run_report = json.loads(_output(workdir, "report", "report") or "{}")
            timings = json.loads(_output(workdir, "cutover", "timings") or "{}")
            cutover_seconds = _float(_output(workdir, "cutover", "write-downtime-seconds"))
            rolled = json.loads(_output(workdir, "rollback", "rollback") or "null")
            if keep:
                _log(console, f"servers stopped; their files are kept in {pair.base}")
                pair.stop()
            else:
                pair.cleanup()
                _log(console, "servers stopped and removed")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted and error is None:
        error = "interrupted (Ctrl-C)"
    rolled = rolled if pair is not None else None
    report = build_report(size=size, engine=engine, switch=switch, db_bytes=db_bytes,
                          run_report=run_report if pair is not None else {},
                          timings=timings if pair is not None else {}, result=result, stats=stats,
                          write_rate=write_rate, slots_left=slots_left,
                          cutover_seconds=cutover_seconds if pair is not None else None, error=error)
    if rollback:
        report["rollback"] = rolled
        report["ok"] = report["ok"] and bool(rolled) and rolled.get("status") == "rolled back"
    if report_path is not None:  # before printing: a closed terminal must not lose it
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    print_report(out, report)
    if report_path is not None:
        _log(console, f"report written to {report_path}")
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if report["ok"] else 1
