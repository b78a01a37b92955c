/* fetch: the engine's public face (fetch.h): fetch_new(), fetch_free(), fetch_get() and the
 * counters. How a loop runs is in loop.c, a transfer in curl in xfer.c, the wait for a name in
 * resolving.c, timers in timer.c, events in event.c; fetch_impl.h holds the structures they share.
 *
 * Threads: fetch_new() and fetch_free() run on the owner's thread; fetch_get() and the readers on
 * any thread. fetch_get() allocates a transfer, copies its strings into it and hands it to its
 * loop, which frees it after the callback. fetch_new() starts the resolver threads and then the
 * loops; fetch_free() stops the resolver's queue, tells every loop to stop (each completes what it
 * holds), joins them all before tearing any down (a callback still running on one loop may call
 * fetch_get() on another, which takes that loop's mutex and sees it stopping), then frees the
 * resolver, whose running lookups it waits for, and the loops. */
#include "fetch/fetch_impl.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RESOLVER_THREADS 2  /* default fetch_opts.resolver_threads */
#define DNS_TTL_MS 60000    /* default fetch_opts.dns_ttl_ms (curl's own DNS cache default) */
#define DNS_NEG_TTL_MS 1000 /* longest a failed lookup is remembered */

void fetch_opts_default(struct fetch_opts *o)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    o->loops = n > 0 ? (unsigned)n : 1;
    o->max_conns = 512;
    o->max_body = 1 << 20;
    o->recv_buffer = FETCH_RECV_BUFFER;
    o->connect_timeout_ms = 5000;
    o->h2c = false;
    o->idle_poll_ms = FETCH__POLL_MS;
    o->resolver_threads = RESOLVER_THREADS;
    o->dns_ttl_ms = DNS_TTL_MS;
    o->lookup = NULL;
    o->lookup_arg = NULL;
}

bool fetch_h2c_supported(void)
{
    /* Before 8.0.0, libcurl reusing an HTTP/2 prior-knowledge connection stacks a second HTTP/2
     * layer on it, and every later transfer on it fails with "Error in the HTTP2 framing layer"
     * (curl issue 10634, fixed in 8.0.0). Seen here with 7.88.1 against nginx: with reuse being
     * the point of h2c, such a build must not offer it. */
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
    return v->version_num >= 0x080000 && (v->features & CURL_VERSION_HTTP2);
}

static bool header_value_ok(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return false;
    return true;
}

/* "IPv4:port" or "[IPv6]:port", nothing else: curl is never asked to resolve it. */
static bool connect_to_ok(const char *s)
{
    size_t n = strlen(s);
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || colon[1] == 0 || n > 64 ||
        strspn(colon + 1, "0123456789") != strlen(colon + 1) || strlen(colon + 1) > 5)
        return false;
    char host[65];
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    if (host[0] == '[') {
        size_t hl = strlen(host);
        if (hl < 3 || host[hl - 1] != ']')
            return false;
        host[hl - 1] = 0;
        struct in6_addr a6;
        return inet_pton(AF_INET6, host + 1, &a6) == 1;
    }
    struct in_addr a4;
    return inet_pton(AF_INET, host, &a4) == 1;
}

int fetch_get(struct fetch *f, unsigned loop, struct ctx *c, const struct fetch_req *r)
{
    if (!f || !c || !r || !r->url || !r->cb || loop >= f->nloops)
        return -EINVAL;
    if (r->request_id && !header_value_ok(r->request_id))
        return -EINVAL; /* no header injection through CR/LF */
    if (r->connect_to && !connect_to_ok(r->connect_to))
        return -EINVAL;
    if (atomic_load_explicit(&f->stopping, memory_order_acquire))
        return FETCH_ESHUTDOWN;
    static const char rid_name[] = "X-Request-Id: ";
    size_t ulen = strlen(r->url) + 1;
    size_t rlen = r->request_id ? sizeof(rid_name) - 1 + strlen(r->request_id) + 1 : 0;
    size_t clen = r->connect_to ? 2 + strlen(r->connect_to) + 1 : 0;
    struct xfer *x = calloc(1, sizeof(*x) + ulen + rlen + clen);
    if (!x)
        return -ENOMEM;
    struct fetch_loop *l = &f->loops[loop];
    memcpy(x->strings, r->url, ulen);
    x->url = x->strings;
    if (r->request_id) {
        memcpy(x->strings + ulen, rid_name, sizeof(rid_name) - 1);
        memcpy(x->strings + ulen + sizeof(rid_name) - 1, r->request_id,
               rlen - (sizeof(rid_name) - 1));
        x->request_id = x->strings + ulen;
    }
    if (r->connect_to) { /* "::addr:port": any host and port of the URL goes to addr:port */
        char *ct = x->strings + ulen + rlen;
        memcpy(ct, "::", 2);
        memcpy(ct + 2, r->connect_to, clen - 2);
        x->connect_to.data = ct;
    }
    x->loop = l;
    x->cb = r->cb;
    x->arg = r->arg;
    x->max_body = r->max_body ? r->max_body : f->opts.max_body;
    x->t0_us = fetch__now_us();
    x->ctx = ctx_ref(c);
    atomic_fetch_add_explicit(&f->in_flight, 1, memory_order_relaxed);
    int rc = fetch__loop_hand(l, x);
    if (rc != 0) {
        ctx_unref(x->ctx);
        free(x);
        atomic_fetch_sub_explicit(&f->in_flight, 1, memory_order_relaxed);
    }
    return rc;
}

unsigned fetch_loops(const struct fetch *f)
{
    return f->nloops;
}

unsigned fetch_pick_loop(struct fetch *f)
{
    struct fetch_loop *own = fetch__current(f);
    if (own)
        return (unsigned)(own - f->loops);
    return atomic_fetch_add_explicit(&f->next_loop, 1, memory_order_relaxed) % f->nloops;
}

void fetch_stats(struct fetch *f, struct fetch_stats *s)
{
    s->ok = atomic_load_explicit(&f->outcomes[OUTCOME_OK], memory_order_relaxed);
    s->status = atomic_load_explicit(&f->outcomes[OUTCOME_STATUS], memory_order_relaxed);
    s->unreachable = atomic_load_explicit(&f->outcomes[OUTCOME_UNREACHABLE], memory_order_relaxed);
    s->deadline = atomic_load_explicit(&f->outcomes[OUTCOME_DEADLINE], memory_order_relaxed);
    s->canceled = atomic_load_explicit(&f->outcomes[OUTCOME_CANCELED], memory_order_relaxed);
    s->too_large = atomic_load_explicit(&f->outcomes[OUTCOME_TOO_LARGE], memory_order_relaxed);
    s->in_flight = atomic_load_explicit(&f->in_flight, memory_order_relaxed);
    s->conns_opened = atomic_load_explicit(&f->conns_opened, memory_order_relaxed);
    s->bytes = atomic_load_explicit(&f->bytes, memory_order_relaxed);
}

void fetch_free(struct fetch *f)
{
    if (!f)
        return;
    atomic_store_explicit(&f->stopping, true, memory_order_release);
    if (f->resolver)
        fetch__resolver_stop(f->resolver); /* queued lookups are dropped */
    for (unsigned i = 0; i < f->nloops; i++)
        fetch__loop_stop(&f->loops[i]);
    /* Join every loop before tearing any down: a callback still running on one loop may call
     * fetch_get() on another, which takes that loop's mutex (and then sees 'stopping'). */
    for (unsigned i = 0; i < f->nloops; i++)
        if (f->loops[i].started)
            pthread_join(f->loops[i].thread, NULL);
    /* No transfer holds an entry now. This waits for lookups still running: a lookup cannot be
     * interrupted (it is bounded by the system resolver's own timeouts). */
    fetch__resolver_free(f->resolver);
    for (unsigned i = 0; i < f->nloops; i++)
        fetch__loop_destroy(&f->loops[i]);
    free(f->loops);
    free(f);
}

int fetch_new(const struct fetch_opts *o, struct fetch **out)
{
    *out = NULL;
    if (!o || o->loops == 0 || o->max_conns < o->loops || o->max_body == 0 ||
        o->max_body > SIZE_MAX / 2)
        return -EINVAL;
    if (o->h2c && !fetch_h2c_supported())
        return -ENOTSUP;
    struct fetch *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOMEM;
    f->opts = *o;
    if (f->opts.recv_buffer == 0)
        f->opts.recv_buffer = FETCH_RECV_BUFFER;
    else if (f->opts.recv_buffer < FETCH_RECV_BUFFER_MIN)
        f->opts.recv_buffer = FETCH_RECV_BUFFER_MIN;
    else if (f->opts.recv_buffer > FETCH_RECV_BUFFER_MAX)
        f->opts.recv_buffer = FETCH_RECV_BUFFER_MAX;
    static const char *const proxy_vars[] = {"http_proxy", "HTTP_PROXY", "https_proxy",
                                             "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                                             "no_proxy", "NO_PROXY"};
    for (size_t i = 0; i < sizeof(proxy_vars) / sizeof(proxy_vars[0]); i++)
        if (getenv(proxy_vars[i]))
            f->proxy_env = true;
    f->loops = calloc(o->loops, sizeof(*f->loops));
    if (!f->loops) {
        free(f);
        return -ENOMEM;
    }
    unsigned cap = o->max_conns / o->loops;
    if (cap < 1)
        cap = 1;
    int64_t ttl = o->dns_ttl_ms > 0 ? o->dns_ttl_ms : DNS_TTL_MS;
    f->resolver = fetch__resolver_new(o->resolver_threads ? o->resolver_threads : RESOLVER_THREADS,
                                      ttl, ttl < DNS_NEG_TTL_MS ? ttl : DNS_NEG_TTL_MS, o->lookup,
                                      o->lookup_arg, fetch__dns_ready, f);
    if (!f->resolver) {
        free(f->loops);
        free(f);
        return -ENOMEM;
    }
    int err = fetch__resolver_start(f->resolver);
    for (unsigned i = 0; i < o->loops && !err; i++) {
        err = fetch__loop_init(f, &f->loops[i], cap);
        if (!err)
            f->nloops++;
    }
    for (unsigned i = 0; i < f->nloops && !err; i++) {
        err = -pthread_create(&f->loops[i].thread, NULL, fetch__loop_main, &f->loops[i]);
        if (!err)
            f->loops[i].started = true;
    }
    if (err) {
        fetch_free(f); /* stops and joins what started; nothing was queued */
        return err;
    }
    *out = f;
    return 0;
}
