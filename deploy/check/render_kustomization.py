#!/usr/bin/env python3
"""Render a (simple) kustomization the way `kubectl kustomize` does, without kubectl.

Twill's kustomizations use only these fields, so this renderer can be faithful:

  resources   local YAML files inside the kustomization's directory, and local
              directories holding a kustomization (bases, rendered first; no remote
              bases)
  patches     [{path | patch, target?}], applied to the resources in that order:
                - a JSON patch (RFC 6902, a YAML list of operations: add, remove,
                  replace, move, copy, test), with a target {group?, version?, kind?,
                  name?, namespace?}, each matched exactly (kustomize's are regular
                  expressions; these are plain names);
                - the strategic-merge patch `$patch: delete` of a whole object,
                  named by its apiVersion, kind, metadata.name and metadata.namespace.
              A patch that matches nothing is an error here (kustomize may skip it).
  namespace   set on every namespaced object
  labels      [{pairs: {...}, includeSelectors: false, includeTemplates: bool}]
  images      [{name, newName?, newTag?, digest?}]

The order is kustomize's: resources (bases fully rendered), patches, then namespace,
labels and images over everything. Any other field or patch form is an error, so a
kustomization cannot outgrow the renderer quietly.
validate_manifests.py compares this rendering with `kubectl kustomize` whenever kubectl
is installed.

Usage: render_kustomization.py DIR        prints the rendered documents as YAML
"""

import copy
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}

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


def _within(path, directory):
    """Whether PATH is DIRECTORY or inside it (symbolic links resolved)."""
    directory = os.path.realpath(directory)
    return os.path.commonpath([os.path.realpath(path), directory]) == directory


def _load_docs(rpath):
    docs = []
    with open(rpath, encoding="utf-8") as f:
        for doc in yaml.safe_load_all(f):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise KustomizationError(f"{rpath}: a document is not a Kubernetes object")
            docs.append(copy.deepcopy(doc))
    return docs


# ---------------------------------------------------------------------------------------
# JSON patch (RFC 6902) and JSON pointer (RFC 6901)


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizationError(f"JSON pointer {path!r} does not start with /")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _index(container, token, path, for_add=False):
    if token == "-" and for_add:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise KustomizationError(f"{path}: {token!r} is not an array index")
    i = int(token)
    if i > len(container) or (i == len(container) and not for_add):
        raise KustomizationError(f"{path}: index {i} is out of range (length {len(container)})")
    return i


def _parent(doc, path):
    tokens = _pointer(path)
    if not tokens:
        raise KustomizationError(f"{path!r}: operations on the whole document are not supported")
    obj = doc
    for t in tokens[:-1]:
        if isinstance(obj, dict):
            if t not in obj:
                raise KustomizationError(f"{path}: {t!r} does not exist")
            obj = obj[t]
        elif isinstance(obj, list):
            obj = obj[_index(obj, t, path)]
        else:
            raise KustomizationError(f"{path}: {t!r} is not inside an object or array")
    return obj, tokens[-1]


def _get(doc, path):
    obj, last = _parent(doc, path)
    if isinstance(obj, dict):
        if last not in obj:
            raise KustomizationError(f"{path}: does not exist")
        return obj[last]
    if isinstance(obj, list):
        return obj[_index(obj, last, path)]
    raise KustomizationError(f"{path}: the parent is not an object or array")


def _add(doc, path, value):
    obj, last = _parent(doc, path)
    if isinstance(obj, dict):
        obj[last] = value
    elif isinstance(obj, list):
        obj.insert(_index(obj, last, path, for_add=True), value)
    else:
        raise KustomizationError(f"{path}: the parent is not an object or array")


def _remove(doc, path):
    obj, last = _parent(doc, path)
    if isinstance(obj, dict):
        if last not in obj:
            raise KustomizationError(f"{path}: cannot remove what does not exist")
        return obj.pop(last)
    if isinstance(obj, list):
        return obj.pop(_index(obj, last, path))
    raise KustomizationError(f"{path}: the parent is not an object or array")


def _json_equal(a, b):
    """JSON equality: no bool/number confusion (in Python True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _json_patch(doc, ops, origin):
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise KustomizationError(f"{origin}: operation {n} needs op and path")
        kind, path = op["op"], op["path"]
        where = f"{origin}: operation {n} ({kind} {path})"
        try:
            if kind == "add":
                _add(doc, path, copy.deepcopy(op["value"]))
            elif kind == "remove":
                _remove(doc, path)
            elif kind == "replace":
                value = copy.deepcopy(op["value"])
                _remove(doc, path)  # must exist
                _add(doc, path, value)
            elif kind == "move":
                _add(doc, path, _remove(doc, op["from"]))
            elif kind == "copy":
                _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
            elif kind == "test":
                if not _json_equal(_get(doc, path), op["value"]):
                    raise KustomizationError(f"test failed: the value is {_get(doc, path)!r}, not {op['value']!r}")
            else:
                raise KustomizationError(f"unknown operation {kind!r}")
        except KeyError as e:
            raise KustomizationError(f"{where}: {e} is missing") from None
        except KustomizationError as e:
            raise KustomizationError(f"{where}: {e}") from None


def _group_version(doc):
    api = doc.get("apiVersion", "")
    return tuple(api.split("/", 1)) if "/" in api else ("", api)


def _matches(doc, target):
    group, version = _group_version(doc)
    meta = doc.get("metadata") or {}
    have = {
        "group": group,
        "version": version,
        "kind": doc.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    return all(have[k] == v for k, v in target.items())


def _apply_patches(docs, patches, directory, path):
    for n, p in enumerate(patches):
        if not isinstance(p, dict) or set(p) - {"path", "patch", "target"} or ("path" in p) == ("patch" in p):
            raise KustomizationError(f"{path}: patches[{n}] needs exactly one of path and patch (and maybe target)")
        if "path" in p:
            ppath = os.path.join(directory, p["path"])
            if not _within(ppath, directory) or not os.path.isfile(ppath):
                raise KustomizationError(f"{path}: patch {p['path']} is not a file inside {directory}")
            origin = ppath
            with open(ppath, encoding="utf-8") as f:
                text = f.read()
        else:
            origin, text = f"{path}: patches[{n}]", p["patch"]
        body = list(yaml.safe_load_all(text))
        if len(body) == 1 and isinstance(body[0], list):
            target = p.get("target")
            if not isinstance(target, dict) or not target or set(target) - TARGET_FIELDS:
                raise KustomizationError(
                    f"{origin}: a JSON patch needs a target with some of {sorted(TARGET_FIELDS)} (and nothing else)"
                )
            hits = [d for d in docs if _matches(d, target)]
            if not hits:
                raise KustomizationError(f"{origin}: the target {target} matches no object")
            for d in hits:
                _json_patch(d, body[0], origin)
        elif len(body) == 1 and isinstance(body[0], dict) and body[0].get("$patch") == "delete":
            spec = body[0]
            if "target" in p or set(spec) - {"$patch", "apiVersion", "kind", "metadata"} or set(
                spec.get("metadata") or {}
            ) - {"name", "namespace"}:
                raise KustomizationError(
                    f"{origin}: only `$patch: delete` of a whole object (apiVersion, kind, metadata.name/namespace) is supported"
                )
            group, version = _group_version(spec)
            target = {"group": group, "version": version, "kind": spec.get("kind")}
            target["name"] = (spec.get("metadata") or {}).get("name")
            target["namespace"] = (spec.get("metadata") or {}).get("namespace")
            hits = [d for d in docs if _matches(d, target)]
            if len(hits) != 1:
                raise KustomizationError(f"{origin}: `$patch: delete` matches {len(hits)} objects, not one ({target})")
            docs.remove(hits[0])
        else:
            raise KustomizationError(
                f"{origin}: only JSON patches (a list of operations) and `$patch: delete` are supported"
            )


def render(directory, _visiting=()):
    """The documents the kustomization in DIRECTORY produces, in resource order."""
    directory = os.path.realpath(directory)
    for v in _visiting:
        # kustomize refuses a base that contains (or is) a kustomization being rendered
        if _within(v, directory):
            raise KustomizationError(f"cycle: {directory} contains {v}, which includes it")
    path, k = load_kustomization(directory)
    namespace = k.get("namespace")
    labels = k.get("labels") or []
    images = k.get("images") or []
    docs = []
    for res in k.get("resources") or []:
        rpath = os.path.join(directory, res)
        if os.path.isdir(rpath):
            docs.extend(render(rpath, _visiting + (directory,)))
        elif os.path.isfile(rpath) and _within(rpath, directory):
            docs.extend(_load_docs(rpath))
        else:
            raise KustomizationError(
                f"{path}: resource {res} is neither a file inside {directory} nor a directory"
            )
    _apply_patches(docs, k.get("patches") or [], directory, path)
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc.setdefault("metadata", {})["namespace"] = namespace
        _apply_labels(doc, labels)
        _apply_images(doc, images)
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
