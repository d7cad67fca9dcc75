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


def test_named_deployments_rules_exactly(tmp_path):
    docs = by_kind_ns(rbac.documents(config(tmp_path)))
    assert set(docs) == {
        ("ServiceAccount", "db-upgrade", "db-upgrade"),
        ("Role", "db-upgrade", "db-upgrade-t-executor"),
        ("RoleBinding", "db-upgrade", "db-upgrade-t-executor"),
        ("Role", "db-upgrade", "db-upgrade-t-restart"),
        ("RoleBinding", "db-upgrade", "db-upgrade-t-restart"),
    }
    assert docs[("Role", "db-upgrade", "db-upgrade-t-executor")]["rules"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]
    assert docs[("Role", "db-upgrade", "db-upgrade-t-restart")]["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["api", "worker"],
         "verbs": ["get", "patch"]}]
    binding = docs[("RoleBinding", "db-upgrade", "db-upgrade-t-restart")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "db-upgrade-t-restart"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "db-upgrade", "namespace": "db-upgrade"}]


def test_selector_in_another_namespace(tmp_path):
    docs = by_kind_ns(rbac.documents(config(tmp_path, restart={"selector": "app=x", "namespace": "shop"})))
    assert docs[("Role", "shop", "db-upgrade-t-restart")]["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "patch"]}]
    binding = docs[("RoleBinding", "shop", "db-upgrade-t-restart")]
    # The subject stays the workflow's service account in the workflow's namespace.
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "db-upgrade", "namespace": "db-upgrade"}]
    assert ("Role", "db-upgrade", "db-upgrade-t-executor") in docs


def test_a_typo_is_caught_by_kubernetes_validate(tmp_path):
    role = rbac.documents(config(tmp_path))[1]
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSION, strict=True)
