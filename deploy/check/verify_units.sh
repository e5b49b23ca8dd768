#!/usr/bin/env bash
# Checks deploy/systemd/*.service with `systemd-analyze verify` and
# `systemd-analyze security --offline`, and that the env files (deploy/systemd/*.env and
# deploy/systemd/ha/*.env) hold only KEY=value lines and comments. Run by
# tests/tests/deploy_manifests.rs.
#
# Usage: verify_units.sh BIN_DIR
#   BIN_DIR holds the built twill-controller and twill-agent. The units are copied to
#   a temporary directory with ExecStart=/usr/local/bin/X pointed at BIN_DIR/X, so
#   verify checks real executables; every other line is verified as shipped.
#   `verify` only warns ("..., ignoring") about unknown keys or bad values, so any
#   message about the units counts as a failure here.
# Exit status: 0 good; 1 failed; 77 skipped because systemd-analyze is missing (only
# when CI is unset: under CI that is a failure). Install: apt-get install systemd
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
units_dir=$here/../systemd
bin_dir=${1:?usage: verify_units.sh BIN_DIR}

in_ci() {
	case "${CI:-}" in "" | 0 | false | no) return 1 ;; *) return 0 ;; esac
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
	bar=$(printf '!%.0s' {1..78})
	if in_ci; then
		printf '\n%s\n!! FAILED (CI is set): systemd-analyze is missing; apt-get install systemd\n%s\n' "$bar" "$bar" >&2
		exit 1
	fi
	printf '\n%s\n!! SKIPPED systemd unit verification: systemd-analyze is missing\n!! Install: apt-get install systemd\n%s\n' "$bar" "$bar" >&2
	exit 77
fi

tmp=$(mktemp -d -t twill-units.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

status=0
for unit in twill-controller.service twill-agent.service; do
	[[ -f $units_dir/$unit ]] || { echo "FAIL: $units_dir/$unit is missing" >&2; status=1; continue; }
	bin=${unit%.service}
	[[ -x $bin_dir/$bin ]] || { echo "FAIL: $bin_dir/$bin is missing: run cargo build --workspace --bins first" >&2; exit 1; }
	grep -qx "ExecStart=/usr/local/bin/$bin" "$units_dir/$unit" || {
		echo "FAIL: $unit: expected the line ExecStart=/usr/local/bin/$bin" >&2
		status=1
	}
	sed "s#^ExecStart=/usr/local/bin/#ExecStart=$bin_dir/#" "$units_dir/$unit" >"$tmp/$unit"
	# verify: exit status for hard errors, output for everything it "ignores".
	if ! out=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=info systemd-analyze verify --man=no --generators=no "./$unit" 2>&1); then
		echo "FAIL: systemd-analyze verify $unit:" >&2
		echo "$out" >&2
		status=1
	elif grep -F "$unit" <<<"$out" >&2; then
		echo "FAIL: systemd-analyze verify $unit printed the warnings above" >&2
		status=1
	else
		echo "ok   systemd-analyze verify $unit"
	fi
done

# Exposure scores (0 = locked down, 10 = unprotected). The agent needs CAP_NET_ADMIN and
# writable net sysctls, hence its higher bound.
check_security() {
	local unit=$1 threshold=$2 out score
	if ! out=$(cd "$tmp" && systemd-analyze security --offline=yes --no-pager "./$unit" 2>&1); then
		echo "FAIL: systemd-analyze security $unit: $out" >&2
		status=1
		return
	fi
	score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
	if [[ -z $score ]]; then
		echo "FAIL: no exposure level in systemd-analyze security $unit:" >&2
		echo "$out" >&2
		status=1
	elif awk -v s="$score" -v t="$threshold" 'BEGIN { exit !(s > t) }'; then
		echo "FAIL: $unit exposure level $score is above $threshold; harden it again:" >&2
		grep '✗' <<<"$out" >&2 || true
		status=1
	else
		echo "ok   systemd-analyze security $unit: exposure $score (at most $threshold)"
	fi
}
check_security twill-controller.service 2.0
check_security twill-agent.service 3.0

# The env files must only set variables (KEY=value), as EnvironmentFile= reads them;
# ha/ holds the ones of the three-controller setup (the same units).
for env in controller.env agent.env ha/controller.env ha/agent.env; do
	[[ -f $units_dir/$env ]] || { echo "FAIL: $units_dir/$env is missing" >&2; status=1; continue; }
	if bad=$(grep -nEv '^[[:space:]]*(#.*)?$|^[A-Z_][A-Z0-9_]*=' "$units_dir/$env"); then
		echo "FAIL: $env has lines that are not KEY=value or comments:" >&2
		echo "$bad" >&2
		status=1
	else
		echo "ok   $env"
	fi
done
exit $status
