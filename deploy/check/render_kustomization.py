#!/usr/bin/env python3
"""Render a (simple) kustomization the way `kubectl kustomize` does, without kubectl.

Twill's kustomizations use only these fields, so this renderer can be faithful:

  resources   local YAML files (no directories, no remote bases)
  namespace   set on every namespaced object
  labels      [{pairs: {...}, includeSelectors: false, includeTemplates: bool}]
  images      [{name, newName?, newTag?, digest?}]

Any other field is an error, so a kustomization cannot outgrow the renderer quietly.
validate_manifests.py compares this rendering with `kubectl kustomize` whenever kubectl
is installed.

Usage: render_kustomization.py DIR        prints the rendered documents as YAML
"""

import copy
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images"}

# Kinds without a namespace (the ones a network add-on might ship).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "CustomResourceDefinition",
    "StorageClass",
    "PersistentVolume",
    "ClusterIssuer",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "RuntimeClass",
    "CSIDriver",
}

# Where kustomize's image transformer looks: containers and initContainers of pods and
# pod templates.
POD_SPEC_PATHS = [
    ("spec",),  # Pod
    ("spec", "template", "spec"),  # Deployment, DaemonSet, StatefulSet, ReplicaSet, Job
    ("spec", "jobTemplate", "spec", "template", "spec"),  # CronJob
]


class KustomizationError(Exception):
    pass


def load_kustomization(directory):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                k = yaml.safe_load(f) or {}
            unknown = set(k) - SUPPORTED
            if unknown:
                raise KustomizationError(
                    f"{path}: fields {sorted(unknown)} are not supported by "
                    f"render_kustomization.py (supported: {sorted(SUPPORTED)}); keep the "
                    "kustomization simple or teach the renderer"
                )
            return path, k
    raise KustomizationError(f"no kustomization.yaml in {directory}")


def _dig(obj, path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _split_image(image):
    """name, tag, digest of an image reference (tag/digest may be None)."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1 :]
    return image, tag, digest


def _apply_images(doc, images):
    for path in POD_SPEC_PATHS:
        pod = _dig(doc, path)
        if not isinstance(pod, dict):
            continue
        for field in ("initContainers", "containers"):
            for c in pod.get(field) or []:
                if "image" not in c:
                    continue
                name, tag, digest = _split_image(c["image"])
                for rule in images:
                    if rule.get("name") != name:
                        continue
                    new_name = rule.get("newName", name)
                    if "digest" in rule:
                        c["image"] = f"{new_name}@{rule['digest']}"
                    elif "newTag" in rule:
                        c["image"] = f"{new_name}:{rule['newTag']}"
                    elif digest:
                        c["image"] = f"{new_name}@{digest}"
                    elif tag:
                        c["image"] = f"{new_name}:{tag}"
                    else:
                        c["image"] = new_name
                    break


def _apply_labels(doc, rules):
    for rule in rules:
        pairs = {str(k): str(v) for k, v in (rule.get("pairs") or {}).items()}
        if rule.get("includeSelectors"):
            raise KustomizationError(
                "labels with includeSelectors: true are not supported (selectors are "
                "immutable: changing them breaks upgrades)"
            )
        extra = set(rule) - {"pairs", "includeSelectors", "includeTemplates"}
        if extra:
            raise KustomizationError(f"labels fields {sorted(extra)} are not supported")
        meta = doc.setdefault("metadata", {})
        meta.setdefault("labels", {}).update(pairs)
        if rule.get("includeTemplates"):
            tmeta = _dig(doc, ("spec", "template", "metadata"))
            if isinstance(tmeta, dict):
                tmeta.setdefault("labels", {}).update(pairs)


def render(directory):
    """The documents the kustomization in DIRECTORY produces, in resource order."""
    path, k = load_kustomization(directory)
    namespace = k.get("namespace")
    labels = k.get("labels") or []
    images = k.get("images") or []
    docs = []
    for res in k.get("resources") or []:
        rpath = os.path.join(directory, res)
        if not os.path.isfile(rpath):
            raise KustomizationError(f"{path}: resource {res} is not a local file")
        with open(rpath, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is None:
                    continue
                if not isinstance(doc, dict) or "kind" not in doc:
                    raise KustomizationError(f"{rpath}: a document is not a Kubernetes object")
                doc = copy.deepcopy(doc)
                if namespace and doc["kind"] not in CLUSTER_SCOPED:
                    doc.setdefault("metadata", {})["namespace"] = namespace
                _apply_labels(doc, labels)
                _apply_images(doc, images)
                docs.append(doc)
    return docs


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        docs = render(argv[1])
    except KustomizationError as e:
        print(f"render_kustomization: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False, explicit_start=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
