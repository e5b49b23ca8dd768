#!/bin/sh
# Runs deploy/docker/twill-install-cni (the agent DaemonSet's init container) against
# a fake host in a temporary directory and checks what it installed. Run by
# tests/tests/deploy_manifests.rs.
# Usage: test_install_cni.sh CNI_CONF_JSON [TWILL_CNI PORTMAP]
#   CNI_CONF_JSON: the conflist to install (the test passes the ConfigMap's cni-conf.json);
#                  it must offer "cniVersions" up to 1.1.0.
#   TWILL_CNI PORTMAP: real plugins; the conflist is then also installed on a node
#                  holding them, and its cniVersions must be what they both support.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
script=$here/../docker/twill-install-cni
conf=${1:?usage: test_install_cni.sh CNI_CONF_JSON [TWILL_CNI PORTMAP]}
tmp=$(mktemp -d -t twill-install-cni.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# fake_plugin FILE NAME VERSIONS: a plugin that says NAME when run and answers
# CNI_COMMAND=VERSION with VERSIONS (a JSON list; "" answers nothing).
fake_plugin() {
	{
		echo '#!/bin/sh'
		if [ -n "$3" ]; then
			echo "[ \"\${CNI_COMMAND:-}\" = VERSION ] && { echo '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":$3}'; exit 0; }"
		fi
		echo "echo '$2'"
	} >"$1"
	chmod 0755 "$1"
}
old_versions='["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0"]'
new_versions='["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]'

# install HOST: runs the script for the fake host directory HOST; prints its log.
install() {
	mkdir -p "$1/bin" "$1/net.d"
	TWILL_CNI_BIN="$tmp/image/twill-cni" TWILL_CNI_PLUGINS_SRC="$tmp/image/plugins" \
		TWILL_CNI_CONF_SRC="$conf" CNI_BIN_DIR="$1/bin" CNI_CONF_DIR="$1/net.d" \
		sh "$script" 2>&1
}
# cni_versions HOST: the installed conflist's cniVersions line, spaces squeezed.
cni_versions() {
	grep '"cniVersions"' "$1/net.d/10-twill.conflist" | tr -s ' ' | sed 's/^ //; s/,$//'
}
# same_but_versions HOST: the installed conflist equals the source but for cniVersions.
same_but_versions() {
	grep -v '"cniVersions"' "$conf" >"$tmp/a"
	grep -v '"cniVersions"' "$1/net.d/10-twill.conflist" >"$tmp/b"
	cmp -s "$tmp/a" "$tmp/b" || fail "10-twill.conflist differs from the source beyond cniVersions"
}

grep -q '"cniVersions".*"1.1.0"' "$conf" || fail "$conf offers no cniVersions up to 1.1.0"
mkdir -p "$tmp/image/plugins"
fake_plugin "$tmp/image/twill-cni" "twill-cni v2" "$new_versions"
# The image's plugins are Debian's (CNI up to 1.0.0).
for p in bridge host-local portmap loopback; do fake_plugin "$tmp/image/plugins/$p" "image $p" "$old_versions"; done

# 1. The node already has its own bridge plugin (must be kept) and an old twill-cni
#    (must be replaced), plus a leftover flannel conflist (must be warned about). It
#    gets the image's portmap, which stops at 1.0.0: cniVersions loses 1.1.0.
h=$tmp/node1
mkdir -p "$h/bin" "$h/net.d"
printf 'node bridge\n' >"$h/bin/bridge"
printf 'old twill-cni\n' >"$h/bin/twill-cni"
printf '{}\n' >"$h/net.d/10-flannel.conflist"
out=$(install "$h") || fail "twill-install-cni failed: $out"

[ -x "$h/bin/twill-cni" ] || fail "twill-cni not installed executable"
[ "$("$h/bin/twill-cni")" = "twill-cni v2" ] || fail "twill-cni was not replaced"
[ "$(cat "$h/bin/bridge")" = "node bridge" ] || fail "the node's own bridge plugin was replaced"
for p in host-local portmap loopback; do
	[ "$("$h/bin/$p")" = "image $p" ] || fail "$p was not installed on a node lacking it"
	[ -x "$h/bin/$p" ] || fail "$p not executable"
done
same_but_versions "$h"
[ "$(cni_versions "$h")" = '"cniVersions": ["0.3.1", "1.0.0"]' ] ||
	fail "cniVersions with a portmap that stops at 1.0.0: $(cni_versions "$h")"
case $out in *"cniVersions narrowed"*) ;; *) fail "no word of the narrowed cniVersions: $out" ;; esac
leftovers=$(find "$tmp" -name '.*twill-tmp*' -o -name '.*twill-src*')
[ -z "$leftovers" ] || fail "temporary files left: $leftovers"
case $out in
*"WARNING: $h/net.d/10-flannel.conflist"*) ;;
*) fail "no warning about the leftover 10-flannel.conflist: $out" ;;
esac

# Idempotent: a second run (a restarted pod) succeeds and changes nothing.
cp "$h/net.d/10-twill.conflist" "$tmp/first"
install "$h" >/dev/null || fail "second run failed"
cmp -s "$tmp/first" "$h/net.d/10-twill.conflist" || fail "second run changed the conflist"

# 2. A node whose plugins all speak 1.1.0: the conflist as it is.
h=$tmp/node2
mkdir -p "$h/bin"
fake_plugin "$h/bin/portmap" "node portmap" "$new_versions"
out=$(install "$h") || fail "twill-install-cni failed: $out"
cmp -s "$conf" "$h/net.d/10-twill.conflist" || fail "10-twill.conflist differs from the source on a 1.1.0 node"

# 3. A node whose portmap does not answer VERSION: an empty list, and a warning.
h=$tmp/node3
mkdir -p "$h/bin"
fake_plugin "$h/bin/portmap" "node portmap" ""
out=$(install "$h") || fail "twill-install-cni failed: $out"
same_but_versions "$h"
[ "$(cni_versions "$h")" = '"cniVersions": []' ] || fail "cniVersions with a mute portmap: $(cni_versions "$h")"
case $out in *"WARNING: $h/bin/portmap does not answer"*) ;; *) fail "no warning about the mute portmap: $out" ;; esac

# 4. Real plugins, when given: what they both support.
if [ $# -ge 3 ]; then
	h=$tmp/node4
	mkdir -p "$h/bin"
	cp "$3" "$h/bin/portmap"
	cp "$2" "$tmp/image/twill-cni"
	out=$(install "$h") || fail "twill-install-cni failed: $out"
	same_but_versions "$h"
	want=$(CNI_COMMAND=VERSION "$3" </dev/null | grep -q '"1.1.0"' && echo '["0.3.1", "1.0.0", "1.1.0"]' || echo '["0.3.1", "1.0.0"]')
	[ "$(cni_versions "$h")" = "\"cniVersions\": $want" ] ||
		fail "cniVersions with the real $3 and $2: $(cni_versions "$h"), want $want"
	echo "ok   twill-install-cni with $2 and $3: $(cni_versions "$h")"
fi

# A missing conflist source is an error, not an empty install.
if TWILL_CNI_BIN="$tmp/image/twill-cni" TWILL_CNI_CONF_SRC="$tmp/nope" CNI_BIN_DIR="$tmp/node1/bin" \
	CNI_CONF_DIR="$tmp/node1/net.d" sh "$script" >/dev/null 2>&1; then
	fail "succeeded without a conflist"
fi
echo "ok   twill-install-cni"
