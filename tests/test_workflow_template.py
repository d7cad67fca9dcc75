"""The upgrade WorkflowTemplate: DAG order, every branch, volumes, affinity, guard rails."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.test_workflow_helpers import BASE, config, dag_tasks, example_template, simulate, templates

BASE_CONNECTIONS = BASE["connections"]
from workflows.render import render_documents, to_multi_yaml
from workflows.upgrade import render

POD_STEPS = {
    "create-scratch-target", "drop-scratch-target", "preflight", "grant-replication", "follow", "wait-caught-up",
    "verify-prepare", "cutover", "finish", "cleanup", "cleanup-after-failure", "unfreeze-after-failure", "report",
    "rollback", "end-backout", "backout-verify-prepare", "verify-ready",
}
COMMAND = {"cleanup-after-failure": "cleanup"}


@pytest.fixture(scope="module")
def wt():
    return example_template()


def test_dag_depends_exactly(wt):
    depends = {t["name"]: t.get("depends") for t in dag_tasks(wt, "upgrade")}
    assert depends == {
        "create-scratch-target": None,
        "preflight": "create-scratch-target.Succeeded || create-scratch-target.Skipped",
        "grant-replication": "preflight.Succeeded",
        "follow": "grant-replication.Succeeded",
        "wait-caught-up": "grant-replication.Succeeded",
        "verify-prepare": "wait-caught-up.Succeeded",
        "verify-ready": "wait-caught-up.Succeeded",
        "approve": "verify-ready.Succeeded",
        "cutover": "verify-ready.Succeeded && (approve.Succeeded || approve.Skipped)",
        "finish": "cutover.Succeeded || cutover.Skipped || cutover.Failed || cutover.Errored"
        " || approve.Failed || approve.Errored || verify-ready.Failed || verify-ready.Errored"
        " || wait-caught-up.Failed || wait-caught-up.Errored",
        "backout": "cutover.Succeeded",
        "backout-verify-prepare": "cutover.Succeeded",
        "rollback": "backout.Succeeded",
        "end-backout": "backout.Succeeded",
        "cleanup": "finish.Succeeded && (cutover.Succeeded || cutover.Skipped) && follow.Succeeded"
        " && (verify-prepare.Succeeded || verify-prepare.Skipped || verify-prepare.Failed || verify-prepare.Errored"
        " || verify-prepare.Omitted) && (backout-verify-prepare.Succeeded || backout-verify-prepare.Skipped"
        " || backout-verify-prepare.Failed || backout-verify-prepare.Errored || backout-verify-prepare.Omitted)"
        " && (backout.Skipped || backout.Omitted || end-backout.Succeeded || rollback.Succeeded)",
    }
    for task in dag_tasks(wt, "upgrade") + dag_tasks(wt, "exit-handler") + dag_tasks(wt, "recover"):
        # Bare `depends: a` also matches a.Skipped: every reference names its result.
        for token in (task.get("depends") or "").replace("(", " ").replace(")", " ").split():
            assert token in ("&&", "||") or "." in token, (task["name"], token)


def test_no_daemon_and_every_step_runs_db_upgrade_step(wt):
    assert '"daemon"' not in json.dumps(wt)
    for name, t in templates(wt).items():
        if "container" not in t:
            continue
        c = t["container"]
        assert name in POD_STEPS
        assert "command" not in c and "script" not in t
        assert c["args"] == ["step", COMMAND.get(name, name)]
        assert c["image"] == "ghcr.io/example/db-upgrade:0.1.0"
    assert {n for n, t in templates(wt).items() if "container" in t} == POD_STEPS


def _all_runs():
    for approval, mode, decision in itertools.product(("manual", "auto"), ("upgrade", "rehearsal"),
                                                      ("cutover", "abort")):
        yield dict(params={"approval": approval, "mode": mode}, decision=decision)


FOLLOW_SIDE = ("follow", "wait-caught-up", "verify-prepare", "approve", "cutover", "finish", "cleanup")


def test_every_branch_stops_follow_and_only_a_cutover_freezes(wt):
    """Each run shape, with no failure or one failing task: finish runs whenever follow
    started (it stops follow when no cutover did); the cutover only after a cutover
    decision; cleanup in the main DAG only after a cutover or an abort."""
    for run, failing in itertools.product(_all_runs(), (None,) + FOLLOW_SIDE):
        outcomes = {failing: "Failed"} if failing else {}
        s = simulate(wt, outcomes=outcomes, **run)
        label = (run, failing, s)
        cut = run["params"]["approval"] == "auto" or run["decision"] == "cutover"
        if s["follow"] not in ("Omitted", "Skipped") and s["wait-caught-up"] != "Omitted":
            assert s["finish"] in ("Succeeded", "Failed"), label
        if s["cutover"] not in ("Omitted", "Skipped"):
            assert cut, label
        if s["cleanup"] not in ("Omitted", "Skipped"):
            assert s["cutover"] in ("Succeeded", "Skipped") and s["follow"] == "Succeeded", label


def test_manual_cutover_happy_path(wt):
    assert simulate(wt) == {
        "create-scratch-target": "Skipped", "preflight": "Succeeded", "grant-replication": "Succeeded",
        "follow": "Succeeded", "wait-caught-up": "Succeeded", "verify-prepare": "Succeeded",
        "verify-ready": "Succeeded", "approve": "Succeeded",
        "cutover": "Succeeded", "backout": "Skipped", "backout-verify-prepare": "Skipped", "rollback": "Omitted",
        "end-backout": "Omitted", "finish": "Succeeded", "cleanup": "Succeeded",
    }


def test_back_out_window_then_rollback_or_end(wt):
    opened = {"tasks.cutover.outputs.parameters.backout": "open"}
    s = simulate(wt, extra_values={**opened, "tasks.backout.outputs.parameters.decision": "rollback"})
    assert (s["backout"], s["backout-verify-prepare"], s["rollback"], s["end-backout"], s["cleanup"]) == (
        "Succeeded", "Succeeded", "Succeeded", "Skipped", "Succeeded")
    s = simulate(wt, extra_values={**opened, "tasks.backout.outputs.parameters.decision": "end"})
    assert (s["rollback"], s["end-backout"], s["cleanup"]) == ("Skipped", "Succeeded", "Succeeded")
    # A failed rollback leaves the cleanup to the exit handler (its cleanup ends the window too).
    s = simulate(wt, extra_values={**opened, "tasks.backout.outputs.parameters.decision": "rollback"},
                 outcomes={"rollback": "Failed"})
    assert s["cleanup"] == "Omitted"
    backout = templates(wt)["backout"]
    assert backout["suspend"]["duration"] == "172800"  # the deadline: the window ends by itself
    assert {p["name"] for p in backout["inputs"]["parameters"]} <= {p["name"] for p in backout["outputs"]["parameters"]}


def test_abort_stops_follow_without_a_cutover_then_cleans_up(wt):
    s = simulate(wt, decision="abort")
    assert (s["cutover"], s["finish"], s["cleanup"]) == ("Skipped", "Succeeded", "Succeeded")


def test_auto_approval_skips_approve_and_counts_as_cutover(wt):
    s = simulate(wt, params={"approval": "auto"})
    assert (s["approve"], s["cutover"]) == ("Skipped", "Succeeded")


def test_rehearsal_runs_the_cutover_as_a_measurement(wt):
    s = simulate(wt, params={"approval": "auto", "mode": "rehearsal"})
    assert s["create-scratch-target"] == "Succeeded"
    assert (s["cutover"], s["finish"], s["cleanup"]) == ("Succeeded", "Succeeded", "Succeeded")
    env = {e["name"]: e.get("value") for e in templates(wt)["cutover"]["container"]["env"]}
    assert env["DB_UPGRADE_MODE"] == "{{workflow.parameters.mode}}"  # the step itself never freezes then


def test_wait_caught_up_failure_still_stops_follow(wt):
    s = simulate(wt, outcomes={"wait-caught-up": "Failed"})
    assert (s["approve"], s["cutover"], s["finish"], s["cleanup"]) == ("Omitted", "Omitted", "Succeeded", "Omitted")


def test_a_failed_cutover_stops_follow_and_leaves_cleanup_to_the_exit_handler(wt):
    s = simulate(wt, outcomes={"cutover": "Failed"})
    assert (s["finish"], s["cleanup"]) == ("Succeeded", "Omitted")


@pytest.mark.parametrize(
    "status, mode, keep_slot, expected",
    [
        ("Succeeded", "upgrade", "false",
         {"unfreeze-after-failure": "Skipped", "cleanup-after-failure": "Skipped", "drop-scratch-target": "Skipped"}),
        # Whether to restore writes is decided by the step, from the run's record in the source.
        ("Failed", "upgrade", "false", {"unfreeze-after-failure": "Succeeded", "cleanup-after-failure": "Succeeded"}),
        ("Error", "upgrade", "true", {"unfreeze-after-failure": "Succeeded", "cleanup-after-failure": "Skipped"}),
        ("Succeeded", "rehearsal", "false", {"unfreeze-after-failure": "Skipped", "drop-scratch-target": "Succeeded"}),
        ("Failed", "rehearsal", "false", {"unfreeze-after-failure": "Skipped", "drop-scratch-target": "Succeeded"}),
        ("Failed", "rehearsal", "true", {"drop-scratch-target": "Skipped"}),
    ],
)
def test_exit_handler(wt, status, mode, keep_slot, expected):
    assert wt["spec"]["onExit"] == "exit-handler"
    s = simulate(wt, dag="exit-handler", params={"mode": mode, "keep-slot-on-failure": keep_slot},
                 extra_values={"workflow.status": status})
    assert s["report"] == "Succeeded"
    assert {k: s[k] for k in expected} == expected
    assert [t["name"] for t in dag_tasks(wt, "exit-handler")][-1] == "report"  # last: it removes the record
    # Even when the steps before it failed, the report runs.
    s = simulate(wt, dag="exit-handler", params={"mode": mode, "keep-slot-on-failure": keep_slot},
                 extra_values={"workflow.status": "Failed"},
                 outcomes={"unfreeze-after-failure": "Failed", "cleanup-after-failure": "Failed"})
    assert s["report"] == "Succeeded"


def test_the_exit_handler_unfreezes_from_the_run_state_not_from_outputs(wt):
    """A failed pod's outputs may never be published (issue 12): no `when` reads them."""
    text = json.dumps(dag_tasks(wt, "exit-handler"))
    assert "workflow.outputs" not in text
    env = {e["name"]: e.get("value") for e in templates(wt)["unfreeze-after-failure"]["container"]["env"]}
    assert env["DB_UPGRADE_RUN_ID"] == "{{workflow.parameters.run-id}}"
    assert env["DB_UPGRADE_WORKFLOW_NAME"] == "{{workflow.name}}"
    assert templates(wt)["unfreeze-after-failure"]["container"]["args"] == ["step", "unfreeze-after-failure"]


def test_recover_does_the_exit_handlers_work_for_a_terminated_run(wt):
    s = simulate(wt, dag="recover")
    assert s == {"unfreeze-after-failure": "Succeeded", "cleanup": "Succeeded"}
    s = simulate(wt, dag="recover", outcomes={"unfreeze-after-failure": "Failed"})
    assert s["cleanup"] == "Succeeded"


def test_approve_is_a_dropdown_defaulting_to_abort(wt):
    approve = templates(wt)["approve"]
    assert approve["suspend"] == {"duration": "14400"}
    decision_in = next(p for p in approve["inputs"]["parameters"] if p["name"] == "decision")
    assert decision_in["enum"] == ["cutover", "abort"] and decision_in["default"] == "abort"
    outputs = {p["name"]: p for p in approve["outputs"]["parameters"]}
    assert outputs["decision"] == {"name": "decision", "valueFrom": {"default": "abort", "supplied": {}}}
    # The UI sends every input as an output: each one must be a supplied output.
    assert {p["name"] for p in approve["inputs"]["parameters"]} <= set(outputs)
    assert all("supplied" in p["valueFrom"] and "default" in p["valueFrom"] for p in outputs.values())
    task = next(t for t in dag_tasks(wt, "upgrade") if t["name"] == "approve")
    assert task["when"] == "'{{workflow.parameters.approval}}' == 'manual'"
    # The approver sees the lag and where the exact comparison stands, when it is prepared.
    assert task["arguments"]["parameters"] == [
        {"name": "lag", "value": "{{tasks.verify-ready.outputs.parameters.lag}}"},
        {"name": "verification", "value": "{{tasks.verify-ready.outputs.parameters.verification}}"}]
    ready_out = {p["name"] for p in templates(wt)["verify-ready"]["outputs"]["parameters"]}
    assert ready_out == {"lag", "verification"}


def test_the_cutover_knows_when_the_approval_ran_and_its_timeout(wt):
    task = next(t for t in dag_tasks(wt, "upgrade") if t["name"] == "cutover")
    args = {p["name"]: p["value"] for p in task["arguments"]["parameters"]}
    assert args == {"approval-started": "{{tasks.approve.startedAt}}", "approval-finished": "{{tasks.approve.finishedAt}}"}
    env = {e["name"]: e.get("value") for e in templates(wt)["cutover"]["container"]["env"]}
    assert env["DB_UPGRADE_APPROVAL_TIMEOUT"] == "14400"
    assert env["DB_UPGRADE_APPROVAL_STARTED_AT"] == "{{inputs.parameters.approval-started}}"


def test_parameters(wt):
    params = {p["name"]: (p["value"], p.get("enum")) for p in wt["spec"]["arguments"]["parameters"]}
    assert params == {
        "approval": ("manual", ["manual", "auto"]),
        "mode": ("upgrade", ["upgrade", "rehearsal"]),
        "keep-slot-on-failure": ("false", ["false", "true"]),
        "keep-scratch": ("false", ["false", "true"]),
        "run-id": ("", None),
        "skip-verify-preparation": ("false", ["false", "true"]),
    }


WORK_STEPS = {"preflight", "follow"}


def test_only_follow_and_preflight_mount_the_work_volume(wt):
    claims = wt["spec"]["volumeClaimTemplates"]
    assert len(claims) == 1
    assert claims[0]["metadata"]["name"] == "work"
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    mounted = set()
    for name, t in templates(wt).items():
        mounts = {m["name"]: m["mountPath"] for m in t.get("container", {}).get("volumeMounts", [])}
        if "work" in mounts:
            assert mounts["work"] == "/var/lib/db-upgrade/work"
            mounted.add(name)
    assert mounted == WORK_STEPS
    # No pod runs beside follow on its volume: no affinity is needed anywhere.
    assert not any("affinity" in t for t in wt["spec"]["templates"])


def test_read_write_many(tmp_path):
    wt = render(config(tmp_path, volume={"access_mode": "ReadWriteMany", "storage_class": "nfs"}))
    assert wt["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert wt["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "nfs"


def test_guard_rails(wt):
    spec = wt["spec"]
    assert spec["synchronization"] == {"mutexes": [{"name": "db-upgrade-orders"}]}
    assert spec["ttlStrategy"] == {"secondsAfterSuccess": 86400, "secondsAfterFailure": 604800}
    assert spec["podGC"] == {"strategy": "OnPodSuccess"}
    assert "activeDeadlineSeconds" not in spec  # it would count the time waiting for approval
    ts = templates(wt)
    assert json.loads(ts["follow"]["podSpecPatch"]) == {"terminationGracePeriodSeconds": 300}
    assert ts["wait-caught-up"]["activeDeadlineSeconds"] == 86400
    assert spec["securityContext"]["runAsNonRoot"] is True
    for name, t in ts.items():
        if "container" in t:
            # A deadline on every pod, and never `timeout` beside it (it would replace it:
            # workflow/controller/workflowpod.go).
            assert t["activeDeadlineSeconds"] > 0 and "timeout" not in t, name
            sc = t["container"]["securityContext"]
            assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"], name
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in t["container"]["volumeMounts"]}
            assert {"/tmp", "/tmp/outputs"} <= mounts
            assert {"name": "tmp", "emptyDir": {}} in t["volumes"]
            res = t["container"]["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], name
            assert "cpu" not in res["limits"], name  # a throttled cutover is a longer window


def test_resources_come_from_the_config(tmp_path):
    wt = render(config(tmp_path, resources={"follow": {"cpu": "2", "memory": "1Gi", "memory_limit": "2Gi"}}))
    res = templates(wt)["follow"]["container"]["resources"]
    assert res == {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    assert templates(wt)["preflight"]["container"]["resources"]["requests"]["memory"] == "128Mi"


def test_only_the_cutover_may_move_the_applications_and_only_the_report_writes_history(wt):
    ts = templates(wt)
    assert wt["spec"]["serviceAccountName"] == "db-upgrade"
    assert ts["cutover"]["serviceAccountName"] == "db-upgrade-switch"
    assert ts["report"]["serviceAccountName"] == "db-upgrade-report"
    assert ts["rollback"]["serviceAccountName"] == "db-upgrade-switch"  # it moves the applications back
    assert {n for n, t in ts.items() if "serviceAccountName" in t} == {"cutover", "rollback", "report"}
    env = {e["name"]: e.get("value") for e in ts["report"]["container"]["env"]}
    assert env["DB_UPGRADE_HISTORY_CONFIGMAP"] == "db-upgrade-history-orders"
    assert env["DB_UPGRADE_NAMESPACE"] == "{{workflow.namespace}}"


def test_mutex_follows_the_database_id(tmp_path):
    a = render(config(tmp_path, database_id="billing"))
    assert a["spec"]["synchronization"]["mutexes"] == [{"name": "db-upgrade-billing"}]
    assert a["metadata"]["name"] == "db-upgrade-t"


def test_metrics(wt):
    names = {m["name"] for m in wt["spec"]["metrics"]["prometheus"]}
    assert names == {"db_upgrade_duration_seconds", "db_upgrade_outcome_total"}
    cut = {m["name"] for m in templates(wt)["cutover"]["metrics"]["prometheus"]}
    assert cut == {"db_upgrade_write_downtime_seconds", "db_upgrade_predicted_write_downtime_seconds"}
    rep = {m["name"] for m in templates(wt)["report"]["metrics"]["prometheus"]}
    assert rep == {"db_upgrade_copy_seconds", "db_upgrade_catchup_seconds"}


def test_engine_and_fenced_roles_from_the_config(tmp_path):
    wt = render(config(tmp_path, engine="pgcopydb-follow", application_roles=["orders_app", "orders ro"]))
    env = {e["name"]: e.get("value") for e in templates(wt)["follow"]["container"]["env"]}
    assert env["DB_UPGRADE_ENGINE"] == "pgcopydb-follow"
    assert env["DB_UPGRADE_APP_ROLES"] == "orders_app,orders ro"
    assert {e["name"]: e.get("value") for e in templates(example_template())["follow"]["container"]["env"]}[
        "DB_UPGRADE_ENGINE"] == "native"


def test_connections_from_secret_keys_or_service_file(wt, tmp_path):
    env = {e["name"]: e for e in templates(wt)["follow"]["container"]["env"]}
    assert env["PGCOPYDB_SOURCE_PGURI"]["value"] == "postgres://?service=source"
    assert env["PGSERVICEFILE"]["value"] == "/etc/db-upgrade/pg/pg_service.conf"
    vols = {v["name"]: v for v in templates(wt)["follow"]["volumes"]}
    assert vols["pg-service"]["secret"]["secretName"] == "pg-services"

    wt2 = render(config(tmp_path, connections={**BASE_CONNECTIONS,
                                               "subscription": {"secret": "sub-uri", "key": "uri"}}))
    env = {e["name"]: e for e in templates(wt2)["follow"]["container"]["env"]}
    assert env["PGCOPYDB_SOURCE_PGURI"] == {
        "name": "PGCOPYDB_SOURCE_PGURI", "valueFrom": {"secretKeyRef": {"name": "source-uri", "key": "uri"}}}
    assert env["DB_UPGRADE_SUBSCRIPTION_PGURI"] == {
        "name": "DB_UPGRADE_SUBSCRIPTION_PGURI", "valueFrom": {"secretKeyRef": {"name": "sub-uri", "key": "uri"}}}
    assert "PGSERVICEFILE" not in env


def test_no_secret_value_anywhere(tmp_path, monkeypatch):
    marker = "Marker-Pa55word-7f3c"
    # As if the operator's shell held real credentials while rendering.
    for var in ("PGPASSWORD", "PGCOPYDB_SOURCE_PGURI", "PGCOPYDB_TARGET_PGURI", "DB_UPGRADE_SUBSCRIPTION_PGURI"):
        monkeypatch.setenv(var, f"postgres://app:{marker}@db/orders" if "URI" in var else marker)
    docs = render_documents(config(tmp_path))
    text = to_multi_yaml(docs)
    assert marker not in text
    assert "secretKeyRef" in text
    for doc in docs:
        for p in doc.get("spec", {}).get("arguments", {}).get("parameters", []):
            assert "pass" not in json.dumps(p).lower()


PGBOUNCER = {"strategy": "pgbouncer", "pgbouncer": {
    "admin_uri": {"secret": "pgbouncer-admin", "key": "admin-uri"}, "database": "orders",
    "include_file": "/pgbouncer/databases.ini", "volume": {"claim_name": "pgbouncer-dynamic"},
    "target": {"host": "pg17.db.svc", "dbname": "orders"}}}


def test_pgbouncer_switch_is_wired_into_the_cutover_and_the_exit_handler(tmp_path):
    from workflows import rbac
    from workflows.schema import validate

    cfg = config(tmp_path, switch=PGBOUNCER)
    wt = render(cfg)
    assert validate(wt) == []
    ts = templates(wt)
    for name in ("cutover", "unfreeze-after-failure"):
        env = {e["name"]: e for e in ts[name]["container"]["env"]}
        assert env["DB_UPGRADE_SWITCH"]["value"] == "pgbouncer"
        assert env["DB_UPGRADE_PGBOUNCER_ADMIN_PGURI"] == {"name": "DB_UPGRADE_PGBOUNCER_ADMIN_PGURI", "valueFrom": {
            "secretKeyRef": {"name": "pgbouncer-admin", "key": "admin-uri"}}}
        assert env["DB_UPGRADE_PGBOUNCER_TARGET_HOST"]["value"] == "pg17.db.svc"
        mounts = {m["name"]: m["mountPath"] for m in ts[name]["container"]["volumeMounts"]}
        assert mounts["pgbouncer-config"] == "/pgbouncer"
    # No Kubernetes permission on Deployments at all with PgBouncer.
    assert not [d for d in rbac.documents(cfg) if d["metadata"]["name"].endswith("-restart")]


def test_a_switch_without_its_section_is_one_line(tmp_path):
    from workflows.config import ConfigError, load_config
    from tests.test_workflow_helpers import write_config

    data = {k: v for k, v in BASE.items() if k != "restart"}
    with pytest.raises(ConfigError, match="switch.strategy restart needs the restart section"):
        load_config(write_config(tmp_path, data))
    with pytest.raises(ConfigError, match="pgbouncer needs the switch.pgbouncer section"):
        load_config(write_config(tmp_path, {**data, "switch": {"strategy": "pgbouncer"}}))
    bad = {**PGBOUNCER, "pgbouncer": {**PGBOUNCER["pgbouncer"], "admin_uri": {"uri": "postgres://a@b/pgbouncer"}}}
    with pytest.raises(ConfigError, match="admin_uri"):
        load_config(write_config(tmp_path, {**data, "switch": bad}))
