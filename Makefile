# fanout: one plain Makefile. Objects go under $(BUILD), one tree per sanitizer.
#   make            library, binary and test programs      make test   every suite
#   make layers     every #include points down (tests/layers.sh; part of make test)
#   make asan/tsan  the same suites under sanitizers       make run    fanout --demo
#   make stress     every suite 20 times beside a CPU hog
#   make fuzz       each libFuzzer target for FUZZ_SECONDS (clang)
#   make soak       SOAK_SECONDS of mixed load under ASan, then TSan, with resource samples
#   make bench      micro-benchmarks                       make install / clean
#   make deploy-test  container images, compose cluster and manifests, under Docker
#   make slowhttp   slowhttptest attacks (slowloris, slow body, slow read, many connections)
# A command-line CFLAGS= adds to ours instead of replacing them.

BUILD    ?= build
PREFIX   ?= /usr/local
CC       ?= cc
OPT      ?= -O2 -g
SAN      ?=
PKGS      = libcurl libmicrohttpd libcjson cunit
# Debian package providing each pkg-config module, in the same order as PKGS.
DEB_PKGS  = libcurl4-openssl-dev libmicrohttpd-dev libcjson-dev libcunit1-dev

WARN      = -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
            -Wformat=2 -Wvla -Wcast-qual -Wno-format-nonliteral
# Each function in its own section, so that the binary's link (--gc-sections) leaves out what it
# never calls: the library keeps the whole C API (DESIGN.md; the tests and other programs link
# it), the fanout binary only what the service runs.
ALL_CFLAGS   = -std=c11 $(WARN) $(OPT) $(SAN) -pthread -ffunction-sections -fdata-sections $(CFLAGS)
ALL_CPPFLAGS = -I. -D_GNU_SOURCE -MMD -MP $(PKG_CFLAGS) $(CPPFLAGS)
ALL_LDFLAGS  = $(SAN) -pthread $(LDFLAGS)

# The service binary's allocator: mimalloc when its library is installed (Debian: libmimalloc-dev,
# which 'deps' installs), linked first so that it serves every malloc of the process, libcurl's
# included (BENCHMARKS.md: 6% less CPU per fetch on S1). Not with a sanitizer, which brings its
# own. The library, the tests and the load tool keep libc's.
BIN_ALLOC = $(if $(SAN),,$(shell f=$$($(CC) -print-file-name=libmimalloc.so); \
              [ -f "$$f" ] && echo -lmimalloc))
# pkg-config is asked only when something is compiled, after 'deps' has run.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs libcurl libmicrohttpd libcjson 2>/dev/null) -lm
CUNIT_LIBS = $(shell pkg-config --libs cunit 2>/dev/null)

LIB_SRCS  = $(wildcard ctx/*.c pool/*.c fetch/*.c server/*/*.c) $(filter-out server/main.c,$(wildcard server/*.c))
LIB_OBJS  = $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
TEST_SRCS = $(wildcard tests/test_*.c)
TEST_BINS = $(TEST_SRCS:tests/%.c=$(BUILD)/tests/%)
# Every tests/*.c that is not a test_* or bench_* program is shared support, linked into each.
TEST_COMMON = $(patsubst %.c,$(BUILD)/obj/%.o,$(filter-out tests/test_% tests/bench_%,$(wildcard tests/*.c)))
BENCH_SRCS = $(wildcard tests/bench_*.c)
BENCH_BINS = $(BENCH_SRCS:tests/%.c=$(BUILD)/tests/%)
LIB       = $(BUILD)/libfanout.a
BIN       = $(BUILD)/bin/fanout
# The load-test tool (deploy/loadtest/): its own program; test_loadtest links its parts.
LOAD_SRCS = $(wildcard deploy/loadtest/*.c)
LOAD_OBJS = $(LOAD_SRCS:%.c=$(BUILD)/obj/%.o)
LOAD_BIN  = $(BUILD)/bin/fanout-load

# Suites run under 'timeout' so that a hang fails instead of blocking CI.
TEST_TIMEOUT ?= 300

.PHONY: all build deps test-deps layers test asan tsan stress soak fuzz fuzz-deps fuzz-build bench run install clean load deploy-deps deploy-test slowhttp
all: deps
	@$(MAKE) --no-print-directory build

# The real build, run after 'deps' so that pkg-config answers for every object.
build: $(BIN) $(LOAD_BIN) $(TEST_BINS) $(BENCH_BINS)
	@:

# Installs the -dev packages that pkg-config cannot find (apt-get as root or through sudo), or
# stops with a message naming them.
deps:
	@command -v pkg-config >/dev/null 2>&1 || need=pkg-config; \
	set -- $(DEB_PKGS); for p in $(PKGS); do \
	  pkg-config --exists $$p 2>/dev/null || need="$$need $$1"; shift; done; \
	[ -f "$$($(CC) -print-file-name=libmimalloc.so)" ] || ! command -v apt-get >/dev/null 2>&1 || \
	  need="$$need libmimalloc-dev"; \
	[ -z "$$need" ] || tests/apt-install.sh "build dependencies" \
	  "install your system's equivalents of libcurl, libmicrohttpd, cJSON and CUnit development packages" \
	  $$need pkg-config

$(LIB): $(LIB_OBJS)
	@mkdir -p $(@D)
	rm -f $@
	$(AR) rcs $@ $^

$(BIN): $(BUILD)/obj/server/main.o $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(ALL_LDFLAGS) -Wl,--gc-sections $(BIN_ALLOC) $(PKG_LIBS)

$(LOAD_BIN): $(LOAD_OBJS)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(ALL_LDFLAGS) $(shell pkg-config --libs libcjson 2>/dev/null) -lm

# 'make load' builds only the load tool (deploy/loadtest.sh runs it).
load: deps
	@$(MAKE) --no-print-directory $(LOAD_BIN)

$(BUILD)/tests/test_loadtest: $(filter-out %/main.o,$(LOAD_OBJS))
$(BUILD)/tests/test_loadtest: PKG_LIBS += -lm

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(TEST_COMMON) $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(ALL_LDFLAGS) $(PKG_LIBS) $(CUNIT_LIBS)

# Benchmarks have their own main(); they share the support code but not the CUnit runner.
$(BUILD)/tests/bench_%: $(BUILD)/obj/tests/bench_%.o $(filter-out %/main.o,$(TEST_COMMON)) $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(ALL_LDFLAGS) $(PKG_LIBS) $(CUNIT_LIBS)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) -c -o $@ $<

# Tools the suites run besides the libraries, as command:Debian package: promtool checks
# /metrics, gnuplot draws the load tool's sweep plot. Installed like the libraries (apt-get as
# root or through sudo), or named. FANOUT_SKIP_PROMTOOL=1 skips promtool and its check.
TEST_TOOLS = promtool:prometheus gnuplot:gnuplot-nox
test-deps: deps
	@need=; for t in $(TEST_TOOLS); do c=$${t%%:*}; p=$${t#*:}; \
	  [ "$$c" = promtool ] && [ -n "$$FANOUT_SKIP_PROMTOOL" ] && continue; \
	  command -v $$c >/dev/null 2>&1 || need="$$need $$p"; done; \
	if [ -n "$$need" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	    else echo "fanout: the tests need:$$need (run apt-get install as root)" >&2; exit 1; fi; \
	    echo "fanout: installing the test tools:$$need"; \
	    $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$need >/dev/null || exit 1; \
	  else \
	    echo "fanout: the tests need:$$need (Debian names; install your system's equivalents)" >&2; exit 1; \
	  fi; \
	fi

# Every #include points down the layers (tests/layers.sh); part of make test.
layers:
	@tests/layers.sh

# The server suites that also run under --loop-model split (the default is shared).
TEST_ALSO_SPLIT = test_server_api test_server_life test_stream test_http test_faults test_ops

test: all test-deps layers
	FANOUT_BIN=$(BIN) FANOUT_LOAD_BIN=$(LOAD_BIN) TEST_TIMEOUT=$(TEST_TIMEOUT) TEST_WRAP="$(TEST_WRAP)" \
	  TEST_LOG_DIR=$(BUILD)/test-logs TEST_ALSO_SPLIT="$(TEST_ALSO_SPLIT)" tests/run.sh $(TEST_BINS)

# Sanitizer runs: separate trees, never combined. A sanitizer report fails the run.
export ASAN_OPTIONS ?= detect_leaks=1:abort_on_error=0:detect_stack_use_after_return=1
export UBSAN_OPTIONS ?= print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS ?= halt_on_error=1:second_deadlock_stack=1
ASAN_SAN = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
TSAN_SAN = -fsanitize=thread
TSAN_WRAP = setarch $$(uname -m) -R
asan:
	$(MAKE) test BUILD=build/asan OPT="-O1 -g" SAN="$(ASAN_SAN)"

# setarch -R: TSan cannot map its shadow memory on kernels with high mmap randomisation.
tsan:
	$(MAKE) test BUILD=build/tsan OPT="-O1 -g" SAN="$(TSAN_SAN)" TEST_WRAP="$(TSAN_WRAP)"

# Soak (tests/soak.sh): SOAK_SECONDS of mixed load against the ASan build, then the TSan build,
# sampling RSS, threads and fds every second; CSVs, plots and logs in build/soak/.
SOAK_SECONDS ?= 600
soak: all
	@$(MAKE) --no-print-directory build/asan/bin/fanout BUILD=build/asan OPT="-O1 -g" SAN="$(ASAN_SAN)"
	@$(MAKE) --no-print-directory build/tsan/bin/fanout BUILD=build/tsan OPT="-O1 -g" SAN="$(TSAN_SAN)"
	tests/soak.sh -b build/asan/bin/fanout -s $(SOAK_SECONDS) -n asan
	$(TSAN_WRAP) tests/soak.sh -b build/tsan/bin/fanout -s $(SOAK_SECONDS) -n tsan

# The suites run again and again beside a CPU hog (tests/stress.sh): STRESS_RUNS times each of
# STRESS_TARGETS. A test that needs an idle machine fails here.
STRESS_RUNS ?= 20
STRESS_TARGETS ?= test tsan asan
stress:
	tests/stress.sh -n $(STRESS_RUNS) $(STRESS_TARGETS)

# libFuzzer targets (clang; Debian: clang libclang-rt-14-dev): tests/fuzz/fuzz_<name>.c, seeds
# in tests/fuzz/corpus/<name>/ (read only; new inputs go to build/fuzz/corpus/<name>/, crashes
# to build/fuzz/artifacts/). Each runs FUZZ_SECONDS; a crash stops the run with exit 1.
FUZZ_TARGETS ?= request url render http
FUZZ_SECONDS ?= 60
FUZZ_SAN = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
# clang with its libFuzzer and sanitizer runtimes (Debian: clang, libclang-rt-N-dev for clang N),
# installed like the libraries when a test link fails.
fuzz-deps: deps
	@probe() { printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; return (int)n * 0; }\n' | \
	  clang -fsanitize=fuzzer,address,undefined -x c - -o /dev/null >/dev/null 2>&1; }; \
	probe && exit 0; \
	need=clang; if command -v clang >/dev/null 2>&1; then \
	  v=$$(clang -dumpversion | cut -d. -f1); need="libclang-rt-$$v-dev"; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "fanout: make fuzz needs: $$need (run apt-get install as root)" >&2; exit 1; fi; \
	  echo "fanout: installing the fuzzing tools: $$need"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$need >/dev/null || exit 1; \
	  if [ "$$need" = clang ]; then v=$$(clang -dumpversion | cut -d. -f1); \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends libclang-rt-$$v-dev >/dev/null 2>&1 || true; fi; \
	  probe || { echo "fanout: clang still cannot link a libFuzzer target" >&2; exit 1; }; \
	else \
	  echo "fanout: make fuzz needs clang with libFuzzer and the ASan/UBSan runtimes" >&2; exit 1; \
	fi

fuzz: fuzz-deps
	@$(MAKE) --no-print-directory fuzz-build BUILD=build/fuzz CC=clang OPT="-O1 -g" \
	  SAN="-fsanitize=fuzzer-no-link $(FUZZ_SAN)"
	@mkdir -p build/fuzz/artifacts
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz/corpus/$$t; \
	  echo "== fuzz_$$t for $(FUZZ_SECONDS) s"; \
	  build/fuzz/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=build/fuzz/artifacts/$$t- build/fuzz/corpus/$$t tests/fuzz/corpus/$$t \
	    2>build/fuzz/fuzz_$$t.log || { tail -n 60 build/fuzz/fuzz_$$t.log; exit 1; }; \
	  grep -E '^(#[0-9]+.*DONE|Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)' build/fuzz/fuzz_$$t.log; \
	done

FUZZ_BINS = $(FUZZ_TARGETS:%=$(BUILD)/fuzz/fuzz_%)
fuzz-build: $(FUZZ_BINS)
	@:

$(BUILD)/fuzz/fuzz_%: $(BUILD)/obj/tests/fuzz/fuzz_%.o $(LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer -o $@ $^ $(ALL_LDFLAGS) $(PKG_LIBS)

# Slow-client attacks (tests/slowhttp.sh): slowhttptest in bounded runs of SLOWHTTP_SECONDS with
# SLOWHTTP_CONNS connections each, while fanout-load measures another client's latency; threads
# and client connections must come back to their baseline (RSS to within 16 MiB of its
# high-water mark). slowhttptest is installed like the suites' tools.
SLOWHTTP_SECONDS ?= 30
SLOWHTTP_CONNS ?= 1000
slowhttp: all
	@$(MAKE) --no-print-directory test-deps TEST_TOOLS=slowhttptest:slowhttptest
	tests/slowhttp.sh -b $(BIN) -L $(LOAD_BIN) -s $(SLOWHTTP_SECONDS) -c $(SLOWHTTP_CONNS)

bench: all
	@for b in $(BENCH_BINS); do echo "== $$b"; $$b || exit 1; done

run: deps
	@$(MAKE) --no-print-directory $(BIN)
	$(BIN) --demo --listen $${LISTEN:-127.0.0.1:8080}

install: deps
	@$(MAKE) --no-print-directory $(BIN)
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/fanout

# What deploy/deploy-test.sh runs besides Docker itself, as command:Debian package: debootstrap
# for the local base image, Compose for the cluster, ss (iproute2) for free ports, python3 and
# curl for the figures. Installed like the libraries (apt-get as root or through sudo), or named.
# Docker's engine and Go (deploy/validate needs 1.23 or later) are not Debian installs here: a
# missing one is named.
DEPLOY_TOOLS = debootstrap:debootstrap docker-compose:docker-compose ss:iproute2 python3:python3 curl:curl
deploy-deps:
	@need=; for t in $(DEPLOY_TOOLS); do c=$${t%%:*}; p=$${t#*:}; \
	  if [ "$$c" = docker-compose ] && docker compose version >/dev/null 2>&1; then continue; fi; \
	  command -v $$c >/dev/null 2>&1 || PATH=$$PATH:/usr/sbin:/sbin command -v $$c >/dev/null 2>&1 || need="$$need $$p"; done; \
	[ -z "$$need" ] || tests/apt-install.sh "what make deploy-test needs" \
	  "install your system's equivalents" $$need || exit 1; \
	command -v docker >/dev/null 2>&1 || { echo "fanout: make deploy-test needs Docker (the engine and its client)" >&2; exit 1; }; \
	command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || \
	  { echo "fanout: make deploy-test needs Go 1.23 or later (deploy/validate) in PATH or /usr/local/go" >&2; exit 1; }

# Builds the container images (a local Debian base first, where none exists) and exercises the
# image, the compose cluster, the upstream replicas fanout follows by name and the Kubernetes
# manifests under Docker (deploy/deploy-test.sh). Installs its tools first (deploy-deps).
deploy-test: deploy-deps
	deploy/deploy-test.sh

clean:
	rm -rf build

.PRECIOUS: $(BUILD)/obj/%.o $(BUILD)/obj/tests/%.o
-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
