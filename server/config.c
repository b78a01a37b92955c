/* config: table-driven flag and environment parsing.
 *
 * One table lists every setting once: its flag, kind, bounds, default text and help line. The
 * environment is applied first (FANOUT_<NAME>, dashes as underscores), then the command line, so
 * flags win. Numbers must be whole and within the setting's bounds; sizes take an optional
 * KiB/MiB/GiB (or K/M/G) suffix; booleans take 1/0/true/false/yes/no/on/off. --demo and
 * --upstream exclude each other only when both come from the same source: a flag overrides the
 * other one's environment variable; so does --demo-upstream-only, against both. The upstream template is parsed here too (url.h), so a bad
 * one is a configuration error that --check-config reports.
 *
 * Every error is one line that names the flag (and the variable, for the environment).
 * Threads: none; not thread-safe (getenv), call once from main before any thread starts. */
#include "server/config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdio.h>
#include <sys/socket.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fetch/fetch.h"
#include "server/batch/batch.h"
#include "server/demo/set.h"
#include "server/json.h"
#include "server/upstream/discover.h"
#include "fetch/upstream.h"
#include "fetch/url.h"

enum kind { K_LISTEN, K_UPSTREAM, K_BOOL, K_ONOFF, K_INT, K_UINT, K_MS, K_SIZE, K_LEVEL, K_POLICY,
            K_HEDGE, K_DISCOVERY, K_LOOPS, K_PATH, K_FACTOR };

struct opt {
    const char *name; /* flag without the leading dashes */
    enum kind kind;   /* how to parse it */
    size_t off;       /* field offset in struct srv_config */
    int64_t min, max; /* bounds for numbers */
    const char *help; /* one line for --help */
};

#define F(field) offsetof(struct srv_config, field)
static const struct opt opts[] = {
    {"listen", K_LISTEN, 0, 0, 0, "address to serve, HOST:PORT (port 0 picks one) [0.0.0.0:8080]"},
    {"upstream", K_UPSTREAM, F(upstream), 0, 0,
     "upstream URL template with {id}, e.g. http://items:8080/items/{id}; every address its host "
     "resolves to is a member; repeat for several (FANOUT_UPSTREAM: a comma- or space-separated "
     "list), at most 64; required unless --upstreams-file or --demo"},
    {"upstream-policy", K_POLICY, F(upstream_policy), 0, 0,
     "replicas (every member of every upstream holds every id: an id ranks them all) or shards "
     "(each upstream holds its own ids: an id picks its upstream, then ranks its members) "
     "[replicas]"},
    {"eject-after", K_UINT, F(eject_after), 0, 1000000,
     "consecutive failures (transport or 5xx) that eject a member; 0 never ejects [5]"},
    {"eject-ms", K_MS, F(eject_ms), 1, 86400000,
     "how long a member stays ejected, doubled on each repeat, ms [30000]"},
    {"eject-max-ms", K_MS, F(eject_max_ms), 1, 86400000,
     "the longest ejection, ms [300000]"},
    {"max-ejected-pct", K_UINT, F(max_ejected_pct), 0, 100,
     "most members ejected at once, percent of all members (rounded down) [50]"},
    {"upstream-discovery", K_DISCOVERY, F(discovery_dns), 0, 0,
     "dns: every address an upstream's host resolves to (A and AAAA) is a member, looked up "
     "again and again; static: looked up once, when the upstream enters the set [dns]"},
    {"resolve-every-ms", K_MS, F(resolve_every_ms), 100, 86400000,
     "between lookups of an upstream's name, jittered by +-20%, ms [5000]"},
    {"resolve-hold-ms", K_MS, F(resolve_hold_ms), 0, 86400000,
     "after NXDOMAIN or an empty answer, keep the members this long before emptying the "
     "upstream, ms [30000]"},
    {"upstreams-file", K_PATH, F(upstreams_file), 0, 0,
     "read the upstream templates from this file, one per line (# comments), again on SIGHUP "
     "and when the file is replaced or changed (looked at every second); excludes --upstream "
     "and --demo"},
    {"max-members", K_UINT, F(max_members), 1, UPSTREAM_MEMBERS_MAX,
     "members in all upstreams together (1 to 4096); more are left out with a warning [256]"},
    {"slow-start-ms", K_MS, F(slow_start_ms), 0, 3600000,
     "a member that joins a running upstream ramps its share of ids from 10% to 100% over "
     "this long; 0: full share at once, ms [10000]"},
    {"balance-factor", K_FACTOR, F(balance_factor), 0, 100,
     "bounded load: a member with at least F times the average attempts in flight (plus one) "
     "is tried after the members under it; 0 turns it off (1 to 100) [1.25]"},
    {"health-path", K_PATH, F(health_path), 0, 0,
     "GET this path on every member (e.g. /healthz); a new member takes traffic after its "
     "first pass, --unhealthy-after failures take a member out, an ejected one returns only "
     "after passing [none: no checks]"},
    {"health-every-ms", K_MS, F(health_every_ms), 100, 3600000,
     "between health checks of a member, ms [2000]"},
    {"health-timeout-ms", K_MS, F(health_timeout_ms), 1, 600000,
     "a health check's deadline, ms [1000]"},
    {"healthy-after", K_UINT, F(healthy_after), 1, 100,
     "passes in a row that make a failing member healthy [2]"},
    {"unhealthy-after", K_UINT, F(unhealthy_after), 1, 100,
     "failures in a row that make a member unhealthy [3]"},
    {"hedge-after-ms", K_HEDGE, F(hedge_after_ms), 0, 3600000,
     "send a hedged attempt when the first is still pending after N ms, or 'auto' (the "
     "fastest candidate member's recent latency at 100 - 0.4 x --hedge-budget-pct percent: "
     "p98 with the 5% budget, leaving the budget room for bursts); 0 turns hedging off [0]"},
    {"hedge-budget-pct", K_UINT, F(hedge_budget_pct), 0, 100,
     "hedges at most this percent of first attempts [5]"},
    {"retries", K_UINT, F(retries), 0, 10,
     "retries after a connect error, reset, empty reply or 502/503/504 [1]"},
    {"retry-budget-pct", K_UINT, F(retry_budget_pct), 0, 1000,
     "retries at most this percent of first attempts, plus 10 a second [20]"},
    {"coalesce", K_ONOFF, F(coalesce), 0, 0,
     "on: concurrent requests for the same id share one upstream fetch (a request may opt out "
     "with \"coalesce\": false) [on]"},
    {"demo", K_BOOL, F(demo), 0, 0, "serve the built-in demo upstream on loopback and use it"},
    {"demo-members", K_UINT, F(demo_members), 1, DEMO_SET_MAX,
     "with --demo: N members on 127.0.0.2 to 127.0.0.N+1, one port, behind the name "
     DEMO_SET_NAME ", which discovery finds (needs those loopback addresses, as Linux has) [1]"},
    {"demo-upstream-only", K_BOOL, F(demo_upstream_only), 0, 0,
     "serve only the demo upstream (GET /items/{id}, /healthz, /readyz) on --listen; no fanout"},
    {"limit", K_INT, F(limit), 1, 100000, "in-flight fetches per request (errgroup limit) [32]"},
    {"spread-min", K_UINT, F(spread_min), 0, 1000000,
     "spread a batch's fetches over the fetch loops when at least N of its calls can be in "
     "flight at once; 0 never spreads [32]"},
    {"max-conns", K_UINT, F(max_conns), 1, 1000000,
     "upstream connections, all members and fetch loops together [512]"},
    {"max-batch", K_UINT, F(max_batch), 1, 1000000, "ids per request [1000]"},
    {"max-requests", K_UINT, F(max_requests), 1, 1000000,
     "batch requests in flight before 503 overloaded [1024]"},
    {"timeout-ms", K_MS, F(timeout_ms), 1, 86400000, "default request deadline, ms [5000]"},
    {"max-timeout-ms", K_MS, F(max_timeout_ms), 1, 86400000,
     "largest request deadline a client may ask for, ms [30000]"},
    {"max-body", K_SIZE, F(max_body), 1, (int64_t)1 << 32, "upstream body per id, bytes [1MiB]"},
    {"upstream-buffer", K_SIZE, F(upstream_buffer), FETCH_RECV_BUFFER_MIN, FETCH_RECV_BUFFER_MAX,
     "libcurl's receive buffer per upstream fetch in flight, 1KiB to 512KiB: smaller holds less "
     "memory, larger reads big bodies in fewer calls, bytes [4KiB]"},
    {"max-response-bytes", K_SIZE, F(max_response_bytes), 1024, (int64_t)1 << 40,
     "one batch response, bytes (duplicates count at each position) [64MiB]"},
    {"max-request-bytes", K_SIZE, F(max_request_bytes), 2, (int64_t)1 << 30,
     "request body, bytes [1MiB]"},
    {"http-threads", K_UINT, F(http_threads), 1, 256, "libmicrohttpd threads with --loop-model split [CPUs]"},
    {"fetch-threads", K_UINT, F(fetch_threads), 1, 256, "upstream fetch loop threads [CPUs]"},
    {"loop-model", K_LOOPS, F(loop_shared), 0, 0,
     "shared: each fetch loop also serves its own client connections, so one thread serves a "
     "request from its first byte to its answer (--http-threads is not used); split: "
     "--http-threads HTTP threads hand each batch to a fetch loop and back [shared]"},
    {"drain-ms", K_MS, F(drain_ms), 0, 3600000,
     "grace period for in-flight batches on SIGTERM or SIGINT, ms [10000]"},
    {"log-level", K_LEVEL, F(log_level), 0, 0, "error, warn, info or debug [info]"},
    {"max-clients", K_UINT, F(max_clients), 1, 1000000, "client connections open at once [10000]"},
    {"idle-timeout-s", K_UINT, F(idle_timeout_s), 1, 86400,
     "idle client connection timeout, s [60]"},
    {"connect-timeout-ms", K_MS, F(connect_timeout_ms), 1, 3600000,
     "upstream connect timeout, ms (the request deadline still bounds it) [2000]"},
    {"h2c", K_BOOL, F(h2c), 0, 0, "speak HTTP/2 (prior knowledge, cleartext) to the upstream; needs libcurl >= 8.0.0"},
    {"header-timeout-ms", K_MS, F(header_timeout_ms), 0, 3600000,
     "a request's first byte to the end of its headers, else 408 and close; 0: none, ms [10000]"},
    {"body-timeout-ms", K_MS, F(body_timeout_ms), 0, 3600000,
     "the end of a request's headers to the end of its body, else 408 and close; 0: none, ms "
     "[30000]"},
    {"max-clients-per-ip", K_UINT, F(max_clients_per_ip), 0, 1000000,
     "client connections from one address at once (more are refused); 0: no limit "
     "[a quarter of --max-clients]"},
    {"max-memory", K_SIZE, F(max_memory), 1 << 20, (int64_t)1 << 40,
     "request bodies, upstream bodies and answers held at once, all requests together; a "
     "batch past it gets 503 overloaded or 502 upstream_too_large, bytes [a quarter of RAM, "
     "at most 4GiB]"},
    {"linger-ms", K_MS, F(linger_ms), 0, 60000,
     "after an early error answer, read and drop what the client still sends for this long "
     "before closing; 0: close at once, ms [5000]"},
    {"linger-bytes", K_SIZE, F(linger_bytes), 0, (int64_t)1 << 30,
     "the most bytes read and dropped in one lingering close, bytes [16MiB]"},
};
#undef F

static unsigned cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

/* A quarter of the memory this process may use: the machine's RAM, or the cgroup's limit when
 * lower (a container), at most 4 GiB. */
static size_t default_max_memory(void)
{
    uint64_t ram = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE);
    FILE *f = fopen("/sys/fs/cgroup/memory.max", "re");
    if (f) {
        unsigned long long lim;
        if (fscanf(f, "%llu", &lim) == 1 && lim > 0 && lim < ram)
            ram = lim;
        fclose(f);
    }
    uint64_t q = ram / 4;
    if (q > (uint64_t)4 << 30)
        q = (uint64_t)4 << 30;
    if (q < (uint64_t)1 << 24)
        q = (uint64_t)1 << 24;
    return (size_t)q;
}

void config_defaults(struct srv_config *c)
{
    memset(c, 0, sizeof(*c));
    strcpy(c->listen_host, "0.0.0.0");
    c->listen_port = 8080;
    c->limit = 32;
    c->max_conns = 512;
    c->max_batch = 1000;
    c->max_requests = 1024;
    c->timeout_ms = 5000;
    c->max_timeout_ms = 30000;
    c->max_body = 1 << 20;
    c->upstream_buffer = FETCH_RECV_BUFFER;
    c->max_request_bytes = 1 << 20;
    c->max_response_bytes = (size_t)64 << 20;
    c->http_threads = cpu_count();
    c->fetch_threads = cpu_count();
    c->drain_ms = 10000;
    c->log_level = LOG_INFO;
    c->max_clients = 10000;
    c->idle_timeout_s = 60;
    c->connect_timeout_ms = 2000;
    c->upstream_policy = UPSTREAM_REPLICAS;
    c->coalesce = true;
    c->demo_members = 1;
    c->spread_min = BATCH_SPREAD_MIN;
    c->eject_after = 5;
    c->eject_ms = 30000;
    c->eject_max_ms = 300000;
    c->max_ejected_pct = 50;
    c->discovery_dns = true;
    c->loop_shared = true;
    c->resolve_every_ms = 5000;
    c->resolve_hold_ms = 30000;
    c->max_members = 256;
    c->slow_start_ms = 10000;
    c->balance_factor = 1.25;
    c->health_every_ms = 2000;
    c->health_timeout_ms = 1000;
    c->healthy_after = 2;
    c->unhealthy_after = 3;
    c->hedge_budget_pct = 5;
    c->retries = 1;
    c->retry_budget_pct = 20;
    c->header_timeout_ms = 10000;
    c->body_timeout_ms = 30000;
    c->max_memory = default_max_memory();
    c->linger_ms = 5000;
    c->linger_bytes = (size_t)16 << 20;
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

unsigned config_split_upstreams(char *list, const char **out, unsigned max)
{
    unsigned n = 0;
    for (char *save = NULL, *t = strtok_r(list, "\n", &save); t && n < max;
         t = strtok_r(NULL, "\n", &save))
        out[n++] = t;
    return n;
}

/* Appends the templates in 'v' to c->upstream: split on commas and whitespace when 'split'
 * (FANOUT_UPSTREAM), else 'v' is one template. */
static int add_upstreams(struct srv_config *c, const char *v, bool split, const char *label,
                         char *err, size_t errlen)
{
    size_t used = strlen(c->upstream);
    const char *p = v;
    bool any = false;
    while (*p) {
        size_t n = split ? strcspn(p, ", \t\r\n") : strlen(p);
        if (n == 0) {
            p++;
            continue;
        }
        if (used + n + 2 > sizeof(c->upstream))
            return fail(err, errlen, "%s: the upstream list is too long (%zu bytes in all at most)",
                        label, sizeof(c->upstream) - 1);
        if (used)
            c->upstream[used++] = '\n';
        memcpy(c->upstream + used, p, n);
        used += n;
        c->upstream[used] = '\0';
        p += n;
        any = true;
    }
    if (!any)
        return fail(err, errlen, "%s: empty upstream", label);
    return 0;
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

/* Parses a whole decimal number with an optional size suffix (sizes only). */
static bool parse_num(const char *v, bool size, int64_t *out)
{
    if (!isdigit((unsigned char)v[0]))
        return false;
    errno = 0;
    char *end;
    unsigned long long n = strtoull(v, &end, 10);
    if (errno || n > INT64_MAX)
        return false;
    uint64_t mult = 1;
    if (size && *end) {
        static const struct {
            const char *sfx;
            uint64_t mult;
        } sfx[] = {{"KiB", 1024},  {"K", 1024},       {"k", 1024},     {"MiB", 1 << 20},
                   {"M", 1 << 20}, {"GiB", 1u << 30}, {"G", 1u << 30}, {"B", 1}};
        size_t i;
        for (i = 0; i < sizeof(sfx) / sizeof(sfx[0]); i++)
            if (strcmp(end, sfx[i].sfx) == 0)
                break;
        if (i == sizeof(sfx) / sizeof(sfx[0]))
            return false;
        mult = sfx[i].mult;
        end += strlen(end);
    }
    if (*end || (mult > 1 && n > (uint64_t)INT64_MAX / mult))
        return false;
    *out = (int64_t)(n * mult);
    return true;
}

static int parse_listen(struct srv_config *c, const char *v, const char *label, char *err,
                        size_t errlen)
{
    const char *colon = strrchr(v, ':');
    if (!colon || colon == v)
        return fail(err, errlen, "%s: want HOST:PORT, got \"%s\"", label, v);
    size_t hl = (size_t)(colon - v);
    const char *h = v;
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') { /* [::1]:8080 */
        h++;
        hl -= 2;
    }
    if (hl == 0 || hl >= sizeof(c->listen_host))
        return fail(err, errlen, "%s: bad host in \"%s\"", label, v);
    int64_t port;
    if (!parse_num(colon + 1, false, &port) || port > 65535)
        return fail(err, errlen, "%s: port must be 0-65535, got \"%s\"", label, colon + 1);
    memcpy(c->listen_host, h, hl);
    c->listen_host[hl] = '\0';
    c->listen_port = (uint16_t)port;
    return 0;
}

/* --hedge-after-ms: auto, or a whole number of ms within the bounds. */
static int set_hedge(struct srv_config *c, const struct opt *o, const char *v, const char *label,
                     char *err, size_t errlen)
{
    int64_t n = 0;
    if (!strcmp(v, "auto")) {
        c->hedge_auto = true;
        c->hedge_after_ms = 0;
        return 0;
    }
    if (!parse_num(v, false, &n) || n < o->min || n > o->max)
        return fail(err, errlen,
                    "%s: want auto or a whole number from %" PRId64 " to %" PRId64 ", got \"%s\"",
                    label, o->min, o->max, v);
    c->hedge_auto = false;
    c->hedge_after_ms = n;
    return 0;
}

/* A path setting (--upstreams-file, --health-path): 1 byte to its field's size. */
static int set_path(struct srv_config *c, const struct opt *o, const char *v, const char *label,
                    char *err, size_t errlen)
{
    size_t cap = o->off == offsetof(struct srv_config, health_path) ? sizeof(c->health_path)
                                                                   : sizeof(c->upstreams_file);
    if (!v[0] || strlen(v) >= cap)
        return fail(err, errlen, "%s: want 1 to %zu bytes, got %zu", label, cap - 1, strlen(v));
    memcpy((char *)c + o->off, v, strlen(v) + 1);
    return 0;
}

/* A factor (--balance-factor): 0 (off), or a decimal number from 1 to 100. */
static int set_factor(struct srv_config *c, const struct opt *o, const char *v, const char *label,
                      char *err, size_t errlen)
{
    char *end;
    errno = 0;
    double f = strtod(v, &end);
    if (!isdigit((unsigned char)v[0]) || *end || errno || !(f == 0 || (f >= 1 && f <= 100)))
        return fail(err, errlen, "%s: want 0 (off) or a number from 1 to 100, got \"%s\"", label,
                    v);
    *(double *)((char *)c + o->off) = f;
    return 0;
}

/* Sets one option from text; 'label' names where it came from ("--limit", "FANOUT_LIMIT"). */
/* The flags that name one of two words. */
static int set_choice(struct srv_config *c, const struct opt *o, const char *v, const char *label,
                      char *err, size_t errlen)
{
    static const char *const words[][2] = {[K_POLICY] = {"replicas", "shards"},
                                           [K_DISCOVERY] = {"static", "dns"},
                                           [K_LOOPS] = {"split", "shared"}};
    const char *const *w = words[o->kind];
    bool second = !strcmp(v, w[1]);
    if (!second && strcmp(v, w[0]) != 0)
        return fail(err, errlen, "%s: want %s or %s, got \"%s\"", label, w[0], w[1], v);
    if (o->kind == K_POLICY)
        c->upstream_policy = second ? UPSTREAM_SHARDS : UPSTREAM_REPLICAS;
    else
        *(bool *)((char *)c + o->off) = second;
    return 0;
}

static int set_opt(struct srv_config *c, const struct opt *o, const char *v, const char *label,
                   char *err, size_t errlen)
{
    char *base = (char *)c;
    int64_t n = 0;
    switch (o->kind) {
    case K_LISTEN:
        return parse_listen(c, v, label, err, errlen);
    case K_UPSTREAM:
        return add_upstreams(c, v, strncmp(label, "FANOUT_", 7) == 0, label, err, errlen);
    case K_POLICY:
    case K_DISCOVERY:
    case K_LOOPS:
        return set_choice(c, o, v, label, err, errlen);
    case K_HEDGE:
        return set_hedge(c, o, v, label, err, errlen);
    case K_PATH:
        return set_path(c, o, v, label, err, errlen);
    case K_FACTOR:
        return set_factor(c, o, v, label, err, errlen);
    case K_BOOL:
    case K_ONOFF: {
        bool b;
        if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on"))
            b = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off"))
            b = false;
        else
            return fail(err, errlen, o->kind == K_ONOFF ? "%s: want on or off, got \"%s\""
                                                        : "%s: want true or false, got \"%s\"",
                        label, v);
        *(bool *)(base + o->off) = b;
        return 0;
    }
    case K_LEVEL:
        for (int l = LOG_ERROR; l <= LOG_DEBUG; l++)
            if (!strcmp(v, log_level_name((enum log_level)l))) {
                *(enum log_level *)(base + o->off) = (enum log_level)l;
                return 0;
            }
        return fail(err, errlen, "%s: want error, warn, info or debug, got \"%s\"", label, v);
    case K_INT:
    case K_UINT:
    case K_MS:
    case K_SIZE:
        if (!parse_num(v, o->kind == K_SIZE, &n) || n < o->min || n > o->max)
            return fail(err, errlen,
                        "%s: want a whole number from %" PRId64 " to %" PRId64 "%s, got \"%s\"",
                        label, o->min, o->max,
                        o->kind == K_SIZE ? " (optional KiB/MiB/GiB suffix)" : "", v);
        if (o->kind == K_INT)
            *(int *)(base + o->off) = (int)n;
        else if (o->kind == K_UINT)
            *(unsigned *)(base + o->off) = (unsigned)n;
        else if (o->kind == K_MS)
            *(int64_t *)(base + o->off) = n;
        else
            *(size_t *)(base + o->off) = (size_t)n;
        if (o->off == offsetof(struct srv_config, timeout_ms))
            c->timeout_ms_given = true;
        if (o->off == offsetof(struct srv_config, max_clients_per_ip))
            c->max_clients_per_ip_given = true;
        return 0;
    }
    return -EINVAL;
}

static const struct opt *find_opt(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++)
        if (strlen(opts[i].name) == len && !strncmp(opts[i].name, name, len))
            return &opts[i];
    return NULL;
}

static int apply_env(struct srv_config *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
        char var[64] = "FANOUT_";
        size_t k = strlen(var);
        for (const char *p = opts[i].name; *p && k < sizeof(var) - 1; p++)
            var[k++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
        var[k] = '\0';
        const char *v = getenv(var);
        if (!v)
            continue;
        char label[96];
        snprintf(label, sizeof(label), "%s (--%s)", var, opts[i].name);
        int rc = set_opt(c, &opts[i], v, label, err, errlen);
        if (rc)
            return rc;
    }
    return 0;
}

int config_resolve_listen(const struct srv_config *c, struct sockaddr_storage *ss, char *err,
                          size_t errlen)
{
    const char *h = c->listen_host;
    if (h[strspn(h, "0123456789.")] == '\0') { /* looks like IPv4: never a name to look up */
        struct in_addr a;
        if (inet_pton(AF_INET, h, &a) != 1)
            return fail(err, errlen, "--listen: \"%s\" is not a valid IPv4 address", h);
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res;
    char port[8];
    snprintf(port, sizeof(port), "%u", c->listen_port);
    int rc = getaddrinfo(h, port, &hints, &res);
    if (rc != 0)
        return fail(err, errlen, "--listen: cannot resolve \"%s\": %s", h, gai_strerror(rc));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    return 0;
}

/* Reads and parses the upstreams file into t[] (pointers into 'text', malloc'd for the caller).
 * Returns how many, or -EINVAL with the reason. */
static int read_upstreams_file(const char *path, char **text, const char **t, unsigned max,
                               char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return fail(err, errlen, "--upstreams-file: cannot open %s: %s", path, strerror(errno));
    char *buf = malloc(DISCOVER_FILE_MAX + 2);
    size_t got = buf ? fread(buf, 1, DISCOVER_FILE_MAX + 1, f) : 0;
    fclose(f);
    if (!buf)
        return fail(err, errlen, "out of memory");
    *text = buf;
    buf[got] = 0;
    if (got > DISCOVER_FILE_MAX || memchr(buf, 0, got))
        return fail(err, errlen, "--upstreams-file: %s is over %d bytes or holds a NUL byte",
                    path, DISCOVER_FILE_MAX);
    char why[256];
    int n = discover_parse_file(buf, t, max, why, sizeof(why));
    if (n < 0)
        return fail(err, errlen, "--upstreams-file: %s: %s", path, why);
    if (n == 0)
        return fail(err, errlen, "--upstreams-file: %s has no upstream in it", path);
    return n;
}

/* The upstreams: exactly one of --upstream, --upstreams-file, --demo (or --demo-upstream-only
 * alone), each template valid and the list a valid set. */
static int check_upstreams(const struct srv_config *c, char *err, size_t errlen)
{
    bool file = c->upstreams_file[0] != 0;
    if (c->demo_upstream_only && (c->demo || c->upstream[0] || file))
        return fail(err, errlen, "--demo-upstream-only excludes --demo and --upstream");
    if (c->demo && (c->upstream[0] || file))
        return fail(err, errlen, "--demo and --upstream%s exclude each other",
                    file ? "s-file" : "");
    if (file && c->upstream[0])
        return fail(err, errlen, "--upstream and --upstreams-file exclude each other");
    if (!c->demo && !c->upstream[0] && !c->demo_upstream_only && !file)
        return fail(err, errlen,
                    "--upstream is required (or --demo for the built-in demo upstream)");
    if (c->demo_members > 1 && !c->demo)
        return fail(err, errlen, "--demo-members %u needs --demo", c->demo_members);
    if (c->demo || c->demo_upstream_only)
        return 0;
    const char *t[UPSTREAMS_MAX + 1];
    char list[sizeof(c->upstream)], *text = NULL;
    int n;
    if (file) {
        n = read_upstreams_file(c->upstreams_file, &text, t, UPSTREAMS_MAX, err, errlen);
    } else {
        memcpy(list, c->upstream, sizeof(list));
        n = (int)config_split_upstreams(list, t, UPSTREAMS_MAX + 1);
        if (n > UPSTREAMS_MAX)
            n = fail(err, errlen, "--upstream: more than %d upstreams", UPSTREAMS_MAX);
    }
    struct upstreams_opts uo = {.policy = c->upstream_policy,
                                .eject_after = c->eject_after,
                                .eject_ms = c->eject_ms,
                                .eject_max_ms = c->eject_max_ms,
                                .max_ejected_pct = c->max_ejected_pct};
    struct upstreams *u = NULL;
    char why[512];
    int rc = n < 0 ? n : upstreams_new(t, (unsigned)n, &uo, &u, why, sizeof(why));
    upstreams_free(u);
    free(text);
    if (rc == -ENOMEM)
        return fail(err, errlen, "out of memory");
    if (rc != 0 && n >= 0)
        return fail(err, errlen, "%s: %s", file ? "--upstreams-file" : "--upstream", why);
    return rc;
}

static int check(const struct srv_config *c, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    if (config_resolve_listen(c, &ss, err, errlen) != 0)
        return -EINVAL;
    if (c->max_memory < c->max_request_bytes || c->max_memory < c->max_body)
        return fail(err, errlen,
                    "--max-memory (%zu) must hold at least one --max-request-bytes (%zu) and one "
                    "--max-body (%zu)", c->max_memory, c->max_request_bytes, c->max_body);
    int rc = check_upstreams(c, err, errlen);
    if (rc != 0)
        return rc;
    if (c->health_path[0] && (c->health_path[0] != '/' || strpbrk(c->health_path, " #\t\r\n")))
        return fail(err, errlen, "--health-path: want an absolute path such as /healthz, got \"%s\"",
                    c->health_path);
    if (c->eject_max_ms < c->eject_ms)
        return fail(err, errlen, "--eject-max-ms (%" PRId64 ") is below --eject-ms (%" PRId64 ")",
                    c->eject_max_ms, c->eject_ms);
    if (c->timeout_ms > c->max_timeout_ms)
        return fail(err, errlen,
                    "--timeout-ms (%" PRId64 ") exceeds --max-timeout-ms (%" PRId64 ")",
                    c->timeout_ms, c->max_timeout_ms);
    if (c->h2c && !fetch_h2c_supported())
        return fail(err, errlen, "--h2c needs libcurl 8.0.0 or later with HTTP/2 (this one breaks "
                                 "reused HTTP/2 prior-knowledge connections)");
    if (c->max_conns < c->fetch_threads)
        return fail(err, errlen, "--max-conns (%u) must be at least --fetch-threads (%u)",
                    c->max_conns, c->fetch_threads);
    return 0;
}

/* One command-line item: a flag with its value, or an action. */
enum item { ITEM_FLAG, ITEM_HELP, ITEM_VERSION, ITEM_CHECK, ITEM_HEALTHCHECK };

/* Reads the item at argv[*i] (advancing *i past a separate value). Returns 0 and the item (for
 * ITEM_FLAG also the option and its value text), or -EINVAL with the reason in err. */
static int next_item(int argc, char **argv, int *i, enum item *it, const struct opt **o,
                     const char **v, char *err, size_t errlen)
{
    const char *a = argv[*i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
        *it = ITEM_HELP;
        return 0;
    }
    if (!strcmp(a, "--version")) {
        *it = ITEM_VERSION;
        return 0;
    }
    if (!strcmp(a, "--check-config")) {
        *it = ITEM_CHECK;
        return 0;
    }
    if (!strncmp(a, "--healthcheck", 13) && (a[13] == '\0' || a[13] == '=')) {
        const char *path = a[13] ? a + 14 : "/healthz";
        if (path[0] != '/' || strlen(path) >= sizeof(((struct srv_config *)0)->probe_path) ||
            strpbrk(path, " \t\r\n?#"))
            return fail(err, errlen, "--healthcheck: want a path like /readyz, got \"%s\"", path);
        *it = ITEM_HEALTHCHECK;
        *v = path;
        return 0;
    }
    if (strncmp(a, "--", 2) != 0 || a[2] == '\0')
        return fail(err, errlen, "unexpected argument \"%s\" (see --help)", a);
    const char *name = a + 2, *eq = strchr(name, '=');
    size_t len = eq ? (size_t)(eq - name) : strlen(name);
    if (!(*o = find_opt(name, len)))
        return fail(err, errlen, "unknown flag --%.*s (see --help)", (int)len, name);
    if (eq)
        *v = eq + 1;
    else if ((*o)->kind == K_BOOL)
        *v = "true";
    else if (*i + 1 < argc)
        *v = argv[++*i];
    else
        return fail(err, errlen, "--%s needs a value", (*o)->name);
    *it = ITEM_FLAG;
    return 0;
}

int config_parse(struct srv_config *c, int argc, char **argv, enum config_action *action, char *err,
                 size_t errlen)
{
    *action = CONFIG_RUN;
    enum item it;
    const struct opt *o = NULL;
    const char *v = NULL;
    int rc;
    /* First the command line's shape: --help and --version win over anything else, even over
     * a bad environment, and an unknown flag is reported before any value. */
    for (int i = 1; i < argc; i++) {
        if ((rc = next_item(argc, argv, &i, &it, &o, &v, err, errlen)) != 0)
            return rc;
        if (it == ITEM_HELP || it == ITEM_VERSION) {
            *action = it == ITEM_HELP ? CONFIG_HELP : CONFIG_VERSION;
            return 0;
        }
        if (it == ITEM_CHECK)
            *action = CONFIG_CHECK;
        if (it == ITEM_HEALTHCHECK) {
            *action = CONFIG_HEALTHCHECK;
            snprintf(c->probe_path, sizeof(c->probe_path), "%s", v);
        }
    }
    if ((rc = apply_env(c, err, errlen)) != 0)
        return rc;
    bool flag_demo = false, flag_upstream = false, flag_only = false;
    for (int i = 1; i < argc; i++) {
        if ((rc = next_item(argc, argv, &i, &it, &o, &v, err, errlen)) != 0)
            return rc;
        if (it != ITEM_FLAG)
            continue;
        char label[64];
        snprintf(label, sizeof(label), "--%s", o->name);
        bool is_upstream = o->kind == K_UPSTREAM;
        if (is_upstream && !flag_upstream)
            c->upstream[0] = '\0'; /* the flags' list replaces FANOUT_UPSTREAM's */
        if ((rc = set_opt(c, o, v, label, err, errlen)) != 0)
            return rc;
        flag_demo |= !strcmp(o->name, "demo");
        flag_upstream |= is_upstream;
        flag_only |= !strcmp(o->name, "demo-upstream-only");
    }
    /* A flag beats the environment also across this pair: --demo drops FANOUT_UPSTREAM, and
     * --upstream drops FANOUT_DEMO. Both as flags is an error (check()). */
    if (flag_demo && !flag_upstream && c->demo)
        c->upstream[0] = '\0';
    if (flag_upstream && !flag_demo && c->upstream[0])
        c->demo = false;
    if (flag_only && !flag_demo && !flag_upstream && c->demo_upstream_only) {
        c->demo = false;
        c->upstream[0] = '\0';
    }
    if ((flag_demo || flag_upstream) && !flag_only && (c->demo || c->upstream[0]))
        c->demo_upstream_only = false;
    /* The default deadline follows a lower --max-timeout-ms down; an explicit one must fit. */
    if (!c->timeout_ms_given && c->timeout_ms > c->max_timeout_ms)
        c->timeout_ms = c->max_timeout_ms;
    if (!c->max_clients_per_ip_given)
        c->max_clients_per_ip = c->max_clients / 4 ? c->max_clients / 4 : 1;
    if (*action == CONFIG_HEALTHCHECK)
        return 0;
    return check(c, err, errlen);
}

void config_usage(FILE *out)
{
    fprintf(out,
            "usage: fanout [flags]\n"
            "Fetches batches of ids from an upstream HTTP service concurrently.\n"
            "POST /v1/batch {\"ids\":[...],\"timeout_ms\":N}; GET /healthz /readyz /metrics.\n\n"
            "Each flag --name may also be set as FANOUT_NAME (dashes as underscores); flags "
            "win.\n\n");
    for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
        const struct opt *o = &opts[i];
        static const char *const meta[] = {[K_LISTEN] = " HOST:PORT", [K_UPSTREAM] = " URL",
                                           [K_BOOL] = "",          [K_ONOFF] = " on|off",
                                           [K_INT] = " N",
                                           [K_UINT] = " N",        [K_MS] = " MS",
                                           [K_SIZE] = " SIZE",     [K_LEVEL] = " LEVEL",
                                           [K_POLICY] = " POLICY", [K_HEDGE] = " MS|auto",
                                           [K_DISCOVERY] = " dns|static", [K_PATH] = " PATH",
                                           [K_LOOPS] = " shared|split",
                                           [K_FACTOR] = " F"};
        char flag[48];
        snprintf(flag, sizeof(flag), "--%s%s", o->name, meta[o->kind]);
        fprintf(out, "  %-31s %s\n", flag, o->help);
    }
    fprintf(out, "  %-31s %s\n  %-31s %s\n  %-31s %s\n  %-31s %s\n", "--check-config",
            "validate flags and environment, print the effective config as JSON, exit",
            "--healthcheck[=PATH]",
            "GET PATH [/healthz] on the --listen port over loopback: exit 0 on 200, else 1",
            "--version",
            "print the version and exit", "-h, --help", "this text");
    fprintf(out, "\nN is a whole number, MS milliseconds; SIZE takes an optional KiB, MiB or GiB "
                 "(or K, M, G) suffix;\nbooleans are true/false, yes/no, on/off or 1/0.\n"
                 "Exit status: 0 after a clean stop (or --help, --version, --check-config), 1 if "
                 "the server\ncannot start or stops unclean, 2 for an invalid configuration.\n");
}

void config_print_json(const struct srv_config *c, FILE *out)
{
    struct json_buf b;
    json_buf_init(&b);
    json_buf_append_str(&b, "{\"listen\":");
    char listen[300];
    snprintf(listen, sizeof(listen), strchr(c->listen_host, ':') ? "[%s]:%u" : "%s:%u",
             c->listen_host, c->listen_port);
    json_append_string(&b, listen, strlen(listen));
    char list[sizeof(c->upstream)];
    memcpy(list, c->upstream, sizeof(list));
    const char *t[UPSTREAMS_MAX];
    unsigned n = config_split_upstreams(list, t, UPSTREAMS_MAX);
    json_buf_append_str(&b, ",\"upstream\":"); /* one: a string; several: a list */
    if (n <= 1) {
        json_append_string(&b, n ? t[0] : "", n ? strlen(t[0]) : 0);
    } else {
        for (unsigned i = 0; i < n; i++) {
            json_buf_append_str(&b, i ? "," : "[");
            json_append_string(&b, t[i], strlen(t[i]));
        }
        json_buf_append_char(&b, ']');
    }
    json_buf_printf(&b,
                    ",\"upstream_policy\":\"%s\",\"eject_after\":%u,\"eject_ms\":%" PRId64
                    ",\"eject_max_ms\":%" PRId64 ",\"max_ejected_pct\":%u,\"hedge_after_ms\":",
                    c->upstream_policy == UPSTREAM_SHARDS ? "shards" : "replicas", c->eject_after,
                    c->eject_ms, c->eject_max_ms, c->max_ejected_pct);
    if (c->hedge_auto)
        json_buf_append_str(&b, "\"auto\"");
    else
        json_buf_printf(&b, "%" PRId64, c->hedge_after_ms);
    json_buf_printf(&b,
                    ",\"upstream_discovery\":\"%s\",\"resolve_every_ms\":%" PRId64
                    ",\"resolve_hold_ms\":%" PRId64 ",\"max_members\":%u,\"slow_start_ms\":%" PRId64
                    ",\"balance_factor\":%g,\"health_every_ms\":%" PRId64
                    ",\"health_timeout_ms\":%" PRId64 ",\"healthy_after\":%u,\"unhealthy_after\":%u",
                    c->discovery_dns ? "dns" : "static", c->resolve_every_ms, c->resolve_hold_ms,
                    c->max_members, c->slow_start_ms, c->balance_factor, c->health_every_ms,
                    c->health_timeout_ms, c->healthy_after, c->unhealthy_after);
    json_buf_append_str(&b, ",\"upstreams_file\":");
    json_append_string(&b, c->upstreams_file, strlen(c->upstreams_file));
    json_buf_append_str(&b, ",\"health_path\":");
    json_append_string(&b, c->health_path, strlen(c->health_path));
    json_buf_printf(&b, ",\"hedge_budget_pct\":%u,\"retries\":%u,\"retry_budget_pct\":%u"
                        ",\"coalesce\":%s",
                    c->hedge_budget_pct, c->retries, c->retry_budget_pct,
                    c->coalesce ? "true" : "false");
    json_buf_printf(
        &b,
        ",\"demo\":%s,\"demo_members\":%u,\"demo_upstream_only\":%s,\"limit\":%d,"
        "\"spread_min\":%u,\"max_conns\":%u,\"max_batch\":%u,"
        "\"max_requests\":%u,\"timeout_ms\":%" PRId64 ",\"max_timeout_ms\":%" PRId64
        ",\"max_body\":%zu,\"upstream_buffer\":%zu,\"max_request_bytes\":%zu,"
        "\"max_response_bytes\":%zu,\"http_threads\":%u,"
        "\"fetch_threads\":%u,\"loop_model\":\"%s\",\"drain_ms\":%" PRId64 ",\"log_level\":\"%s\","
        "\"max_clients\":%u,\"idle_timeout_s\":%u,\"connect_timeout_ms\":%" PRId64 ",\"h2c\":%s,"
        "\"header_timeout_ms\":%" PRId64 ",\"body_timeout_ms\":%" PRId64
        ",\"max_clients_per_ip\":%u,\"max_memory\":%zu,\"linger_ms\":%" PRId64
        ",\"linger_bytes\":%zu}",
        c->demo ? "true" : "false", c->demo_members, c->demo_upstream_only ? "true" : "false",
        c->limit, c->spread_min, c->max_conns, c->max_batch, c->max_requests,
        c->timeout_ms, c->max_timeout_ms, c->max_body, c->upstream_buffer, c->max_request_bytes,
        c->max_response_bytes, c->http_threads,
        c->fetch_threads, c->loop_shared ? "shared" : "split", c->drain_ms, log_level_name(c->log_level), c->max_clients,
        c->idle_timeout_s, c->connect_timeout_ms, c->h2c ? "true" : "false", c->header_timeout_ms,
        c->body_timeout_ms, c->max_clients_per_ip, c->max_memory, c->linger_ms, c->linger_bytes);
    if (!json_buf_failed(&b))
        fwrite(b.data, 1, b.len, out);
    json_buf_destroy(&b);
}
