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
    if cfg.restart is None:
        return []
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


def history_rules(cfg: Config) -> list[dict]:
    # get/update can be pinned to the one ConfigMap; create cannot (the name does not exist yet).
    return [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [cfg.history_config_map],
         "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ]


def _binding(name: str, namespace: str, cfg: Config, accounts: list[str]) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(name, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": a, "namespace": cfg.namespace} for a in accounts],
    }


def _role(name: str, namespace: str, rules: list[dict]) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(name, namespace),
            "rules": copy.deepcopy(rules)}


def documents(cfg: Config) -> list[dict]:
    """Three ServiceAccounts, least privilege each: every pod may report its own
    results; only the cutover pod (the switch) may patch the Deployments; only the
    report pod may write the history ConfigMap."""
    executor = f"{cfg.template_name}-executor"
    restart = f"{cfg.template_name}-restart"
    history = f"{cfg.template_name}-history"
    accounts = [cfg.service_account, cfg.switch_service_account, cfg.report_service_account]
    docs = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(a, cfg.namespace)} for a in accounts]
    docs += [_role(executor, cfg.namespace, EXECUTOR_RULES), _binding(executor, cfg.namespace, cfg, accounts)]
    if cfg.switch.strategy == "restart":  # pgbouncer and none need no Kubernetes permission
        docs += [_role(restart, cfg.restart_namespace, deployment_rules(cfg)),
                 _binding(restart, cfg.restart_namespace, cfg, [cfg.switch_service_account])]
    docs += [
        _role(history, cfg.namespace, history_rules(cfg)),
        _binding(history, cfg.namespace, cfg, [cfg.report_service_account]),
    ]
    return docs
