/* resolving: transfers waiting for the resolver, outside curl, before they start.
 *
 * Host names are resolved by fetch itself, never by curl: before a transfer with a host name
 * enters the multi, the engine's resolver (resolve.c) answers it from its cache, or the transfer
 * waits on the loop's 'resolving' FIFO (not holding a slot) until a resolver thread answers and
 * wakes the loops ('dns_ready'). It then enters curl with the addresses pinned by
 * CURLOPT_RESOLVE, so curl's threaded resolver, whose abort joins its lookup thread and would
 * block the loop, never runs. A transfer aborted while it waits just drops its hold on the cache
 * entry (its completion releases it). The wait counts against connect_timeout_ms, as curl's own
 * lookup would (fetch__resolving_expire(), checked on every pass; its next expiry bounds the
 * poll).
 *
 * Threads: the loop thread alone; the transfers here are the loop's. The resolver's mutex is
 * never held together with a loop's. */
#include "fetch/fetch_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Copies the URL's host (as curl will look it up) and port. Returns false if curl cannot parse
 * the URL; curl then reports it as it always has. */
static bool url_host(const char *url, char *host, size_t size, long *port)
{
    CURLU *u = curl_url();
    char *h = NULL, *p = NULL;
    bool ok = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK;
#ifdef CURLU_PUNYCODE
    unsigned hflags = CURLU_PUNYCODE; /* curl resolves the ASCII form of a UTF-8 name */
#else
    unsigned hflags = 0;
#endif
    ok = ok && curl_url_get(u, CURLUPART_HOST, &h, hflags) == CURLUE_OK;
    ok = ok && curl_url_get(u, CURLUPART_PORT, &p, CURLU_DEFAULT_PORT) == CURLUE_OK;
    ok = ok && strlen(h) < size;
    if (ok) {
        memcpy(host, h, strlen(h) + 1);
        *port = strtol(p, NULL, 10);
    }
    curl_free(h);
    curl_free(p);
    curl_url_cleanup(u);
    return ok;
}

/* Resolves the host of 'x' before it enters curl. Returns true if 'x' may start now (an IP
 * literal, or the answer is pinned in x->pin); false if it now waits on 'resolving' or was
 * completed (the name did not resolve, or no memory). */
bool fetch__resolving_enter(struct fetch_loop *l, struct xfer *x)
{
    /* Parsing a URL costs more than the rest of a start; one request's URLs share an origin. */
    const char *sep = strstr(x->url, "://");
    size_t olen = sep ? (size_t)(sep + 3 - x->url) + strcspn(sep + 3, "/?#") : 0;
    if (olen == 0 || olen != l->origin_len || memcmp(x->url, l->origin, olen) != 0) {
        l->origin_len = 0;
        if (!url_host(x->url, l->origin_host, sizeof(l->origin_host), &l->origin_port))
            return true;
        l->origin_literal = fetch__host_is_literal(l->origin_host);
        if (olen > 0 && olen < sizeof(l->origin)) {
            memcpy(l->origin, x->url, olen);
            l->origin_len = olen;
        }
    }
    if (l->origin_literal)
        return true;
    const char *host = l->origin_host;
    long port = l->origin_port;
    char addrs[FETCH__DNS_ADDRS_SIZE];
    struct fetch__dns *d = NULL;
    int rc = fetch__resolve(l->f->resolver, host, addrs, &d);
    if (rc == 0) {
        x->dns = d;
        if (x->resolve_t0_us == 0)
            x->resolve_t0_us = fetch__now_us();
        x->where = XFER_RESOLVING;
        fetch__queue_push(&l->resolving, x);
        return false;
    }
    if (rc == -ESHUTDOWN) { /* fetch_free() began: as if this loop had seen it */
        fetch__complete_ctx(l, x, FETCH_ESHUTDOWN);
        return false;
    }
    if (rc < 0) {
        fetch__complete(l, x, FETCH_EUNREACH, addrs);
        return false;
    }
    size_t n = strlen(host) + strlen(addrs) + 32;
    char *entry = malloc(n);
    struct curl_slist *s = NULL;
    if (entry) {
        snprintf(entry, n, "%s:%ld:%s", host, port, addrs);
        s = curl_slist_append(NULL, entry);
        free(entry);
    }
    if (!s) {
        fetch__complete(l, x, FETCH_EUNREACH, "out of memory starting the transfer");
        return false;
    }
    curl_slist_free_all(x->pin);
    x->pin = s;
    return true;
}

/* curl's connect timeout covers its name lookup; ours does too: a transfer that has waited
 * connect_timeout_ms for its name is unreachable (the deadline, if sooner, ends it first, by its
 * ctx hook). Returns the ms until the next such expiry, or -1 if none is pending. */
int64_t fetch__resolving_expire(struct fetch_loop *l)
{
    int64_t cap_ms = l->f->opts.connect_timeout_ms;
    if (!l->resolving.head || cap_ms <= 0)
        return -1;
    struct xfer_queue late = {NULL, NULL};
    int64_t now = fetch__now_us(), next = -1;
    struct xfer *x, *after;
    for (x = l->resolving.head; x; x = after) {
        after = x->next;
        int64_t due = x->resolve_t0_us + cap_ms * 1000;
        if (due <= now) {
            fetch__queue_del(&l->resolving, x);
            fetch__queue_push(&late, x);
            continue;
        }
        int64_t ms = (due - now + 999) / 1000;
        if (next < 0 || ms < next)
            next = ms;
    }
    char buf[320];
    while ((x = fetch__queue_pop(&late)) != NULL) {
        snprintf(buf, sizeof(buf), "resolving host %s took longer than %lld ms",
                 fetch__dns_host(x->dns), (long long)cap_ms);
        fetch__complete(l, x, FETCH_EUNREACH, buf);
    }
    return next;
}

/* After a resolver answer: moves the transfers whose lookup ended to the front of 'waiting', in
 * order, so that they start next (fetch__start() then finds the answer in the cache). */
void fetch__resolving_resume(struct fetch_loop *l)
{
    struct xfer_queue ready = {NULL, NULL};
    char addrs[FETCH__DNS_ADDRS_SIZE];
    struct xfer *x, *after;
    for (x = l->resolving.head; x; x = after) {
        after = x->next;
        if (fetch__resolve_poll(l->f->resolver, x->dns, addrs) == 0)
            continue;
        fetch__resolve_release(l->f->resolver, x->dns);
        x->dns = NULL;
        fetch__queue_del(&l->resolving, x);
        x->where = XFER_WAITING;
        fetch__queue_push(&ready, x);
    }
    fetch__queue_prepend(&l->waiting, &ready);
}
