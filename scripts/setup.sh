#!/usr/bin/env bash
# Twill: install what `make demo` and `make test` need on a Debian machine, and only
# what is missing. Idempotent; run as root. Used by the Makefile and (through
# `make test`) by CI.
#
# Each Debian package is paired with a probe (a command or a file it provides); the
# package is installed only when its probe is absent, so tools that are already there
# by other means (e.g. a python3 from pyenv) are left alone. `apt-get update` runs only
# when something has to be installed.
#
# etcd (etcd-server, 3.4 with the v3election API; etcdctl from etcd-client) is for the
# tests and the benchmarks, which start their own members on loopback with temp data
# dirs: the package's own service must not run. Its start is refused through
# policy-rc.d while installing, and it is stopped if it started anyway.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }
die() {
	printf 'setup: ERROR: %s\n' "$*" >&2
	exit 1
}

# package  probe (command name, or an absolute path that must exist)
REQUIREMENTS=(
	"iproute2 ip"
	"iproute2 bridge"
	"iputils-ping ping"
	"nftables nft"
	"ethtool ethtool"
	"iperf3 iperf3"
	"containernetworking-plugins /usr/lib/cni/bridge"
	"containernetworking-plugins /usr/lib/cni/host-local"
	"openssl openssl"
	"procps pkill"
	"procps ps"
	"python3 python3"
	"systemd systemd-analyze"
	"etcd-server etcd"
	"etcd-client etcdctl"
)

# PyPI packages for the contract and manifest checks: module to import, package to install.
PYTHON_REQUIREMENTS=(
	"grpc grpcio"
	"grpc_tools grpcio-tools"
	"kubernetes_validate kubernetes-validate"
)

present() {
	local probe=$1
	if [[ $probe == /* ]]; then
		[[ -e $probe ]]
	else
		command -v "$probe" >/dev/null 2>&1
	fi
}

POLICY_RC=/usr/sbin/policy-rc.d

# invoke-rc.d and deb-systemd-invoke ask policy-rc.d (the service's name among its
# arguments) before starting a service. An existing one is the machine's own policy
# and is honoured as it is (containers often have one refusing everything); otherwise
# a temporary one refuses etcd only, and goes away when this script exits.
refuse_etcd_service_start() {
	[[ -e $POLICY_RC ]] && return 0
	printf '%s\n' '#!/bin/sh' \
		'# written by twill scripts/setup.sh while it installs etcd-server' \
		'for a in "$@"; do case $a in etcd | etcd.service) exit 101 ;; esac; done' \
		'exit 0' >"$POLICY_RC"
	chmod 755 "$POLICY_RC"
	trap 'rm -f "$POLICY_RC"' EXIT
}

# The packaged service, if a service manager started it anyway. Only the service is
# stopped (by systemd's unit, or by its init script's pidfile), never etcd processes
# found by name: tests may be running their own.
stop_etcd_service() {
	if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
		say "stopping the packaged etcd service"
		systemctl stop etcd || true
	elif [[ -s /var/run/etcd.pid ]] && kill -0 "$(cat /var/run/etcd.pid)" 2>/dev/null; then
		say "stopping the packaged etcd service"
		/etc/init.d/etcd stop >/dev/null || true
	fi
}

missing=()
for req in "${REQUIREMENTS[@]}"; do
	read -r pkg probe <<<"$req"
	if ! present "$probe"; then
		# keep the list free of duplicates
		if [[ " ${missing[*]-} " != *" $pkg "* ]]; then
			missing+=("$pkg")
		fi
	fi
done

if ((${#missing[@]} > 0)); then
	say "installing missing Debian packages: ${missing[*]}"
	if [[ $(id -u) -ne 0 ]]; then
		die "installing ${missing[*]} needs root (run as root, or install them yourself)"
	fi
	command -v apt-get >/dev/null 2>&1 ||
		die "apt-get not found: this script supports Debian/Ubuntu; install ${missing[*]} by hand"
	export DEBIAN_FRONTEND=noninteractive
	log=$(mktemp -t twill-setup.XXXXXX)
	if ! apt-get update -qq >"$log" 2>&1; then
		cat "$log" >&2
		rm -f "$log"
		die "apt-get update failed"
	fi
	if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
		refuse_etcd_service_start
	fi
	if ! apt-get install -y -qq --no-install-recommends \
		-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
		"${missing[@]}" >"$log" 2>&1; then
		tail -n 40 "$log" >&2
		rm -f "$log"
		die "apt-get install ${missing[*]} failed"
	fi
	rm -f "$log"
	if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
		stop_etcd_service
	fi
	# check again: a package that installed but still lacks its probe is a failure
	for req in "${REQUIREMENTS[@]}"; do
		read -r pkg probe <<<"$req"
		present "$probe" || die "package $pkg installed but $probe is still missing"
	done
	say "installed: ${missing[*]}"
else
	say "Debian packages: all present"
fi

# The Python packages go into the python3 first on PATH, the one the tests run.
pymissing=()
for req in "${PYTHON_REQUIREMENTS[@]}"; do
	read -r module pkg <<<"$req"
	python3 -c "import $module" >/dev/null 2>&1 || pymissing+=("$pkg")
done
if ((${#pymissing[@]} > 0)); then
	say "installing missing PyPI packages into $(command -v python3): ${pymissing[*]}"
	log=$(mktemp -t twill-setup.XXXXXX)
	# A Debian-managed python3 refuses plain pip installs (PEP 668); say so explicitly there.
	if ! python3 -m pip install --quiet --disable-pip-version-check "${pymissing[@]}" >"$log" 2>&1 &&
		! python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${pymissing[@]}" >"$log" 2>&1; then
		tail -n 40 "$log" >&2
		rm -f "$log"
		die "pip install ${pymissing[*]} failed (is python3-pip installed?)"
	fi
	rm -f "$log"
	for req in "${PYTHON_REQUIREMENTS[@]}"; do
		read -r module pkg <<<"$req"
		python3 -c "import $module" >/dev/null 2>&1 || die "$pkg installed but python3 cannot import $module"
	done
	say "installed: ${pymissing[*]}"
else
	say "PyPI packages: all present"
fi

if ! command -v cargo >/dev/null 2>&1; then
	if [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
		die "cargo is not on PATH; run: export PATH=\"${CARGO_HOME:-$HOME/.cargo}/bin:\$PATH\""
	fi
	die "cargo not found: install a Rust toolchain (https://rustup.rs), then rerun"
fi
say "cargo: $(cargo --version)"

if [[ $(id -u) -ne 0 ]]; then
	say "WARNING: not root: the network-namespace tests and the demo need root"
fi
say "ok"
