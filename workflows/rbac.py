"""The ServiceAccount the workflow pods run as, and the least it may do.

Two Roles, one concern each: what Argo's executor needs in the workflow's namespace,
and what `step restart` needs on the applications' Deployments (in their namespace).
"""

from __future__ import annotations

import copy

from workflows.config import Config

LABELS = {"app.kubernetes.io/name": "db-upgrade"}


def _meta(name: str, namespace: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": dict(LABELS)}


def deployment_rules(cfg: Config) -> list[dict]:
    if cfg.restart.deployments:
        # Named deployments: resourceNames pins the permission to exactly those.
        return [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments"],
                "resourceNames": list(cfg.restart.deployments),
                "verbs": ["get", "patch"],
            }
        ]
    # A selector is resolved at run time: list cannot be restricted by name.
    return [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "patch"]}]


EXECUTOR_RULES = [
    # The executor reports outputs and progress through WorkflowTaskResults.
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
]


def _binding(name: str, namespace: str, cfg: Config) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(name, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": cfg.service_account, "namespace": cfg.namespace}],
    }


def documents(cfg: Config) -> list[dict]:
    executor = f"{cfg.template_name}-executor"
    restart = f"{cfg.template_name}-restart"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(cfg.service_account, cfg.namespace)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(executor, cfg.namespace),
            "rules": copy.deepcopy(EXECUTOR_RULES),
        },
        _binding(executor, cfg.namespace, cfg),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(restart, cfg.restart_namespace),
            "rules": deployment_rules(cfg),
        },
        _binding(restart, cfg.restart_namespace, cfg),
    ]
