"""`python -m bench`: measure the upgrade on this machine, both engines side by side.

  python -m bench --quick                  # smoke: 100MB, 1 run of each cell at 100 writes/s, cutover at catch-up
  python -m bench                          # 1GB: copy, apply rate, the cutover matrix (docs/performance.md)
  python -m bench --only cutover --sizes 5GB --cells native/tpcb/5GB/500/120x3 --out bench/results-5gb.json
  python -m bench --report bench/results.json bench/results-5gb.json   # the tables of earlier runs

Scenarios (bench/scenarios/; alternatives interleaved run by run, figures are medians):
  copy     the follow step of each engine, start -> caught up, and bare `pgcopydb clone`; no writes
  apply    the highest pgbench TPC-B rate at which the lag stays flat, per engine
  cutover  write-downtime as the application sees it, and its parts, per engine x workload x size x
           rate x delay (seconds from the catch-up to the cutover)
Every step runs as its own process (`db-upgrade step NAME`), as in its pod; their peak memory is
recorded. Results are written after every run (--out); --resume skips the runs already there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="copy,apply,cutover", help="scenarios to run (comma-separated)")
    ap.add_argument("--sizes", default="1GB", help="database sizes (cutover matrix and copy)")
    ap.add_argument("--engines", default="native,pgcopydb-follow")
    ap.add_argument("--workloads", default="tpcb,writer", help="tpcb (pgbench TPC-B) and/or writer (local.workload)")
    ap.add_argument("--rates", default="100,500", help="application writes (transactions) per second")
    ap.add_argument("--delays", default="0,120", help="seconds from the catch-up to the cutover's start")
    ap.add_argument("--runs", type=int, default=1, help="runs per cutover cell")
    ap.add_argument("--done-when-runs", type=int, default=3,
                    help="runs for issue 13's done-when cells (native, 500 writes/s, 120 s after catch-up)")
    ap.add_argument("--cells", default="",
                    help="cutover cells instead of the matrix: engine/workload/size/rate/delay[xRUNS],...")
    ap.add_argument("--copy-runs", type=int, default=3, help="rounds of the copy scenario per size")
    ap.add_argument("--apply-size", default="1GB")
    ap.add_argument("--apply-rates", default="250,500,1000,1500,2000,3000,4000")
    ap.add_argument("--apply-runs", type=int, default=1)
    ap.add_argument("--catchup-timeout", type=float, default=900,
                    help="seconds a run waits for the catch-up before it is recorded as never caught up")
    ap.add_argument("--jobs", default="4,4", help="pgcopydb table,index jobs (the template's default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 100MB, 1 run, 100 writes/s, delay 0")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the rest")
    ap.add_argument("--base", default=None, help="directory for the servers and logs (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the servers and templates in --base for next time")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="run the tree as it is now, instead of a copy taken at the start (others edit it)")
    ap.add_argument("--templates-only", action="store_true",
                    help="only generate the template databases the plan needs (with --base --keep: for later)")
    ap.add_argument("--report", nargs="+", metavar="FILE", help="print the tables of these results files and exit")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.runs, a.done_when_runs, a.rates, a.delays, a.copy_runs = "100MB", 1, 1, "100", "0", 1
        a.apply_size, a.apply_rates = "100MB", "500,1000"
    return a


# --- the plan ----------------------------------------------------------------------------------

def cutover_cells(a, sizes: list[int]):
    """[(Cell, runs)] in run order: by size, then workload, rate, delay, with the engines adjacent."""
    from bench import data
    from bench.scenarios.cutover import Cell

    if a.cells:
        out = []
        for spec in a.cells.split(","):
            spec, _, n = spec.strip().partition("x")
            engine, wl, size, rate, delay = spec.split("/")
            out.append((Cell(engine, wl, data.parse_size(size), int(rate), int(delay)), int(n or 1)))
        return out
    out = []
    for size in sizes:
        for wl in a.workloads.split(","):
            for rate in (int(x) for x in a.rates.split(",")):
                for delay in (int(x) for x in a.delays.split(",")):
                    for engine in a.engines.split(","):
                        done_when = engine == "native" and rate == 500 and delay == 120
                        out.append((Cell(engine, wl, size, rate, delay), max(a.runs, a.done_when_runs)
                                    if done_when else a.runs))
    return out


def plan(a) -> list[tuple[str, str, dict]]:
    """[(plan id, scenario, arguments)]: sizes ascending; copy rounds rotate the tool that goes
    first; apply and cutover rounds alternate which engine goes first."""
    from bench import data
    from bench.scenarios import copy as copy_s

    only = set(a.only.split(","))
    engines = a.engines.split(",")
    cells = cutover_cells(a, [data.parse_size(x) for x in a.sizes.split(",")]) if "cutover" in only else []
    sizes = sorted({data.parse_size(x) for x in a.sizes.split(",")} | {c.size for c, _ in cells}
                   | ({data.parse_size(a.apply_size)} if "apply" in only else set()))
    steps = []
    for size in sizes:
        label = data.pretty(size)
        if "copy" in only and label in [data.pretty(data.parse_size(x)) for x in a.sizes.split(",")]:
            tools = [t for t in copy_s.TOOLS if t in engines or t == copy_s.BARE]
            for r in range(a.copy_runs):
                order = tools[r % len(tools):] + tools[:r % len(tools)]
                for tool in order:
                    steps.append((f"copy/{label}/{tool}/{r}", "copy", {"size": size, "tool": tool}))
        if "apply" in only and data.parse_size(a.apply_size) == size:
            for r in range(a.apply_runs):
                for engine in (engines if r % 2 == 0 else engines[::-1]):
                    steps.append((f"apply/{label}/{engine}/{r}", "apply", {"size": size, "engine": engine}))
        here = [(c, n) for c, n in cells if c.size == size]
        for r in range(max((n for _, n in here), default=0)):
            round_cells = [c for c, n in here if n > r]
            if r % 2:  # the other engine first in odd rounds
                round_cells = [c for pair in _engine_pairs(round_cells) for c in pair[::-1]]
            for c in round_cells:
                steps.append((f"cutover/{c.label()}/{r}", "cutover", {"cell": c}))
    return steps


def _engine_pairs(cells):
    groups: dict[tuple, list] = {}
    for c in cells:
        groups.setdefault((c.workload, c.size, c.rate, c.delay), []).append(c)
    return list(groups.values())


def templates_needed(steps) -> list[tuple[str, int]]:
    need = []
    for _pid, scenario, args in steps:
        if scenario == "copy":
            need.append(("writer", args["size"]))
        elif scenario == "apply":
            need.append(("tpcb", args["size"]))
        else:
            need.append((args["cell"].workload, args["cell"].size))
    return list(dict.fromkeys(need))


# --- running -----------------------------------------------------------------------------------

def tree_info() -> dict:
    """Which code was measured (read-only git)."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    import hashlib

    digest = hashlib.sha256()
    for f in sorted((ROOT / "steps").rglob("*.py")):
        digest.update(f.read_bytes())
    return {"head": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain", "--", "steps", "local").splitlines(),
            "steps_sha256": digest.hexdigest()[:12]}


def snapshot() -> Path:
    """A copy of the code the steps run, so that edits made by others while the bench runs
    (hours) do not change what is measured halfway."""
    d = Path(tempfile.mkdtemp(prefix="db-upgrade-bench-tree-"))
    for sub in ("steps", "local", "bench", "cli", "workflows"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__", "results*.json"))
    os.chmod(d, 0o755)
    return d


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.report:
        from bench.report import summarize

        runs = [r for f in a.report for r in json.loads(Path(f).read_text()).get("runs", [])]
        print("\n".join(summarize(runs)))
        return
    if not a.no_snapshot and not os.environ.get("DB_UPGRADE_BENCH_TREE"):
        tree = snapshot()
        env = {**os.environ, "PYTHONPATH": str(tree), "DB_UPGRADE_BENCH_TREE": str(tree),
               "DB_UPGRADE_BENCH_INFO": json.dumps(tree_info())}
        # Paths as given, from here: the re-executed bench runs in the copy.
        args = [sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv),
                "--out", str(Path(a.out).resolve())] + (["--base", str(Path(a.base).resolve())] if a.base else [])
        os.chdir(tree)
        os.execve(sys.executable, args, env)
    run(a)


def run(a) -> None:
    import psycopg
    from psycopg import sql

    from bench import report, servers
    from bench.scenarios import Context
    from bench.scenarios import apply as apply_s
    from bench.scenarios import copy as copy_s
    from bench.scenarios import cutover as cutover_s
    from bench.upgrade import log
    from bench.workloads import WORKLOADS
    from local import workload

    steps = plan(a)
    out = Path(a.out)
    results = {"runs": []}
    if a.resume and out.exists():
        results = json.loads(out.read_text())
    done = {r.get("plan_id") for r in results["runs"] if not r.get("error")}
    results["runs"] = [r for r in results["runs"] if r.get("plan_id") in done]
    results.update(machine=servers.machine(), args=vars(a),
                   tree=json.loads(os.environ.get("DB_UPGRADE_BENCH_INFO") or "null") or tree_info())
    todo = [s for s in steps if s[0] not in done]
    log(f"bench: {len(todo)} run(s) to do ({len(steps) - len(todo)} already in {out}); load average "
        f"{servers.load_average():.1f}")
    base = Path(a.base or tempfile.mkdtemp(prefix="db-upgrade-bench-"))
    pair = servers.start_pair(base)
    log(f"bench: servers in {base} (source :{pair.source.port}, target :{pair.target.port})")
    jobs = tuple(int(x) for x in a.jobs.split(","))
    ctx = Context(pair=pair, base=base, jobs=jobs, catchup_timeout=a.catchup_timeout,
                  pythonpath=os.environ.get("DB_UPGRADE_BENCH_TREE"))
    started = time.time()

    def save() -> None:
        results["table"] = report.summarize(results["runs"])
        results["bench_seconds"] = round(time.time() - started)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(out)

    try:
        servers.drop_leftovers(pair, log)
        workload.ensure_app_role(pair.source.uri())
        workload.ensure_app_role(pair.target.uri())
        with psycopg.connect(pair.target.uri(), autocommit=True) as conn:  # a killed bench's fence (kept servers)
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(workload.APP_ROLE)))
        if a.templates_only:
            for key in templates_needed(todo):
                WORKLOADS[key[0]].ensure_template(pair.source.uri(), key[1], log)
            todo = []
        for i, (pid, scenario, args) in enumerate(todo, 1):
            for key in templates_needed([(pid, scenario, args)]):
                if key not in ctx.templates:
                    ctx.templates[key] = WORKLOADS[key[0]].ensure_template(pair.source.uri(), key[1], log)
            log(f"bench: [{i}/{len(todo)}] {pid} (load average {servers.load_average():.1f})")
            tag = f"{int(time.time()) % 10_000_000}"
            if scenario == "copy":
                rec = copy_s.run(ctx, args["size"], args["tool"], tag)
            elif scenario == "apply":
                rec = apply_s.run(ctx, args["size"], args["engine"], [int(x) for x in a.apply_rates.split(",")], tag)
            else:
                rec = cutover_s.run(ctx, args["cell"], tag)
            rec["plan_id"] = pid
            rec["steps_sha256"] = results["tree"].get("steps_sha256")
            rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            results["runs"].append(rec)
            save()
    finally:
        save()
        servers.stop_pair(pair, keep=a.keep)
    m = results["machine"]
    print(f"machine: {m['nproc']} cpus, {m['memory_mb']} MB, {m['cpu']}; "
          f"bench ran {results['bench_seconds']} s")
    print("\n".join(results["table"]))


if __name__ == "__main__":
    main()
