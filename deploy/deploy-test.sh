#!/usr/bin/env bash
# make deploy-test: builds fanout's images and exercises them under Docker.
#
#   1. the base image (deploy/base-image.sh, kept when it exists) and the image: /healthz, a
#      batch, the health check, and `docker stop` draining a batch in flight, exit 0
#   2. the compose cluster (3 fanout, 3 demo upstreams, haproxy): load through the load balancer,
#      every fanout replica serves, no request fails
#   3. a rolling restart of each fanout replica under load (target: no failed request)
#   4. kill -9 of one fanout replica under load: failed requests, time until haproxy drops it
#   5. one upstream replica cut off the network under load: failed requests and the time until
#      batches stop failing (zero failures needs fanout's several-upstreams support; with a
#      single --upstream the step reports what it saw and does not fail the run)
#   6. the Kubernetes manifests: strict decoding (deploy/validate), `kubectl kustomize` when
#      kubectl is installed, and the Deployment's container run under Docker as Kubernetes would
#      run it (user, read-only root, dropped capabilities, limits, probes, preStop + drain)
# and prints a table of the figures. Everything it starts (containers, the compose project and
# its network) is removed on exit, also on failure or interrupt. Published ports are on
# 127.0.0.1 only, picked free at start.
#
# Needs: docker, docker-compose, curl, python3, debootstrap (first run), Go (/usr/local/go or
# PATH); the load comes from the project's load tool (deploy/loadtest.sh, built when missing).
# DEPLOY_TEST_LOAD_CONNS (8) and DEPLOY_TEST_BATCH (10) shape the load.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

P=fodt$$                     # compose project and container name prefix
IMG=fanout:deploy-test       # the images this run builds (tags of their own)
LBIMG=fanout-lb:deploy-test
CONNS=${DEPLOY_TEST_LOAD_CONNS:-8}
BATCH=${DEPLOY_TEST_BATCH:-10}
tmp=$(mktemp -d /tmp/fanout-deploy-test.XXXXXX)
compose=(docker-compose -p "$P" -f deploy/compose.yaml)
bgpids=()
compose_up=

cleanup() {
	local rc=$?
	for pid in "${bgpids[@]}"; do kill "$pid" 2>/dev/null || true; done
	docker rm -f "$P-single" "$P-k8s" >/dev/null 2>&1 || true
	if [[ -n $compose_up ]]; then
		"${compose[@]}" down -v --remove-orphans -t 2 >/dev/null 2>&1 || true
	fi
	rm -rf "$tmp"
	if [[ $rc -ne 0 ]]; then echo "deploy-test: FAILED (exit $rc)" >&2; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in docker docker-compose curl go python3; do
	command -v "$tool" >/dev/null || { echo "deploy-test: $tool not found" >&2; exit 1; }
done

now_ms() { date +%s%3N; }
say() { printf '\n== %s\n' "$*"; }
die() { echo "deploy-test: $*" >&2; exit 1; }

# A TCP port nothing listens on, from a random start.
free_port() {
	local p
	for _ in $(seq 200); do
		p=$((20000 + RANDOM % 40000))
		[[ -z $(ss -Htln "sport = :$p") ]] && { echo "$p"; return; }
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

# load_result OUT: "ATTEMPTS FAILED" of a load run (failed: anything but a 200 answer).
load_result() {
	python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["attempts"], r["attempts"] - r["ok"])' "$1" 2>/dev/null ||
		{ cat "$1" "$1.err" >&2; die "no load summary in $1"; }
}

# The answers other than 200 and the socket errors of a load run, on one line.
load_errors() {
	python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
st = ", ".join("%s: %d" % kv for kv in r["status"].items() if kv[0] != "200")
er = ", ".join("%s %d" % kv for kv in r["errors"].items() if kv[1])
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
# Several upstreams in one FANOUT_UPSTREAM need a fanout that takes a list; with one that does
# not, the cluster runs on the single name "upstream" (compose.single-upstream.yaml).
multi=yes
if ! docker run --rm -e 'FANOUT_UPSTREAM=http://a:1/items/{id},http://b:1/items/{id}' "$IMG" --check-config >/dev/null 2>&1; then
	multi=
	compose+=(-f deploy/compose.single-upstream.yaml)
fi
if [[ -n $multi ]]; then
	echo "upstreams: the three, as a list"
else
	echo "upstreams: one name for the three (this fanout takes a single --upstream)"
fi
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

# ---------------------------------------------------------------- 3. rolling restart

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

# ---------------------------------------------------------------- 4. kill -9

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

# ---------------------------------------------------------------- 5. upstream cut off

say "5. one upstream replica cut off the network under load"
# The busiest upstream replica: the most established connections on its port 8080 (1F90).
busiest() {
	local s c n best=-1
	for s in upstream-1 upstream-2 upstream-3; do
		c=$("${compose[@]}" ps -q "$s")
		n=$(docker exec "$c" cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$2 ~ /:1F90$/ && $4 == "01"' | wc -l)
		if [[ $n -gt $best ]]; then best=$n cut=$c cutname=$s; fi
	done
	cutconns=$best
}
net=${P}_default
# "RETRIES HEDGES" sent so far, summed over the fanout replicas (their /metrics, on the project's
# network).
fanout_counters() {
	local c
	for c in $(fanout_containers); do
		curl -s --max-time 2 "http://$(ip_of "$c"):8080/metrics" || true
	done | awk '/^fanout_retries_sent_total / { r += $2 } /^fanout_hedges_sent_total / { h += $2 } END { print r + 0, h + 0 }'
}
read -r re0 he0 <<<"$(fanout_counters)"
load 14 "$tmp/load5" -T 2000
sleep 3
busiest
echo "cutting $cutname off (${cutconns} fanout connections to it)"
t=$(now_ms)
cut_wall=$(date -u +%s.%N)
docker network disconnect "$net" "$cut"
# Probe batches of 20 ids (1.5 s deadline) for 8 s: when did the last one fail?
last_fail=-1 probes=0 probe_fail=0
while [[ $(($(now_ms) - t)) -lt 8000 ]]; do
	ids=$(seq -f '"p%g-'"$RANDOM"'"' 1 20 | paste -sd,)
	code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:$LBPORT/v1/batch" \
		-H 'Content-Type: application/json' -d "{\"ids\":[$ids],\"timeout_ms\":1500}" || true)
	probes=$((probes + 1))
	printf '+%dms:%s ' "$(($(now_ms) - t))" "$code" >>"$tmp/probes"
	if [[ $code != 200 ]]; then probe_fail=$((probe_fail + 1)) last_fail=$(($(now_ms) - t)); fi
	sleep 0.2
done
wait "$load_pid" || true
read -r total failed <<<"$(load_result "$tmp/load5")"
cut_failed=$failed
read -r re1 he1 <<<"$(fanout_counters)"
# The first "upstream ejected" line naming it, in any replica's log, after the cut.
eject_up=$(for c in $(fanout_containers); do docker logs "$c" 2>&1; done | python3 -c '
import datetime, json, sys
t0, name, first, n = float(sys.argv[1]), sys.argv[2], None, 0
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("msg") != "upstream ejected" or not str(r.get("upstream", "")).startswith(name):
        continue
    t = datetime.datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()
    if t >= t0:
        n += 1
        first = t if first is None or t < first else first
print("%d ms (%d ejections)" % ((first - t0) * 1000, n) if first is not None else "not ejected")' "$cut_wall" "$cutname")
docker network connect --alias upstream --alias "$cutname" "$net" "$cut"
wait_for 30 healthy "$cut" || true
if [[ $last_fail -lt 0 ]]; then recover="no probe failed"; else recover="last failure at +${last_fail} ms"; fi
echo "load: requests $total, failed $failed; probes: $probe_fail of $probes failed, $recover"
echo "fanout: $((re1 - re0)) retries, $((he1 - he0)) hedges sent; $cutname ejected after: $eject_up"
echo "probes (time after the cut: status): $(cat "$tmp/probes")"
[[ $failed -eq 0 ]] || echo "failures: $(load_errors "$tmp/load5")"
if [[ -n $multi ]]; then
	verdict=$([[ $failed -eq 0 ]] && echo "ok, zero failed" || echo "FAILED BATCHES")
else
	verdict="single --upstream: not gated (needs several upstreams)"
fi
row "upstream cut ($cutname, $cutconns conns): requests / failed" "$total / $failed" "$verdict"
row "upstream cut: probes failed, recovery" "$probe_fail of $probes, $recover" ""
row "upstream cut: fanout retries / hedges sent" "$((re1 - re0)) / $((he1 - he0))" ""
row "upstream cut: time to ejection (first replica)" "$eject_up" ""

# ---------------------------------------------------------------- 6. manifests

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
mapfile -t kargs < <("$V" -k deploy/k8s -emit docker | grep -v '^--env=FANOUT_UPSTREAM=')
declare -A probe
while read -r k v; do probe[$k]=$v; done < <("$V" -k deploy/k8s -emit probes)
# As the kubelet would run it, on the compose network so that a batch reaches the upstreams.
p4=$(free_port)
docker run -d --name "$P-k8s" --network "$net" -p "127.0.0.1:$p4:8080" "${kargs[@]}" \
	--env 'FANOUT_UPSTREAM=http://upstream:8080/items/{id}' "$IMG" >/dev/null
probe_ok() { docker exec "$P-k8s" /usr/local/bin/fanout "--healthcheck=$1"; }
wait_for 20 probe_ok "${probe[readiness]}" || { docker logs "$P-k8s"; die "readiness ${probe[readiness]} failed"; }
probe_ok "${probe[liveness]}" || die "liveness ${probe[liveness]} failed"
[[ $(docker exec "$P-k8s" id -u) == 10001 ]] || die "not uid 10001"
! docker exec "$P-k8s" sh -c 'echo x >/probe' 2>/dev/null || die "root filesystem is writable"
[[ $(docker exec "$P-k8s" sh -c 'grep CapEff /proc/self/status' | awk '{ print $2 }') == 0000000000000000 ]] || die "capabilities left"
body=$(curl -s --max-time 5 "http://127.0.0.1:$p4/v1/batch" -H 'Content-Type: application/json' -d '{"ids":["k8s",1]}')
[[ $(grep -o '"status":200' <<<"$body" | wc -l) -eq 2 ]] || die "batch on the k8s-configured container: $body"
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
row "step 6 time" "${manifests_ms} ms" ""

# ---------------------------------------------------------------- table

say "deploy-test figures"
printf '%-58s %-30s %s\n' "what" "figure" "verdict"
for r in "${rows[@]}"; do
	IFS='|' read -r a b c <<<"$r"
	printf '%-58s %-30s %s\n' "$a" "$b" "$c"
done
[[ $roll_failed -eq 0 ]] || die "rolling restart: $roll_failed failed requests"
if [[ -n $multi && $cut_failed -ne 0 ]]; then die "upstream cut: $cut_failed failed batches"; fi
echo "deploy-test: passed"
