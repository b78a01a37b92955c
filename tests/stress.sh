#!/usr/bin/env bash
# Runs whole suites many times with a CPU hog beside them, to prove that no test depends on an
# idle machine. Each run is a full `make TARGET`; the first build is done before the hog starts.
#
#   tests/stress.sh [-n RUNS] [-j HOGS] [TARGET...]     (default: -n 20 -j 1 test tsan asan)
#
# Prints one line per run and a closing line per target, "stress TARGET: N runs, M failed";
# the log of every failed run is kept under build/stress/. Exit status 1 if any run failed.
set -u
runs=20 hogs=1
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "n:j:h" o; do
	case $o in
	n) runs=$OPTARG ;;
	j) hogs=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "stress: -n wants a positive integer, not '$runs'" >&2; exit 2; }
[[ $hogs =~ ^[0-9]+$ ]] || { echo "stress: -j wants a non-negative integer, not '$hogs'" >&2; exit 2; }
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(test tsan asan)
cd "$(dirname "$0")/.."
logs=build/stress
mkdir -p "$logs"

pids=()
stop_hogs() {
	[[ ${#pids[@]} -eq 0 ]] || kill "${pids[@]}" 2>/dev/null
	wait 2>/dev/null
	pids=()
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM

bad=0
summary=()
for t in "${targets[@]}"; do
	# Build (and run once) before the hog, so the runs below time tests, not compilers.
	if ! make --no-print-directory "$t" >"$logs/$t-build.log" 2>&1; then
		echo "stress $t: the first run failed; see $logs/$t-build.log"
		bad=1 summary+=("stress $t: build or first run failed")
		continue
	fi
	for ((h = 0; h < hogs; h++)); do
		(while :; do :; done) &
		pids+=($!)
	done
	failed=0
	for ((i = 1; i <= runs; i++)); do
		start=$SECONDS
		log="$logs/$t-run$i.log"
		if make --no-print-directory "$t" >"$log" 2>&1; then
			echo "stress $t run $i/$runs: ok ($((SECONDS - start)) s) $(tail -n 1 "$log")"
			rm -f "$log"
		else
			failed=$((failed + 1))
			echo "stress $t run $i/$runs: FAILED ($((SECONDS - start)) s), log kept: $log"
			grep -E '^\*\*\*|^    [0-9]+\. |failing programs' "$log" | head -n 20 | sed 's/^/    /'
		fi
	done
	stop_hogs
	[[ $failed -eq 0 ]] || bad=1
	summary+=("stress $t: $runs runs, $failed failed")
done
printf '%s\n' "${summary[@]}"
exit "$bad"
