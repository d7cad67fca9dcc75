"""The bench's pure logic: the run plan, the flat-lag test, pgbench's report,
the medians and verdicts of the tables, the process tree of the memory monitor.
No server: the measurements themselves are `python -m bench` (docs/performance.md)."""

from __future__ import annotations

from bench import report, tpcb
from bench.__main__ import parse_args, plan
from bench.memory import tree
from bench.scenarios.apply import lag_flat

MiB = 1 << 20

PGBENCH_OUTPUT = """pgbench (15.10 (Debian 15.10-0+deb12u1))
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 70
query mode: simple
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 30 s
number of transactions actually processed: 29950
number of failed transactions: 0 (0.000%)
latency average = 2.361 ms
rate limit schedule lag: avg 0.345 (max 12.130) ms
initial connection time = 40.204 ms
tps = 998.421035 (without initial connection time)
"""


def test_lag_flat_is_the_briefs_test():
    assert lag_flat(0, 7 * MiB)  # under 8 MB, whatever the start
    assert lag_flat(10 * MiB, 13 * MiB)  # grew by less than 4 MB
    assert not lag_flat(0, 9 * MiB)
    assert not lag_flat(10 * MiB, 15 * MiB)
    assert not lag_flat(None, 9 * MiB)
    assert not lag_flat(0, None)  # unknown at the end: never counted as kept up with


def test_pgbench_report_is_parsed():
    got = tpcb.parse_pgbench(PGBENCH_OUTPUT)
    assert got == {"tps": 998.421035, "processed": 29950, "failed": 0}
    assert tpcb.parse_pgbench("connection to server failed")["tps"] is None


def test_pgbench_scale_for_sizes():
    assert tpcb.scale_for(1 << 30) == 70  # the issues' "scale 70 (1 GB)"
    assert tpcb.scale_for(5 << 30) == 351
    assert tpcb.scale_for(1) == 1


def test_plan_interleaves_engines_and_repeats_the_done_when_cells():
    a = parse_args(["--only", "cutover", "--sizes", "1GB", "--workloads", "tpcb", "--rates", "500",
                    "--delays", "0,120", "--runs", "1", "--done-when-runs", "3"])
    ids = [p[0] for p in plan(a)]
    assert ids[:4] == ["cutover/native/tpcb/1GB/500/0/0", "cutover/pgcopydb-follow/tpcb/1GB/500/0/0",
                       "cutover/native/tpcb/1GB/500/120/0", "cutover/pgcopydb-follow/tpcb/1GB/500/120/0"]
    # Only native/500/120 gets rounds 1 and 2.
    assert ids[4:] == ["cutover/native/tpcb/1GB/500/120/1", "cutover/native/tpcb/1GB/500/120/2"]
    assert len(set(ids)) == len(ids)


def test_plan_odd_rounds_put_the_other_engine_first():
    a = parse_args(["--only", "cutover", "--sizes", "1GB", "--workloads", "writer", "--rates", "100",
                    "--delays", "0", "--runs", "2"])
    ids = [p[0] for p in plan(a)]
    assert ids == ["cutover/native/writer/1GB/100/0/0", "cutover/pgcopydb-follow/writer/1GB/100/0/0",
                   "cutover/pgcopydb-follow/writer/1GB/100/0/1", "cutover/native/writer/1GB/100/0/1"]


def test_plan_copy_rotates_and_cells_override_the_matrix():
    a = parse_args(["--only", "copy,cutover", "--sizes", "5GB", "--copy-runs", "2",
                    "--cells", "native/tpcb/5GB/500/120x3,native/writer/5GB/500/120"])
    ids = [p[0] for p in plan(a)]
    assert ids[:6] == ["copy/5GB/native/0", "copy/5GB/pgcopydb-follow/0", "copy/5GB/pgcopydb clone/0",
                       "copy/5GB/pgcopydb-follow/1", "copy/5GB/pgcopydb clone/1", "copy/5GB/native/1"]
    assert ids[6:] == ["cutover/native/tpcb/5GB/500/120/0", "cutover/native/writer/5GB/500/120/0",
                       "cutover/native/tpcb/5GB/500/120/1", "cutover/native/tpcb/5GB/500/120/2"]


def _cut(downtime, error=None, **kw):
    rec = {"scenario": "cutover", "engine": "native", "workload": "tpcb", "size": "1GB", "rate": 500, "delay": 120,
           "app_downtime_s": downtime, "timings": {"end_position": 0.01, "drain": 0.02, "verify": 0.3}}
    rec.update(kw)
    if error:
        rec["error"] = error
    return rec


def test_done_when_verdict_uses_the_median_of_successful_runs():
    lines = report.done_when([_cut(0.8), _cut(1.4), _cut(0.9), _cut(None, error="boom")])
    assert "median 0.90 s over 3 run(s)" in lines[1] and "met" in lines[1] and "1 failed run(s)" in lines[1]
    lines = report.done_when([_cut(1.2), _cut(1.5)])
    assert "missed by 0.35 s" in lines[1]


def test_downtime_table_has_one_row_per_cell_with_medians():
    rows = report.downtime_table([_cut(0.5), _cut(0.7), _cut(0.6), _cut(2.0, engine="pgcopydb-follow")])
    body = [r for r in rows if r.startswith("| native") or r.startswith("| pgcopydb")]
    assert len(body) == 2
    native = next(r for r in body if r.startswith("| native"))
    assert "**0.60**" in native and "0.50-0.70" in native and "3/3" in native
    assert "0.030" in native  # end position + drain


def test_memory_tree_follows_descendants_only():
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 21: 20}
    assert sorted(tree(10, parents)) == [10, 11, 12]
    assert tree(99, parents) == []


def test_a_cell_measured_again_on_newer_code_supersedes_its_older_runs():
    old = [{**_cut(2.0), "steps_sha256": "aaa", "finished_at": "2026-12-01T10:00:00Z"} for _ in range(3)]
    new = [{**_cut(0.7), "steps_sha256": "bbb", "finished_at": "2026-12-01T13:00:00Z"} for _ in range(2)]
    other = {**_cut(1.0, engine="pgcopydb-follow"), "steps_sha256": "aaa", "finished_at": "2026-12-01T09:00:00Z"}
    kept, left_out = report.latest_code(old + new + [other])
    assert left_out == 3 and kept == new + [other]  # the other cell keeps its runs on the older code
    assert "median 0.70 s over 2 run(s)" in "\n".join(report.summarize(old + new))


def test_readme_rows_name_each_done_when_cell_with_its_parts():
    runs = [{**_cut(d), "freeze_s": 0.02, "switch_s": 0.01, "app_reconnect_s": 0.05, "verify_keys_rechecked": 500}
            for d in (0.4, 0.5, 0.6)] + [_cut(None, error="boom"), _cut(None, error="lag", workload="writer")]
    rows = report.done_when_rows(runs)
    assert len(rows) == 2
    tpcb = next(r for r in rows if r.startswith("| tpcb"))
    assert "**0.50** (0.40, 0.50, 0.60, 1 failed)" in tpcb and "| 0.030 |" in tpcb and "| 0.060 |" in tpcb
    assert next(r for r in rows if r.startswith("| writer")).startswith("| writer | 1GB | never caught up")
