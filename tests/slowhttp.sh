#!/usr/bin/env bash
# Slow-client attacks against fanout with slowhttptest, each a bounded run, while fanout-load
# measures another client's latency; then threads, fds and RSS must return to their baseline.
#
#   tests/slowhttp.sh [-b BIN] [-L LOADBIN] [-s SECONDS] [-c CONNS] [-m MODES]
#
#   -b  fanout binary                         [build/bin/fanout]
#   -L  fanout-load binary                    [build/bin/fanout-load]
#   -s  seconds per attack                    [30]
#   -c  attacking connections                 [1000]
#   -m  modes: N no attack (the same client alone, for comparison), H slowloris, B slow body,
#       X slow read, C many connections sending a byte a second  [NHBXC]
#
# Fanout runs with --demo and its default limits (header deadline 10 s), except a body deadline of
# 10 s so the slow-body run meets it. The measuring client is an open loop of 50 batches a second
# over 8 connections for the whole attack; a run fails if fewer than 99% of its batches succeed,
# or if threads or client connections (0) are not back to the baseline 30 s after the attack, or
# if RSS grew by more than 16 MiB past the highest level an earlier attack left (glibc's malloc
# keeps the heap a burst grew, so the first heavy attack sets a high-water mark that the later
# ones must not raise; fds are shown: with --demo they include both ends of the warm upstream
# pool).
# Prints one row per attack: the measuring client's p50/p99/max, its success ratio, the peak of
# client connections during the attack, and fanout's fds and RSS after it. Exit 1 on a failed run.
set -euo pipefail
bin=build/bin/fanout load=build/bin/fanout-load secs=30 conns=1000 modes=NHBXC
while getopts "b:L:s:c:m:h" o; do
	case $o in
	b) bin=$OPTARG ;; L) load=$OPTARG ;; s) secs=$OPTARG ;; c) conns=$OPTARG ;; m) modes=$OPTARG ;;
	*) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
	esac
done
command -v slowhttptest >/dev/null || { echo "slowhttp: slowhttptest not found (apt-get install slowhttptest)" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

out=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$out"' EXIT
"$bin" --demo --listen 127.0.0.1:0 --body-timeout-ms 10000 --max-clients 8000 2>"$out/log" &
pid=$!
port=
for _ in $(seq 1 200); do # the port from the "starting" line (port 0: the kernel picked it)
	port=$(grep -m1 -o '"msg":"starting".*"port":[0-9]*' "$out/log" 2>/dev/null | sed 's/.*"port"://' || true)
	[[ -n $port ]] && break
	kill -0 "$pid" || { cat "$out/log" >&2; exit 1; }
	sleep 0.05
done
[[ -n $port ]] || { echo "slowhttp: fanout did not start" >&2; exit 1; }
url=http://127.0.0.1:$port

threads() { awk '/^Threads:/ {print $2}' "/proc/$pid/status"; }
fds() { ls "/proc/$pid/fd" | wc -l; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }
# Client connections to fanout's port in any state that holds a descriptor (not LISTEN, not
# TIME-WAIT); its own upstream pool, in the same process with --demo, is not counted: it is kept
# warm on purpose.
clients() { ss -Htn "( sport = :$port )" | awk '$1 != "LISTEN" && $1 != "TIME-WAIT"' | wc -l; }

# Warm up before the baseline: connection pools, and one short attack, since the allocator keeps
# the heap a first burst of connections grew (a high-water mark, not a leak: later attacks must
# not raise it).
"$load" -d 2s -r 50 -c 8 --no-progress --json "$url" >/dev/null || true
slowhttptest -H -i 1 -x 8 -c "$conns" -r "$conns" -l 5 -p 3 -u "$url/healthz" >/dev/null 2>&1 || true
for _ in $(seq 1 100); do [[ $(clients) -eq 0 ]] && break; sleep 0.1; done
base_t=$(threads) base_f=$(fds) base_r=$(rss_kib)
hw_r=$base_r # the highest RSS after an attack so far
echo "slowhttp: fanout on $url, baseline threads $base_t, fds $base_f, RSS $((base_r / 1024)) MiB"
printf '%-12s %8s %8s %8s %8s %8s %9s %9s %s\n' attack p50_ms p99_ms max_ms success peak_cl fds_after rss_after result
fail=0
for m in $(echo "$modes" | grep -o .); do
	case $m in
	N) name=no-attack args=() ;;
	H) name=slowloris args=(-H -i 5 -x 24) ;;
	B) name=slow-body args=(-B -i 5 -s 100000 -t POST -u "$url/v1/batch") ;;
	X) name=slow-read args=(-X -k 20 -n 5 -w 1 -y 16 -z 8 -u "$url/metrics") ;;
	C) name=connections args=(-H -i 1 -x 1) ;;
	esac
	if [[ $m == N ]]; then
		sleep "$((secs + 1))" >"$out/$name.slow" &
	else
		[[ " ${args[*]} " == *" -u "* ]] || args+=(-u "$url/healthz")
		slowhttptest "${args[@]}" -c "$conns" -r "$((conns / 5 > 0 ? conns / 5 : 1))" -l "$secs" -p 3 \
			>"$out/$name.slow" 2>&1 &
	fi
	spid=$!
	sleep 1 # the attack's first connections are open before the measuring client starts
	(peak=0; while kill -0 "$spid" 2>/dev/null; do c=$(clients); ((c > peak)) && peak=$c; echo "$peak" >"$out/peak"; sleep 0.5; done) &
	sampler=$!
	"$load" -d "${secs}s" -r 50 -c 8 --timeout 10s --no-progress --json "$url" >"$out/$name.json" 2>/dev/null || true
	wait "$spid" 2>/dev/null || true
	wait "$sampler" 2>/dev/null || true
	peak=$(cat "$out/peak" 2>/dev/null || echo 0)
	after=
	for _ in $(seq 1 300); do # back to the baseline: the deadlines and lingering close them
		t=$(threads) c=$(clients) r=$(rss_kib) f=$(fds)
		if [[ $t -le $base_t && $c -eq 0 && $r -le $((hw_r + 16384)) ]]; then after=ok; break; fi
		sleep 0.1
	done
	[[ -n $after ]] || after="threads $t, clients $c, RSS $((r / 1024)) MiB"
	read -r p50 p99 mx ok < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); l=d["latency_ms"]; print(l["p50"], l["p99"], l["max"], d["success_ratio"])' "$out/$name.json" 2>/dev/null || echo "- - - 0")
	res=PASS
	if [[ $after != ok ]] || ! python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= 0.99 else 1)' "$ok"; then
		res=FAIL fail=1
	fi
	((r > hw_r)) && hw_r=$r
	printf '%-12s %8s %8s %8s %8s %8s %9s %8sM %s\n' "$name" "$p50" "$p99" "$mx" "$ok" "$peak" "$f" "$((r / 1024))" "$res"
	[[ $after == ok ]] || echo "    not back to the baseline: $after"
	grep -E 'service available|closed:|pending:|connected:' "$out/$name.slow" | tail -n 4 | sed 's/\x1b\[[0-9;]*m//g; s/^/    slowhttptest: /' || true
done
kill -0 "$pid" || { echo "slowhttp: fanout died" >&2; cat "$out/log" >&2; exit 1; }
exit "$fail"
