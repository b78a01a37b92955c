/* srv: the server's lifecycle: libmicrohttpd's daemon and its listener, the threads around it,
 * the drain and the stop. The request machine is conn.c's, admission admit.c's and the NDJSON
 * transport stream.c's (srv.h lists the wing).
 *
 * LIFECYCLE: srv_new() runs a table of steps, each starting one part: the log writer, the root
 * ctx and ctx's timer thread (ctx.h starts it on the first deadline; arming one here moves that
 * out of the first request), the retry and hedge budgets, the upstream set (and the demo
 * upstream), the disconnect watch, the flights, the fetch loops, the batch environment, the
 * connection guard, and last the listener and the daemon. srv_free() undoes every step begun,
 * last first; an undo copes with its own step having failed half way. srv_drain() turns /readyz
 * to 503, stops accepting, waits for batches in flight until the drain deadline, cancels the
 * rest (they answer 503) and waits for their answers, logging each step. The ctx timer is
 * process-wide and stopped by ctx_shutdown() in main.
 *
 * GAUGES: the drain waits on 'active' (admit.h), which falls only when libmicrohttpd reports a
 * request complete (its answer sent), so nothing is cut off mid-write.
 *
 * LOOP MODELS: shared (the default) starts one daemon per fetch loop in external-polling mode,
 * each on its own duplicate of the listening socket, and hands each to its loop as the loop's
 * source (fetch_loop_source()): the loop polls the daemon's epoll descriptor with curl's sockets
 * and runs MHD_run() when it is ready, so a connection's requests, batches and answers all stay
 * on that loop's thread. stop_daemon() takes each daemon back from its loop before stopping it.
 * split starts one daemon with its own --http-threads workers, which hand batches to the loops.
 *
 * THREADS: srv_new(), srv_drain*() and srv_free() run on the owner's thread (main's); the
 * daemons' threads (the fetch loops, or split's workers) call conn.c's handlers and
 * mhd_logger(); outlier ejection's events come from whichever thread noticed them. Counters are relaxed atomics (metrics.h); a scrape reads them
 * without a lock.
 *
 * OWNERSHIP: the server owns every part it starts and frees them in srv_free(); the daemon owns
 * the listening socket once it has started (it closes it in MHD_stop_daemon()). */
#include "server/http/srv.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/batch/attempt.h"
#include "server/batch/batch.h"
#include "server/batch/budget.h"
#include "server/batch/flight.h"
#include "server/demo/set.h"
#include "server/http/guard.h"
#include "server/http/srv_impl.h"
#include "server/http/watch.h"
#include "server/upstream/discover.h"
#include "server/json.h"
#include "server/membudget.h"
#include "server/obs/log.h"
#include "server/obs/metrics.h"
#include "server/version.h"

#define LOG_RING_BYTES (4u << 20)
/* After the drain deadline, how long canceled batches get to send their 503s. */
#define DRAIN_CANCEL_GRACE_MS 5000
#define MHD_LOG_PER_SEC 10
/* Lingering closes at once (each holds a descriptor beyond --max-clients for up to
 * --linger-ms); past it a connection closes at once. */
#define LINGER_MAX 1024
/* Retries the retry budget allows a second whatever the traffic (Finagle's floor). */
#define RETRY_FLOOR_PER_S 10

/* ---------------------------------------------------------------- logs */

/* Logs 'msg' with extra members 'fmt' (",\"key\":value" pieces, printf-style). */
static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    struct srv *s = cls;
    char msg[512];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    /* Closing a connection whose client went away is reported by MHD as an internal error;
     * it is expected here (the request's own log line says client_closed). */
    enum log_level lvl =
        strstr(msg, "Application reported internal error") ? LOG_DEBUG : LOG_WARN;
    if (!log_enabled(s->log, lvl))
        return;
    /* MHD can repeat a message in a tight loop (e.g. out of file descriptors): at most
     * MHD_LOG_PER_SEC lines a second reach the log, the rest are counted as dropped. */
    int64_t sec = ctx_now() / 1000;
    int64_t prev = atomic_load(&s->mhd_log_sec);
    if (prev != sec && atomic_compare_exchange_strong(&s->mhd_log_sec, &prev, sec))
        atomic_store(&s->mhd_log_count, 0);
    if (atomic_fetch_add(&s->mhd_log_count, 1) >= MHD_LOG_PER_SEC) {
        atomic_fetch_add_explicit(&s->metrics.log_dropped, 1, memory_order_relaxed);
        return;
    }
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, lvl, "http");
    json_buf_append_str(&b, ",\"detail\":");
    json_append_string(&b, msg, n);
    log_end(s->log, &b);
    json_buf_destroy(&b);
}

static void log_startup(struct srv *s)
{
    if (!log_enabled(s->log, LOG_INFO))
        return;
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, LOG_INFO, "starting");
    json_buf_printf(&b,
                    ",\"version\":\"%s\",\"pid\":%ld,\"port\":%u,\"loop_model\":\"%s\","
                    "\"http_threads\":%u,\"fetch_threads\":%u",
                    FANOUT_VERSION, (long)getpid(), s->port,
                    s->cfg.loop_shared ? "shared" : "split",
                    s->cfg.http_threads, s->cfg.fetch_threads);
    json_buf_append_str(&b, ",\"upstream\":");
    json_append_string(&b, s->upstream, strlen(s->upstream));
    json_buf_append_str(&b, ",\"upstreams\":[");
    struct upstreams *ups = upstream_live_get(s->ups);
    for (unsigned i = 0; i < upstreams_count(ups); i++) {
        const char *t = upstream_template(ups, i);
        json_buf_append_str(&b, i ? "," : "");
        json_append_string(&b, t, strlen(t));
    }
    upstreams_free(ups);
    json_buf_append_str(&b, "],\"config\":");
    char *cfg = NULL;
    size_t cfglen = 0;
    FILE *mem = open_memstream(&cfg, &cfglen);
    if (mem) {
        config_print_json(&s->cfg, mem);
        fclose(mem);
        json_buf_append(&b, cfg, cfglen);
        free(cfg);
    } else {
        json_buf_append_str(&b, "null");
    }
    log_end(s->log, &b);
    json_buf_destroy(&b);
}

/* Outlier ejection's events, from whichever thread noticed them. */
static void on_upstream_event(void *arg, const char *upstream, const char *member, bool ejected,
                              int64_t ms, uint64_t ejections)
{
    struct srv *s = arg;
    if (ejected)
        log_fieldsf(s->log, LOG_WARN, "upstream ejected",
                   ",\"upstream\":\"%s\",\"member\":\"%s\",\"eject_ms\":%" PRId64
                   ",\"ejections\":%" PRIu64,
                   upstream, member, ms, ejections);
    else
        log_fieldsf(s->log, LOG_INFO, "upstream returned", ",\"upstream\":\"%s\",\"member\":\"%s\"",
                   upstream, member);
}

/* ---------------------------------------------------------------- the steps of srv_new */

static int start_log(struct srv *s, char *err, size_t errlen)
{
    int rc = log_new(s->log_fd, s->cfg.log_level, LOG_RING_BYTES, &s->metrics.log_dropped,
                     &s->log);
    if (rc)
        snprintf(err, errlen, "cannot start the log writer: %s", strerror(-rc));
    return rc;
}

/* The last undo: the closing line of a server that ran, then the log written out. */
static void stop_log(struct srv *s)
{
    if (s->log && s->serving) {
        uint64_t total = 0;
        for (unsigned r = 0; r < ROUTE_COUNT; r++)
            for (unsigned i = 0; i < 600; i++)
                total += atomic_load_explicit(&s->metrics.by_status[r][i], memory_order_relaxed);
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        log_fieldsf(s->log, LOG_INFO, "stopped", ",\"requests\":%" PRIu64 ",\"uptime_s\":%.3f", total,
                   (double)now.tv_sec + (double)now.tv_nsec / 1e9 - s->metrics.start_time);
    }
    log_free(s->log);
    s->log = NULL;
}

static int start_root(struct srv *s, char *err, size_t errlen)
{
    if (!(s->root = ctx_new(ctx_background(), CTX_FOREVER))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    /* Start ctx's timer thread now, not on the first request's deadline, so that every thread
     * the server runs exists once srv_new() returns: arming any deadline starts it (ctx.h), and
     * it keeps running until ctx_shutdown() (main calls it after srv_free()). */
    ctx_free(ctx_with_timeout(ctx_background(), 3600000));
    return 0;
}

static void stop_root(struct srv *s)
{
    ctx_free(s->root);
    s->root = NULL;
}

static int start_budgets(struct srv *s, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    budget_init(&s->hedge_budget, s->cfg.hedge_budget_pct, 0, ctx_now());
    budget_init(&s->retry_budget, s->cfg.retry_budget_pct, RETRY_FLOOR_PER_S, ctx_now());
    return 0;
}

static void stop_budgets(struct srv *s)
{
    budget_destroy(&s->hedge_budget);
    budget_destroy(&s->retry_budget);
}

/* The upstream set: the demo's (its members started here; with several, their name is answered
 * by the demo set's lookup), or --upstream's or the file's, looked up once (the discover thread
 * starts after the fetch loops, which its health checks run on). */
static int start_upstreams(struct srv *s, char *err, size_t errlen)
{
    const struct srv_config *c = &s->cfg;
    const char *tmpls[UPSTREAMS_MAX];
    unsigned ntmpl = 0;
    char *list = NULL;
    int rc;
    fetch_lookup_fn lookup = s->seams.lookup;
    void *lookup_arg = s->seams.lookup_arg;
    if (c->demo) {
        if ((rc = demo_set_start(c->demo_members, &s->demo, err, errlen)) != 0)
            return rc;
        demo_set_url_template(s->demo, s->upstream, sizeof(s->upstream));
        tmpls[ntmpl++] = s->upstream;
        if (!lookup) { /* the demo's name is answered with its members' addresses */
            lookup = demo_set_lookup;
            lookup_arg = s->demo;
        }
    } else if (!c->upstreams_file[0]) {
        if (!(list = strdup(c->upstream))) {
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
        ntmpl = config_split_upstreams(list, tmpls, UPSTREAMS_MAX);
        snprintf(s->upstream, sizeof(s->upstream), "%s", ntmpl ? tmpls[0] : "");
    }
    struct discover_opts o = {
        .set = {.policy = c->upstream_policy,
                .eject_after = c->eject_after,
                .eject_ms = c->eject_ms,
                .eject_max_ms = c->eject_max_ms,
                .max_ejected_pct = c->max_ejected_pct,
                .slow_start_ms = c->slow_start_ms,
                .balance_factor = c->balance_factor,
                .hedge_pct = attempt_hedge_pct(c->hedge_budget_pct),
                .on_event = on_upstream_event,
                .event_arg = s},
        .dns = c->discovery_dns,
        .every_ms = c->resolve_every_ms,
        .hold_ms = c->resolve_hold_ms,
        .max_members = c->max_members,
        .file = c->upstreams_file[0] ? c->upstreams_file : NULL,
        .lookup = lookup,
        .lookup_arg = lookup_arg,
        .file_check_ms = s->seams.file_check_ms,
        .health_path = c->health_path[0] ? c->health_path : NULL,
        .health_every_ms = c->health_every_ms,
        .health_timeout_ms = c->health_timeout_ms,
        .healthy_after = c->healthy_after,
        .unhealthy_after = c->unhealthy_after,
        .log = s->log};
    char derr[512];
    rc = discover_new(&o, tmpls, ntmpl, &s->discover, derr, sizeof(derr));
    free(list);
    if (rc != 0) {
        snprintf(err, errlen, "%s: %s", c->upstreams_file[0] ? "--upstreams-file" : "--upstream",
                 rc == -EINVAL ? derr : strerror(-rc));
        return rc;
    }
    s->ups = discover_live(s->discover);
    if (c->upstreams_file[0]) {
        struct upstreams *u = upstream_live_get(s->ups);
        snprintf(s->upstream, sizeof(s->upstream), "%s", upstream_template(u, 0));
        upstreams_free(u);
    }
    return 0;
}

static void stop_upstreams(struct srv *s)
{
    discover_free(s->discover);
    s->discover = NULL;
    s->ups = NULL;
    demo_set_stop(s->demo);
    s->demo = NULL;
}

/* The discover thread: lookups, the file, health checks (on the fetch loops). */
static int start_discovery(struct srv *s, char *err, size_t errlen)
{
    int rc = discover_start(s->discover, s->fetch);
    if (rc != 0)
        snprintf(err, errlen, "cannot start the upstream discovery thread: %s", strerror(-rc));
    return rc;
}

static void stop_discovery(struct srv *s)
{
    discover_stop(s->discover);
}

static int start_watch(struct srv *s, char *err, size_t errlen)
{
    int rc = watch_new(&s->watch);
    if (rc != 0)
        snprintf(err, errlen, "cannot start the disconnect watch: %s", strerror(-rc));
    return rc;
}

static void stop_watch(struct srv *s)
{
    watch_free(s->watch);
    s->watch = NULL;
}

static int start_flights(struct srv *s, char *err, size_t errlen)
{
    if (!(s->flights = flights_new())) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

static void stop_flights(struct srv *s)
{
    flights_free(s->flights); /* every flight ended with the engine's last callback */
    s->flights = NULL;
}

static int start_fetch(struct srv *s, char *err, size_t errlen)
{
    struct fetch_opts fo;
    fetch_opts_default(&fo);
    fo.loops = s->cfg.fetch_threads;
    fo.max_conns = s->cfg.max_conns;
    fo.max_body = s->cfg.max_body;
    fo.recv_buffer = s->cfg.upstream_buffer;
    fo.connect_timeout_ms = s->cfg.connect_timeout_ms;
    fo.h2c = s->cfg.h2c;
    int rc = fetch_new(&fo, &s->fetch);
    if (rc == -ENOTSUP) { /* a configuration this build cannot serve: exit 2 */
        rc = -EINVAL;
        snprintf(err, errlen, "--h2c needs libcurl 8.0.0 or later with HTTP/2 (this is %s: "
                 "it breaks reused HTTP/2 prior-knowledge connections)",
                 curl_version_info(CURLVERSION_NOW)->version);
    } else if (rc != 0) {
        snprintf(err, errlen, "cannot start the fetch loops: %s", strerror(-rc));
    }
    return rc;
}

static void stop_fetch(struct srv *s)
{
    fetch_free(s->fetch);
    s->fetch = NULL;
}

/* Every client connection and every upstream connection is a descriptor. When RLIMIT_NOFILE
 * cannot hold --max-clients + --max-conns + LINGER_MAX (+ a margin for the process's own), the
 * server would hit EMFILE at accept time, where libmicrohttpd busy-waits; lower --max-clients
 * instead, and say so. */
static void fit_fd_budget(struct srv *s)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return;
    uint64_t reserve = (uint64_t)s->cfg.max_conns + 64 + LINGER_MAX;
    if ((uint64_t)s->cfg.max_clients + reserve <= rl.rlim_cur)
        return;
    uint64_t fit = rl.rlim_cur > reserve + 16 ? rl.rlim_cur - reserve : 16;
    log_fieldsf(s->log, LOG_WARN, "--max-clients lowered to fit RLIMIT_NOFILE",
               ",\"max_clients\":%" PRIu64 ",\"requested\":%u,\"rlimit_nofile\":%" PRIu64, fit,
               s->cfg.max_clients, (uint64_t)rl.rlim_cur);
    s->cfg.max_clients = (unsigned)fit;
}

/* What every batch runs with, and --max-memory; --max-clients fitted to the descriptors. */
static int start_env(struct srv *s, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    const struct srv_config *c = &s->cfg;
    fit_fd_budget(s);
    s->env = (struct batch_env){.flight = {.fetch = s->fetch,
                                           .ups = s->ups,
                                           .root = s->root,
                                           .hedge_budget = &s->hedge_budget,
                                           .retry_budget = &s->retry_budget,
                                           .metrics = &s->metrics,
                                           .flights = s->flights,
                                           .hedge_after_ms = c->hedge_after_ms,
                                           .hedge_auto = c->hedge_auto,
                                           .retries = c->retries},
                                .limit = c->limit,
                                .max_response_bytes = c->max_response_bytes,
                                .max_body = c->max_body,
                                .coalesce = c->coalesce,
                                .spread_min = c->spread_min};
    membudget_init(&s->mem, c->max_memory);
    s->env.mem = &s->mem;
    return 0;
}

static int start_guard(struct srv *s, char *err, size_t errlen)
{
    struct guard_opts go = {.header_timeout_ms = s->cfg.header_timeout_ms,
                            .body_timeout_ms = s->cfg.body_timeout_ms,
                            .linger_ms = s->cfg.linger_ms,
                            .linger_bytes = s->cfg.linger_bytes,
                            .max_lingering = LINGER_MAX,
                            .max_per_ip = s->cfg.max_clients_per_ip, /* one count for every
                                                                        daemon */
                            .on_timeout = conn_on_guard_timeout,
                            .new_id = conn_new_id,
                            .arg = s};
    int rc = guard_new(&go, &s->guard);
    if (rc != 0)
        snprintf(err, errlen, "cannot start the connection guard: %s", strerror(-rc));
    return rc;
}

static void stop_guard(struct srv *s)
{
    guard_free(s->guard); /* after the daemon: no connection is registered any more */
    s->guard = NULL;
}

/* ---------------------------------------------------------------- the listener and daemon */

/* Binds and listens on 'ss' ourselves, so a failure names its real reason and port (for the
 * socket handed to libmicrohttpd, MHD_OPTION_LISTEN_SOCKET). Returns the descriptor, or
 * -errno with the reason in err. */
static int bind_listen(const struct srv_config *c, const struct sockaddr_storage *ss, char *err,
                       size_t errlen)
{
    const char *fmt = strchr(c->listen_host, ':') ? "[%s]:%u" : "%s:%u";
    char where[300];
    snprintf(where, sizeof(where), fmt, c->listen_host, c->listen_port);
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot listen on %s: socket: %s", where, strerror(e));
        return -e;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)); /* restarts: TIME_WAIT */
    if (ss->ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    socklen_t len = ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                              : sizeof(struct sockaddr_in);
    if (bind(fd, (const struct sockaddr *)ss, len) != 0 || listen(fd, 4096) != 0) {
        int e = errno;
        snprintf(err, errlen, "cannot listen on %s: %s", where, strerror(e));
        close(fd);
        return -e;
    }
    return fd;
}

/* Starts a libmicrohttpd daemon on the listening socket 'lfd': its own thread pool (split), or
 * polled by the caller (shared: 'n' daemons, one per fetch loop, share the connection limits).
 * NULL when it refuses (its reason is logged through mhd_logger()). */
static struct MHD_Daemon *start_mhd(struct srv *s, int lfd, bool ipv6, unsigned n)
{
    const struct srv_config *c = &s->cfg;
    unsigned flags = (c->loop_shared ? MHD_USE_EPOLL : MHD_USE_EPOLL_INTERNAL_THREAD) |
                     MHD_ALLOW_SUSPEND_RESUME | MHD_USE_TURBO | MHD_USE_ERROR_LOG;
    if (ipv6)
        flags |= MHD_USE_IPv6;
    unsigned limit = c->max_clients / n ? c->max_clients / n : 1;
    struct MHD_OptionItem opts[] = {
        {MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_logger, s}, /* first, to catch all */
        {MHD_OPTION_LISTEN_SOCKET, lfd, NULL},
        {MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)conn_on_connection, s},
#if MHD_VERSION >= 0x00097701
        /* libmicrohttpd 1.0: refuse what RFC 9112 lets a server refuse (obs-fold, bare CR or
         * LF, whitespace before a colon, malformed chunk sizes) at its strictest level. */
        {MHD_OPTION_CLIENT_DISCIPLINE_LVL, 3, NULL},
#endif
        {MHD_OPTION_CONNECTION_LIMIT, limit, NULL},
        {MHD_OPTION_CONNECTION_TIMEOUT, c->idle_timeout_s, NULL},
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, 64 * 1024, NULL},
        {MHD_OPTION_LISTEN_BACKLOG_SIZE, 4096, NULL},
        {MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)conn_on_completed, s},
        {!c->loop_shared && c->http_threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END,
         c->http_threads, NULL},
        {MHD_OPTION_END, 0, NULL},
    };
    return MHD_start_daemon(flags, 0, NULL, NULL, conn_on_request, s, MHD_OPTION_ARRAY, opts,
                            MHD_OPTION_END);
}

/* A shared loop's source (fetch.h): its daemon's connections and listener. */
static void mhd_source_run(void *arg)
{
    MHD_run(arg);
}

static int64_t mhd_source_timeout(void *arg)
{
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(arg, &ms) != MHD_YES)
        return -1;
    return ms > (MHD_UNSIGNED_LONG_LONG)INT32_MAX ? INT32_MAX : (int64_t)ms;
}

/* Shared: hands daemon i to fetch loop i, which polls it from now on. */
static int attach_mhd(struct srv *s, unsigned i, char *err, size_t errlen)
{
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd[i], MHD_DAEMON_INFO_EPOLL_FD);
    struct fetch_source src = {.fd = di ? di->epoll_fd : -1,
                               .run = mhd_source_run,
                               .timeout_ms = mhd_source_timeout,
                               .arg = s->mhd[i]};
    int rc = di ? fetch_loop_source(s->fetch, i, &src) : -EIO;
    if (rc != 0) {
        snprintf(err, errlen, "cannot hand the HTTP front end to fetch loop %u", i);
        return rc == -EINVAL ? -EIO : rc;
    }
    s->nsources = i + 1;
    return 0;
}

/* The daemons on 'lfd' (taken): one, or one per fetch loop on duplicates of it (shared). */
static int start_mhds(struct srv *s, int lfd, bool ipv6, char *err, size_t errlen)
{
    const struct srv_config *c = &s->cfg;
    unsigned n = c->loop_shared ? fetch_loops(s->fetch) : 1;
    if (!(s->mhd = calloc(n, sizeof(*s->mhd)))) {
        close(lfd);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (unsigned i = 0; i < n; i++) {
        int fd = i + 1 < n ? fcntl(lfd, F_DUPFD_CLOEXEC, 0) : lfd; /* the last takes lfd */
        if (fd < 0 || !(s->mhd[i] = start_mhd(s, fd, ipv6, n))) {
            int e = fd < 0 ? errno : EIO;
            if (fd >= 0)
                close(fd);
            if (fd != lfd)
                close(lfd);
            snprintf(err, errlen, "cannot start the HTTP front end on %s:%u (%s)",
                     c->listen_host, c->listen_port,
                     fd < 0 ? strerror(e) : "libmicrohttpd's reason is in the log above");
            return -e;
        }
        s->nmhd = i + 1;
        if (c->loop_shared) {
            int rc = attach_mhd(s, i, err, errlen);
            if (rc != 0) {
                if (fd != lfd)
                    close(lfd);
                return rc;
            }
        }
    }
    return 0;
}

/* The last step: the listening socket, then the daemons on it, and the port it got. */
static int start_daemon(struct srv *s, char *err, size_t errlen)
{
    const struct srv_config *c = &s->cfg;
    struct sockaddr_storage ss;
    int rc = config_resolve_listen(c, &ss, err, errlen);
    if (rc != 0)
        return rc;
    int lfd = bind_listen(c, &ss, err, errlen);
    if (lfd < 0)
        return lfd == -EINVAL ? -EADDRNOTAVAIL : lfd; /* exit 1: the system refused, not the
                                                         config */
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    s->port = c->listen_port;
    if (getsockname(lfd, (struct sockaddr *)&bound, &blen) == 0)
        s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                    : ((struct sockaddr_in *)&bound)->sin_port);
    return start_mhds(s, lfd, ss.ss_family == AF_INET6, err, errlen);
}

/* Shared: each loop lets go of its daemon first (fetch_loop_source() returns once it has), so
 * that no loop runs a daemon while it stops. */
static void stop_daemon(struct srv *s)
{
    for (unsigned i = 0; i < s->nsources; i++)
        fetch_loop_source(s->fetch, i, NULL);
    s->nsources = 0;
    for (unsigned i = 0; i < s->nmhd; i++)
        MHD_stop_daemon(s->mhd[i]);
    s->nmhd = 0;
    free(s->mhd);
    s->mhd = NULL;
}

/* srv_new()'s steps in order. srv_free() undoes them last first, which is the order they must
 * stop in: the daemon first (no connection is suspended or registered any more), then the
 * guard, the fetch loops (every flight ends with their last callback), the flights, the watch,
 * and so on down to the log, last so that every step before it can still log. */
static const struct step {
    int (*run)(struct srv *s, char *err, size_t errlen); /* 0, or -errno with err filled */
    void (*undo)(struct srv *s);                         /* NULL: nothing to undo */
} steps[] = {
    {start_log, stop_log},
    {start_root, stop_root},
    {start_budgets, stop_budgets},
    {start_upstreams, stop_upstreams},
    {start_watch, stop_watch},
    {start_flights, stop_flights},
    {start_fetch, stop_fetch},
    {start_discovery, stop_discovery},
    {start_env, NULL},
    {start_guard, stop_guard},
    {start_daemon, stop_daemon},
};

int srv_new(const struct srv_config *cfg, int log_fd, struct srv **out, char *err, size_t errlen)
{
    return srv_new_seams(cfg, log_fd, NULL, out, err, errlen);
}

int srv_new_seams(const struct srv_config *cfg, int log_fd, const struct srv_seams *seams,
                  struct srv **out, char *err, size_t errlen)
{
    struct srv *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->cfg = *cfg;
    if (seams)
        s->seams = *seams;
    s->log_fd = log_fd;
    metrics_init(&s->metrics);
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca; /* drain waits are on the monotonic clock, like every deadline */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    s->id_seed = (uint64_t)ts.tv_nsec * 6364136223846793005ull ^ (uint64_t)getpid() << 32 ^
                 (uint64_t)ts.tv_sec;
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        s->steps = (unsigned)i + 1; /* begun: undone even if it fails half way */
        int rc = steps[i].run(s, err, errlen);
        if (rc != 0) {
            srv_free(s);
            return rc;
        }
    }
    log_startup(s);
    s->serving = true;
    *out = s;
    return 0;
}

uint16_t srv_port(const struct srv *s)
{
    return s->port;
}

void srv_reload(struct srv *s)
{
    discover_reload(s->discover);
}

uint64_t srv_discover_passes(struct srv *s)
{
    return discover_passes(s->discover);
}

struct demo *srv_demo_member(struct srv *s, unsigned i)
{
    return s->demo ? demo_set_member(s->demo, i) : NULL;
}

/* ---------------------------------------------------------------- drain and stop */

/* Stops accepting: new connections are refused and those waiting in the backlog are reset.
 *
 * Not MHD_quiesce_daemon(): in libmicrohttpd 0.9.75 it races with the epoll workers, which also
 * remove the listening socket from their epoll sets once they see the daemon quiesced; the loser
 * gets ENOENT and MHD_PANIC()s, aborting the process (seen about once in 2,700 drains here).
 * Instead the listening socket's descriptor is replaced, with dup3(), by an eventfd that never
 * becomes ready: the kernel closes the socket (so connects are refused at once and epoll drops it
 * from every worker's set by itself), libmicrohttpd keeps a valid descriptor that it never sees
 * ready, and closes it as usual in MHD_stop_daemon(). */
static void close_listener(struct srv *s)
{
    for (unsigned i = 0; i < s->nmhd; i++) {
        const union MHD_DaemonInfo *di =
            MHD_get_daemon_info(s->mhd[i], MHD_DAEMON_INFO_LISTEN_FD);
        int efd = eventfd(0, EFD_CLOEXEC);
        if (!di || efd < 0 || dup3(efd, di->listen_fd, O_CLOEXEC) < 0)
            log_msg(s->log, LOG_WARN,
                    "could not close the listening socket; it stays open until exit");
        if (efd >= 0)
            close(efd);
    }
}

void srv_drain_start(struct srv *s)
{
    if (atomic_exchange(&s->draining, true))
        return;
    log_fieldsf(s->log, LOG_INFO, "draining", ",\"in_flight\":%" PRIdFAST64 ",\"drain_ms\":%" PRId64,
               atomic_load(&s->active), s->cfg.drain_ms);
    close_listener(s);
}

int64_t srv_in_flight(struct srv *s)
{
    return atomic_load(&s->metrics.in_flight);
}

int64_t srv_active(struct srv *s)
{
    return atomic_load(&s->active);
}

void srv_cancel_all(struct srv *s)
{
    ctx_cancel(s->root, -ESHUTDOWN);
}

/* Waits until no batch is in flight or 'until' (monotonic ms) passes. */
static bool wait_idle(struct srv *s, int64_t until)
{
    pthread_mutex_lock(&s->mu);
    while (atomic_load(&s->active) > 0 && ctx_now() < until) {
        struct timespec ts = {.tv_sec = until / 1000, .tv_nsec = (until % 1000) * 1000000L};
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    bool idle = atomic_load(&s->active) == 0;
    pthread_mutex_unlock(&s->mu);
    return idle;
}

void srv_drain(struct srv *s, int64_t drain_ms)
{
    s->drained = true;
    int64_t t0 = ctx_now();
    srv_drain_start(s);
    int64_t canceled = 0;
    if (!wait_idle(s, t0 + drain_ms)) {
        canceled = atomic_load(&s->active);
        log_fieldsf(s->log, LOG_WARN, "drain deadline passed; canceling batches in flight",
                   ",\"in_flight\":%" PRId64, canceled);
        srv_cancel_all(s);
        wait_idle(s, ctx_now() + DRAIN_CANCEL_GRACE_MS);
    }
    log_fieldsf(s->log, LOG_INFO, "drained",
               ",\"canceled\":%" PRId64 ",\"left\":%" PRIdFAST64 ",\"duration_ms\":%" PRId64,
               canceled, atomic_load(&s->active), ctx_now() - t0);
}

int srv_free(struct srv *s)
{
    if (!s)
        return 0;
    if (s->mhd && !s->drained)
        srv_drain(s, s->cfg.drain_ms);
    if (s->mhd && srv_active(s) > 0) {
        /* Batches that did not end even after their cancellation: MHD_stop_daemon() with
         * suspended connections is an API violation (0.9.75 aborts), and freeing anything they
         * use is unsafe. Leave everything running and tell the caller, who should exit. */
        log_fieldsf(s->log, LOG_ERROR, "batches still in flight after the drain; not stopping",
                   ",\"in_flight\":%" PRIdFAST64, atomic_load(&s->active));
        struct log *l = s->log; /* written out now: the caller is about to exit */
        s->log = NULL;
        log_free(l);
        return -EBUSY;
    }
    for (unsigned i = s->steps; i-- > 0;)
        if (steps[i].undo)
            steps[i].undo(s);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return 0;
}
