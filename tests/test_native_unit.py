"""Pure logic of the native engine, the sequences, the fence, the cutover's checks: no database."""

from __future__ import annotations

import pytest
from steps import fence, late_writes, sequences
from steps.cutover import check_approval
from steps.engines.native import statements as q
from steps.errors import StepError
from steps.settings import load_settings


def test_publication_lists_the_tables_and_the_barrier():
    stmt = q.create_publication("db_upgrade", [("shop", 'Audit "Log"'), ("public", "t")])
    s = stmt.as_string(None)
    assert s.startswith('CREATE PUBLICATION "db_upgrade" FOR TABLE ')
    assert '"shop"."Audit ""Log"""' in s and '"public"."t"' in s and '"db_upgrade"."barrier"' in s
    assert "ALL TABLES" not in s


def test_subscription_never_copies_nor_creates_a_slot_and_quotes_the_uri():
    s = q.create_subscription("db_upgrade", "host=a password='x''y'", "db_upgrade", "db_upgrade").as_string(None)
    assert "create_slot = false" in s and "copy_data = false" in s and "slot_name = 'db_upgrade'" in s
    assert "'host=a password=''x''''y'''" in s  # a literal, quotes doubled


def test_drop_subscription_detaches_its_slot_first():
    steps = [x.as_string(None) for x in q.drop_subscription("db_upgrade")]
    assert steps == ['ALTER SUBSCRIPTION "db_upgrade" DISABLE', 'ALTER SUBSCRIPTION "db_upgrade" SET (slot_name = NONE)',
                     'DROP SUBSCRIPTION "db_upgrade"']


@pytest.mark.parametrize("bad", ["Upper", "a-b", "x; DROP TABLE t", "", "a" * 64])
def test_names_are_checked(bad):
    with pytest.raises(ValueError):
        q.create_slot_command(bad)


def test_slot_command_exports_a_snapshot():
    assert q.create_slot_command("db_upgrade") == b"CREATE_REPLICATION_SLOT db_upgrade LOGICAL pgoutput (SNAPSHOT 'export')"


def test_barrier_end_position():
    assert q.barrier_id("barrier:wf-1:abc") == "wf-1:abc"
    with pytest.raises(ValueError):
        q.barrier_id("0/16B3748")


S = sequences.SeqState


@pytest.mark.parametrize("src, tgt, inc, expect_set", [
    (S(100, True), S(1, False), 1, True),      # behind: set
    (S(100, True), S(100, True), 1, False),    # equal: nothing
    (S(100, True), S(150, True), 1, False),    # ahead: never moved back
    (S(100, False), S(99, True), 1, False),    # nextval is 100 on both
    (S(1, False), None, 1, True),              # missing on the target: named by verify
    (S(-10, True), S(-5, True), -1, True),     # descending: -5 is behind -10
])
def test_sequence_plan_is_never_behind(src, tgt, inc, expect_set):
    key = ("shop", "s")
    to_set, ahead = sequences.plan({key: src}, {} if tgt is None else {key: tgt}, {key: inc})
    assert (key in to_set) is expect_set
    if tgt is not None and not expect_set and tgt != src:
        assert ahead == ["shop.s"]


def test_late_writes_are_the_counters_that_grew():
    assert late_writes.changed({"a": 5, "b": 1}, {"a": 5, "b": 3, "c": 2}) == {"b": 2, "c": 2}
    assert late_writes.changed({"a": 5}, {"a": 5}) == {}


def test_fence_statements_quote_the_role():
    assert fence.nologin('app "rw" user').as_string(None) == 'ALTER ROLE "app ""rw"" user" NOLOGIN'
    assert fence.login("app").as_string(None) == 'ALTER ROLE "app" LOGIN'


def test_fence_roles_from_settings():
    assert fence.roles(load_settings(app_roles=" a, b ,,")) == ["a", "b"]
    assert fence.roles(load_settings()) == []


def test_a_timed_out_approval_does_not_cut_over():
    timed_out = load_settings(approval_started_at="2026-12-01T10:00:00Z", approval_finished_at="2026-12-01T11:00:00Z",
                              approval_timeout="3600")
    with pytest.raises(StepError, match="approval timed out"):
        check_approval(timed_out)
    resumed = load_settings(approval_started_at="2026-12-01T10:00:00Z", approval_finished_at="2026-12-01T10:20:00Z",
                            approval_timeout="3600")
    check_approval(resumed)
    # approval=auto (skipped node) or a local run: nothing to check.
    check_approval(load_settings(approval_started_at="", approval_finished_at="{{tasks.approve.finishedAt}}",
                                 approval_timeout="3600"))


def test_the_follow_pulse_counts_only_while_the_step_runs():
    import time as _t

    from steps.state import RunState

    now = _t.time()
    running = RunState(follow_attempt_at=now - 30, follow_alive_at=now - 5)
    assert 4 < running.follow_pulse_age(25) < 6
    assert running.model_copy(update={"follow_alive_at": now - 40}).follow_pulse_age(25) is None  # killed pod
    assert running.model_copy(update={"follow_done_at": now - 1}).follow_pulse_age(25) is None
    assert running.model_copy(update={"follow_failed_at": now - 1}).follow_pulse_age(25) is None
    assert running.model_copy(update={"follow_done_at": now - 60}).follow_pulse_age(25) is not None  # an earlier run's end
    assert RunState().follow_pulse_age(25) is None
