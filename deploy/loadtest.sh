#!/usr/bin/env bash
# Load-tests a running fanout: runs fanout-load (deploy/loadtest/), building it first when the
# binary is missing or older than its sources. Every argument goes to fanout-load; see
#   deploy/loadtest.sh --help
# FANOUT_LOAD_BIN names a binary to use instead (nothing is built then).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${FANOUT_LOAD_BIN:-}
if [[ -z $bin ]]; then
	bin=$root/build/bin/fanout-load
	stale=0
	if [[ ! -x $bin ]]; then
		stale=1
	else
		for f in "$root"/deploy/loadtest/*.[ch]; do
			[[ $f -nt $bin ]] && stale=1 && break
		done
	fi
	if [[ $stale = 1 ]]; then
		command -v make >/dev/null || { echo "loadtest: make not found (Debian: apt-get install build-essential)" >&2; exit 3; }
		make -s -C "$root" load >&2 || { echo "loadtest: building fanout-load failed" >&2; exit 3; }
	fi
fi
exec "$bin" "$@"
