"""The upgrade WorkflowTemplate: DAG order, every branch, volumes, affinity, guard rails."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.test_workflow_helpers import config, dag_tasks, example_template, simulate, templates
from workflows.render import render_documents, to_multi_yaml
from workflows.upgrade import render

POD_STEPS = {
    "create-scratch-target", "drop-scratch-target", "preflight", "grant-replication", "follow", "wait-caught-up",
    "freeze", "finish", "verify", "cleanup", "unfreeze", "restart", "report",
}


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
        "approve": "wait-caught-up.Succeeded",
        "freeze": "wait-caught-up.Succeeded && (approve.Succeeded || approve.Skipped)",
        "finish": "freeze.Succeeded || freeze.Skipped || freeze.Failed || freeze.Errored"
        " || approve.Failed || approve.Errored || wait-caught-up.Failed || wait-caught-up.Errored",
        "unfreeze": "freeze.Failed || freeze.Errored || (freeze.Succeeded && (finish.Failed || finish.Errored))",
        "verify": "follow.Succeeded && finish.Succeeded && (freeze.Succeeded || freeze.Skipped)",
        "cleanup": "verify.Succeeded || verify.Skipped",
        "restart": "cleanup.Succeeded && freeze.Succeeded",
    }
    for task in dag_tasks(wt, "upgrade") + dag_tasks(wt, "exit-handler"):
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
        assert c["args"] == ["step", name]
        assert c["image"] == "ghcr.io/example/db-upgrade:0.1.0"
    assert {n for n, t in templates(wt).items() if "container" in t} == POD_STEPS


def _all_runs():
    for approval, mode, decision in itertools.product(("manual", "auto"), ("upgrade", "rehearsal"),
                                                      ("cutover", "abort")):
        yield dict(params={"approval": approval, "mode": mode}, decision=decision)


FOLLOW_SIDE = ("follow", "wait-caught-up", "approve", "freeze", "finish", "verify", "cleanup", "restart")


def test_every_branch_stops_follow_and_never_restarts_without_a_freeze(wt):
    """Each run shape, with no failure or one failing task: finish runs whenever follow
    started; freeze only in upgrade mode after a cutover; restart only after freeze."""
    for run, failing in itertools.product(_all_runs(), (None,) + FOLLOW_SIDE):
        outcomes = {failing: "Failed"} if failing else {}
        s = simulate(wt, outcomes=outcomes, **run)
        label = (run, failing, s)
        cutover = run["params"]["approval"] == "auto" or run["decision"] == "cutover"
        if s["follow"] not in ("Omitted", "Skipped"):
            assert s["finish"] in ("Succeeded", "Failed"), label
        if s["freeze"] not in ("Omitted", "Skipped"):
            assert run["params"]["mode"] == "upgrade" and cutover, label
        if s["restart"] not in ("Omitted", "Skipped"):
            assert s["freeze"] == "Succeeded" and s["verify"] == "Succeeded", label
        if s["freeze"] in ("Failed", "Errored") or (s["freeze"] == "Succeeded" and s["finish"] == "Failed"):
            assert s["unfreeze"] == "Succeeded", label
        else:
            assert s["unfreeze"] == "Omitted", label


def test_manual_cutover_happy_path(wt):
    s = simulate(wt)
    assert s == {
        "create-scratch-target": "Skipped", "preflight": "Succeeded", "grant-replication": "Succeeded",
        "follow": "Succeeded", "wait-caught-up": "Succeeded", "approve": "Succeeded", "freeze": "Succeeded",
        "finish": "Succeeded", "unfreeze": "Omitted", "verify": "Succeeded", "cleanup": "Succeeded",
        "restart": "Succeeded",
    }


def test_abort_finishes_without_freeze_then_cleans_up(wt):
    s = simulate(wt, decision="abort")
    assert (s["freeze"], s["finish"], s["verify"], s["cleanup"], s["restart"]) == (
        "Skipped", "Succeeded", "Skipped", "Succeeded", "Omitted")


def test_auto_approval_skips_approve_and_counts_as_cutover(wt):
    s = simulate(wt, params={"approval": "auto"})
    assert (s["approve"], s["freeze"], s["restart"]) == ("Skipped", "Succeeded", "Succeeded")


def test_rehearsal_never_freezes_or_restarts(wt):
    s = simulate(wt, params={"approval": "auto", "mode": "rehearsal"})
    assert s["create-scratch-target"] == "Succeeded"
    assert (s["freeze"], s["finish"], s["verify"], s["cleanup"], s["restart"]) == (
        "Skipped", "Succeeded", "Succeeded", "Succeeded", "Omitted")
    env = {e["name"]: e.get("value") for e in templates(wt)["verify"]["container"]["env"]}
    assert env["DB_UPGRADE_MODE"] == "{{workflow.parameters.mode}}"


def test_wait_caught_up_failure_still_stops_follow(wt):
    s = simulate(wt, outcomes={"wait-caught-up": "Failed"})
    assert (s["approve"], s["freeze"], s["finish"], s["verify"], s["restart"]) == (
        "Omitted", "Omitted", "Succeeded", "Omitted", "Omitted")


EXIT = {"workflow.parameters.keep-slot-on-failure": "false"}


@pytest.mark.parametrize(
    "status, frozen, restarted, mode, keep_slot, expected",
    [
        ("Succeeded", True, True, "upgrade", "false",
         {"unfreeze-after-failure": "Skipped", "cleanup-after-failure": "Skipped", "drop-scratch-target": "Skipped"}),
        ("Failed", True, False, "upgrade", "false",
         {"unfreeze-after-failure": "Succeeded", "cleanup-after-failure": "Succeeded"}),
        ("Failed", False, False, "upgrade", "false",
         {"unfreeze-after-failure": "Skipped", "cleanup-after-failure": "Succeeded"}),
        # Once restart began the applications may write to the target: never unfreeze the source.
        ("Failed", True, True, "upgrade", "false", {"unfreeze-after-failure": "Skipped"}),
        ("Error", True, False, "upgrade", "true",
         {"unfreeze-after-failure": "Succeeded", "cleanup-after-failure": "Skipped"}),
        ("Succeeded", False, False, "rehearsal", "false", {"drop-scratch-target": "Succeeded"}),
        ("Failed", False, False, "rehearsal", "false", {"drop-scratch-target": "Succeeded"}),
        ("Failed", False, False, "rehearsal", "true", {"drop-scratch-target": "Skipped"}),
    ],
)
def test_exit_handler(wt, status, frozen, restarted, mode, keep_slot, expected):
    assert wt["spec"]["onExit"] == "exit-handler"
    values = {"workflow.status": status}
    if frozen:
        values["workflow.outputs.parameters.frozen-at"] = "1764000000.123"
    if restarted:
        values["workflow.outputs.parameters.restart-started"] = "1764000100.000"
    s = simulate(wt, dag="exit-handler", params={"mode": mode, "keep-slot-on-failure": keep_slot},
                 extra_values=values)
    assert s["report"] == "Succeeded"
    assert {k: s[k] for k in expected} == expected
    assert {t["name"]: t["template"] for t in dag_tasks(wt, "exit-handler")} == {
        "report": "report", "unfreeze-after-failure": "unfreeze", "cleanup-after-failure": "cleanup",
        "drop-scratch-target": "drop-scratch-target"}


def test_approve_is_a_dropdown_defaulting_to_abort(wt):
    approve = templates(wt)["approve"]
    assert approve["suspend"] == {"duration": "14400"}
    decision_in = next(p for p in approve["inputs"]["parameters"] if p["name"] == "decision")
    assert decision_in["enum"] == ["cutover", "abort"] and decision_in["default"] == "abort"
    assert approve["outputs"]["parameters"] == [
        {"name": "decision", "valueFrom": {"default": "abort", "supplied": {}}}]
    task = next(t for t in dag_tasks(wt, "upgrade") if t["name"] == "approve")
    assert task["when"] == "'{{workflow.parameters.approval}}' == 'manual'"
    # The approver sees the lag on the approve node.
    assert task["arguments"]["parameters"] == [
        {"name": "lag", "value": "{{tasks.wait-caught-up.outputs.parameters.lag}}"}]
    wait_out = templates(wt)["wait-caught-up"]["outputs"]["parameters"]
    assert {"name": "lag", "valueFrom": {"path": "/tmp/outputs/lag"}} in wait_out


def test_parameters(wt):
    params = {p["name"]: (p["value"], p["enum"]) for p in wt["spec"]["arguments"]["parameters"]}
    assert params == {
        "approval": ("manual", ["manual", "auto"]),
        "mode": ("upgrade", ["upgrade", "rehearsal"]),
        "keep-slot-on-failure": ("false", ["false", "true"]),
        "keep-scratch": ("false", ["false", "true"]),
    }


WORK_STEPS = {"preflight", "grant-replication", "follow", "wait-caught-up", "freeze", "finish", "verify", "cleanup"}
NEAR_FOLLOW = {"wait-caught-up", "freeze", "finish"}


def test_one_work_volume_mounted_where_pgcopydb_dir_is_used(wt):
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


def test_affinity_only_on_pods_running_beside_follow(wt):
    ts = templates(wt)
    assert {n for n, t in ts.items() if "affinity" in t} == NEAR_FOLLOW
    term = ts["freeze"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term == {
        "labelSelector": {"matchLabels": {"workflows.argoproj.io/workflow": "{{workflow.name}}",
                                          "db-upgrade/role": "follow"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    assert ts["follow"]["metadata"]["labels"] == {"db-upgrade/role": "follow"}


def test_read_write_many_needs_no_affinity(tmp_path):
    wt = render(config(tmp_path, volume={"access_mode": "ReadWriteMany", "storage_class": "nfs"}))
    assert not any("affinity" in t for t in wt["spec"]["templates"])
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
    for name in ("follow", "wait-caught-up", "freeze", "finish", "unfreeze", "restart"):
        assert ts[name]["activeDeadlineSeconds"] > 0, name
    assert ts["wait-caught-up"]["activeDeadlineSeconds"] == 86400
    assert spec["securityContext"]["runAsNonRoot"] is True
    for name, t in ts.items():
        if "container" in t:
            sc = t["container"]["securityContext"]
            assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"], name
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in t["container"]["volumeMounts"]}
            assert {"/tmp", "/tmp/outputs"} <= mounts
            assert {"name": "tmp", "emptyDir": {}} in t["volumes"]


def test_mutex_follows_the_database_id(tmp_path):
    a = render(config(tmp_path, database_id="billing"))
    assert a["spec"]["synchronization"]["mutexes"] == [{"name": "db-upgrade-billing"}]
    assert a["metadata"]["name"] == "db-upgrade-t"


def test_metrics(wt):
    names = {m["name"] for m in wt["spec"]["metrics"]["prometheus"]}
    assert names == {"db_upgrade_duration_seconds", "db_upgrade_outcome_total"}
    restart = templates(wt)["restart"]
    assert restart["metrics"]["prometheus"][0]["name"] == "db_upgrade_write_downtime_seconds"
    assert {"name": "frozen-at", "valueFrom": {"path": "/tmp/outputs/frozen-at"}, "globalName": "frozen-at"} in (
        templates(wt)["freeze"]["outputs"]["parameters"])


def test_connections_from_secret_keys_or_service_file(wt, tmp_path):
    env = {e["name"]: e for e in templates(wt)["follow"]["container"]["env"]}
    assert env["PGCOPYDB_SOURCE_PGURI"]["value"] == "postgres://?service=source"
    assert env["PGSERVICEFILE"]["value"] == "/etc/db-upgrade/pg/pg_service.conf"
    vols = {v["name"]: v for v in templates(wt)["follow"]["volumes"]}
    assert vols["pg-service"]["secret"]["secretName"] == "pg-services"

    wt2 = render(config(tmp_path))
    env = {e["name"]: e for e in templates(wt2)["follow"]["container"]["env"]}
    assert env["PGCOPYDB_SOURCE_PGURI"] == {
        "name": "PGCOPYDB_SOURCE_PGURI", "valueFrom": {"secretKeyRef": {"name": "source-uri", "key": "uri"}}}
    assert "PGSERVICEFILE" not in env


def test_no_secret_value_anywhere(tmp_path, monkeypatch):
    marker = "Marker-Pa55word-7f3c"
    # As if the operator's shell held real credentials while rendering.
    for var in ("PGPASSWORD", "PGCOPYDB_SOURCE_PGURI", "PGCOPYDB_TARGET_PGURI"):
        monkeypatch.setenv(var, f"postgres://app:{marker}@db/orders" if "URI" in var else marker)
    docs = render_documents(config(tmp_path))
    text = to_multi_yaml(docs)
    assert marker not in text
    assert "secretKeyRef" in text
    for doc in docs:
        for p in doc.get("spec", {}).get("arguments", {}).get("parameters", []):
            assert "pass" not in json.dumps(p).lower()
