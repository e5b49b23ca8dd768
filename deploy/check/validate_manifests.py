#!/usr/bin/env python3
"""Offline checks of Twill's Kubernetes manifests (run by tests/tests/deploy_manifests.rs).

For each kustomization (deploy/kubernetes and deploy/kubernetes/cert-manager, the
single-controller default; deploy/kubernetes-ha and deploy/kubernetes-ha/cert-manager,
the HA variant, overlays of those two):
  1. render it: with `kubectl kustomize` when kubectl is installed, else with
     render_kustomization.py; when kubectl is there, the two renderings must agree, so
     the Python renderer stays faithful for machines without kubectl;
  2. validate every rendered object against the Kubernetes OpenAPI schemas shipped by
     the PyPI package kubernetes-validate, in strict mode (unknown fields are errors),
     for each Kubernetes version in VERSIONS.
cert-manager's kinds (cert-manager.io/*) are custom resources without a schema in
kubernetes-validate: they are skipped by name, with a note, after a structural check.
The Certificates printed by cert-manager/node-certificates.sh, and the manifests applied
on their own (STANDALONE: kubernetes-ha/migrate-from-sled.yaml), get the same checks.

Exit status: 0 all good; 1 a check failed; 77 skipped because python3's yaml or
kubernetes-validate is missing (only when the environment variable CI is unset: under
CI a missing tool is a failure). Install: pip install kubernetes-validate
"""

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.dirname(HERE)
KUSTOMIZATIONS = [
    os.path.join(DEPLOY, "kubernetes"),
    os.path.join(DEPLOY, "kubernetes", "cert-manager"),
    os.path.join(DEPLOY, "kubernetes-ha"),
    os.path.join(DEPLOY, "kubernetes-ha", "cert-manager"),
]
# Manifests applied on their own (`kubectl apply -f`), outside any kustomization.
STANDALONE = [
    os.path.join(DEPLOY, "kubernetes-ha", "migrate-from-sled.yaml"),
]
# The oldest Kubernetes we promise (1.30) and the newest the package ships.
VERSIONS = ["1.30.0", "latest"]
# Custom resources: no schema in kubernetes-validate.
SKIPPED_GROUPS = {"cert-manager.io": "cert-manager CRD (no schema in kubernetes-validate)"}
SKIP = 77


def in_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip(reason):
    bar = "!" * 78
    msg = f"\n{bar}\n!! SKIPPED deploy manifest validation: {reason}\n!! Install: pip install kubernetes-validate\n{bar}\n"
    if in_ci():
        print(msg.replace("SKIPPED", "FAILED (CI is set, so nothing may be skipped):"), file=sys.stderr)
        sys.exit(1)
    print(msg, file=sys.stderr)
    sys.exit(SKIP)


try:
    import yaml
except ImportError:
    skip("python3 has no yaml module (PyYAML)")
try:
    from kubernetes_validate import utils as kv
except ImportError:
    skip("the PyPI package kubernetes-validate is not installed")

sys.path.insert(0, HERE)
import render_kustomization  # noqa: E402

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}", file=sys.stderr)


def ident(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{(ns + '/') if ns else ''}{meta.get('name')}"


def kubectl_render(directory):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    try:
        out = subprocess.run(
            [kubectl, "kustomize", directory],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"note: kubectl kustomize unusable ({e}); using render_kustomization.py", file=sys.stderr)
        return None
    if out.returncode != 0:
        fail(f"kubectl kustomize {directory} failed: {out.stderr.strip()}")
        return None
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def structural_check_cert_manager(doc):
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        fail(f"{ident(doc)}: no spec")
        return
    if doc["kind"] == "Certificate":
        for field in ("secretName", "issuerRef"):
            if field not in spec:
                fail(f"{ident(doc)}: spec.{field} is missing")
        if not (spec.get("commonName") or spec.get("dnsNames")):
            fail(f"{ident(doc)}: neither commonName nor dnsNames")
        if (spec.get("privateKey") or {}).get("encoding") != "PKCS8":
            fail(f"{ident(doc)}: privateKey.encoding must be PKCS8 (twillctl signs with PKCS#8 keys)")


def validate(doc, origin):
    group = doc.get("apiVersion", "").split("/")[0] if "/" in doc.get("apiVersion", "") else ""
    if group in SKIPPED_GROUPS:
        structural_check_cert_manager(doc)
        print(f"  skip {ident(doc)}: {SKIPPED_GROUPS[group]} ({origin})")
        return
    for version in VERSIONS:
        v = kv.latest_version() if version == "latest" else version
        try:
            used = kv.validate(doc, v, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path) or "(top)"
            fail(f"{ident(doc)} ({origin}) is invalid for Kubernetes {v} at {path}: {e.message}")
            continue
        except kv.SchemaNotFoundError:
            fail(f"{ident(doc)} ({origin}): no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {v}")
            continue
        print(f"  ok   {ident(doc)} (Kubernetes {used}, strict)")


def canonical(docs):
    return sorted(yaml.safe_dump(d, sort_keys=True) for d in docs)


def main():
    print(f"kubernetes-validate schemas: {kv.all_versions()[0]} .. {kv.latest_version()}; checking {VERSIONS}")
    for directory in KUSTOMIZATIONS:
        rel = os.path.relpath(directory, os.path.dirname(DEPLOY))
        print(f"{rel}:")
        try:
            py_docs = render_kustomization.render(directory)
        except render_kustomization.KustomizationError as e:
            fail(str(e))
            continue
        k_docs = kubectl_render(directory)
        if k_docs is not None:
            if canonical(k_docs) != canonical(py_docs):
                k_ids = sorted(ident(d) for d in k_docs)
                p_ids = sorted(ident(d) for d in py_docs)
                fail(
                    f"{rel}: render_kustomization.py disagrees with kubectl kustomize "
                    f"(kubectl: {k_ids}; python: {p_ids}); diff the two outputs"
                )
            docs, how = k_docs, "kubectl kustomize"
        else:
            docs, how = py_docs, "render_kustomization.py"
        print(f"  rendered {len(docs)} objects with {how}")
        if not docs:
            fail(f"{rel}: renders to nothing")
        seen = set()
        for doc in docs:
            if ident(doc) in seen:
                fail(f"{rel}: {ident(doc)} twice")
            seen.add(ident(doc))
            validate(doc, rel)

    for path in STANDALONE:
        rel = os.path.relpath(path, os.path.dirname(DEPLOY))
        print(f"{rel}:")
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            fail(f"{rel}: holds no object")
        for doc in docs:
            validate(doc, rel)

    script = os.path.join(DEPLOY, "kubernetes", "cert-manager", "node-certificates.sh")
    bash = shutil.which("bash")
    out = subprocess.run([bash or "/bin/bash", script, "worker-1", "node.example"], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"node-certificates.sh failed: {out.stderr.strip()}")
    else:
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        names = [d["spec"].get("commonName") for d in docs]
        if names != ["worker-1", "node.example"]:
            fail(f"node-certificates.sh: expected certificates for worker-1, node.example, got {names}")
        for d in docs:
            if d["spec"].get("subject", {}).get("organizations") != ["twill:nodes"]:
                fail(f"{ident(d)}: subject must be O=twill:nodes")
            if d["spec"].get("secretName") != f"twill-node-{d['spec'].get('commonName')}":
                fail(f"{ident(d)}: secretName must be twill-node-<node>")
            validate(d, "node-certificates.sh")

    if failures:
        print(f"\n{len(failures)} manifest check(s) failed", file=sys.stderr)
        return 1
    print("manifests: all valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
