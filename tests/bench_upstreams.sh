#!/usr/bin/env bash
# Benchmarks of fanout over several upstream replicas: a slow replica (with and without
# hedging), a replica killed in the middle of a run (with and without retries), and replicas
# that drop a share of their connections (with 0 to 3 retries). The upstreams are fanout's own
# demo upstream (`fanout --demo-upstream-only`), one process each; a replica is made slow or
# flaky by its URL template (`/items/sleep50-{id}`, `/items/drop5-{id}`). The load is
# fanout-load, open loop, so a stall shows in the latencies. Everything is on loopback.
#
#   tests/bench_upstreams.sh [-d SECONDS] [-r RATE] [SCENARIO...]   (slow kill drop; default all)
#
# Prints one markdown table row per run: batches/s, success ratio, p50/p99/p99.9, hedges and
# retries sent (from /metrics), and for the kill scenario the time from the kill until fanout
# ejected the replica. Needs build/bin/fanout and build/bin/fanout-load (make).
set -u
dur=15 rate=200
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "d:r:h" o; do
	case $o in
	d) dur=$OPTARG ;; r) rate=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
scen=("$@")
[[ ${#scen[@]} -gt 0 ]] || scen=(slow kill drop)
cd "$(dirname "$0")/.."
bin=build/bin/fanout load=build/bin/fanout-load
for b in "$bin" "$load"; do [[ -x $b ]] || { echo "bench: $b missing (run make)" >&2; exit 2; }; done
tmp=$(mktemp -d)
pids=()
cleanup() {
	[[ ${#pids[@]} -eq 0 ]] || kill -9 "${pids[@]}" 2>/dev/null
	wait 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT

port_of() { # $1: a log file with a "port":N line; waits for it
	local p=
	for _ in $(seq 200); do
		p=$(grep -o '"port":[0-9]*' "$1" 2>/dev/null | head -1 | cut -d: -f2)
		[[ -n $p ]] && { echo "$p"; return 0; }
		sleep 0.05
	done
	return 1
}

# Starts upstream i (a demo upstream alone); sets UP_PID[i], UP_PORT[i].
declare -a UP_PID UP_PORT
start_up() {
	"$bin" --demo-upstream-only --listen "127.0.0.1:${2:-0}" 2>"$tmp/up$1.log" &
	UP_PID[$1]=$!
	pids+=($!)
	UP_PORT[$1]=$(port_of "$tmp/up$1.log") || { echo "bench: upstream $1 did not start" >&2; exit 1; }
}

# Starts fanout with the templates "$@" (host:port/path parts) and $FLAGS; sets FPID, FPORT.
start_fanout() {
	local args=() t
	for t in "$@"; do args+=(--upstream "http://$t"); done
	# shellcheck disable=SC2086
	"$bin" --listen 127.0.0.1:0 "${args[@]}" $FLAGS 2>"$tmp/fanout.log" &
	FPID=$!
	pids+=($!)
	FPORT=$(port_of "$tmp/fanout.log") || { echo "bench: fanout did not start" >&2; cat "$tmp/fanout.log" >&2; exit 1; }
}

stop_all() {
	[[ ${#pids[@]} -eq 0 ]] || kill -9 "${pids[@]}" 2>/dev/null
	wait 2>/dev/null
	pids=()
}

metric() { # $1: exact series name; prints its value (0 if absent)
	curl -s "http://127.0.0.1:$FPORT/metrics" | awk -v n="$1" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }'
}

# Runs the load and prints a table row: $1 label, $2 note; LOADARGS extra load flags.
row() {
	local j=$tmp/load.json h0 r0
	h0=$(metric fanout_hedges_sent_total) r0=$(metric fanout_retries_sent_total)
	# shellcheck disable=SC2086
	"$load" "http://127.0.0.1:$FPORT" -d "${dur}s" -r "$rate" -c 16 -t 2 --no-progress \
		--min-success 0 --json $LOADARGS >"$j" 2>"$tmp/load.err"
	local h1 r1
	h1=$(metric fanout_hedges_sent_total) r1=$(metric fanout_retries_sent_total)
	python3 - "$j" "$1" "$2" "$((h1 - h0))" "$((r1 - r0))" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
lat = j["latency_ms"]
print(f"| {sys.argv[2]} | {j['requests_per_s']:.0f} | {j['success_ratio']*100:.3f}% | "
      f"{lat['p50']:.1f} | {lat['p99']:.1f} | {lat['p99_9']:.1f} | {sys.argv[4]} | {sys.argv[5]} | {sys.argv[3]} |")
EOF
}

echo "| run | batches/s | success | p50 ms | p99 ms | p99.9 ms | hedges sent | retries sent | note |"
echo "|---|---|---|---|---|---|---|---|---|"

for s in "${scen[@]}"; do
	case $s in
	slow) # three replicas, one ten times slower (5 ms vs 50 ms); batches of 10
		for h in 0 15 auto; do
			start_up 1; start_up 2; start_up 3
			FLAGS="--hedge-after-ms $h --hedge-budget-pct 30 --log-level warn"
			start_fanout "127.0.0.1:${UP_PORT[1]}/items/sleep5-{id}" \
				"127.0.0.1:${UP_PORT[2]}/items/sleep5-{id}" "127.0.0.1:${UP_PORT[3]}/items/sleep50-{id}"
			LOADARGS="-b 10 --ids uniform -k 100000"
			row "slow replica, --hedge-after-ms $h" "replicas 5/5/50 ms"
			stop_all
		done
		;;
	kill) # three replicas; one killed with SIGKILL a third of the way in
		for rt in 0 1; do
			start_up 1; start_up 2; start_up 3
			FLAGS="--retries $rt --eject-after 5 --log-level info"
			start_fanout "127.0.0.1:${UP_PORT[1]}/items/{id}" "127.0.0.1:${UP_PORT[2]}/items/{id}" \
				"127.0.0.1:${UP_PORT[3]}/items/{id}"
			(
				sleep $((dur / 3))
				kill -9 "${UP_PID[3]}"
				date +%s%3N >"$tmp/killed_at"
			) &
			LOADARGS="-b 10 --ids uniform -k 100000"
			row "replica killed, --retries $rt" "see ejection below" | tee "$tmp/row"
			ej=$(grep -m1 '"msg":"upstream ejected"' "$tmp/fanout.log" | grep -o '"time":"[^"]*"' | cut -d'"' -f4)
			if [[ -n $ej && -f $tmp/killed_at ]]; then
				ej_ms=$(date -d "$ej" +%s%3N)
				echo "|  | ejected $((ej_ms - $(cat "$tmp/killed_at"))) ms after the kill |  |  |  |  |  |  |  |"
			else
				echo "|  | not ejected |  |  |  |  |  |  |  |"
			fi
			rm -f "$tmp/killed_at"
			stop_all
		done
		;;
	drop) # three replicas that each drop 5% of requests (connection closed, no answer)
		for rt in 0 1 2 3; do
			start_up 1; start_up 2; start_up 3
			FLAGS="--retries $rt --eject-after 0 --log-level warn"
			start_fanout "127.0.0.1:${UP_PORT[1]}/items/drop5-{id}" \
				"127.0.0.1:${UP_PORT[2]}/items/drop5-{id}" "127.0.0.1:${UP_PORT[3]}/items/drop5-{id}"
			LOADARGS="-b 10 --ids uniform -k 100000"
			row "5% dropped, --retries $rt" "batches of 10"
			stop_all
		done
		;;
	*) echo "bench: unknown scenario $s (slow, kill, drop)" >&2; exit 2 ;;
	esac
done
