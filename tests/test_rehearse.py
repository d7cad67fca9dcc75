"""`db-upgrade rehearse`: the whole upgrade on throwaway servers, ending with a report."""

import json
import subprocess

import pytest

from tests.conftest import DB_UPGRADE


@pytest.mark.slow
def test_rehearse_tiny_reports_a_clean_upgrade(tmp_path):
    report_file = tmp_path / "r.json"
    proc = subprocess.run([DB_UPGRADE, "rehearse", "--size", "tiny", "--report", str(report_file)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    r = json.loads(report_file.read_text())
    assert r["ok"] is True and r["status"] == "Succeeded" and r["engine"] == "native", r
    assert r["verification"]["ok"] is True and "verified: 5 tables" in r["verification"]["summary"]
    assert r["leftover_slots"] == 0
    # Measured as the application saw it: refused on the source, then written on the target ...
    w = r["writes"]
    assert r["write_downtime_seconds"] is not None and r["write_downtime_seconds"] > 0
    assert w["first_refused_at"] < w["first_ok_on_target_at"]
    assert w["ok"] > 0 and w["refused"] > 0
    # ... close to the cutover's own measure (the application's first write on the target
    # does not wait for anything after the switch), and the same in a cluster: one pod.
    assert r["write_downtime_seconds"] <= r["writes_frozen_seconds"] + 1.0, r
    assert abs(r["write_downtime_cluster_seconds"] - r["write_downtime_seconds"]) <= 1.5
    assert r["database_size_bytes"] > 0 and r["initial_copy_seconds"] is not None
    assert r["catch_up_seconds"] is not None and r["lag_at_catchup_bytes"] is not None
    assert {"end_position", "drain", "sequences", "verify"} <= set(r["cutover_parts_seconds"])
    assert r["tasks"]["cutover"] == "Succeeded" and r["tasks"]["approve"] == "Skipped"
    assert r["tasks"]["verify-prepare"] == "Succeeded" and r["tasks"]["report"] == "Succeeded"
    # The report table is on stdout; the servers are gone.
    assert "write-downtime" in proc.stdout and "replication slots left" in proc.stdout
    assert "servers stopped and removed" in proc.stderr


def test_rehearse_bad_size_is_one_line():
    proc = subprocess.run([DB_UPGRADE, "rehearse", "--size", "huge"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --size must be one of tiny, small, medium, large, not 'huge'"
