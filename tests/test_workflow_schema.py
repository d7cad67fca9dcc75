"""The strict Argo schema: every rendered document validates; a typo does not."""

from __future__ import annotations

import copy

import pytest

from tests.test_workflow_helpers import EXAMPLE, ROOT, config
from workflows import schema
from workflows.config import load_config
from workflows.render import render_documents


def documents():
    return render_documents(load_config(EXAMPLE))


@pytest.mark.parametrize("path", sorted((ROOT / "environments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_rendered_document_validates(path):
    docs = render_documents(load_config(path))
    assert {d["kind"] for d in docs} >= {"WorkflowTemplate", "ServiceAccount", "Role", "RoleBinding"}
    assert schema.problems(docs) == []


def test_rwx_and_selector_variants_validate(tmp_path):
    cfg = config(tmp_path, volume={"access_mode": "ReadWriteMany"}, restart={"selector": "app=x", "namespace": "shop"})
    assert schema.problems(render_documents(cfg)) == []


@pytest.mark.parametrize(
    "where, field",
    [
        (lambda wt: wt["spec"], "serviceAcountName"),
        (lambda wt: wt["spec"]["templates"][0], "activeDeadlineSecond"),
        (lambda wt: wt["spec"]["templates"][0]["container"], "evn"),
        (lambda wt: wt["spec"]["templates"][-1]["dag"]["tasks"][0], "dependencies_"),
    ],
)
def test_a_misspelt_field_fails(where, field):
    wt = next(d for d in documents() if d["kind"] == "WorkflowTemplate")
    bad = copy.deepcopy(wt)
    where(bad)[field] = "x"
    problems = schema.validate(bad)
    assert len(problems) == 1
    assert f"'{field}' was unexpected" in problems[0]
    assert problems[0].startswith("WorkflowTemplate/db-upgrade-example: ")


def test_int_or_string_accepts_both():
    wt = next(d for d in documents() if d["kind"] == "WorkflowTemplate")
    follow = next(t for t in wt["spec"]["templates"] if t["name"] == "follow")
    assert isinstance(follow["activeDeadlineSeconds"], int)
    follow["activeDeadlineSeconds"] = "3600"
    assert schema.validate(wt) == []
    follow["activeDeadlineSeconds"] = 1.5
    assert schema.validate(wt) != []


def test_patch_leaves_open_definitions_alone():
    raw = {"definitions": {
        "a": {"type": "object", "properties": {"x": {}}},
        "map": {"type": "object", "properties": {"x": {}}, "additionalProperties": {"type": "string"}},
        "any": {"type": "object"},
        "combined": {"properties": {"x": {}}, "allOf": [{"$ref": "#/definitions/a"}]},
        schema.INT_OR_STRING: {"type": "string"},
    }}
    patched = schema.patch(raw)
    d = patched["definitions"]
    assert d["a"]["additionalProperties"] is False
    assert d["map"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in d["any"] and "additionalProperties" not in d["combined"]
    assert d[schema.INT_OR_STRING] == {"type": ["string", "integer"]}
    assert "additionalProperties" not in raw["definitions"]["a"]  # the input is not modified


def test_schema_location_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("DB_UPGRADE_ARGO_SCHEMA", str(tmp_path / "s.json"))
    assert schema.schema_path() == tmp_path / "s.json"
    monkeypatch.delenv("DB_UPGRADE_ARGO_SCHEMA")
    assert schema.schema_path() == ROOT.parent / "shared/argo/schema.json"
