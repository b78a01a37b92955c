#!/usr/bin/env bash
# Benchmarks of fanout's upstream resilience, on loopback:
#   s4    the bench harness's S4 (one upstream, 99% 5 ms / 1% 100 ms, random per request; its Go
#         item upstream) with --hedge-after-ms 0, 15 and auto (or $HEDGES): batches of 100,
#         limit 100, 4 connections in a closed loop as the harness runs it (S4_LOOP=open: an
#         open loop at -r RATE over 16 connections instead);
#   slow  three replicas, all healthy (5 / 5 / 5 ms) and one ten times slower (5 / 5 / 50 ms;
#         $SLOW_THIRD picks the third's delays, default "5 50"), with --balance-factor $BALANCE
#         (default "0 1.25") and --hedge-after-ms $HEDGES (default "0 15 auto"), hedge budget
#         $HEDGE_BUDGET percent (default 5, fanout's own);
#   kill  three replicas, one killed with SIGKILL a third of the way in, --retries 0 and 1, and
#         the time from the kill until fanout ejected it;
#   drop  three replicas that each drop 5% of requests (connection closed, no answer), with
#         --retries 0 to 3;
#   hot   hot keys: 64 connections, batches of 20 ids from Zipf(1.1) over 10,000 ids, a 20 ms
#         Go upstream, --coalesce off and on: upstream requests per batch, p50/p99;
#   stream  S4 answered as JSON and as NDJSON, --hedge-after-ms 0 and 15: time to the first
#         line against the time to the whole answer.
# The replicas are fanout's own demo upstream (`fanout --demo-upstream-only`), one process each,
# made slow or flaky by their URL templates (`/items/sleep50-{id}`, `/items/drop5-{id}`). The
# load is fanout-load: open loop at RATE batches/s of 10 ids (so a stall shows in the
# latencies), closed loop for s4 as the harness runs it.
#
#   tests/bench_upstreams.sh [-d SECONDS] [-r RATE] [SCENARIO...]   (default: s4 slow kill drop)
#
# WARMUP=SECONDS runs the same load unmeasured first (default 0; the slow scenario's rows below
# were measured with 2, so that every member has answered before the measurement starts).
# Prints one markdown table row per run: batches/s, success ratio, p50/p99/p99.9 ms, hedges
# and retries sent, and upstream attempts beyond one per id (from fanout's /metrics). Needs
# build/bin/fanout and build/bin/fanout-load (make), and for s4, hot and stream the harness's Go upstream
# ($ITEMUPSTREAM, default ~/.cache/fanout-bench/itemupstream, which its run.sh builds).
set -u
dur=15 rate=200
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "d:r:h" o; do
	case $o in
	d) dur=$OPTARG ;; r) rate=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
scen=("$@")
[[ ${#scen[@]} -gt 0 ]] || scen=(s4 slow kill drop)
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

listen_port_of() { # $1: pid; its one loopback listening port, from the kernel
	local p=
	for _ in $(seq 200); do
		p=$(ss -ltnpH 2>/dev/null | grep "pid=$1," | grep -o '127.0.0.1:[0-9]*' | head -1 | cut -d: -f2)
		[[ -n $p ]] && { echo "$p"; return 0; }
		sleep 0.05
	done
	return 1
}

declare -a UP_PID UP_PORT
start_up() { # $1: index; a demo upstream alone; sets UP_PID[i], UP_PORT[i]
	"$bin" --demo-upstream-only --listen 127.0.0.1:0 >/dev/null 2>"$tmp/up$1.log" &
	UP_PID[$1]=$!
	pids+=($!)
	UP_PORT[$1]=$(port_of "$tmp/up$1.log") || { echo "bench: upstream $1 did not start" >&2; exit 1; }
}

start_goup() { # "$@": the harness's Go item upstream's flags; sets gport
	local goup=${ITEMUPSTREAM:-$HOME/.cache/fanout-bench/itemupstream}
	[[ -x $goup ]] || { echo "bench: the scenario needs the harness's Go upstream ($goup; run its run.sh once, or set ITEMUPSTREAM)" >&2; exit 2; }
	"$goup" -listen 127.0.0.1:0 "$@" 2>"$tmp/goup.log" &
	pids+=($!)
	gport=$(listen_port_of $!) || { echo "bench: the Go upstream did not start" >&2; exit 1; }
}

start_fanout() { # "$@": host:port/path templates; FLAGS: more flags; sets FPORT
	local args=() t
	for t in "$@"; do args+=(--upstream "http://$t"); done
	# shellcheck disable=SC2086
	"$bin" --listen 127.0.0.1:0 "${args[@]}" $FLAGS >/dev/null 2>"$tmp/fanout.log" &
	pids+=($!)
	FPORT=$(listen_port_of $!) || { echo "bench: fanout did not start" >&2; cat "$tmp/fanout.log" >&2; exit 1; }
}

stop_all() {
	[[ ${#pids[@]} -eq 0 ]] || kill -9 "${pids[@]}" 2>/dev/null
	wait 2>/dev/null
	pids=()
}

metric() { # $1: an exact series name; its value (0 if absent)
	curl -s "http://127.0.0.1:$FPORT/metrics" | awk -v n="$1" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }'
}

attempts() { # every upstream attempt so far, whatever its result
	curl -s "http://127.0.0.1:$FPORT/metrics" |
		awk '$1 ~ /^fanout_fetches_total[{]/ { s += $2 } END { print s + 0 }'
}

summarize() { # load.json label note hedges retries attempts ids-per-batch
	python3 - "$@" <<'PY'
import json, sys
a = sys.argv
j = json.load(open(a[1]))
lat = j["latency_ms"]
ids = j["attempts"] * int(a[7])
extra = (int(a[6]) / ids - 1) * 100 if ids else 0
rps, ok = j["requests_per_s"], j["success_ratio"] * 100
print(f"| {a[2]} | {rps:.0f} | {ok:.3f}% | {lat['p50']:.1f} | {lat['p99']:.1f} | "
      f"{lat['p99_9']:.1f} | {a[4]} | {a[5]} | {extra:+.1f}% | {a[3]} |")
PY
}

# Runs the load and prints a row: $1 label, $2 note, $3 ids per batch. LOADARGS: more load
# flags; LOOP: "open" (-r $rate over 16 connections) or "closed N" (N connections).
row() {
	local j=$tmp/load.json h0 r0 a0 h1 r1 a1 loop
	if [[ ${LOOP:-open} == open ]]; then loop="-r $rate -c 16"; else loop="-c ${LOOP#closed }"; fi
	if [[ ${WARMUP:-0} -gt 0 ]]; then # unmeasured: latency estimates and rankings settle
		# shellcheck disable=SC2086
		"$load" "http://127.0.0.1:$FPORT" -d "${WARMUP}s" $loop -t 2 --no-progress --min-success 0 \
			$LOADARGS >/dev/null 2>&1
	fi
	h0=$(metric fanout_hedges_sent_total) r0=$(metric fanout_retries_sent_total) a0=$(attempts)
	# shellcheck disable=SC2086
	"$load" "http://127.0.0.1:$FPORT" -d "${dur}s" $loop -t 2 --no-progress --min-success 0 \
		--json $LOADARGS >"$j" 2>"$tmp/load.err"
	h1=$(metric fanout_hedges_sent_total) r1=$(metric fanout_retries_sent_total) a1=$(attempts)
	summarize "$j" "$1" "$2" "$((h1 - h0))" "$((r1 - r0))" "$((a1 - a0))" "$3"
}

echo "| run | batches/s | success | p50 ms | p99 ms | p99.9 ms | hedges | retries | upstream requests beyond one per id | note |"
echo "|---|---|---|---|---|---|---|---|---|---|"

for s in "${scen[@]}"; do
	case $s in
	s4)
		for h in ${HEDGES:-0 15 auto}; do
			start_goup -delay 5ms -tail-frac 0.01 -tail-delay 100ms
			FLAGS="--limit 100 --hedge-after-ms $h ${S4_FLAGS:-} --log-level warn"
			start_fanout "127.0.0.1:$gport/items/{id}"
			LOADARGS="-b 100 --ids seq" LOOP=${S4_LOOP:-closed 4} row "S4, --hedge-after-ms $h" "one upstream, 1% at 100 ms${S4_LOOP:+, $S4_LOOP loop}" 100
			stop_all
		done
		;;
	slow)
		for b in ${BALANCE:-0 1.25}; do
			for h in ${HEDGES:-0 15 auto}; do
				for third in ${SLOW_THIRD:-5 50}; do
					start_up 1; start_up 2; start_up 3
					FLAGS="--hedge-after-ms $h --hedge-budget-pct ${HEDGE_BUDGET:-5} --balance-factor $b --log-level warn"
					start_fanout "127.0.0.1:${UP_PORT[1]}/items/sleep5-{id}" \
						"127.0.0.1:${UP_PORT[2]}/items/sleep5-{id}" "127.0.0.1:${UP_PORT[3]}/items/sleep$third-{id}"
					LOADARGS="-b 10 --ids uniform -k 100000" row \
						"replicas 5/5/$third ms, --balance-factor $b, --hedge-after-ms $h" \
						"hedge budget ${HEDGE_BUDGET:-5}%" 10
					stop_all
				done
			done
		done
		;;
	kill)
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
			kpid=$!
			LOADARGS="-b 10 --ids uniform -k 100000" row "replica killed, --retries $rt" \
				"killed at ${dur}/3 s" 10
			wait "$kpid"
			ej=$(grep -m1 '"msg":"upstream ejected"' "$tmp/fanout.log" | grep -o '"time":"[^"]*"' | cut -d'"' -f4)
			if [[ -n $ej && -f $tmp/killed_at ]]; then
				echo "|  | ejected $(($(date -d "$ej" +%s%3N) - $(cat "$tmp/killed_at"))) ms after the kill |  |  |  |  |  |  |  |  |"
			else
				echo "|  | not ejected |  |  |  |  |  |  |  |  |"
			fi
			rm -f "$tmp/killed_at"
			stop_all
		done
		;;
	drop)
		for rt in 0 1 2 3; do
			start_up 1; start_up 2; start_up 3
			FLAGS="--retries $rt --eject-after 0 --log-level warn"
			start_fanout "127.0.0.1:${UP_PORT[1]}/items/drop5-{id}" \
				"127.0.0.1:${UP_PORT[2]}/items/drop5-{id}" "127.0.0.1:${UP_PORT[3]}/items/drop5-{id}"
			LOADARGS="-b 10 --ids uniform -k 100000" row "5% dropped, --retries $rt" "batches of 10" 10
			stop_all
		done
		;;
	hot)
		# Hot keys: 64 connections, batches of 20 ids from Zipf(1.1) over 10,000 ids, an
		# upstream that answers in 20 ms; coalescing off, then on.
		echo
		echo "| --coalesce | batches/s | success | p50 ms | p99 ms | upstream requests per batch | joined per batch |"
		echo "|---|---|---|---|---|---|---|"
		for co in off on; do
			start_goup -delay 20ms
			FLAGS="--coalesce $co --log-level warn"
			start_fanout "127.0.0.1:$gport/items/{id}"
			a0=$(attempts) j0=$(metric fanout_flights_joined_total)
			"$load" "http://127.0.0.1:$FPORT" -d "${dur}s" -c 64 -t 2 --no-progress --min-success 0 \
				--json -b 20 --ids zipf -k 10000 --zipf-s 1.1 >"$tmp/load.json" 2>"$tmp/load.err"
			a1=$(attempts) j1=$(metric fanout_flights_joined_total)
			python3 - "$tmp/load.json" "$co" "$((a1 - a0))" "$((j1 - j0))" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); lat = j["latency_ms"]; n = j["requests"] or 1
print(f"| {sys.argv[2]} | {j['requests_per_s']:.0f} | {j['success_ratio'] * 100:.3f}% | "
      f"{lat['p50']:.1f} | {lat['p99']:.1f} | {int(sys.argv[3]) / n:.2f} | {int(sys.argv[4]) / n:.2f} |")
PY
			stop_all
		done
		;;
	stream)
		# S4 streamed: the time to the first NDJSON line against the time to the whole answer.
		echo
		echo "| S4 (--hedge-after-ms) | answer | batches/s | first line p50 ms | first line p99 ms | whole answer p50 ms | whole answer p99 ms |"
		echo "|---|---|---|---|---|---|---|"
		for h in 0 15; do
			for nd in "" --ndjson; do
				start_goup -delay 5ms -tail-frac 0.01 -tail-delay 100ms
				FLAGS="--limit 100 --hedge-after-ms $h ${S4_FLAGS:-} --log-level warn"
				start_fanout "127.0.0.1:$gport/items/{id}"
				"$load" "http://127.0.0.1:$FPORT" -d "${dur}s" -c 4 -t 2 --no-progress --min-success 0 \
					--json -b 100 --ids seq $nd >"$tmp/load.json" 2>"$tmp/load.err"
				python3 - "$tmp/load.json" "$h" "${nd:-JSON}" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); lat = j["latency_ms"]; fl = j.get("first_line_ms")
first = f"{fl['p50']:.1f} | {fl['p99']:.1f}" if fl else "- | -"
print(f"| {sys.argv[2]} | {sys.argv[3].lstrip('-')} | {j['requests_per_s']:.0f} | {first} | "
      f"{lat['p50']:.1f} | {lat['p99']:.1f} |")
PY
				stop_all
			done
		done
		;;
	*) echo "bench: unknown scenario $s (s4, slow, kill, drop, hot, stream)" >&2; exit 2 ;;
	esac
done
