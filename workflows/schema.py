"""Offline validation of Argo documents against the official JSON schema, made strict.

The published schema (v4.1.2) has two gaps that `argo lint` does not: IntOrString is
typed as string only (so a valid `activeDeadlineSeconds: 3600` fails), and no
definition forbids unknown fields (so a typo such as `serviceAcountName` passes).
We patch both in memory; nothing of the schema is copied into the repository.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import jsonschema

INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
ARGO_KINDS = ("Workflow", "WorkflowTemplate", "CronWorkflow", "ClusterWorkflowTemplate")


def schema_path() -> Path:
    env = os.environ.get("DB_UPGRADE_ARGO_SCHEMA")
    if env:
        return Path(env)
    # The shared checkout next to the repository (CI and developer machines).
    return Path(__file__).resolve().parents[1].parent / "shared/argo/schema.json"


def patch(schema: dict) -> dict:
    """Returns a strict copy of the Argo schema."""
    schema = copy.deepcopy(schema)
    definitions = schema["definitions"]
    definitions[INT_OR_STRING] = {"type": ["string", "integer"]}
    for definition in definitions.values():
        # Only closed objects: skip definitions that already decide (maps), or that
        # combine sub-schemas, where `additionalProperties: false` would reject
        # properties listed in the other branch.
        if "properties" not in definition or "additionalProperties" in definition:
            continue
        if any(k in definition for k in ("allOf", "anyOf", "oneOf", "$ref")):
            continue
        definition["additionalProperties"] = False
    return schema


@functools.cache
def _patched() -> dict:
    path = schema_path()
    try:
        return patch(json.loads(path.read_text()))
    except OSError as exc:
        raise FileNotFoundError(
            f"Argo schema not found at {path} ({exc.strerror}): set DB_UPGRADE_ARGO_SCHEMA"
        ) from None


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    schema = _patched()
    root = {
        "$schema": schema.get("$schema"),
        "definitions": schema["definitions"],
        "$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{kind}",
    }
    cls = jsonschema.validators.validator_for(root)
    return cls(root)


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def validate(document: dict) -> list[str]:
    """One line per problem; an empty list means valid. Non-Argo kinds are not checked here."""
    kind = document.get("kind")
    if kind not in ARGO_KINDS:
        return []
    name = (document.get("metadata") or {}).get("name", "?")
    errors = sorted(_validator(kind).iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{kind}/{name}: {_where(e.absolute_path)}: {e.message}" for e in errors]


def _kubernetes_problems(document: dict) -> list[str]:
    """Core kinds (RBAC, ServiceAccount) against the Kubernetes schemas, when available."""
    try:
        import kubernetes_validate
    except ImportError:  # an optional (test) dependency: lint the Argo documents only
        return []
    name = f"{document.get('kind')}/{(document.get('metadata') or {}).get('name', '?')}"
    try:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{name}: {_where(exc.path)}: {exc.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        return [f"{name}: cannot validate: {exc}"]
    return []


def problems(documents: list[dict]) -> list[str]:
    """Every problem of every document, one line each."""
    found: list[str] = []
    for document in documents:
        if document.get("kind") in ARGO_KINDS:
            found += validate(document)
        else:
            found += _kubernetes_problems(document)
    return found
