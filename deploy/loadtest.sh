#!/usr/bin/env bash
# Load-tests a running fanout with wrk: POST /v1/batch with BATCH ids per request.
#
#   deploy/loadtest.sh [-u URL] [-d DURATION] [-c CONNS] [-t THREADS] [-b BATCH] [-T TIMEOUT_MS]
#
#   -u  base URL of fanout            [http://127.0.0.1:8080]
#   -d  duration (wrk syntax)         [10s]
#   -c  connections                   [32]
#   -t  wrk threads                   [2]
#   -b  ids per request               [10]
#   -p  id prefix                     [item-]   (with --demo: "sleep20-" adds 20 ms per id)
#   -T  timeout_ms sent in each body  [none]
#
# Prints wrk's report, the count of each status code and one LOADTEST summary line. Needs wrk
# (Debian: apt-get install wrk). The run is bounded by the duration; it stops by itself.
set -euo pipefail
url=http://127.0.0.1:8080 dur=10s conns=32 threads=2 batch=10 prefix=item- tmo=
while getopts "u:d:c:t:b:p:T:h" o; do
	case $o in
	u) url=$OPTARG ;; d) dur=$OPTARG ;; c) conns=$OPTARG ;; t) threads=$OPTARG ;;
	b) batch=$OPTARG ;; p) prefix=$OPTARG ;; T) tmo=$OPTARG ;;
	*) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
	esac
done
command -v wrk >/dev/null || { echo "loadtest: wrk not found (apt-get install wrk)" >&2; exit 1; }
curl -fsS -o /dev/null --max-time 2 "$url/healthz" || { echo "loadtest: $url/healthz does not answer" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
BATCH=$batch ID_PREFIX=$prefix TIMEOUT_MS=$tmo \
	exec wrk -t"$threads" -c"$conns" -d"$dur" --latency -s "$here/loadtest.lua" "$url/v1/batch"
