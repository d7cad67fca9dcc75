"""The back-out window's pure parts: its SQL, the verdicts of check(), the deadline and
the decision's timeout, the switch back's destination, the status lines, the report;
and `db-upgrade rollback | end-backout` against the fake Argo Server (no database)."""

from __future__ import annotations

import json

import pytest
import typer
from psycopg import sql

from steps.backout import plan
from steps.backout import statements as q
from steps.errors import StepError
from steps.settings import load_settings
from tests.fakes.argo import cli_invoker, served, NS, node, status, write_environment


def text(composed) -> str:
    return composed.as_string(None)


# -- SQL -----------------------------------------------------------------------------------------------


def test_names_are_the_slot_name_plus_backout_and_checked():
    assert q.name("db_upgrade") == "db_upgrade_backout"
    assert len(q.name("a" * 52)) == 60
    with pytest.raises(ValueError):
        q.name("Bad-Name")


def test_publication_lists_the_tables_and_our_barrier_never_all_tables():
    out = text(q.create_publication("db_upgrade_backout", [("shop", "customers"), ("shop", 'Audit "Log"')]))
    assert out == ('CREATE PUBLICATION "db_upgrade_backout" FOR TABLE "shop"."customers", "shop"."Audit ""Log""", '
                   '"db_upgrade"."backout_barrier"')
    assert "ALL TABLES" not in out
    # Not the forward barrier: nothing of the back-out may ride the forward publication.
    assert '"db_upgrade"."barrier"' not in out


def test_subscription_reuses_the_slot_and_copies_nothing():
    out = text(q.create_subscription("x_backout", "host=new password='it''s'", "x_backout", "x_backout"))
    assert "create_slot = false" in out and "copy_data = false" in out and "slot_name = 'x_backout'" in out
    assert "CONNECTION 'host=new password=''it''''s'''" in out
    drops = [text(s) for s in q.drop_subscription("x_backout")]
    assert drops == ['ALTER SUBSCRIPTION "x_backout" DISABLE', 'ALTER SUBSCRIPTION "x_backout" SET (slot_name = NONE)',
                     'DROP SUBSCRIPTION "x_backout"']


def test_probe_connects_without_slot_or_worker():
    out = text(q.probe_subscription("x_backout_test", "host=new"))
    assert "connect = true" in out and "enabled = false" in out and "create_slot = false" in out
    assert "slot_name = NONE" in out


def test_barrier_statements_use_our_table():
    assert text(q.insert_barrier()) == 'INSERT INTO "db_upgrade"."backout_barrier" (id) VALUES (%s)'
    assert text(q.barrier_seen()) == 'SELECT 1 FROM "db_upgrade"."backout_barrier" WHERE id = %s'
    assert "CREATE TABLE IF NOT EXISTS" in text(q.BARRIER_DDL)
    assert isinstance(q.DROP_BARRIER, sql.Composed)


# -- check(): verdicts -----------------------------------------------------------------------------------


def test_old_server_15_needs_a_superuser_for_the_subscription():
    ok, why = plan.judge_old_subscriber(15, "migrator", False, False)
    assert not ok and "only a superuser" in why and "PostgreSQL 15" in why
    assert plan.judge_old_subscriber(15, "postgres", True, False)[0]
    assert plan.judge_old_subscriber(16, "migrator", False, True)[0]
    ok, why = plan.judge_old_subscriber(16, "migrator", False, False)
    assert not ok and "pg_create_subscription" in why


def test_new_server_needs_logical_wal_a_slot_and_a_sender():
    bad = plan.judge_new_server("replica", 10, 10, 10, 10, "-1")
    assert [ok for ok, _ in bad] == [False, False, False]
    assert "wal_level = replica on the NEW server" in bad[0][1]
    good = plan.judge_new_server("logical", 10, 1, 10, 0, "-1")
    assert all(ok for ok, _ in good) and any("max_slot_wal_keep_size = -1" in t for _, t in good)
    assert len(plan.judge_new_server("logical", 10, 1, 10, 0, "10GB")) == 1


def test_new_role_needs_replication_and_the_owners():
    found = plan.judge_new_role("migrator", False, False, ["app_owner"])
    assert [ok for ok, _ in found] == [False, False]
    assert "REPLICATION" in found[0][1] and "GRANT app_owner TO migrator" in found[1][1]
    assert plan.judge_new_role("postgres", True, False, ["x"]) == [
        (True, "back-out: role 'postgres' may create the reverse slot and publication on the new database")]


@pytest.mark.parametrize("error, says", [
    (None, "connects to the new one"),
    ('FATAL:  must be superuser or replication role to start walsender', "REPLICATION on the NEW server"),
    ("canceling statement due to statement timeout", "firewall"),
    ('could not connect to the publisher: connection refused', "DB_UPGRADE_BACKOUT_PGURI"),
])
def test_test_subscription_verdicts(error, says):
    ok, why = plan.judge_test_subscription(error, "DB_UPGRADE_BACKOUT_PGURI")
    assert ok == (error is None) and says in why


def test_engine_must_be_native():
    assert plan.judge_engine("native")[0]
    ok, why = plan.judge_engine("pgcopydb-follow")
    assert not ok and "DB_UPGRADE_ENGINE=native" in why


# -- the deadline and the decision --------------------------------------------------------------------------


def test_deadline_and_time_left():
    assert plan.deadline(1000.0, 3600) == 4600.0
    assert plan.time_left(4600.0, now=4000.0) == 600.0
    assert plan.time_left(4600.0, now=5000.0) == 0.0
    assert plan.time_left(None) is None


@pytest.mark.parametrize("started, finished, timeout, by_timeout", [
    ("2026-11-24T22:00:00Z", "2026-11-24T22:10:00Z", 3600, False),  # resumed by the operator
    ("2026-11-24T22:00:00Z", "2026-11-24T23:00:00Z", 3600, True),  # resumed by the timeout
    ("2026-11-24T22:00:00Z", "2026-11-24T22:59:59.5Z", 3600, True),
    ("{{tasks.backout.startedAt}}", "2026-11-24T23:00:00Z", 3600, False),  # unresolved: no backout node
    ("", "", 3600, False),
    ("not a time", "2026-11-24T23:00:00Z", 3600, False),
])
def test_a_decision_resumed_only_by_the_timeout_does_not_count(started, finished, timeout, by_timeout):
    assert plan.decided_by_timeout(started, finished, timeout) is by_timeout


# -- the switch back ----------------------------------------------------------------------------------------


def test_switch_back_points_pgbouncer_at_the_recorded_old_entry():
    assert plan.switch_back_overrides({"host": "old-pg", "port": "5433", "dbname": "orders", "user": "app"}, "app-db") \
        == {"target_host": "old-pg", "target_port": 5433, "target_dbname": "orders", "target_user": "app"}
    assert plan.switch_back_overrides({"host": "old-pg"}, "app-db") == \
        {"target_host": "old-pg", "target_port": 5432, "target_dbname": "app-db", "target_user": ""}
    with pytest.raises(ValueError, match="no host"):
        plan.switch_back_overrides({"dbname": "orders"}, "app-db")


# -- status and report --------------------------------------------------------------------------------------


def test_status_lines_say_lag_time_left_and_a_stopped_apply():
    st = plan.BackoutStatus("open", deadline_at=1_800_000_000.0, time_left_seconds=2 * 86400 + 3 * 3600 + 60,
                            lag_bytes=2048, retained_bytes=10 * 1024 * 1024, wal_status="reserved", applying=False,
                            apply_errors=3)
    lines = st.lines()
    assert lines[0].startswith("back-out: open, 2d03h01m left (until 2027-01-15 08:00:00 UTC, then end)")
    assert "2.0 kB behind" in lines[1] and "10.0 MB of WAL" in lines[1] and "wal_status" not in lines[1]
    assert any("NOT RUNNING" in line for line in lines) and any("failed 3 time(s)" in line for line in lines)
    assert plan.BackoutStatus("ended").lines() == ["back-out: ended"]
    assert plan.BackoutStatus("open", lag_bytes=1, retained_bytes=1, wal_status="unreserved").lines()[1].endswith(
        "(wal_status unreserved)")


def test_report_counts_every_row_change():
    r = plan.report("rolled back", "verified: ...", {"shop.orders": 7, "shop.customers": 3}, 0.52, {"drain": 0.01234})
    assert r["status"] == "rolled back" and r["writes_after_cutover"] == 10 and r["timings"] == {"drain": 0.012}
    assert json.loads(json.dumps(r)) == r


def test_settings_for_the_window():
    s = load_settings(backout=True, backout_window_seconds=600, backout_pguri="postgres://u:s3cret@new/db")
    assert s.backout and s.backout_window_seconds == 600 and "s3cret" not in repr(s)
    with pytest.raises(StepError, match="^DB_UPGRADE_BACKOUT_WINDOW_SECONDS: "):
        load_settings(backout_window_seconds=0)
    assert load_settings(backout_decision_started_at="{{tasks.backout.startedAt}}").backout_decision_started_at is None


# -- db-upgrade rollback | end-backout -----------------------------------------------------------------------

TOKEN = "tok-BACKOUT-77aa"
WF = "db-upgrade-prod-x7k2q"


@pytest.fixture
def fake():
    yield from served(TOKEN)


@pytest.fixture
def run(fake, tmp_path, monkeypatch):
    from cli import backout as cli_backout

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli_backout.register(app)
    return cli_invoker(app, fake, write_environment(tmp_path), TOKEN, monkeypatch)


def wf_path(name: str, action: str | None = None) -> str:
    return f"/api/v1/workflows/{NS}/{name}" + (f"/{action}" if action else "")


def in_window(**outputs) -> dict:
    return status("Running", node("cutover", "Succeeded"), node("backout", "Running", type="Suspend",
                                                                  outputs=outputs or None))


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command, decision", [("rollback", "rollback"), ("end-backout", "end")])
def test_rollback_and_end_backout_set_and_resume_the_backout_node(run, fake, command, decision):
    fake.script(NS, WF, [in_window()])
    result = run(command, WF)
    assert result.exit_code == 0, result.output
    assert fake.calls() == [("GET", wf_path(WF)), ("PUT", wf_path(WF, "set")), ("PUT", wf_path(WF, "resume"))]
    assert fake.bodies("PUT", wf_path(WF, "set")) == [
        {"nodeFieldSelector": "displayName=backout", "outputParameters": json.dumps({"decision": decision})}]
    assert fake.bodies("PUT", wf_path(WF, "resume")) == [{"nodeFieldSelector": "displayName=backout"}]


def test_the_same_decision_set_before_is_only_resumed(run, fake):
    fake.script(NS, WF, [in_window(decision="rollback")])
    result = run("rollback", WF)
    assert result.exit_code == 0 and "resumed it now" in result.output
    assert fake.calls("PUT") == [("PUT", wf_path(WF, "resume"))]


def test_another_decision_set_before_is_one_line_naming_what_to_do(run, fake):
    fake.script(NS, WF, [in_window(decision="end")])
    line = one_line_error(run("rollback", WF))
    assert "already holds the decision end" in line and f"db-upgrade end-backout {WF}" in line
    assert fake.calls("PUT") == []


@pytest.mark.parametrize("wf_status, why", [
    (status("Running", node("cutover", "Running")), "the cutover has not opened the back-out window"),
    (status("Running", node("backout", "Succeeded", type="Suspend")), "the backout step is Succeeded"),
    (status("Succeeded"), "workflow is Succeeded"),
])
def test_refuses_outside_the_window(run, fake, wf_status, why):
    fake.script(NS, WF, [wf_status])
    assert one_line_error(run("rollback", WF)) == \
        f"error: workflow {WF} is not in its back-out window ({why}): nothing to roll back"
    assert fake.calls("PUT") == []
