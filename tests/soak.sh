#!/usr/bin/env bash
# Soak: minutes of mixed load against one fanout built with a sanitizer, while RSS, threads and
# open fds are sampled every second. The load mixes successes, failing ids, deadlines, client
# disconnects, duplicate ids (Zipf), settled batches and max-size batches, over three demo
# upstreams of which one is killed and restarted again and again (flapping).
#
#   tests/soak.sh -b FANOUT_BIN [-s SECONDS] [-o DIR] [-n NAME]
#
# Needs build/bin/fanout (the demo upstreams) and build/bin/fanout-load. Writes DIR/NAME.csv
# (t, rss_kb, threads, fds), DIR/NAME.png (with gnuplot) and DIR/NAME.log (fanout's stderr).
# Passes (exit 0) when: fanout stays up and exits 0 on SIGTERM (so a leak fails under ASan);
# no sanitizer report; the thread count never changes; and after the first fifth of the run
# (warm-up) RSS grows by at most 10% + 8 MiB over its warm-up maximum, and once the load has
# gone the open fds come back to at most 32 over theirs (under load they swing with it).
set -u
secs=60 out=build/soak name=soak bin=
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "b:s:o:n:h" o; do
	case $o in
	b) bin=$OPTARG ;; s) secs=$OPTARG ;; o) out=$OPTARG ;; n) name=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
[[ -n $bin && -x $bin ]] || { echo "soak: -b wants the fanout binary to soak" >&2; exit 2; }
[[ $secs =~ ^[1-9][0-9]*$ && $secs -ge 20 ]] || { echo "soak: -s wants at least 20 seconds" >&2; exit 2; }
cd "$(dirname "$0")/.."
up_bin=build/bin/fanout load=build/bin/fanout-load
for b in "$up_bin" "$load"; do
	[[ -x $b ]] || { echo "soak: $b is missing (run make)" >&2; exit 2; }
done
mkdir -p "$out"
csv=$out/$name.csv log=$out/$name.log
pids=() flap_pid= fanout_pid=
cleanup() {
	[[ -z $flap_pid ]] || kill "$flap_pid" 2>/dev/null
	[[ ! -f $out/$name.flap.pid ]] || kill -9 "$(cat "$out/$name.flap.pid")" 2>/dev/null
	[[ ${#pids[@]} -eq 0 ]] || kill "${pids[@]}" 2>/dev/null
	[[ -z $fanout_pid ]] || kill -9 "$fanout_pid" 2>/dev/null
	wait 2>/dev/null
}
trap cleanup EXIT

# Ports picked by the kernel: each upstream binds 0 and logs the port it got.
start_upstream() { # $1: index; prints "pid port"
	local f=$out/$name.up$1.log port=
	"$up_bin" --demo-upstream-only --listen 127.0.0.1:0 >/dev/null 2>"$f" &
	local pid=$!
	for _ in $(seq 200); do
		port=$(grep -o '"port":[0-9]*' "$f" 2>/dev/null | head -1 | cut -d: -f2)
		[[ -n $port ]] && break
		sleep 0.05
	done
	echo "$pid $port"
}
read -r up1 p1 < <(start_upstream 1)
read -r up2 p2 < <(start_upstream 2)
read -r up3 p3 < <(start_upstream 3)
pids+=("$up1" "$up2")
[[ -n $up3 ]] || up3=0
[[ -n $p1 && -n $p2 && -n $p3 ]] || { echo "soak: the demo upstreams did not start" >&2; exit 1; }

TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=0}:atexit_sleep_ms=0 \
	"$bin" --listen 127.0.0.1:0 --log-level warn \
	--upstream "http://127.0.0.1:$p1/items/{id}" --upstream "http://127.0.0.1:$p2/items/{id}" \
	--upstream "http://127.0.0.1:$p3/items/{id}" \
	--retries 2 --hedge-after-ms auto --eject-after 3 --eject-ms 2000 --eject-max-ms 8000 \
	--max-timeout-ms 2000 --drain-ms 3000 >/dev/null 2>"$log" &
fanout_pid=$!
port=
for _ in $(seq 400); do # the port it bound, from the kernel (it logs at warn only)
	port=$(ss -ltnpH 2>/dev/null | grep "pid=$fanout_pid," | grep -o '127.0.0.1:[0-9]*' | head -1 | cut -d: -f2)
	[[ -n $port ]] && break
	kill -0 "$fanout_pid" 2>/dev/null || break
	sleep 0.05
done
[[ -n $port ]] || { echo "soak: fanout did not start:"; cat "$log"; exit 1; }
url=http://127.0.0.1:$port

# The flapping upstream: killed, down 2 s, back on its port for 6 s, again and again.
(
	pid=$up3
	while :; do
		sleep 6
		kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
		sleep 2
		"$up_bin" --demo-upstream-only --listen "127.0.0.1:$p3" >/dev/null 2>&1 &
		pid=$!
		echo "$pid" >"$out/$name.flap.pid"
	done
) &
flap_pid=$!

sample() { # t rss threads fds
	local st
	st=$(cat /proc/"$fanout_pid"/status 2>/dev/null) || return 1
	printf '%s,%s,%s,%s\n' "$1" "$(awk '/^VmRSS:/{print $2}' <<<"$st")" \
		"$(awk '/^Threads:/{print $2}' <<<"$st")" "$(ls /proc/"$fanout_pid"/fd 2>/dev/null | wc -l)"
}
echo "t,rss_kb,threads,fds" >"$csv"

d=${secs}s
common=(--wait 5s -d "$d" --no-progress --min-success 0 --json)
"$load" "$url" "${common[@]}" -c 8 -r 150 -b 1-40 --ids zipf -k 500 --fail-frac 0.01 \
	--slow-frac 0.05 --slow-ms 150 -T 400 >"$out/$name.load1.json" 2>&1 &
pids+=($!)
"$load" "$url" "${common[@]}" -c 4 -r 40 -b 5-60 --ids uniform -k 2000 --mode settled \
	--slow-frac 0.1 --slow-ms 300 -T 250 >"$out/$name.load2.json" 2>&1 &
pids+=($!)
"$load" "$url" "${common[@]}" -c 4 -r 20 -b 10 --slow-frac 0.5 --slow-ms 1000 \
	--timeout 150ms >"$out/$name.load3.json" 2>&1 & # clients that give up: disconnects
pids+=($!)
"$load" "$url" "${common[@]}" -c 1 -r 2 -b 1000 --ids uniform -k 5000 >"$out/$name.load4.json" 2>&1 &
pids+=($!)
loads=("${pids[@]:2}")

start=$SECONDS
while (( SECONDS - start < secs + 2 )); do
	sample $((SECONDS - start)) >>"$csv" || break
	sleep 1
done
wait "${loads[@]}" 2>/dev/null
kill "$flap_pid" 2>/dev/null; wait "$flap_pid" 2>/dev/null; flap_pid=
[[ ! -f $out/$name.flap.pid ]] || kill -9 "$(cat "$out/$name.flap.pid")" 2>/dev/null
rm -f "$out/$name.flap.pid"
# Under load the fd count swings with it (client and upstream connections, lingering closes);
# a leak is what stays once the load has gone. Wait (up to 15 s: lingering closes and idle
# connections end) for the count to come back within the bound, then take the last sample.
wf=$(awk -F, -v warm=$((secs / 5)) 'NR > 1 && $1 <= warm && $4 > m { m = $4 } END { print m + 0 }' "$csv")
for _ in $(seq 30); do
	n=$(ls /proc/"$fanout_pid"/fd 2>/dev/null | wc -l)
	((n <= wf + 32)) && break
	sleep 0.5
done
sample $((SECONDS - start)) >>"$csv"

alive=1
kill -0 "$fanout_pid" 2>/dev/null || alive=0
kill -TERM "$fanout_pid" 2>/dev/null
wait "$fanout_pid"
status=$?
fanout_pid=

reports=$(grep -cE 'ERROR: (AddressSanitizer|LeakSanitizer)|WARNING: ThreadSanitizer|runtime error:' "$log")
verdict=$(awk -F, -v secs="$secs" '
	BEGIN { n = 0 }
	NR == 1 { next }
	{ t = $1; rss[n] = $2; th[n] = $3; fd[n] = $4; tt[n] = t; n++ }
	END {
		if (n < 5) { print "FAIL too few samples"; exit }
		warm = secs / 5; wr = 0; wf = 0; lr = 0; tmin = th[0]; tmax = th[0]
		for (i = 0; i < n; i++) {
			if (th[i] < tmin) tmin = th[i]; if (th[i] > tmax) tmax = th[i]
			if (tt[i] <= warm) { if (rss[i] > wr) wr = rss[i]; if (fd[i] > wf) wf = fd[i] }
			else if (rss[i] > lr) lr = rss[i]
		}
		lf = fd[n - 1] # once the load has gone
		ok = tmin == tmax && lr <= wr * 1.10 + 8192 && lf <= wf + 32
		printf "%s threads %d..%d, rss warm-up max %d kB, after %d kB, fds warm-up max %d, at the end %d\n",
			ok ? "ok" : "FAIL", tmin, tmax, wr, lr, wf, lf
	}' "$csv")
if command -v gnuplot >/dev/null 2>&1; then
	gnuplot <<EOF 2>/dev/null
set terminal pngcairo size 1000,700 noenhanced
set output "$out/$name.png"
set datafile separator ","
set multiplot layout 3,1 title "soak: $name ($secs s)"
set xlabel "seconds"
set ylabel "RSS (MiB)"
plot "$csv" using 1:(\$2/1024) skip 1 with lines title "rss"
set ylabel "threads"
set yrange [0:*]
set offsets 0, 0, 2, 0
plot "$csv" using 1:3 skip 1 with lines title "threads"
set ylabel "open fds"
plot "$csv" using 1:4 skip 1 with lines title "fds"
unset multiplot
EOF
fi
for f in "$out/$name".load*.json; do
	printf 'soak %s: %s\n' "$(basename "$f" .json)" "$(tr -d '\n' <"$f" | grep -oE '"(requests|ok|success_ratio)":[[:space:]]*[0-9.]+' | tr -d '\t"' | tr '\n' ' ')"
done
echo "soak $name: $secs s, alive=$alive exit=$status sanitizer_reports=$reports; $verdict"
[[ $alive == 1 && $status == 0 && $reports == 0 && $verdict == ok* ]]
