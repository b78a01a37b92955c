#!/usr/bin/env bash
# make deploy-test: builds fanout's images and exercises them under Docker.
#
#   1. the base image (deploy/base-image.sh, kept when it exists) and the image: /healthz, a
#      batch, the health check, and `docker stop` draining a batch in flight, exit 0
#   2. the compose cluster (3 fanout, the upstream service with 3 replicas under one name,
#      haproxy): load through the load balancer, every fanout replica serves and sees the 3
#      upstream replicas as members, no request fails
#   3. a rolling restart of each fanout replica under load (target: no failed request)
#   4. kill -9 of one fanout replica under load: failed requests, time until haproxy drops it
#   5. the upstream replicas, which fanout follows by name, changed under load (the figures come
#      from each fanout replica's /metrics: its members, their fetches, ejection and health):
#        a. scaled 3 -> 5: seconds until every new member has served in every fanout replica
#           (target: no failed batch)
#        b. scaled 5 -> 2: seconds until every fanout replica has 2 members (target: none failed)
#        c. one replica paused (docker pause: its connections stay open, nothing answers):
#           failed batches and the time until every fanout replica stops sending to it
#        d. one replica killed (docker kill): the same
#        e. a rolling restart of every upstream replica (target: no failed batch)
#   6. the Kubernetes manifests: strict decoding (deploy/validate), `kubectl kustomize` when
#      kubectl is installed, the Deployment's container run under Docker as Kubernetes would
#      run it (user, read-only root, dropped capabilities, limits, probes, preStop + drain), and
#      the example upstream's pods behind their headless Service's name as fanout's members
# and prints a table of the figures. A scenario whose target is no failed batch fails the run
# when a batch fails (5a, 5b, 5e, and 3); 5c and 5d report their failed batches and fail the run
# only when a replica is never taken out. Everything it starts (containers, the compose project
# and its networks) is removed on exit, also on failure or interrupt. Published ports are on
# 127.0.0.1 only, picked free at start; every request the script sends goes to them.
#
# Needs: docker, docker-compose (or the compose plugin), curl, python3, ss, debootstrap (first
# run), Go (/usr/local/go or PATH); `make deploy-test` installs the Debian ones. The load comes
# from the project's load tool (deploy/loadtest.sh, built when missing).
# DEPLOY_TEST_LOAD_CONNS (8) and DEPLOY_TEST_BATCH (10) shape the load; DEPLOY_TEST_RATE (100)
# is the open-loop rate, batches/s, of step 5. DEPLOY_TEST_STEPS ("3 4 5 6") picks the steps
# after the first two (which build the images and start the cluster the others use).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

P=fodt$$                     # compose project and container name prefix
IMG=fanout:deploy-test       # the images this run builds (tags of their own)
LBIMG=fanout-lb:deploy-test
CONNS=${DEPLOY_TEST_LOAD_CONNS:-8}
BATCH=${DEPLOY_TEST_BATCH:-10}
RATE=${DEPLOY_TEST_RATE:-100}
STEPS=${DEPLOY_TEST_STEPS:-3 4 5 6}
tmp=$(mktemp -d /tmp/fanout-deploy-test.XXXXXX)
if command -v docker-compose >/dev/null; then
	compose=(docker-compose -p "$P" -f deploy/compose.yaml)
else
	compose=(docker compose -p "$P" -f deploy/compose.yaml)
fi
bgpids=()
compose_up=

cleanup() {
	local rc=$?
	for pid in "${bgpids[@]}"; do kill "$pid" 2>/dev/null || true; done
	docker rm -f "$P-single" "$P-k8s" $(docker ps -aq --filter "label=fanout-deploy-test=$P") >/dev/null 2>&1 || true
	docker network rm "$P-k8s" >/dev/null 2>&1 || true
	if [[ -n $compose_up ]]; then
		"${compose[@]}" down -v --remove-orphans -t 2 >/dev/null 2>&1 || true
	fi
	rm -rf "$tmp"
	if [[ $rc -ne 0 ]]; then echo "deploy-test: FAILED (exit $rc)" >&2; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in docker "${compose[0]}" curl go python3 ss; do
	command -v "$tool" >/dev/null || { echo "deploy-test: $tool not found (make deploy-test installs it)" >&2; exit 1; }
done

now_ms() { date +%s%3N; }
say() { printf '\n== %s\n' "$*"; }
die() { echo "deploy-test: $*" >&2; exit 1; }

# A TCP port no socket uses, below the kernel's ephemeral range (where a port that is free now
# could be taken by any outgoing connection before docker binds it).
free_port() {
	local p lo hi
	read -r lo hi </proc/sys/net/ipv4/ip_local_port_range
	[[ $lo -gt 12000 ]] || lo=61000 hi=65535
	for _ in $(seq 200); do
		if [[ $lo -eq 61000 ]]; then p=$((lo + RANDOM % (hi - lo))); else p=$((10000 + RANDOM % (lo - 10000))); fi
		[[ -z $(ss -Htan "sport = :$p") ]] && { echo "$p"; return; }
	done
	die "no free port"
}

# wait_for SECONDS CMD...: runs CMD every 0.2 s until it succeeds; fails after SECONDS.
wait_for() {
	local until=$(($(date +%s) + $1))
	shift
	until "$@" >/dev/null 2>&1; do
		[[ $(date +%s) -lt $until ]] || return 1
		sleep 0.2
	done
}

http_ok() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1") == 200 ]]; }
healthy() { [[ $(docker inspect -f '{{.State.Health.Status}}' "$1") == healthy ]]; }

# Figures for the closing table: name, value, verdict.
rows=()
row() { rows+=("$1|$2|$3"); }
# Step 5's table: scenario, failed batches, seconds, what the seconds measure; and the scenarios
# whose target is no failed batch, as "SCENARIO:FAILED".
urows=()
urow() { urows+=("$1|$2|$3|$4"); }
ushow() { printf '%-30s %-16s %-8s %s\n' "$1" "$2" "$3" "$4"; }
gated=()

# ---------------------------------------------------------------- load and haproxy stats

# load SECONDS OUT [flags]: the project's load tool (deploy/loadtest.sh) through the load
# balancer, closed loop, in the background, its JSON summary in OUT; its pid is left in $load_pid.
# SIGINT ends it early with the summary of what it sent.
load() {
	local secs=$1 out=$2
	shift 2
	deploy/loadtest.sh --json --no-progress --min-success 0 -d "${secs}s" -c "$CONNS" -b "$BATCH" \
		"$@" "http://127.0.0.1:$LBPORT" >"$out" 2>"$out.err" &
	load_pid=$!
	bgpids+=("$load_pid")
}

# load_result OUT: "SENT FAILED" of a load run (failed: anything but a 200 answer). Requests
# that an open loop had due but not yet sent when SIGINT ended it ("unsent") are neither.
load_result() {
	python3 -c 'import json, sys
r = json.load(open(sys.argv[1])); sent = r["attempts"] - r["errors"].get("unsent", 0)
print(sent, sent - r["ok"])' "$1" 2>/dev/null ||
		{ cat "$1" "$1.err" >&2; die "no load summary in $1"; }
}

# The answers other than 200 and the socket errors of a load run, on one line.
load_errors() {
	python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
st = ", ".join("%s: %d" % kv for kv in r["status"].items() if kv[0] != "200")
er = ", ".join("%s %d" % kv for kv in r["errors"].items() if kv[1] and kv[0] != "unsent")
print("status " + (st or "none") + "; errors " + (er or "none") + "; codes " + json.dumps(r["error_codes"]))' "$1"
}

# "REQUESTS/S P99_MS" of a load run.
load_rate() {
	python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print("%.0f requests/s, p99 %.1f ms" % (r["requests_per_s"], r["latency_ms"]["p99"]))' "$1"
}

# The haproxy stats table of backend "fanout" servers that have an address:
# "NAME ADDR STATUS SESSIONS" per line.
lb_servers() {
	curl -s --max-time 2 "http://127.0.0.1:$STATSPORT/stats;csv" | awk -F, '
		NR == 1 { for (i = 1; i <= NF; i++) { h = $i; sub(/^# /, "", h); col[h] = i }; next }
		$1 == "fanout" && $2 != "BACKEND" && $(col["addr"]) != "" {
			st = $(col["status"]); gsub(/ /, "_", st)
			print $2, $(col["addr"]), st, $(col["stot"]) }'
}
# "RETRIES REDISPATCHES" of backend "fanout" so far.
lb_retries() {
	curl -s --max-time 2 "http://127.0.0.1:$STATSPORT/stats;csv" | awk -F, '
		NR == 1 { for (i = 1; i <= NF; i++) { h = $i; sub(/^# /, "", h); col[h] = i }; next }
		$1 == "fanout" && $2 == "BACKEND" { print $(col["wretr"]) + 0, $(col["wredis"]) + 0 }'
}
lb_up_count() { lb_servers | awk '$3 == "UP"' | wc -l; }
lb_has_up() { [[ $(lb_up_count) -ge $1 ]]; }

# The address of container $1 on the project's network.
ip_of() { docker inspect -f "{{(index .NetworkSettings.Networks \"${P}_default\").IPAddress}}" "$1"; }

fanout_containers() { "${compose[@]}" ps -q fanout; }

# All three fanout replicas healthy and UP in haproxy.
cluster_ready() {
	local c
	for c in $(fanout_containers); do healthy "$c" || return 1; done
	lb_has_up 3
}

# ---------------------------------------------------------------- fanout's view of its upstream

# The running containers of compose service $1 (paused ones too).
svc_containers() {
	docker ps -q --filter "label=com.docker.compose.project=$P" --filter "label=com.docker.compose.service=$1"
}
# Every running upstream replica as fanout names a member: "ADDRESS:8080", one per line.
upstream_members() {
	local c
	for c in $(svc_containers upstream); do echo "$(ip_of "$c"):8080"; done | sort
}
# The /metrics URL of each fanout replica, on the loopback port compose publishes for it
# (deploy/compose.yaml); looked up again after the replicas restart.
murls=()
murls_refresh() {
	local c hp
	murls=()
	for c in $(fanout_containers); do
		hp=$(docker port "$c" 8080/tcp | grep -m1 '^127\.0\.0\.1:') || die "fanout replica $c publishes no loopback port"
		murls+=("http://$hp/metrics")
	done
}
# The upstream series of every fanout replica's /metrics, each line led by the replica's number.
scrape() {
	local i=0 u
	for u in "${murls[@]}"; do
		i=$((i + 1))
		curl -s --max-time 2 "$u" | sed -n "s/^fanout_upstream_/$i &/p" || true
	done
}
# q MODE ARG <scrape: asks the scrape about upstream $UPS ("upstream:8080") in every fanout replica;
# exit 0 when true of every replica that answered (and at least one did not fail to answer).
#   members N     the upstream has N members
#   serving "M.." each member M has served at least one fetch (result ok)
#   out M         M gets no new attempts: no longer a member, ejected, or unhealthy
#   in M          M is a member, not ejected, healthy
#   count-out M   prints how many replicas have M out (always exit 0)
q() {
	awk -v mode="$1" -v arg="$2" -v nrep="${#murls[@]}" -v ups="${UPS:-upstream:8080}" '
		function lab(s, k) { return match(s, k "=\"[^\"]*\"") ? substr(s, RSTART + length(k) + 2, RLENGTH - length(k) - 3) : "" }
		{ name = $2; sub(/\{.*/, "", name) }
		lab($2, "upstream") != ups { next }
		name == "fanout_upstream_members" { mem[$1] = $3 }
		name == "fanout_upstream_fetches_total" && lab($2, "result") == "ok" { ok[$1, lab($2, "member")] = $3; seen[$1, lab($2, "member")] = 1 }
		name == "fanout_upstream_ejected" { ej[$1, lab($2, "member")] = $3 }
		name == "fanout_upstream_healthy" { he[$1, lab($2, "member")] = $3 }
		END {
			n = split(arg, ms, /[ \n]+/); good = 0
			for (r = 1; r <= nrep; r++) {
				if (!(r in mem)) { if (mode == "count-out") continue; exit 1 }
				if (mode == "members") { if (mem[r] != arg) exit 1; continue }
				for (i = 1; i <= n; i++) {
					m = ms[i]; if (m == "") continue
					if (mode == "serving" && !(ok[r, m] > 0)) exit 1
					isout = !((r, m) in seen) || ej[r, m] == 1 || he[r, m] == 0
					if (mode == "out" && !isout) exit 1
					if (mode == "in" && isout) exit 1
					if (mode == "count-out" && isout) good++
				}
			}
			if (mode == "count-out") print good
			exit 0
		}'
}
# upstream_ok MODE ARG: q on a fresh scrape.
upstream_ok() { scrape | q "$@"; }

deploy/loadtest.sh --help >/dev/null # builds the load tool now if it is missing or stale

# The manifest validator downloads and compiles while the images build.
go -C deploy/validate build -o "$tmp/validate" . >"$tmp/go-build.log" 2>&1 &
gobuild=$!
bgpids+=("$gobuild")

# ---------------------------------------------------------------- 1. image

say "1. base image and fanout image"
t=$(now_ms)
deploy/base-image.sh -s trixie -t debian:trixie-slim
base_s=$((($(now_ms) - t) / 1000))
t=$(now_ms)
docker build -f deploy/Dockerfile -t "$IMG" . >"$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; die "image build failed"; }
build_s=$((($(now_ms) - t) / 1000))
suite=$(sed -n 's/^build stage: make test took \([0-9]*\) s/\1 s/p' "$tmp/build.log")
tests=$(grep -E '^tests: [0-9]+ passed, [0-9]+ failed' "$tmp/build.log" | tail -1 || true)
t=$(now_ms)
docker build -t "$LBIMG" deploy/lb >"$tmp/build-lb.log" 2>&1 || { tail -20 "$tmp/build-lb.log"; die "load balancer image build failed"; }
lbbuild_s=$((($(now_ms) - t) / 1000))
size=$(docker image inspect -f '{{.Size}}' "$IMG" | awk '{ printf "%.1f MB", $1 / 1e6 }')
lbsize=$(docker image inspect -f '{{.Size}}' "$LBIMG" | awk '{ printf "%.1f MB", $1 / 1e6 }')
version=$(docker run --rm "$IMG" --version)
echo "image $IMG: $size; $version"
echo "build: ${build_s} s (suite in the build stage: ${suite:-cached, not run}; ${tests:-no new run})"
row "base image (debootstrap trixie, or kept)" "${base_s} s" "$(docker image inspect -f '{{.Size}}' debian:trixie-slim | awk '{ printf "%.1f MB", $1 / 1e6 }')"
if [[ -n $suite ]]; then built="build-stage make test: $suite"; else built="all layers cached"; fi
row "image build, this run" "${build_s} s" "$built"
row "build-stage suite" "${tests:-cached}" ""
row "image size (runtime stage)" "$size" "$(awk -v s="${size% MB}" 'BEGIN { print (s < 100 ? "ok, < 100 MB" : "over 100 MB") }')"
row "load balancer image: build, size" "${lbbuild_s} s, $lbsize" ""

p1=$(free_port)
docker run -d --name "$P-single" -p "127.0.0.1:$p1:8080" "$IMG" --demo >/dev/null
wait_for 20 http_ok "http://127.0.0.1:$p1/healthz" || { docker logs "$P-single"; die "/healthz does not answer"; }
body=$(curl -s --max-time 5 "http://127.0.0.1:$p1/v1/batch" -H 'Content-Type: application/json' -d '{"ids":["apple","pear",7]}')
[[ $(grep -o '"status":200' <<<"$body" | wc -l) -eq 3 ]] || die "batch: unexpected answer: $body"
wait_for 30 healthy "$P-single" || die "the image's HEALTHCHECK never turned healthy"
[[ $(docker inspect -f '{{.Config.User}}' "$P-single") == 10001:10001 ]] || die "not running as 10001"
# A batch in flight when docker stop sends SIGTERM completes; the process exits 0.
curl -s --max-time 10 -o "$tmp/inflight" -w '%{http_code}' "http://127.0.0.1:$p1/v1/batch" \
	-H 'Content-Type: application/json' -d '{"ids":["sleep1500-a","b"]}' >"$tmp/inflight.code" &
inflight=$!
bgpids+=("$inflight")
sleep 0.5
t=$(now_ms)
docker stop -t 15 "$P-single" >/dev/null
stop_ms=$(($(now_ms) - t))
wait "$inflight" || true
code=$(docker inspect -f '{{.State.ExitCode}}' "$P-single")
[[ $code -eq 0 ]] || { docker logs "$P-single"; die "exit status $code after docker stop"; }
[[ $(cat "$tmp/inflight.code") == 200 ]] || die "the batch in flight got $(cat "$tmp/inflight.code"), not 200"
logs=$(docker logs "$P-single" 2>&1)
grep -q '"msg":"drained"' <<<"$logs" || { echo "$logs"; die "no drain in the log"; }
docker rm "$P-single" >/dev/null
echo "docker stop: batch in flight answered 200, exit 0, ${stop_ms} ms"
row "docker stop with a batch in flight" "${stop_ms} ms" "200, exit 0"

# ---------------------------------------------------------------- 2. compose

say "2. compose cluster under load"
LBPORT=$(free_port)
STATSPORT=$(free_port)
export FANOUT_IMAGE=$IMG FANOUT_LB_IMAGE=$LBIMG
export FANOUT_LB_PUBLISH=127.0.0.1:$LBPORT FANOUT_LB_STATS_PUBLISH=127.0.0.1:$STATSPORT
compose_up=1
t=$(now_ms)
"${compose[@]}" up -d --no-build >"$tmp/up.log" 2>&1 || { cat "$tmp/up.log"; die "compose up failed"; }
wait_for 60 cluster_ready || { lb_servers; "${compose[@]}" ps; die "cluster not ready"; }
up_ms=$(($(now_ms) - t))
echo "compose up to 3 healthy replicas in haproxy: ${up_ms} ms"
row "compose up until 3 replicas UP in the LB" "${up_ms} ms" ""
body=$(curl -s --max-time 5 "http://127.0.0.1:$LBPORT/v1/batch" -H 'Content-Type: application/json' -d '{"ids":["apple",7]}')
[[ $(grep -o '"status":200' <<<"$body" | wc -l) -eq 2 ]] || die "batch through the LB: $body"
lb_servers >"$tmp/before"
load 8 "$tmp/load2"
wait "$load_pid"
lb_servers >"$tmp/after"
read -r total failed <<<"$(load_result "$tmp/load2")"
echo "load: $(load_rate "$tmp/load2")"
served=$(join <(sort "$tmp/before") <(sort "$tmp/after") | awk '$3 == "UP" && $7 > $4 { n++ } END { print n + 0 }')
echo "requests $total, failed $failed, replicas that served: $served of 3"
[[ $failed -eq 0 ]] || { cat "$tmp/load2"; die "requests failed through the LB"; }
[[ $served -ge 3 ]] || { cat "$tmp/before" "$tmp/after"; die "not every replica served"; }
row "steady load: requests / failed" "$total / $failed" "ok, 3 of 3 replicas served"
murls_refresh
scrape >"$tmp/scrape2"
q members 3 <"$tmp/scrape2" || { cat "$tmp/scrape2"; die "not every fanout replica has the 3 upstream replicas as members"; }
q serving "$(upstream_members)" <"$tmp/scrape2" || { cat "$tmp/scrape2"; die "not every upstream replica served every fanout replica"; }
echo "every fanout replica has the 3 upstream replicas (one name, \"upstream\") as members, and each served it"
row "upstream replicas as members, each serving" "3 of 3" "in every fanout replica"

# ---------------------------------------------------------------- 3. rolling restart
step3() {

say "3. rolling restart of each fanout replica under load"
read -r r0 d0 <<<"$(lb_retries)"
load 40 "$tmp/load3"
sleep 2
t=$(now_ms)
for c in $(fanout_containers); do
	docker restart -t 15 "$c" >/dev/null
	wait_for 30 cluster_ready || { lb_servers; die "replica $c did not come back"; }
	echo "restarted $(docker inspect -f '{{.Name}}' "$c" | tr -d /), back in the LB at +$((($(now_ms) - t) / 1000)) s"
done
roll_s=$((($(now_ms) - t) / 1000))
kill -INT "$load_pid" 2>/dev/null || true # stop the load once the last replica is back
wait "$load_pid" || true
read -r total failed <<<"$(load_result "$tmp/load3")"
read -r r1 d1 <<<"$(lb_retries)"
echo "requests $total, failed $failed (restarts took ${roll_s} s); haproxy retried $((r1 - r0)) times, $((d1 - d0)) on another replica"
[[ $failed -eq 0 ]] || echo "failures: $(load_errors "$tmp/load3")"
roll_failed=$failed
row "rolling restart: LB retries / redispatches" "$((r1 - r0)) / $((d1 - d0))" ""
row "rolling restart (3 replicas, ${roll_s} s): requests / failed" "$total / $failed" \
	"$([[ $failed -eq 0 ]] && echo "ok, zero failed" || echo "FAILED REQUESTS")"

}

# ---------------------------------------------------------------- 4. kill -9
step4() {

say "4. kill -9 of one fanout replica under load"
victim=$(fanout_containers | sed -n 1p)
vip=$(ip_of "$victim")
docker update --restart=no "$victim" >/dev/null # measure the removal, not docker's restart
read -r r0 d0 <<<"$(lb_retries)"
load 12 "$tmp/load4"
sleep 3
t=$(now_ms)
docker kill -s KILL "$victim" >/dev/null
gone() { ! lb_servers | awk -v a="$vip:8080" '$2 == a && $3 == "UP" { f = 1 } END { exit !f }'; }
wait_for 20 gone || die "haproxy still sends to the killed replica after 20 s"
eject_ms=$(($(now_ms) - t))
wait "$load_pid" || true
read -r total failed <<<"$(load_result "$tmp/load4")"
read -r r1 d1 <<<"$(lb_retries)"
echo "requests $total, failed $failed; haproxy stopped sending to it after ${eject_ms} ms; retried $((r1 - r0)) times"
[[ $failed -eq 0 ]] || echo "failures: $(load_errors "$tmp/load4")"
docker start "$victim" >/dev/null
docker update --restart=unless-stopped "$victim" >/dev/null
wait_for 30 cluster_ready || die "the killed replica did not come back"
row "kill -9 one replica: requests / failed" "$total / $failed" "LB retries $((r1 - r0))"
row "kill -9: until the LB stops sending to it" "${eject_ms} ms" "(<= 0.2 s polling)"

}

# ---------------------------------------------------------------- 5. upstream replicas
step5() {

say "5. the upstream's replicas, followed by name, changed under load ($RATE batches/s of $BATCH ids)"
murls_refresh
net=${P}_default
# "RETRIES HEDGES" sent so far, summed over the fanout replicas.
fanout_counters() {
	local u
	for u in "${murls[@]}"; do curl -s --max-time 2 "$u" || true; done |
		awk '/^fanout_retries_sent_total / { r += $2 } /^fanout_hedges_sent_total / { h += $2 } END { print r + 0, h + 0 }'
}
# scale N: the upstream service to N replicas, nothing else touched.
scale() {
	"${compose[@]}" up -d --no-build --no-deps --scale "upstream=$1" upstream >>"$tmp/scale.log" 2>&1 ||
		{ cat "$tmp/scale.log"; die "scaling the upstream to $1 failed"; }
}
# settled N: N upstream replicas running, each one a healthy member in every fanout replica.
settled() {
	local ms
	ms=$(upstream_members)
	[[ $(wc -l <<<"$ms") -eq $1 ]] || return 1
	scrape >"$tmp/settle"
	q members "$1" <"$tmp/settle" && q in "$ms" <"$tmp/settle"
}
# scenario_start NAME: the load for one scenario, from 2 s before its event.
scenario_start() {
	scen=$1
	read -r sre0 she0 <<<"$(fanout_counters)"
	load 300 "$tmp/load-$scen" -r "$RATE"
	sleep 2
}
# scenario_end: 3 s more of load, then its figures: "$sfailed" failed batches of "$stotal".
scenario_end() {
	sleep 3
	kill -INT "$load_pid" 2>/dev/null || true
	wait "$load_pid" || true
	read -r stotal sfailed <<<"$(load_result "$tmp/load-$scen")"
	read -r sre1 she1 <<<"$(fanout_counters)"
	echo "  batches $stotal, failed $sfailed; fanout sent $((sre1 - sre0)) retries, $((she1 - she0)) hedges"
	[[ $sfailed -eq 0 ]] || echo "  failures: $(load_errors "$tmp/load-$scen")"
}
# watch_out M SECS: polls until every fanout replica has stopped sending to member M; sets
# first_ms (the first replica) and all_ms (every one) after $t, or all_ms=-1 after SECS.
watch_out() {
	local until=$(($(now_ms) + $2 * 1000)) n
	first_ms=-1 all_ms=-1
	while [[ $(now_ms) -lt $until ]]; do
		n=$(upstream_ok count-out "$1")
		if [[ $n -gt 0 && $first_ms -lt 0 ]]; then first_ms=$(($(now_ms) - t)); fi
		if [[ $n -ge ${#murls[@]} ]]; then all_ms=$(($(now_ms) - t)); return 0; fi
		sleep 0.2
	done
	return 1
}
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }

wait_for 60 settled 3 || { cat "$tmp/settle"; die "the 3 upstream replicas are not all healthy members"; }

# a. 3 -> 5
echo "-- a. scale the upstream 3 -> 5"
scenario_start up
before=$(svc_containers upstream | sort)
t=$(now_ms)
scale 5
scaled_ms=$(($(now_ms) - t))
newc=$(comm -13 <(echo "$before") <(svc_containers upstream | sort))
new=$(for c in $newc; do echo "$(ip_of "$c"):8080"; done)
[[ $(wc -w <<<"$new") -eq 2 ]] || die "scaling to 5 made $(wc -w <<<"$new") new replicas: $new"
# From the moment the last new container started (compose itself takes a while on a busy
# machine): its process is then up, and fanout has to find it.
started=$(for c in $newc; do date -d "$(docker inspect -f '{{.State.StartedAt}}' "$c")" +%s%3N; done | sort -n | tail -1)
members_ms=-1
until_ms=$(($(now_ms) + 60000))
while :; do
	scrape >"$tmp/s"
	if [[ $members_ms -lt 0 ]] && q members 5 <"$tmp/s"; then members_ms=$(($(now_ms) - started)); fi
	if q serving "$new" <"$tmp/s"; then serve_ms=$(($(now_ms) - started)); break; fi
	[[ $(now_ms) -lt $until_ms ]] || { cat "$tmp/s"; die "the new upstream replicas ($new) did not all serve every fanout replica within 60 s"; }
	sleep 0.2
done
if [[ $members_ms -lt 0 ]]; then members_ms=$serve_ms; fi
echo "  compose started 2 replicas in $(secs $scaled_ms) s; after the last one started: members of every fanout replica at $(secs $members_ms) s, each one had served every fanout replica at $(secs $serve_ms) s"
scenario_end
urow "upstream 3 -> 5" "$sfailed of $stotal" "$(secs $serve_ms)" "from the last new container's start until each new member served in every fanout replica (members at $(secs $members_ms) s)"
gated+=("upstream 3 -> 5:$sfailed")

# b. 5 -> 2
echo "-- b. scale the upstream 5 -> 2"
scenario_start down
before=$(upstream_members)
t=$(now_ms)
scale 2
scaled_ms=$(($(now_ms) - t))
wait_for 60 upstream_ok members 2 || die "the fanout replicas still have more than 2 members after 60 s"
gone_ms=$(($(now_ms) - t))
echo "  compose stopped and removed 3 replicas in $(secs $scaled_ms) s; every fanout replica had 2 members at $(secs $gone_ms) s"
scenario_end
urow "upstream 5 -> 2" "$sfailed of $stotal" "$(secs $gone_ms)" "from the scale command until every fanout replica had 2 members (compose took $(secs $scaled_ms) s)"
gated+=("upstream 5 -> 2:$sfailed")

scale 3
wait_for 60 settled 3 || { cat "$tmp/settle"; die "back to 3 upstream replicas: not all healthy members"; }

# c. one paused
victim=$(svc_containers upstream | head -1)
vm="$(ip_of "$victim"):8080"
echo "-- c. pause one upstream replica ($vm)"
scenario_start pause
t=$(now_ms)
docker pause "$victim" >/dev/null
watch_out "$vm" 30 || { scrape; docker unpause "$victim"; die "a paused upstream replica still gets attempts after 30 s"; }
echo "  out in the first fanout replica at $(secs $first_ms) s, in every one at $(secs $all_ms) s"
scenario_end
p_first=$first_ms p_all=$all_ms
t=$(now_ms)
docker unpause "$victim" >/dev/null
wait_for 30 upstream_ok in "$vm" || die "the unpaused replica did not come back within 30 s"
back_ms=$(($(now_ms) - t))
echo "  unpaused: healthy again in every fanout replica at $(secs $back_ms) s"
urow "one upstream paused" "$sfailed of $stotal" "$(secs $p_all)" "until out in every fanout replica (first $(secs $p_first) s; back $(secs $back_ms) s after unpause)"

# d. one killed
wait_for 30 settled 3 || die "before the kill: not 3 healthy members"
victim=$(svc_containers upstream | tail -1)
vm="$(ip_of "$victim"):8080"
echo "-- d. kill one upstream replica ($vm)"
docker update --restart=no "$victim" >/dev/null # measure the removal, not docker's restart
scenario_start kill
t=$(now_ms)
docker kill -s KILL "$victim" >/dev/null
watch_out "$vm" 30 || { scrape; die "a killed upstream replica still gets attempts after 30 s"; }
echo "  out in the first fanout replica at $(secs $first_ms) s, in every one at $(secs $all_ms) s"
scenario_end
urow "one upstream killed" "$sfailed of $stotal" "$(secs $all_ms)" "until out in every fanout replica (first $(secs $first_ms) s)"
docker update --restart=unless-stopped "$victim" >/dev/null
docker start "$victim" >/dev/null
wait_for 60 settled 3 || { cat "$tmp/settle"; die "the killed replica did not come back as a healthy member"; }

# e. rolling restart of every upstream replica
echo "-- e. rolling restart of every upstream replica"
scenario_start roll
t=$(now_ms)
for c in $(svc_containers upstream); do
	docker restart -t 5 "$c" >/dev/null
	wait_for 60 settled 3 || { cat "$tmp/settle"; die "upstream replica $c did not come back as a healthy member"; }
	echo "  restarted $(docker inspect -f '{{.Name}}' "$c" | tr -d /), a healthy member of every fanout replica at $(secs $(($(now_ms) - t))) s"
done
roll_ms=$(($(now_ms) - t))
scenario_end
urow "upstream rolling restart (3)" "$sfailed of $stotal" "$(secs $roll_ms)" "until the last one was back in every fanout replica"
gated+=("upstream rolling restart:$sfailed")

}

# ---------------------------------------------------------------- 6. manifests
step6() {

say "6. Kubernetes manifests"
t=$(now_ms)
wait "$gobuild" || { cat "$tmp/go-build.log"; die "building deploy/validate failed"; }
V=$tmp/validate
"$V" -k deploy/k8s
rendered=skipped
if command -v kubectl >/dev/null && kubectl kustomize deploy/k8s >"$tmp/rendered.yaml" 2>"$tmp/kustomize.err"; then
	"$V" "$tmp/rendered.yaml"
	rendered="kubectl kustomize: $(grep -c '^kind:' "$tmp/rendered.yaml") objects, strict"
else
	echo "kubectl kustomize unavailable ($(cat "$tmp/kustomize.err" 2>/dev/null || echo "no kubectl")): the kustomization was read by the validator itself"
fi
mapfile -t kargs < <("$V" -k deploy/k8s -emit docker)
declare -gA probe
while read -r k v; do probe[$k]=$v; done < <("$V" -k deploy/k8s -emit probes)
# The upstream FANOUT_UPSTREAM names, a headless Service over a Deployment's pods, as Docker can
# have it: the Deployment's replicas as containers run like its pods, on a network of their own,
# each with the Service's name as an alias (Docker's DNS then answers the name with every one of
# them, as the cluster's DNS answers a headless Service's name with every ready pod).
read -r ksvc kdep kreps kport < <("$V" -k deploy/k8s -emit upstreams) || die "no headless upstream Service in deploy/k8s"
mapfile -t uargs < <("$V" -k deploy/k8s -emit docker -deployment "$kdep")
mapfile -t ucmd < <("$V" -k deploy/k8s -emit args -deployment "$kdep")
docker network create --label "fanout-deploy-test=$P" "$P-k8s" >/dev/null
for i in $(seq "$kreps"); do
	docker run -d --name "$P-k8s-$kdep-$i" --label "fanout-deploy-test=$P" --network "$P-k8s" \
		--network-alias "$ksvc" "${uargs[@]}" "$IMG" "${ucmd[@]}" >/dev/null
done
# fanout as the kubelet would run it, with the ConfigMap's settings as they are.
p4=$(free_port)
docker run -d --name "$P-k8s" --network "$P-k8s" -p "127.0.0.1:$p4:8080" "${kargs[@]}" "$IMG" >/dev/null
probe_ok() { docker exec "$P-k8s" /usr/local/bin/fanout "--healthcheck=$1"; }
wait_for 20 probe_ok "${probe[readiness]}" || { docker logs "$P-k8s"; die "readiness ${probe[readiness]} failed"; }
probe_ok "${probe[liveness]}" || die "liveness ${probe[liveness]} failed"
[[ $(docker exec "$P-k8s" id -u) == 10001 ]] || die "not uid 10001"
! docker exec "$P-k8s" sh -c 'echo x >/probe' 2>/dev/null || die "root filesystem is writable"
[[ $(docker exec "$P-k8s" sh -c 'grep CapEff /proc/self/status' | awk '{ print $2 }') == 0000000000000000 ]] || die "capabilities left"
ids=$(seq -f '"k8s-%g"' 1 60 | paste -sd,)
body=$(curl -s --max-time 5 "http://127.0.0.1:$p4/v1/batch" -H 'Content-Type: application/json' -d "{\"ids\":[$ids]}")
[[ $(grep -o '"status":200' <<<"$body" | wc -l) -eq 60 ]] || die "batch on the k8s-configured container: $body"
# Every pod behind the Service's name is a healthy member, and each one served.
murls=("http://127.0.0.1:$p4/metrics")
kmembers=$(for i in $(seq "$kreps"); do echo "$(docker inspect -f "{{(index .NetworkSettings.Networks \"$P-k8s\").IPAddress}}" "$P-k8s-$kdep-$i"):$kport"; done)
scrape >"$tmp/k8s-scrape"
UPS="$ksvc:$kport" q members "$kreps" <"$tmp/k8s-scrape" && UPS="$ksvc:$kport" q in "$kmembers" <"$tmp/k8s-scrape" &&
	UPS="$ksvc:$kport" q serving "$kmembers" <"$tmp/k8s-scrape" ||
	{ cat "$tmp/k8s-scrape"; die "the $kreps pods behind headless Service $ksvc are not all healthy, serving members"; }
echo "headless Service $ksvc: fanout has the $kreps pods of Deployment $kdep as members, each healthy and serving"
# Termination: preStop, then SIGTERM, within the grace period.
t2=$(now_ms)
docker exec "$P-k8s" sleep "${probe[prestop]}"
docker stop -t "${probe[grace]}" "$P-k8s" >/dev/null
term_ms=$(($(now_ms) - t2))
code=$(docker inspect -f '{{.State.ExitCode}}' "$P-k8s")
[[ $code -eq 0 && $term_ms -lt $((probe[grace] * 1000)) ]] || die "termination: exit $code after $term_ms ms (grace ${probe[grace]} s)"
manifests_ms=$(($(now_ms) - t))
echo "manifests: strict decode ok; $rendered; container as the Deployment runs it: probes ok, uid 10001, read-only root, no capabilities, preStop + SIGTERM exit 0 in ${term_ms} ms"
row "manifests: strict decode + checks" "ok" "$rendered"
row "Deployment's container under Docker" "probes ok" "uid 10001, ro root, CapEff 0, exit 0 in ${term_ms} ms < ${probe[grace]} s"
row "headless Service $ksvc: pods as members" "$kreps of $kreps" "each healthy and serving"
row "step 6 time" "${manifests_ms} ms" ""

}

roll_failed=0
for n in 3 4 5 6; do
	if [[ " $STEPS " == *" $n "* ]]; then "step$n"; else echo; echo "== $n. skipped (DEPLOY_TEST_STEPS=$STEPS)"; fi
done

# ---------------------------------------------------------------- table

say "deploy-test figures"
printf '%-58s %-30s %s\n' "what" "figure" "verdict"
for r in "${rows[@]}"; do
	IFS='|' read -r a b c <<<"$r"
	printf '%-58s %-30s %s\n' "$a" "$b" "$c"
done

say "upstream scenarios (step 5)"
ushow "scenario" "failed batches" "seconds" ""
for r in "${urows[@]}"; do
	IFS='|' read -r a b c d <<<"$r"
	ushow "$a" "$b" "$c" "$d"
done
bad=
[[ $roll_failed -eq 0 ]] || { echo "deploy-test: fanout rolling restart: $roll_failed failed requests" >&2; bad=1; }
for g in "${gated[@]}"; do
	[[ ${g##*:} -eq 0 ]] || { echo "deploy-test: ${g%:*}: ${g##*:} failed batches (target 0)" >&2; bad=1; }
done
[[ -z $bad ]] || die "failed batches where the target is none"
echo "deploy-test: passed"
