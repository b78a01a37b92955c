/* fanout-load: a load generator for fanout's POST /v1/batch.
 *
 * main() reads the flags (every value checked; a bad one is a one-line error and exit 2),
 * resolves and probes the target, then runs once, or once per step of --sweep, through run.h,
 * printing a progress line while it runs and, through report.h, a table or a JSON summary at
 * the end; --csv writes per-second rows, --sweep a CSV of the steps and a PNG plot.
 *
 * Exit status: 0 when every objective holds (success ratio >= --min-success, p99 <= --max-p99-ms),
 * 1 when one is missed, 2 for bad usage, 3 when the run cannot be made (target unreachable,
 * gnuplot missing, a file that cannot be written).
 *
 * Threads: this one (flags, progress, output) and the run's workers, joined before output. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "deploy/loadtest/mix.h"
#include "deploy/loadtest/report.h"
#include "deploy/loadtest/run.h"

static const char usage_text[] =
    "Usage: " PROG " [options] [URL]\n"
    "Load-tests fanout's POST /v1/batch. URL is http://HOST[:PORT][/PATH]\n"
    "(default http://127.0.0.1:8080; the path defaults to /v1/batch).\n"
    "\n"
    "Load:\n"
    "  -u, --url URL          target, as the positional URL\n"
    "  -d, --duration TIME    how long to send: 500ms, 10s, 2m [10s]\n"
    "  -c, --connections N    keep-alive connections [32]\n"
    "  -t, --threads N        client threads, each with its share of connections [1]\n"
    "  -r, --rate R           open loop: R requests/s on a fixed schedule, latency from each\n"
    "                         request's intended send time; without it, closed loop (every\n"
    "                         connection sends as soon as its previous answer is in)\n"
    "      --timeout TIME     an answer later than this is a timeout [10s]\n"
    "      --wait TIME        wait up to TIME for the target to accept connections (for\n"
    "                         scripts that have just started it) [no wait]\n"
    "\n"
    "Requests:\n"
    "  -b, --batch N|MIN-MAX  ids per request, fixed or drawn uniformly [10]\n"
    "      --ids DIST         seq, uniform or zipf [seq]\n"
    "  -k, --keys K           distinct ids (seq wraps at K) [100000]\n"
    "      --zipf-s S         Zipf exponent for --ids zipf [1.1]\n"
    "  -p, --prefix P         id prefix (A-Z a-z 0-9 - . _ ~) [item-]\n"
    "      --fail-frac F      fraction of ids sent as fail-<n> (the demo answers 500) [0]\n"
    "      --slow-frac F      fraction of ids sent as sleep<MS>-<n> (delayed by the demo) [0]\n"
    "      --slow-ms MS       delay of a slow id [100]\n"
    "  -T, --timeout-ms N     timeout_ms in each body [not sent]\n"
    "      --mode MODE        mode in each body: all or settled [not sent]; with settled\n"
    "                         (and --ndjson) the entries of 200 answers are counted too\n"
    "      --ndjson           send Accept: application/x-ndjson (a 200 NDJSON answer succeeds\n"
    "                         when it ends with a {\"done\":true} line without an error)\n"
    "      --seed N           seed of the id generator [1]\n"
    "\n"
    "Output:\n"
    "      --json             print the summary as JSON on stdout instead of the table\n"
    "      --csv FILE         write one row per second to FILE\n"
    "      --sweep rate=R1,R2,... | rate=FROM:TO:STEP | conns=N1,N2,... | conns=FROM:TO:STEP\n"
    "                         run once per value (each --duration long), write a CSV and a PNG\n"
    "                         plot of throughput and latency percentiles against load\n"
    "      --sweep-out PREFIX sweep files PREFIX.csv, PREFIX.gp, PREFIX.png [fanout-sweep]\n"
    "      --no-plot          sweep without the plot (gnuplot not needed)\n"
    "      --progress         progress line on stderr even when it is not a terminal\n"
    "      --no-progress      no progress line [shown when stderr is a terminal]\n"
    "\n"
    "Objectives (exit status 1 when missed):\n"
    "      --min-success F    smallest success ratio, 0..1 [1]\n"
    "      --max-p99-ms MS    largest p99 latency in ms [none]\n"
    "\n"
    "  -h, --help             this text\n"
    "\n"
    "Exit status: 0 objectives met, 1 an objective missed, 2 bad usage, 3 the run could not be\n"
    "made (target unreachable, gnuplot missing, a file not writable).\n";


/* ------------------------------------------------------------------ values */

static long long parse_int(const char *flag, const char *s, long long min, long long max)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < min || v > max)
        lt_die(EXIT_USAGE, "%s: '%s' is not a whole number from %lld to %lld", flag, s, min, max);
    return v;
}

static double parse_num(const char *flag, const char *s, double min, double max, bool min_open)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !isfinite(v) || v < min || (min_open && v == min) || v > max)
        lt_die(EXIT_USAGE, "%s: '%s' is not a number %s %g %s %g", flag, s,
            min_open ? "above" : "from", min, min_open ? "and at most" : "to", max);
    return v;
}

/* TIME: a number with ms, s, m or h (bare: seconds); returns nanoseconds. */
static int64_t parse_time(const char *flag, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mul = 1e9;
    if (!strcmp(end, "ms"))
        mul = 1e6;
    else if (!strcmp(end, "s") || !*end)
        mul = 1e9;
    else if (!strcmp(end, "m"))
        mul = 60e9;
    else if (!strcmp(end, "h"))
        mul = 3600e9;
    else
        end = NULL;
    if (!*s || !end || end == s || errno || !isfinite(v) || v <= 0 || v * mul > 86400e9 ||
        v * mul < 1e6)
        lt_die(EXIT_USAGE, "%s: '%s' is not a time from 1ms to 24h (e.g. 500ms, 10s, 2m)", flag, s);
    return (int64_t)(v * mul);
}

static void parse_batch(struct lt_mix *m, const char *s)
{
    const char *dash = strchr(s, '-');
    if (!dash) {
        m->batch_min = m->batch_max = (int)parse_int("--batch", s, 0, 100000);
        return;
    }
    char lo[32];
    size_t n = (size_t)(dash - s);
    if (n == 0 || n >= sizeof(lo))
        lt_die(EXIT_USAGE, "--batch: '%s' is not N or MIN-MAX", s);
    memcpy(lo, s, n);
    lo[n] = '\0';
    m->batch_min = (int)parse_int("--batch", lo, 0, 100000);
    m->batch_max = (int)parse_int("--batch", dash + 1, 0, 100000);
    if (m->batch_max < m->batch_min)
        lt_die(EXIT_USAGE, "--batch: '%s': MAX is below MIN", s);
}

static void parse_sweep(struct lt_cli *c, const char *s)
{
    const char *v;
    if (!strncmp(s, "rate=", 5)) {
        c->sweep_rate = true;
        v = s + 5;
    } else if (!strncmp(s, "conns=", 6)) {
        c->sweep_rate = false;
        v = s + 6;
    } else {
        lt_die(EXIT_USAGE, "--sweep: '%s' is not rate=... or conns=...", s);
    }
    double max = c->sweep_rate ? 1e7 : 100000;
    char buf[1024];
    snprintf(buf, sizeof(buf), "%s", v);
    c->nsteps = 0;
    if (strchr(buf, ':')) {
        char *a = buf, *b = strchr(a, ':'), *d;
        *b++ = '\0';
        d = strchr(b, ':');
        if (!d)
            lt_die(EXIT_USAGE, "--sweep: '%s': a range is FROM:TO:STEP", s);
        *d++ = '\0';
        double from = parse_num("--sweep", a, 0, max, true);
        double to = parse_num("--sweep", b, 0, max, true);
        double step = parse_num("--sweep", d, 0, max, true);
        if (to < from)
            lt_die(EXIT_USAGE, "--sweep: '%s': TO is below FROM", s);
        for (double x = from; x <= to * (1 + 1e-9); x += step) {
            if (c->nsteps == MAX_STEPS)
                lt_die(EXIT_USAGE, "--sweep: '%s' has more than %d steps", s, MAX_STEPS);
            c->steps[c->nsteps++] = x;
        }
    } else {
        for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            if (c->nsteps == MAX_STEPS)
                lt_die(EXIT_USAGE, "--sweep: '%s' has more than %d steps", s, MAX_STEPS);
            c->steps[c->nsteps++] = parse_num("--sweep", t, 0, max, true);
        }
    }
    if (!c->nsteps)
        lt_die(EXIT_USAGE, "--sweep: '%s' names no value", s);
    if (!c->sweep_rate)
        for (int i = 0; i < c->nsteps; i++)
            if (c->steps[i] != floor(c->steps[i]))
                lt_die(EXIT_USAGE, "--sweep: connection counts are whole numbers ('%s')", s);
}

/* ------------------------------------------------------------------ target */

static void resolve(struct lt_cli *c)
{
    const char *u = c->url;
    if (!strncmp(u, "https://", 8))
        lt_die(EXIT_USAGE, "%s: https is not supported (fanout serves plain HTTP)", u);
    if (strncmp(u, "http://", 7) != 0)
        lt_die(EXIT_USAGE, "'%s' is not an http:// URL", u);
    const char *h = u + 7, *path = strchr(h, '/');
    size_t hl = path ? (size_t)(path - h) : strlen(h);
    char hostport[300], host[300], port[16] = "80";
    if (hl == 0 || hl >= sizeof(hostport))
        lt_die(EXIT_USAGE, "'%s' has no host", u);
    memcpy(hostport, h, hl);
    hostport[hl] = '\0';
    const char *colon;
    if (hostport[0] == '[') {
        const char *rb = strchr(hostport, ']');
        if (!rb)
            lt_die(EXIT_USAGE, "'%s': unclosed '['", u);
        snprintf(host, sizeof(host), "%.*s", (int)(rb - hostport - 1), hostport + 1);
        colon = rb[1] == ':' ? rb + 1 : NULL;
        if (rb[1] && !colon)
            lt_die(EXIT_USAGE, "'%s': bad host", u);
    } else {
        colon = strchr(hostport, ':');
        snprintf(host, sizeof(host), "%.*s", colon ? (int)(colon - hostport) : (int)hl, hostport);
    }
    if (colon) {
        long long p = parse_int("port", colon + 1, 1, 65535);
        snprintf(port, sizeof(port), "%lld", p);
    }
    if (!*host)
        lt_die(EXIT_USAGE, "'%s' has no host", u);
    struct lt_target *t = &c->o.target;
    snprintf(t->host, sizeof(t->host), "%s", hostport);
    if (!path || !strcmp(path, "/"))
        path = "/v1/batch";
    if (strlen(path) >= sizeof(t->path) || strpbrk(path, " \r\n\t"))
        lt_die(EXIT_USAGE, "'%s': bad path", u);
    snprintf(t->path, sizeof(t->path), "%s", path);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0 || !res)
        lt_die(EXIT_CANNOT, "cannot resolve '%s': %s", host, gai_strerror(rc));
    memcpy(&t->addr, res->ai_addr, res->ai_addrlen);
    t->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
}

/* One connect with a bound; returns 0 or the errno. */
static int probe_once(const struct lt_target *t)
{
    int fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return errno;
    int err = 0;
    if (connect(fd, (const struct sockaddr *)&t->addr, t->addrlen) != 0) {
        err = errno;
        if (err == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int n = poll(&p, 1, 3000);
            socklen_t len = sizeof(err);
            if (n == 0)
                err = ETIMEDOUT;
            else if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
                err = errno;
        }
    }
    close(fd);
    return err;
}

/* The clear error for an unreachable target, before any load; with --wait, retried every
 * 100 ms until the target accepts or the wait is over. */
static void probe(const struct lt_cli *c)
{
    const struct lt_target *t = &c->o.target;
    char addr[128] = "?", serv[16] = "?";
    getnameinfo((const struct sockaddr *)&t->addr, t->addrlen, addr, sizeof(addr), serv,
                sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV);
    int64_t until = lt_now_ns() + c->wait_ns;
    int err;
    while ((err = probe_once(t)) != 0 && lt_now_ns() < until) {
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    if (err)
        lt_die(EXIT_CANNOT, "cannot connect to %s (address %s, port %s): %s%s", c->url, addr, serv,
            strerror(err), c->wait_ns ? " (after --wait)" : "");
}

static bool on_path(const char *name)
{
    const char *path = getenv("PATH");
    if (!path || !*path)
        return false;
    char buf[4096];
    for (const char *p = path; *p;) {
        const char *e = strchr(p, ':');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n && n + strlen(name) + 2 < sizeof(buf)) {
            snprintf(buf, sizeof(buf), "%.*s/%s", (int)n, p, name);
            if (access(buf, X_OK) == 0)
                return true;
        }
        if (!e)
            break;
        p = e + 1;
    }
    return false;
}

/* ------------------------------------------------------------------ flags */

enum {
    OPT_IDS = 256, OPT_ZIPF_S, OPT_FAIL, OPT_SLOW, OPT_SLOW_MS,
    OPT_MODE, OPT_NDJSON, OPT_SEED, OPT_JSON, OPT_CSV, OPT_SWEEP, OPT_SWEEP_OUT, OPT_NO_PLOT,
    OPT_PROGRESS, OPT_NO_PROGRESS, OPT_MIN_SUCCESS, OPT_MAX_P99, OPT_TIMEOUT, OPT_WAIT,
};

static const struct option long_opts[] = {
    {"url", required_argument, NULL, 'u'},
    {"duration", required_argument, NULL, 'd'},
    {"connections", required_argument, NULL, 'c'},
    {"threads", required_argument, NULL, 't'},
    {"rate", required_argument, NULL, 'r'},
    {"batch", required_argument, NULL, 'b'},
    {"keys", required_argument, NULL, 'k'},
    {"help", no_argument, NULL, 'h'},
    {"timeout", required_argument, NULL, OPT_TIMEOUT},
    {"wait", required_argument, NULL, OPT_WAIT},
    {"ids", required_argument, NULL, OPT_IDS},
    {"zipf-s", required_argument, NULL, OPT_ZIPF_S},
    {"prefix", required_argument, NULL, 'p'},
    {"fail-frac", required_argument, NULL, OPT_FAIL},
    {"slow-frac", required_argument, NULL, OPT_SLOW},
    {"slow-ms", required_argument, NULL, OPT_SLOW_MS},
    {"timeout-ms", required_argument, NULL, 'T'},
    {"mode", required_argument, NULL, OPT_MODE},
    {"ndjson", no_argument, NULL, OPT_NDJSON},
    {"seed", required_argument, NULL, OPT_SEED},
    {"json", no_argument, NULL, OPT_JSON},
    {"csv", required_argument, NULL, OPT_CSV},
    {"sweep", required_argument, NULL, OPT_SWEEP},
    {"sweep-out", required_argument, NULL, OPT_SWEEP_OUT},
    {"no-plot", no_argument, NULL, OPT_NO_PLOT},
    {"progress", no_argument, NULL, OPT_PROGRESS},
    {"no-progress", no_argument, NULL, OPT_NO_PROGRESS},
    {"min-success", required_argument, NULL, OPT_MIN_SUCCESS},
    {"max-p99-ms", required_argument, NULL, OPT_MAX_P99},
    {NULL, 0, NULL, 0},
};

/* The flag as the user wrote it, for messages. */
static const char *flag_name(int opt, char *buf, size_t size)
{
    for (const struct option *o = long_opts; o->name; o++)
        if (o->val == opt) {
            snprintf(buf, size, "--%s", o->name);
            return buf;
        }
    snprintf(buf, size, "-%c", opt);
    return buf;
}

static void parse_args(struct lt_cli *c, int argc, char **argv)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->url, sizeof(c->url), "http://127.0.0.1:8080");
    c->o.conns = 32;
    c->o.threads = 1;
    c->o.duration_ns = 10000000000LL;
    c->o.timeout_ns = 10000000000LL;
    c->o.seed = 1;
    c->mix.batch_min = c->mix.batch_max = 10;
    c->mix.dist = LT_DIST_SEQ;
    c->mix.keys = 100000;
    c->mix.zipf_s = 1.1;
    c->mix.slow_ms = 100;
    snprintf(c->mix.prefix, sizeof(c->mix.prefix), "item-");
    c->sweep_out = "fanout-sweep";
    c->plot = true;
    c->progress = -1;
    c->min_success = 1.0;
    bool url_given = false;
    opterr = 0;
    int opt;
    char fb[64];
    while ((opt = getopt_long(argc, argv, ":u:d:c:t:r:b:k:p:T:h", long_opts, NULL)) != -1) {
        const char *f = flag_name(opt, fb, sizeof(fb));
        switch (opt) {
        case 'u':
            if (strlen(optarg) >= sizeof(c->url))
                lt_die(EXIT_USAGE, "--url: too long");
            snprintf(c->url, sizeof(c->url), "%s", optarg);
            url_given = true;
            break;
        case 'd':
            c->o.duration_ns = parse_time(f, optarg);
            break;
        case 'c':
            c->o.conns = (int)parse_int(f, optarg, 1, 100000);
            break;
        case 't':
            c->o.threads = (int)parse_int(f, optarg, 1, 64);
            break;
        case 'r':
            c->o.rate = parse_num(f, optarg, 0, 1e7, true);
            break;
        case 'b':
            parse_batch(&c->mix, optarg);
            break;
        case 'k':
            c->mix.keys = (uint64_t)parse_int(f, optarg, 1, 1000000000000LL);
            break;
        case 'h':
            fputs(usage_text, stdout);
            exit(0);
        case OPT_TIMEOUT:
            c->o.timeout_ns = parse_time(f, optarg);
            break;
        case OPT_WAIT:
            c->wait_ns = parse_time(f, optarg);
            break;
        case OPT_IDS:
            if (!strcmp(optarg, "seq"))
                c->mix.dist = LT_DIST_SEQ;
            else if (!strcmp(optarg, "uniform"))
                c->mix.dist = LT_DIST_UNIFORM;
            else if (!strcmp(optarg, "zipf"))
                c->mix.dist = LT_DIST_ZIPF;
            else
                lt_die(EXIT_USAGE, "--ids: '%s' is not seq, uniform or zipf", optarg);
            break;
        case OPT_ZIPF_S:
            c->mix.zipf_s = parse_num(f, optarg, 0, 10, true);
            break;
        case 'p':
            if (strlen(optarg) >= 33 || strspn(optarg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmno"
                                                       "pqrstuvwxyz0123456789-._~") !=
                                            strlen(optarg))
                lt_die(EXIT_USAGE, "--prefix: '%s': up to 32 of A-Z a-z 0-9 - . _ ~", optarg);
            snprintf(c->mix.prefix, sizeof(c->mix.prefix), "%s", optarg);
            break;
        case OPT_FAIL:
            c->mix.fail_frac = parse_num(f, optarg, 0, 1, false);
            break;
        case OPT_SLOW:
            c->mix.slow_frac = parse_num(f, optarg, 0, 1, false);
            break;
        case OPT_SLOW_MS:
            c->mix.slow_ms = (int)parse_int(f, optarg, 1, 60000);
            break;
        case 'T':
            c->mix.timeout_ms = (int)parse_int(f, optarg, 1, 2147483647);
            break;
        case OPT_MODE:
            if (!strcmp(optarg, "all"))
                c->mix.mode = "all";
            else if (!strcmp(optarg, "settled"))
                c->mix.mode = "settled";
            else
                lt_die(EXIT_USAGE, "--mode: '%s' is not all or settled", optarg);
            break;
        case OPT_NDJSON:
            c->o.ndjson = true;
            break;
        case OPT_SEED: {
            char *end;
            errno = 0;
            if (!*optarg || *optarg == '-' ||
                (c->o.seed = strtoull(optarg, &end, 10), errno || *end))
                lt_die(EXIT_USAGE, "--seed: '%s' is not a whole number from 0 to 2^64-1", optarg);
            break;
        }
        case OPT_JSON:
            c->json = true;
            break;
        case OPT_CSV:
            c->csv = optarg;
            break;
        case OPT_SWEEP:
            parse_sweep(c, optarg);
            break;
        case OPT_SWEEP_OUT:
            if (!*optarg || strpbrk(optarg, "'\"\n\r\\"))
                lt_die(EXIT_USAGE, "--sweep-out: '%s': empty, or has a quote, backslash or newline",
                    optarg);
            c->sweep_out = optarg;
            break;
        case OPT_NO_PLOT:
            c->plot = false;
            break;
        case OPT_PROGRESS:
            c->progress = 1;
            break;
        case OPT_NO_PROGRESS:
            c->progress = 0;
            break;
        case OPT_MIN_SUCCESS:
            c->min_success = parse_num(f, optarg, 0, 1, false);
            break;
        case OPT_MAX_P99:
            c->max_p99_ms = parse_num(f, optarg, 0, 86400000, true);
            break;
        case ':':
            if (optopt)
                lt_die(EXIT_USAGE, "%s needs a value", flag_name(optopt, fb, sizeof(fb)));
            lt_die(EXIT_USAGE, "%s needs a value", argv[optind - 1]);
        default:
            if (optopt)
                lt_die(EXIT_USAGE, "unknown option -%c", optopt);
            lt_die(EXIT_USAGE, "unknown option %s", argv[optind - 1]);
        }
    }
    if (optind < argc) {
        if (url_given || optind + 1 < argc)
            lt_die(EXIT_USAGE, "one URL only (got '%s')", argv[optind]);
        if (strlen(argv[optind]) >= sizeof(c->url))
            lt_die(EXIT_USAGE, "URL too long");
        snprintf(c->url, sizeof(c->url), "%s", argv[optind]);
    }
    if (c->mix.fail_frac + c->mix.slow_frac > 1)
        lt_die(EXIT_USAGE, "--fail-frac plus --slow-frac is above 1");
    if (c->mix.dist == LT_DIST_ZIPF && c->mix.keys > LT_MIX_MAX_ZIPF_KEYS)
        lt_die(EXIT_USAGE, "--keys: at most %llu with --ids zipf", LT_MIX_MAX_ZIPF_KEYS);
    if (c->o.threads > c->o.conns)
        lt_die(EXIT_USAGE, "--threads (%d) is above --connections (%d)", c->o.threads, c->o.conns);
    if (c->nsteps && !c->sweep_rate && c->o.rate > 0)
        lt_die(EXIT_USAGE, "--sweep conns=... is a closed-loop sweep; drop --rate");
    if (c->nsteps && !c->sweep_rate)
        for (int i = 0; i < c->nsteps; i++)
            if (c->steps[i] < c->o.threads)
                lt_die(EXIT_USAGE, "--sweep: %g connections is below --threads %d", c->steps[i],
                    c->o.threads);
}

/* Raises RLIMIT_NOFILE toward what 'conns' connections need, or stops. */
static void fd_limit(int conns)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t need = (rlim_t)conns + 64;
    if (rl.rlim_cur >= need)
        return;
    rlim_t want = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= need ? need : rl.rlim_max;
    rl.rlim_cur = want;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < need)
        lt_die(EXIT_USAGE, "%d connections need %llu open files; the limit is %llu (ulimit -n)",
            conns, (unsigned long long)need, (unsigned long long)rl.rlim_cur);
}

/* ------------------------------------------------------------------ running */

static void on_signal(int sig)
{
    (void)sig;
    lt_run_interrupt();
}

/* Runs once with c->o, showing progress; fills *st. 'label' prefixes the progress line. */
static void run_once(const struct lt_cli *c, struct lt_stats *st, const char *label)
{
    lt_run_clear_interrupt();
    struct lt_run *r;
    int rc = lt_run_start(&c->o, &r);
    if (rc != 0)
        lt_die(EXIT_CANNOT, "cannot start the run: %s", strerror(-rc));
    bool tty = isatty(2);
    bool show = c->progress == 1 || (c->progress == -1 && tty);
    int64_t start = lt_now_ns(), last = start, next = start + 1000000000LL;
    uint64_t last_done = 0;
    while (!lt_run_done(r)) {
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
        int64_t now = lt_now_ns();
        if (!show || now < next)
            continue;
        uint64_t done, ok, failed;
        lt_run_progress(r, &done, &ok, &failed);
        double el = (double)(now - start) / 1e9;
        fprintf(stderr, "%s%s%5.1fs/%.1fs  %llu answers  %.0f/s  ok %.2f%%  failed %llu%s",
                tty ? "\r\033[K" : "", label, el, (double)c->o.duration_ns / 1e9,
                (unsigned long long)done, (double)(done - last_done) / ((double)(now - last) / 1e9),
                done ? 100.0 * (double)ok / (double)done : 0.0, (unsigned long long)failed,
                tty ? "" : "\n");
        last_done = done;
        last = now;
        next = now + 1000000000LL;
    }
    if (show && tty)
        fputs("\r\033[K", stderr);
    lt_run_finish(r, st);
}

static void run_single(struct lt_cli *c, FILE *csv)
{
    struct lt_stats st;
    run_once(c, &st, "");
    struct lt_summary s;
    lt_summarize(c, &st, &s);
    if (csv) {
        lt_csv_rows(csv, &st, NULL);
        lt_close_out(csv, c->csv);
    }
    if (c->json) {
        cJSON *j = lt_summary_json(c, &st, &s);
        lt_print_json(j);
        cJSON_Delete(j);
    } else {
        lt_print_table(c, &st, &s);
    }
    fflush(stdout);
    lt_stats_destroy(&st);
    if (!s.pass)
        exit(EXIT_MISSED);
}

static void run_sweep(struct lt_cli *c, FILE *csv)
{
    char path[1100];
    snprintf(path, sizeof(path), "%s.csv", c->sweep_out);
    FILE *f = lt_open_out(path);
    fprintf(f, "load,rate,connections,requests,ok,success_ratio,requests_per_s,fetches_per_s,"
               "p50_ms,p90_ms,p99_ms,p99_9_ms,max_ms,socket_errors,timeouts,unsent\n");
    cJSON *steps = c->json ? cJSON_CreateArray() : NULL;
    if (!c->json)
        printf("%s %s sweep over %s, %.1f s each\n\n%10s %10s %12s %8s %9s %9s %9s %9s %9s  %s\n",
               PROG, c->url, c->sweep_rate ? "rate" : "connections",
               (double)c->o.duration_ns / 1e9, c->sweep_rate ? "rate" : "conns", "req/s",
               "fetches/s", "ok %", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "result");
    bool all_pass = true;
    for (int i = 0; i < c->nsteps; i++) {
        if (c->sweep_rate)
            c->o.rate = c->steps[i];
        else
            c->o.conns = (int)c->steps[i];
        char label[64];
        snprintf(label, sizeof(label), "[%d/%d %s=%g] ", i + 1, c->nsteps,
                 c->sweep_rate ? "rate" : "conns", c->steps[i]);
        struct lt_stats st;
        run_once(c, &st, label);
        struct lt_summary s;
        lt_summarize(c, &st, &s);
        all_pass &= s.pass;
        fprintf(f, "%g,%g,%d,%llu,%llu,%.6f,%.2f,%.2f,%.3f,%.3f,%.3f,%.3f,%.3f,%llu,%llu,%llu\n",
                c->steps[i], c->o.rate, c->o.conns, (unsigned long long)st.done,
                (unsigned long long)st.ok, s.ratio, s.rps, s.fps, s.p[0], s.p[1], s.p[2], s.p[3],
                s.p[4], (unsigned long long)st.sock_errors, (unsigned long long)st.timeouts,
                (unsigned long long)st.unsent);
        fflush(f);
        if (csv)
            lt_csv_rows(csv, &st, &c->steps[i]);
        if (steps)
            cJSON_AddItemToArray(steps, lt_summary_json(c, &st, &s));
        else
            printf("%10g %10.1f %12.1f %8.2f %9.3f %9.3f %9.3f %9.3f %9.3f  %s\n", c->steps[i],
                   s.rps, s.fps, 100 * s.ratio, s.p[0], s.p[1], s.p[2], s.p[3], s.p[4],
                   s.pass ? "PASS" : s.why);
        fflush(stdout);
        bool stop = st.interrupted;
        lt_stats_destroy(&st);
        if (stop)
            break;
    }
    lt_close_out(f, path);
    if (csv)
        lt_close_out(csv, c->csv);
    if (c->plot)
        lt_write_plot(c, path);
    else
        fprintf(stderr, PROG ": wrote %s\n", path);
    if (steps) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "sweep", c->sweep_rate ? "rate" : "connections");
        cJSON_AddItemToObject(j, "steps", steps);
        cJSON_AddBoolToObject(j, "pass", all_pass);
        lt_print_json(j);
        cJSON_Delete(j);
    }
    fflush(stdout);
    if (!all_pass)
        exit(EXIT_MISSED);
}

/* The flags; static so that everything stays reachable when lt_die() exits from deep inside. */
static struct lt_cli *cli;

int main(int argc, char **argv)
{
    struct lt_cli *c = cli = calloc(1, sizeof(*c));
    if (!c)
        lt_die(EXIT_CANNOT, "out of memory");
    parse_args(c, argc, argv);
    c->o.mix = &c->mix;
    c->o.rows = c->csv != NULL;
    c->o.entries = c->o.ndjson || (c->mix.mode && !strcmp(c->mix.mode, "settled"));
    if (c->nsteps && c->plot && !on_path("gnuplot"))
        lt_die(EXIT_CANNOT, "--sweep draws its plot with gnuplot, which is not installed "
                         "(Debian/Ubuntu: apt-get install gnuplot-nox), or add --no-plot");
    int maxc = c->o.conns;
    for (int i = 0; !c->sweep_rate && i < c->nsteps; i++)
        if (c->steps[i] > maxc)
            maxc = (int)c->steps[i];
    fd_limit(maxc);
    resolve(c);
    probe(c);
    if (lt_mix_prepare(&c->mix) != 0)
        lt_die(EXIT_CANNOT, "out of memory for the Zipf table of %llu keys",
            (unsigned long long)c->mix.keys);
    FILE *csv = NULL;
    if (c->csv) {
        csv = lt_open_out(c->csv);
        lt_csv_header(csv, c->nsteps > 0);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (c->nsteps)
        run_sweep(c, csv);
    else
        run_single(c, csv);
    lt_mix_destroy(&c->mix);
    free(c);
    cli = NULL;
    return 0;
}
