#!/usr/bin/env bash
# Runs each test program given on the command line (under timeout), then prints one closing line
# "tests: N passed, M failed" summed over all of them. Exit status 1 if any program failed,
# crashed, hung or reported a failed test. The whole output of each program that failed is kept
# in $TEST_LOG_DIR (default build/test-logs), named after the program and the time, so that a
# failure seen once can be read after the run. Programs named in $TEST_ALSO_SPLIT run a second
# time with TEST_LOOP_MODEL=split (the server under --loop-model split), as NAME.split.
set -u
log_dir=${TEST_LOG_DIR:-build/test-logs}
timeout_s=${TEST_TIMEOUT:-300}
wrap=(${TEST_WRAP:-}) # e.g. "setarch x86_64 -R" for ThreadSanitizer
passed=0 failed=0 bad=()
# Runs one program ($1), under the name $2, with the environment $3 ("" or NAME=value).
run_one() {
	local bin=$1 name=$2 envset=$3 out rc line nf run kept
	echo "=== $name"
	out=$(mktemp)
	env $envset timeout -k 10 "$timeout_s" "${wrap[@]}" "$bin" 2>&1 | tee "$out"
	rc=${PIPESTATUS[0]}
	line=$(grep '^RESULT ' "$out" | tail -n 1)
	nf=$(sed -n 's/.*tests_failed=\([0-9]*\).*/\1/p' <<<"$line")
	if [[ -z $line || $rc -ne 0 || ${nf:-1} -ne 0 ]]; then
		mkdir -p "$log_dir"
		kept="$log_dir/$name.$(date +%Y%m%dT%H%M%S).$$.log"
		cp "$out" "$kept" && echo "*** $name: output kept in $kept"
	fi
	rm -f "$out"
	if [[ -z $line ]]; then
		echo "*** $name: no result line (exit $rc: crashed or timed out)"
		failed=$((failed + 1)) bad+=("$name")
		return
	fi
	run=$(sed -n 's/.*tests_run=\([0-9]*\).*/\1/p' <<<"$line")
	passed=$((passed + run - nf)) failed=$((failed + nf))
	if [[ $rc -ne 0 ]]; then
		echo "*** $name: exit status $rc"
		[[ $nf -gt 0 ]] || failed=$((failed + 1))
		bad+=("$name")
	fi
}

for bin in "$@"; do
	name=$(basename "$bin")
	run_one "$bin" "$name" ""
	# The server suites named in $TEST_ALSO_SPLIT run again under the split loop model.
	if [[ " ${TEST_ALSO_SPLIT:-} " == *" $name "* ]]; then
		run_one "$bin" "$name.split" "TEST_LOOP_MODEL=split"
	fi
done
echo
[[ ${#bad[@]} -eq 0 ]] || echo "failing programs: ${bad[*]}"
echo "tests: $passed passed, $failed failed"
[[ $failed -eq 0 && ${#bad[@]} -eq 0 ]]
