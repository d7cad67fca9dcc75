"""All documents of one environment, in apply order, and their file names.

Other builders (the rehearsal CronWorkflow) join the list when their module exists.
"""

from __future__ import annotations

import importlib

import yaml

from workflows import rbac, upgrade
from workflows.config import Config

# Optional builders: module name -> function(config) returning one document or a list.
EXTRA_BUILDERS = [("workflows.rehearsal", "documents")]


def _extra(cfg: Config) -> list[dict]:
    docs: list[dict] = []
    for module_name, func in EXTRA_BUILDERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real import error inside the module
                raise
            continue
        result = getattr(module, func)(cfg)
        docs.extend(result if isinstance(result, list) else [result])
    return docs


def as_dict(obj) -> dict:
    """A Hera object, Hera model or plain dict as the wire-format dict."""
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj.model_dump(by_alias=True, exclude_none=True, mode="json")


def render_documents(cfg: Config) -> list[dict]:
    return rbac.documents(cfg) + [upgrade.render(cfg)] + _extra(cfg)


def file_name(doc: dict) -> str:
    meta = doc["metadata"]
    return f"{doc['kind'].lower()}-{meta['namespace']}-{meta['name']}.yaml"


def to_yaml(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=120)


def to_multi_yaml(docs: list[dict]) -> str:
    return "".join(f"---\n{to_yaml(d)}" for d in docs)
