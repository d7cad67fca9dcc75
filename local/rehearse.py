"""`db-upgrade rehearse`: the whole upgrade on throwaway servers, with a report.

Source PostgreSQL 15 and target 17 (local.servers.Pair), the sample database,
an application writing through its own role the whole time, then `run` with
automatic approval. The application switches to the target at the restart
step, as restarted deployments would, so the write-downtime is what an
application sees: from its first refused write on the source to its first
successful write on the target. The servers are removed at the end, also on
failure and Ctrl-C (unless --keep).
"""

from __future__ import annotations

import json
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
SLOT = "pgcopydb"


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


def _span(record: dict, start: str, end: str) -> float | None:
    a, b = record.get(start), record.get(end)
    return round(b - a, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def build_report(*, size: str, db_bytes: int | None, record: dict, result, stats, write_rate: float,
                 slots_left: int | None, error: str | None = None) -> dict:
    copy_s = _span(record, "follow_started_at", "copy_done_at")
    downtime = None
    if stats and stats.first_refused_at and stats.first_ok_on_target_at:
        downtime = round(stats.first_ok_on_target_at - stats.first_refused_at, 2)
    verify = record.get("verify") or {}
    frozen_for = None
    if result is not None and "restart" in result.nodes:
        frozen_for = result.nodes["restart"].outputs.get("write-downtime-seconds") or None
    report = {
        "status": result.status if result else "Failed",
        "error": error,
        "size": size,
        "database_size_bytes": db_bytes,
        "initial_copy_seconds": copy_s,
        "copy_throughput_bytes_per_second": round(db_bytes / copy_s) if db_bytes and copy_s else None,
        "catch_up_seconds": _span(record, "copy_done_at", "caught_up_at"),
        "lag_at_approval_bytes": record.get("lag_at_approval"),
        "freeze_to_endpos_seconds": _span(record, "frozen_at", "endpos_set_at"),
        "endpos_to_follow_done_seconds": _span(record, "endpos_set_at", "follow_done_at"),
        "follow_done_to_verified_seconds": _span(record, "follow_done_at", "verified_at"),
        "write_downtime_seconds": downtime,
        "frozen_until_restart_seconds": float(frozen_for) if frozen_for else None,
        "writes": {
            "rate_per_second": write_rate,
            "ok": stats.ok if stats else 0,
            "refused": stats.refused if stats else 0,
            "first_refused_at": stats.first_refused_at if stats else None,
            "first_ok_on_target_at": stats.first_ok_on_target_at if stats else None,
            "sample_errors": (stats.errors[:3] if stats else []),
        },
        "verification": {
            "ok": verify.get("ok"),
            "tables": [{"table": t["table"], "source_rows": t["source_rows"], "target_rows": t["target_rows"],
                        "match": t["match"]} for t in verify.get("tables", [])],
        },
        "leftover_slots": slots_left,
        "timings": {k: record.get(k) for k in ("follow_started_at", "copy_done_at", "caught_up_at", "frozen_at",
                                               "endpos_set_at", "follow_done_at", "verified_at")},
        "tasks": {n.name: n.phase for nodes in ((result.nodes, result.exit_nodes) if result else ())
                  for n in nodes.values()},
    }
    report["ok"] = bool(
        report["status"] == "Succeeded" and not error and verify.get("ok") is True and slots_left == 0
        and (downtime is not None or write_rate == 0)
    )
    return report


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


def print_report(console, report: dict) -> None:
    from rich.table import Table

    t = Table(title=f"db-upgrade rehearsal ({report['size']}): {'OK' if report['ok'] else 'FAILED'}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    tp = report["copy_throughput_bytes_per_second"]
    v = report["verification"]
    rows = [
        ("status", report["status"] + (f": {report['error']}" if report["error"] else "")),
        ("database size", pretty_bytes(report["database_size_bytes"]) if report["database_size_bytes"] else "-"),
        ("initial copy", _seconds(report["initial_copy_seconds"])),
        ("copy throughput", f"{pretty_bytes(tp)}/s" if tp else "-"),
        ("catch-up (copy done -> caught up)", _seconds(report["catch_up_seconds"])),
        ("lag at approval", pretty_bytes(report["lag_at_approval_bytes"])
         if report["lag_at_approval_bytes"] is not None else "-"),
        ("freeze -> endpos set", _seconds(report["freeze_to_endpos_seconds"])),
        ("endpos -> follow done (replay)", _seconds(report["endpos_to_follow_done_seconds"])),
        ("follow done -> verified", _seconds(report["follow_done_to_verified_seconds"])),
        ("write-downtime (as the application saw it)", _seconds(report["write_downtime_seconds"])),
        ("writes frozen (freeze -> restart step)", _seconds(report["frozen_until_restart_seconds"])),
        ("application writes ok / refused attempts", f"{report['writes']['ok']} / {report['writes']['refused']}"),
        ("verification", "-" if v["ok"] is None else
         f"{'OK' if v['ok'] else 'FAILED'}: {sum(1 for x in v['tables'] if x['match'])}/{len(v['tables'])} tables match"),
        ("replication slots left on the source", "-" if report["leftover_slots"] is None
         else str(report["leftover_slots"])),
    ]
    for name, value in rows:
        t.add_row(name, value)
    console.print(t)
    if v["tables"]:
        vt = Table(title="verification per table")
        vt.add_column("table")
        vt.add_column("source rows", justify="right")
        vt.add_column("target rows", justify="right")
        vt.add_column("match")
        for row in v["tables"]:
            vt.add_row(row["table"], str(row["source_rows"]), str(row["target_rows"]), "yes" if row["match"] else "NO")
        console.print(vt)


def rehearse(*, size: str = "small", write_rate: float = 50, report_path: Path | None = None, keep: bool = False,
             verbose: bool = False) -> int:
    from rich.console import Console

    from local import workload
    from local.runner import EXIT_INTERRUPTED, execute, load_template
    from local.servers import Pair
    from steps import state

    console = Console(stderr=True)
    out = Console()
    pair = writer = result = stats = None
    db_bytes = slots_left = None
    record: dict = {}
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
        if write_rate > 0:
            _log(console, f"application writing {write_rate:g}/s to the source through its own role")
            writer = workload.Writer(workload.app_uri(src), rate=write_rate, threads=2).start()
            time.sleep(1)
        target_app = workload.app_uri(tgt)

        def restarted() -> None:
            # The restart step: the application now connects to the new database.
            if writer is not None:
                writer.switch_to(target_app)
            _log(console, "application switched to the target (the restart step)")

        result = execute(load_template(), console=console, approve="auto", verbose=verbose,
                         source=src, target=tgt, workdir=workdir, readonly_sql=readonly,
                         unfreeze_sql=unfreeze, on_restart=restarted)
        interrupted = result.interrupted
        if writer is not None and not interrupted:
            deadline = time.monotonic() + 10  # let the application land a few writes on the target
            while time.monotonic() < deadline and writer.stats.first_ok_on_target_at is None:
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
        if pair is None and base is not None:
            _remove_half_started(base)
            _log(console, "servers stopped and removed")
        if pair is not None:
            try:
                with psycopg.connect(pair.source.uri(DATABASE), connect_timeout=5) as conn:
                    slots_left = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0]
            except psycopg.Error:
                pass
            if workdir is not None:
                record = state.read(workdir)
                logs = workdir / "local-run" / "logs"
                if (error or result is None or result.status != "Succeeded") and logs.is_dir() and not keep:
                    # The servers go, the evidence stays: each step's full log, pgcopydb's included.
                    kept = Path(tempfile.mkdtemp(prefix="db-upgrade-rehearse-logs-"))
                    shutil.copytree(logs, kept, dirs_exist_ok=True)
                    _log(console, f"the run failed: step logs kept in {kept}")
            if keep:
                _log(console, f"servers stopped; their files are kept in {pair.base}")
                pair.stop()
            else:
                pair.cleanup()
                _log(console, "servers stopped and removed")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted and error is None:
        error = "interrupted (Ctrl-C)"
    report = build_report(size=size, db_bytes=db_bytes, record=record, result=result, stats=stats,
                          write_rate=write_rate, slots_left=slots_left, error=error)
    if report_path is not None:  # before printing: a closed terminal must not lose it
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    print_report(out, report)
    if report_path is not None:
        _log(console, f"report written to {report_path}")
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if report["ok"] else 1
