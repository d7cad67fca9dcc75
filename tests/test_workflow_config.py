"""Environment files: strict, and every error one line naming the file and the field."""

from __future__ import annotations

import pytest

from tests.test_workflow_helpers import BASE, ROOT, write_config
from workflows.config import ConfigError, load_config, package_version


def error(tmp_path, data, name="x.yaml") -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, data, name))
    message = str(exc.value)
    assert "\n" not in message
    return message


def with_(**changes):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


@pytest.mark.parametrize("path", sorted((ROOT / "environments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_environments_load(path):
    cfg = load_config(path)
    assert cfg.template_name == f"db-upgrade-{cfg.name}"


def test_unknown_field_is_named_with_the_file(tmp_path):
    msg = error(tmp_path, with_(restart__deploymnets=["api"], restart__deployments=["api"]))
    assert msg == f"{tmp_path}/x.yaml: restart.deploymnets: unknown field"


def test_missing_field(tmp_path):
    assert error(tmp_path, with_(namespace=None)) == f"{tmp_path}/x.yaml: namespace: missing field"


def test_empty_deployment_list(tmp_path):
    msg = error(tmp_path, with_(restart__deployments=[]))
    assert msg == f"{tmp_path}/x.yaml: restart: deployments is empty: name at least one deployment"


def test_names_and_selector_both(tmp_path):
    msg = error(tmp_path, with_(restart__selector="app=x"))
    assert msg == f"{tmp_path}/x.yaml: restart: give deployments or selector, not both"


def test_neither_names_nor_selector(tmp_path):
    msg = error(tmp_path, with_(restart__deployments=None))
    assert msg.endswith("restart: give deployments or selector")


def test_a_password_in_a_uri_is_refused_and_never_echoed(tmp_path):
    msg = error(tmp_path, with_(connections__source={"uri": "postgres://app:S3cret-marker@db/orders"}))
    assert "connections.source.uri" in msg and "password" in msg
    assert "S3cret-marker" not in msg


def test_endpoint_needs_exactly_one_source(tmp_path):
    msg = error(tmp_path, with_(connections__target={"uri": "postgres://?service=db", "secret": "s", "key": "k"}))
    assert "connections.target: give uri, or secret and key, not both" in msg


def test_wrong_type_and_yaml_errors(tmp_path):
    assert "lag_threshold_bytes" in error(tmp_path, with_(lag_threshold_bytes="lots"))
    assert "volume.access_mode" in error(tmp_path, with_(volume={"access_mode": "ReadOnlyMany"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_tag_defaults_to_the_package_version(tmp_path):
    data = with_(image={"repository": "r"})
    cfg = load_config(write_config(tmp_path, data))
    assert cfg.image.tag == package_version()
    assert cfg.restart_namespace == cfg.namespace
    assert cfg.mutex_name == "db-upgrade-orders"
