#!/usr/bin/env bash
# The layering of fanout's sources, checked: every #include "..." points down.
#
#   rank  where                                       what
#   0     ctx/                                        context: cancel, deadline, hooks
#   1     pool/                                       channels, worker pool, errgroup
#   2     fetch/                                      the curl-multi engine, URLs, upstreams
#   3     server/json, server/membudget, server/rng, server/version   leaves every wing may use
#   4     server/obs/  server/demo/                   logs and metrics; the demo upstream
#   5     server/batch/                               one request's fan-out, no HTTP
#   5     server/upstream/                            the live upstream set: discovery, checks
#   6     server/config                               flags and environment
#   7     server/http/                                the HTTP front end
#   8     server/main.c                               the program
#
# A file may include a header of a lower rank, or one in its own folder (within a folder the
# graph must still be acyclic). Besides: server/batch/ never includes <microhttpd.h>, and
# server/obs/ includes nothing above server/json (rank 3). With -v it also prints the longest
# include chain between modules (x.c, x.h and x_impl.h are one module). Exit 1 on any violation.
set -u
cd "$(dirname "$0")/.."
verbose=0
[[ ${1:-} == -v ]] && verbose=1

rank() {
	case $1 in
	ctx/*) echo 0 ;;
	pool/*) echo 1 ;;
	fetch/*) echo 2 ;;
	server/json.* | server/membudget.* | server/rng.* | server/version.h) echo 3 ;;
	server/obs/* | server/demo/*) echo 4 ;;
	server/batch/* | server/upstream/*) echo 5 ;;
	server/config.*) echo 6 ;;
	server/http/*) echo 7 ;;
	server/main.c) echo 8 ;;
	*) echo -1 ;;
	esac
}

bad=0
edges=$(mktemp)
trap 'rm -f "$edges"' EXIT
for f in $(find ctx pool fetch server -name '*.[ch]' | sort); do
	rf=$(rank "$f")
	if [[ $rf -lt 0 ]]; then
		echo "layers: $f has no rank (add it to tests/layers.sh)"
		bad=1
		continue
	fi
	if [[ $f == server/batch/* ]] && grep -qE '^#include <microhttpd\.h>' "$f"; then
		echo "layers: $f includes <microhttpd.h> (the batch core knows no HTTP library)"
		bad=1
	fi
	while read -r inc; do
		[[ -n $inc ]] || continue
		if [[ ! -f $inc ]]; then
			echo "layers: $f includes \"$inc\", which does not exist"
			bad=1
			continue
		fi
		ri=$(rank "$inc")
		if [[ $ri -gt $rf || ($ri -eq $rf && $(dirname "$inc") != $(dirname "$f")) ]]; then
			echo "layers: $f (rank $rf) includes $inc (rank $ri): an edge that does not point down"
			bad=1
		fi
		if [[ $f == server/obs/* && $ri -gt 3 && $inc != server/obs/* ]]; then
			echo "layers: $f includes $inc: obs/ includes nothing above server/json"
			bad=1
		fi
		m1=${f%.*} m2=${inc%.*}
		m1=${m1%_impl} m2=${m2%_impl} # x_impl.h is x's private header
		[[ $m1 != "$m2" ]] && echo "$m1 $m2" >>"$edges"
	done < <(sed -n 's/^#include "\([^"]*\)".*/\1/p' "$f")
done

# Longest chain, and cycles, over the module graph.
sort -u "$edges" | awk -v verbose="$verbose" '
	{ out[$1] = out[$1] " " $2; nodes[$1] = 1; nodes[$2] = 1 }
	function depth(m,   n, i, parts, d, best, bestnext) {
		if (m in memo) return memo[m]
		if (state[m] == 1) { cyc = cyc " " m; return 0 }
		state[m] = 1; best = 0; bestnext = ""
		n = split(out[m], parts, " ")
		for (i = 1; i <= n; i++) { d = depth(parts[i]) + 1; if (d > best) { best = d; bestnext = parts[i] } }
		state[m] = 2; memo[m] = best; next_of[m] = bestnext
		return best
	}
	END {
		max = 0; top = ""
		for (m in nodes) { d = depth(m); if (d > max) { max = d; top = m } }
		if (cyc != "") { print "layers: include cycle through" cyc; exit 1 }
		if (verbose) {
			chain = top; m = top
			while (next_of[m] != "") { m = next_of[m]; chain = chain " -> " m }
			printf "layers: longest include chain: %d edges: %s\n", max, chain
		}
	}' || bad=1

if [[ $bad -ne 0 ]]; then
	echo "layers: FAILED"
	exit 1
fi
echo "layers: every include points down"
