"""Render docker/k8s the way `kubectl kustomize` does, for the subset of kustomize its
kustomizations use (no kustomize binary here): resources (files and folders), namespace,
images, and strategic-merge patches named by path. A kustomization using anything else is
refused, so the test never passes on something it did not render."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
POD_TEMPLATES = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(base, patch):
    """Strategic merge as the API server applies it to the fields our patches touch: maps merge
    key by key, lists of named items (containers, env, volumes) merge by name, other lists and
    values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if key.startswith("$patch"):
                raise ValueError(f"unsupported patch directive {key}")
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in base + patch):
        merged = [copy.deepcopy(item) for item in base]
        index = {item["name"]: position for position, item in enumerate(merged)}
        for item in patch:
            if item["name"] in index:
                merged[index[item["name"]]] = _merge(merged[index[item["name"]]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def _pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in POD_TEMPLATES:
        return doc["spec"]["template"]["spec"]
    return None


def containers(doc: dict) -> list[dict]:
    spec = _pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def render(folder: Path) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED
    if unsupported:
        raise ValueError(f"{folder}: kustomization keys this renderer lacks: {unsupported}")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else _documents(path)
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise ValueError(f"{folder}: only patches by path are rendered here: {entry}")
        for patch in _documents(folder / entry["path"]):
            [target] = [
                position
                for position, doc in enumerate(docs)
                if doc["kind"] == patch["kind"]
                and doc["metadata"]["name"] == patch["metadata"]["name"]
            ]
            docs[target] = _merge(docs[target], patch)
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in containers(doc):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if namespace := kustomization.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    return docs
