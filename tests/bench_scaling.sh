#!/usr/bin/env bash
# How fanout scales on loopback: fetches/s, latency and CPU per fetch
#   - for batch sizes 1, 10, 100, 1000 (32 connections), and
#   - for 1 to 512 client connections (batches of 10),
# in closed loops of fanout-load against the bench harness's nginx item upstream (fast, no
# delay). CPU per fetch is fanout's own (user + system, from /proc), so a cost that grows with
# the batch or the connection count shows even where the machine, not fanout, caps the rate;
# "loop CPU" is the part spent on the fetch loop threads (those asleep in poll() while fanout
# idles: curl_multi_poll; the HTTP threads wait in epoll, the rest on futexes).
#
#   tests/bench_scaling.sh [-d SECONDS] [batch|conns|CxB ...]   (default: batch conns; 5 s a
#   point; CxB is one point of C connections and batches of B)
#
# Needs build/bin/fanout and build/bin/fanout-load (make) and nginx with the harness's
# upstream script ($BENCH_DIR, default ../shared/bench: upstream/nginx.sh). Ports: $SVC_PORT
# (default 28480) and $UP_PORT (29400). Prints one markdown table per sweep.
set -u
dur=5
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "d:h" o; do
	case $o in
	d) dur=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
sweeps=("$@")
[[ ${#sweeps[@]} -gt 0 ]] || sweeps=(batch conns)
cd "$(dirname "$0")/.."
bench=${BENCH_DIR:-../shared/bench}
bin=build/bin/fanout load=build/bin/fanout-load
for b in "$bin" "$load"; do [[ -x $b ]] || { echo "bench: $b missing (run make)" >&2; exit 2; }; done
[[ -x $bench/upstream/nginx.sh ]] || { echo "bench: $bench/upstream/nginx.sh missing (set BENCH_DIR)" >&2; exit 2; }
command -v nginx >/dev/null || { echo "bench: nginx not installed (apt-get install nginx-light libnginx-mod-http-echo)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "bench: python3 missing" >&2; exit 2; }
svc=${SVC_PORT:-28480} up=${UP_PORT:-29400}
tmp=$(mktemp -d)
pids=()
cleanup() {
	[[ ${#pids[@]} -eq 0 ]] || kill "${pids[@]}" 2>/dev/null
	wait 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT

"$bench/upstream/nginx.sh" "$up" "$tmp/nginx" 1 >/dev/null 2>&1 &
pids+=($!)
"$bin" --listen "127.0.0.1:$svc" --upstream "http://127.0.0.1:$up/items/{id}" --limit 100 \
	--max-requests 4096 --log-level warn 2>"$tmp/fanout.log" &
fp=$!
pids+=($fp)
"$load" --wait 10s -c 1 -d 1s -b 1 "http://127.0.0.1:$svc" >/dev/null 2>&1 ||
	{ echo "bench: fanout did not answer (log: $(head -3 "$tmp/fanout.log"))" >&2; exit 3; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$fp/stat"; }
hz=$(getconf CLK_TCK)
sleep 0.5 # idle now: the loops sit in poll()
loop_tids=()
for t in /proc/$fp/task/*; do
	[[ $(cat "$t/wchan" 2>/dev/null) == poll_schedule_timeout* ]] && loop_tids+=("${t##*/}")
done
loop_ticks() {
	local s=0 t
	for t in "${loop_tids[@]}"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$fp/task/$t/stat"))); done
	echo "$s"
}

point() { # $1 connections, $2 batch size: one row
	local c=$1 b=$2 t0 t1 l0 l1
	"$load" -c "$c" -d 1s -b "$b" "http://127.0.0.1:$svc" >/dev/null 2>&1 # warm-up
	t0=$(cpu_ticks) l0=$(loop_ticks)
	"$load" -c "$c" -d "${dur}s" -b "$b" --json "http://127.0.0.1:$svc" >"$tmp/run.json" 2>/dev/null
	t1=$(cpu_ticks) l1=$(loop_ticks)
	python3 - "$tmp/run.json" "$c" "$b" "$((t1 - t0))" "$hz" "$(awk '/VmHWM/{print $2}' "/proc/$fp/status")" \
		"$(ls "/proc/$fp/task" | wc -l)" "$((l1 - l0))" "${#loop_tids[@]}" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
c, b, ticks, hz, hwm, thr, lticks, nloops = sys.argv[2:10]
f = d.get("fetches", 0) or 0
l = d["latency_ms"]
us = int(ticks) / int(hz) * 1e6 / f if f else float("nan")
lus = int(lticks) / int(hz) * 1e6 / f if f and int(nloops) else float("nan")
print(f"| {c} | {b} | {d['requests_per_s']:.0f} | {d['fetches_per_s']:.0f} | {d['success_ratio']*100:.3f}% "
      f"| {l['p50']:.2f} | {l['p99']:.2f} | {us:.1f} | {lus:.1f} | {int(hwm)/1024:.1f} | {thr} |")
EOF
}

header() {
	echo
	echo "### $1 ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, ${dur} s a point)"
	echo
	echo "| connections | batch | batches/s | fetches/s | success | p50 ms | p99 ms | fanout CPU us/fetch | loop CPU us/fetch | peak RSS MB | threads |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|"
}

points=0
for s in "${sweeps[@]}"; do
	case $s in
	[0-9]*x[0-9]*)
		[[ $points -eq 1 ]] || header "Points (${#loop_tids[@]} fetch loops)"
		points=1
		point "${s%x*}" "${s#*x}"
		continue
		;;
	esac
	points=0
	case $s in
	batch)
		header "Batch size, 32 connections"
		for b in 1 10 100 1000; do point 32 "$b"; done
		;;
	conns)
		header "Connections, batches of 10"
		for c in 1 2 4 8 16 32 64 128 256 512; do point "$c" 10; done
		;;
	*) echo "bench: unknown sweep $s (batch, conns, CxB)" >&2; exit 2 ;;
	esac
done
