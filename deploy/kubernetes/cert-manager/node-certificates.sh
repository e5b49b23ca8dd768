#!/usr/bin/env bash
# Prints one cert-manager Certificate per node (CN=<node>, O=twill:nodes, client auth),
# each filling the Secret twill-node-<node>. Apply the output:
#   deploy/kubernetes/cert-manager/node-certificates.sh | kubectl apply -f -
# Node names default to the cluster's nodes; pass names to choose:
#   deploy/kubernetes/cert-manager/node-certificates.sh worker-1 worker-2
#
# Only for bringing your own node certificates: agents that bootstrap with a token
# (the default, deploy/README.md "Node identity") need none of this.
# cert-manager writes Secrets, but the agent reads its certificate from the node's
# /var/lib/twill/pki (a DaemonSet cannot mount a different Secret per node, and letting
# every agent read every node's Secret would let one node act as any other). Copy each
# Secret to its node, e.g. with --install-on-nodes, which runs
#   kubectl get secret twill-node-<node> ... | ssh <node> 'cat > /var/lib/twill/pki/node.crt ...'
# The agent uses a usable certificate there as it is. Repeat after a renewal, then
# restart the agent on that node so it presents the new certificate.
set -euo pipefail

NAMESPACE=${NAMESPACE:-twill-system}
DURATION=${DURATION:-8760h}
install_on_nodes=false
if [[ ${1-} == --install-on-nodes ]]; then
	install_on_nodes=true
	shift
fi

if (($# > 0)); then
	nodes=("$@")
else
	mapfile -t nodes < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
fi

if $install_on_nodes; then
	# SSH as a user that may write /var/lib/twill/pki (SSH_USER, default root). The
	# CA certificate comes from the ConfigMap twill-ca, not from here.
	for node in "${nodes[@]}"; do
		secret="twill-node-$node"
		get() { kubectl -n "$NAMESPACE" get secret "$secret" -o "jsonpath={.data.$1}" | base64 -d; }
		{
			echo 'set -e; umask 077; mkdir -p /var/lib/twill/pki'
			printf 'cat > /var/lib/twill/pki/node.key.new <<"PEM"\n%s\nPEM\n' "$(get 'tls\.key')"
			printf 'cat > /var/lib/twill/pki/node.crt.new <<"PEM"\n%s\nPEM\n' "$(get 'tls\.crt')"
			echo 'chmod 0644 /var/lib/twill/pki/node.crt.new'
			echo 'mv /var/lib/twill/pki/node.key.new /var/lib/twill/pki/node.key'
			echo 'mv /var/lib/twill/pki/node.crt.new /var/lib/twill/pki/node.crt'
		} | ssh "${SSH_USER:-root}@$node" sh
		echo "installed $secret on $node" >&2
	done
	exit 0
fi

for node in "${nodes[@]}"; do
	cat <<YAML
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: twill-node-$node
  namespace: $NAMESPACE
  labels:
    app.kubernetes.io/part-of: twill
spec:
  secretName: twill-node-$node
  commonName: "$node"
  subject:
    organizations:
      - twill:nodes
  duration: $DURATION
  usages:
    - digital signature
    - key encipherment
    - client auth
  privateKey:
    algorithm: ECDSA
    size: 256
    encoding: PKCS8
  issuerRef:
    name: twill-ca
    kind: Issuer
    group: cert-manager.io
YAML
done
