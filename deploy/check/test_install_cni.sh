#!/bin/sh
# Runs deploy/docker/twill-install-cni (the agent DaemonSet's init container) against
# a fake host in a temporary directory and checks what it installed. Run by
# tests/tests/deploy_manifests.rs. Usage: test_install_cni.sh CNI_CONF_JSON
#   CNI_CONF_JSON: the conflist to install (the test passes the ConfigMap's cni-conf.json)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
script=$here/../docker/twill-install-cni
conf=${1:?usage: test_install_cni.sh CNI_CONF_JSON}
tmp=$(mktemp -d -t twill-install-cni.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir -p "$tmp/image/plugins" "$tmp/host/bin" "$tmp/host/net.d"
printf '#!/bin/sh\necho twill-cni v2\n' >"$tmp/image/twill-cni"
for p in bridge host-local portmap loopback; do printf 'image %s\n' "$p" >"$tmp/image/plugins/$p"; done
# The node already has its own bridge plugin (must be kept) and an old twill-cni
# (must be replaced), plus a leftover flannel conflist (must be warned about).
printf 'node bridge\n' >"$tmp/host/bin/bridge"
printf 'old twill-cni\n' >"$tmp/host/bin/twill-cni"
printf '{}\n' >"$tmp/host/net.d/10-flannel.conflist"

out=$(TWILL_CNI_BIN="$tmp/image/twill-cni" TWILL_CNI_PLUGINS_SRC="$tmp/image/plugins" \
	TWILL_CNI_CONF_SRC="$conf" CNI_BIN_DIR="$tmp/host/bin" CNI_CONF_DIR="$tmp/host/net.d" \
	sh "$script" 2>&1) || fail "twill-install-cni failed: $out"

[ -x "$tmp/host/bin/twill-cni" ] || fail "twill-cni not installed executable"
[ "$("$tmp/host/bin/twill-cni")" = "twill-cni v2" ] || fail "twill-cni was not replaced"
[ "$(cat "$tmp/host/bin/bridge")" = "node bridge" ] || fail "the node's own bridge plugin was replaced"
for p in host-local portmap loopback; do
	[ "$(cat "$tmp/host/bin/$p")" = "image $p" ] || fail "$p was not installed on a node lacking it"
	[ -x "$tmp/host/bin/$p" ] || fail "$p not executable"
done
cmp -s "$conf" "$tmp/host/net.d/10-twill.conflist" || fail "10-twill.conflist differs from the source"
leftovers=$(find "$tmp/host" -name '.*twill-tmp*')
[ -z "$leftovers" ] || fail "temporary files left: $leftovers"
case $out in
*"WARNING: $tmp/host/net.d/10-flannel.conflist"*) ;;
*) fail "no warning about the leftover 10-flannel.conflist: $out" ;;
esac

# Idempotent: a second run (a restarted pod) succeeds and changes nothing.
TWILL_CNI_BIN="$tmp/image/twill-cni" TWILL_CNI_PLUGINS_SRC="$tmp/image/plugins" \
	TWILL_CNI_CONF_SRC="$conf" CNI_BIN_DIR="$tmp/host/bin" CNI_CONF_DIR="$tmp/host/net.d" \
	sh "$script" >/dev/null 2>&1 || fail "second run failed"
cmp -s "$conf" "$tmp/host/net.d/10-twill.conflist" || fail "second run changed the conflist"

# A missing conflist source is an error, not an empty install.
if TWILL_CNI_BIN="$tmp/image/twill-cni" TWILL_CNI_CONF_SRC="$tmp/nope" CNI_BIN_DIR="$tmp/host/bin" \
	CNI_CONF_DIR="$tmp/host/net.d" sh "$script" >/dev/null 2>&1; then
	fail "succeeded without a conflist"
fi
echo "ok   twill-install-cni"
