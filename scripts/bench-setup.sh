#!/usr/bin/env bash
# Twill benchmarks: install what `twill-bench` needs beyond scripts/setup.sh, and only
# what is missing. Idempotent; run as root.
#
# - etcd-server: the anchor of the comparison (flannel's etcd mode). scripts/setup.sh
#   installs it (the tests need it too) without letting the package's own service run;
#   it runs first here. The bench starts its own etcd on 127.0.0.1 with a temp data dir
#   and client-certificate TLS.
# - iproute2: `ip -batch` / `bridge -batch`, the kernel floor of the dataplane scenario.
# - linux-perf, valgrind: for profiling a missed target (optional, not needed to run).
set -euo pipefail

say() { printf 'bench-setup: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
	say "not root: cannot install packages; run as root (etcd: $(command -v etcd || echo missing))"
	exit 1
fi

bash "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

# package  probe
REQUIREMENTS=(
	"iproute2 ip"
	"iproute2 bridge"
	"linux-perf perf"
	"valgrind valgrind"
)

missing=()
for req in "${REQUIREMENTS[@]}"; do
	read -r pkg probe <<<"$req"
	if ! command -v "$probe" >/dev/null 2>&1 && [[ " ${missing[*]-} " != *" $pkg "* ]]; then
		missing+=("$pkg")
	fi
done

if ((${#missing[@]} == 0)); then
	say "everything is present"
else
	say "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# Profiling tools are optional: a failure there must not stop the benchmark setup.
	required=()
	optional=()
	for pkg in "${missing[@]}"; do
		case $pkg in
		linux-perf | valgrind) optional+=("$pkg") ;;
		*) required+=("$pkg") ;;
		esac
	done
	if ((${#required[@]})); then
		apt-get install -y -qq --no-install-recommends "${required[@]}"
	fi
	if ((${#optional[@]})); then
		apt-get install -y -qq --no-install-recommends "${optional[@]}" ||
			say "optional profiling tools not installed: ${optional[*]}"
	fi
fi

say "etcd: $(etcd --version 2>/dev/null | head -1)"
