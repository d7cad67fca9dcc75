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
    assert r["ok"] is True and r["status"] == "Succeeded", r
    assert r["verification"]["ok"] is True
    assert len(r["verification"]["tables"]) == 5 and all(t["match"] for t in r["verification"]["tables"])
    assert r["leftover_slots"] == 0
    # Measured as the application saw it: refused on the source, then written on the target.
    w = r["writes"]
    assert r["write_downtime_seconds"] is not None and r["write_downtime_seconds"] > 0
    assert w["first_refused_at"] < w["first_ok_on_target_at"]
    assert w["ok"] > 0 and w["refused"] > 0
    assert r["database_size_bytes"] > 0 and r["initial_copy_seconds"] is not None
    assert r["lag_at_approval_bytes"] is not None
    for key in ("follow_started_at", "copy_done_at", "caught_up_at", "frozen_at", "endpos_set_at",
                "follow_done_at", "verified_at"):
        assert r["timings"][key], key
    assert r["tasks"]["restart"] == "Succeeded" and r["tasks"]["approve"] == "Skipped"
    # The report table is on stdout; the servers are gone.
    assert "write-downtime" in proc.stdout and "replication slots left" in proc.stdout
    assert "servers stopped and removed" in proc.stderr


def test_rehearse_bad_size_is_one_line():
    proc = subprocess.run([DB_UPGRADE, "rehearse", "--size", "huge"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --size must be one of tiny, small, medium, large, not 'huge'"
