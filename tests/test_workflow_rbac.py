"""RBAC: the least the pods need, valid Kubernetes objects."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.test_workflow_helpers import config
from workflows import rbac

K8S_VERSION = "1.30.0"


def by_kind_ns(docs):
    return {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("restart", [{"deployments": ["api", "worker"]}, {"selector": "app=x", "namespace": "shop"}])
def test_documents_are_valid_kubernetes(tmp_path, restart):
    for doc in rbac.documents(config(tmp_path, restart=restart)):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


SWITCH = {"kind": "ServiceAccount", "name": "db-upgrade-switch", "namespace": "db-upgrade"}
ALL = [{"kind": "ServiceAccount", "name": n, "namespace": "db-upgrade"}
       for n in ("db-upgrade", "db-upgrade-switch", "db-upgrade-report")]


def test_named_deployments_rules_exactly(tmp_path):
    docs = by_kind_ns(rbac.documents(config(tmp_path)))
    assert set(docs) == {
        ("ServiceAccount", "db-upgrade", "db-upgrade"),
        ("ServiceAccount", "db-upgrade", "db-upgrade-switch"),
        ("ServiceAccount", "db-upgrade", "db-upgrade-report"),
        ("Role", "db-upgrade", "db-upgrade-t-executor"),
        ("RoleBinding", "db-upgrade", "db-upgrade-t-executor"),
        ("Role", "db-upgrade", "db-upgrade-t-restart"),
        ("RoleBinding", "db-upgrade", "db-upgrade-t-restart"),
        ("Role", "db-upgrade", "db-upgrade-t-history"),
        ("RoleBinding", "db-upgrade", "db-upgrade-t-history"),
    }
    assert docs[("Role", "db-upgrade", "db-upgrade-t-executor")]["rules"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]
    # Every pod may report its own results...
    assert docs[("RoleBinding", "db-upgrade", "db-upgrade-t-executor")]["subjects"] == ALL
    assert docs[("Role", "db-upgrade", "db-upgrade-t-restart")]["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["api", "worker"],
         "verbs": ["get", "patch"]}]
    binding = docs[("RoleBinding", "db-upgrade", "db-upgrade-t-restart")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "db-upgrade-t-restart"}
    # ... only the cutover pod's account may patch Deployments ...
    assert binding["subjects"] == [SWITCH]
    # ... and only the report pod's may write the history.
    history = docs[("Role", "db-upgrade", "db-upgrade-t-history")]["rules"]
    assert history[0] == {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["db-upgrade-history-orders"],
                          "verbs": ["get", "update"]}
    assert docs[("RoleBinding", "db-upgrade", "db-upgrade-t-history")]["subjects"] == [
        {"kind": "ServiceAccount", "name": "db-upgrade-report", "namespace": "db-upgrade"}]


def test_no_database_pod_can_patch_deployments(tmp_path):
    """Every template but the two switches (cutover, rollback) runs as the account without the restart Role."""
    from workflows.upgrade import render

    cfg = config(tmp_path)
    docs = rbac.documents(cfg)
    patchers = {s["name"] for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["name"].endswith("-restart")
                for s in d["subjects"]}
    wt = render(cfg)
    for t in wt["spec"]["templates"]:
        if "container" in t:
            account = t.get("serviceAccountName", wt["spec"]["serviceAccountName"])
            assert (account in patchers) == (t["name"] in ("cutover", "rollback")), t["name"]  # the switches


def test_selector_in_another_namespace(tmp_path):
    docs = by_kind_ns(rbac.documents(config(tmp_path, restart={"selector": "app=x", "namespace": "shop"})))
    assert docs[("Role", "shop", "db-upgrade-t-restart")]["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "patch"]}]
    binding = docs[("RoleBinding", "shop", "db-upgrade-t-restart")]
    # The subject stays the cutover's service account in the workflow's namespace.
    assert binding["subjects"] == [SWITCH]
    assert ("Role", "db-upgrade", "db-upgrade-t-executor") in docs


def test_a_typo_is_caught_by_kubernetes_validate(tmp_path):
    role = next(d for d in rbac.documents(config(tmp_path)) if d["kind"] == "Role")
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSION, strict=True)
