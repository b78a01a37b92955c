/* resolve: fetch's name resolver (see resolve.h for why it exists).
 *
 * DESIGN
 * A small cache of entries, one per host name, and a FIFO of entries to look up, both guarded by
 * one mutex. A loop thread asking for a name gets the cached answer when there is one (an answer
 * past its time is still used while a fresh lookup runs in the background, so a slow resolver
 * never stalls a name that resolved before); otherwise it holds the entry, which is queued for
 * lookup unless a lookup of it is already queued or running, and its transfer waits outside
 * curl. A fixed number of resolver threads, started with the engine, pop entries,
 * run the lookup with the mutex released, store the answer (or the failure, kept a shorter
 * time), then call notify() with no lock held; the engine wakes its loops, which poll the
 * entries their transfers hold. Any number of transfers on any loops share one lookup.
 *
 * A lookup cannot be interrupted, and none needs to be: a transfer that is aborted while its
 * name is being looked up just drops its hold on the entry. Only fetch__resolver_free() waits
 * for lookups still running (it joins the threads); queued ones are dropped.
 *
 * A queued first lookup that nobody waits for any more (its transfers were canceled or ran out
 * of time) is skipped when its turn comes.
 *
 * Entries are reference counted under the mutex: the table holds one reference, each waiting
 * transfer one, the lookup queue one. At most TABLE_SOFT_MAX entries are kept; past that, an
 * entry nobody holds is evicted for each new one.
 *
 * Locks: 'mu' only; nothing else is taken under it and no callback runs under it. */
#include "fetch/resolve.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define TABLE_SOFT_MAX 256

enum dns_state {
    DNS_NONE, /* never answered */
    DNS_OK,   /* 'addrs' holds the last answer */
    DNS_FAIL, /* the last lookup failed ('gai_err') */
};

struct fetch__dns {
    struct fetch__dns *next;  /* in the table; guarded by mu */
    struct fetch__dns *qnext; /* in the lookup queue; guarded by mu */
    unsigned refs;            /* table + holders + queue; guarded by mu */
    bool in_table;            /* still in the table (not evicted); guarded by mu */
    bool looking;             /* queued or being looked up; guarded by mu */
    enum dns_state state;     /* guarded by mu */
    int gai_err;              /* the last failure (EAI_*); guarded by mu */
    int64_t expires;          /* monotonic ms after which the answer is refreshed; guarded by mu */
    char addrs[FETCH__DNS_ADDRS_SIZE]; /* the last answer; guarded by mu */
    char host[];              /* the name; constant */
};

struct fetch_resolver {
    pthread_mutex_t mu;       /* guards everything below that is not constant */
    pthread_cond_t cv;        /* signalled when the queue grows or 'stopping' is set */
    struct fetch__dns *table; /* entries; guarded by mu */
    unsigned nentries;        /* entries in the table; guarded by mu */
    struct fetch__dns *qhead, *qtail; /* lookups to run, FIFO; guarded by mu */
    bool stopping;            /* fetch__resolver_stop() was called; guarded by mu */
    bool started;             /* threads were created; guarded by mu */
    unsigned nthreads;        /* threads to create (constant) */
    unsigned nstarted;        /* threads created; guarded by mu */
    pthread_t *threads;       /* nthreads of them */
    int64_t ttl_ms, neg_ttl_ms; /* answer and failure lifetimes (constant) */
    fetch_lookup_fn lookup;   /* the lookup and its argument (constant) */
    void *lookup_arg;
    void (*notify)(void *);   /* called after each answer, no lock held (constant) */
    void *notify_arg;
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool fetch__host_is_literal(const char *host)
{
    if (host[0] == '[')
        return true; /* curl's URL parser only accepts an IPv6 literal in brackets */
    struct in_addr a4;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return true;
    /* libcurl 7.88 answers these itself, without a lookup (lib/hostip.c, Curl_resolv). */
    size_t n = strlen(host);
    return strcasecmp(host, "localhost") == 0 ||
           (n > 10 && strcasecmp(host + n - 10, ".localhost") == 0);
}

/* ---------------------------------------------------------------- entries */

static void entry_unref_locked(struct fetch_resolver *r, struct fetch__dns *d)
{
    (void)r;
    if (--d->refs == 0)
        free(d);
}

/* Evicts one entry that nobody holds, if there is one. */
static void evict_one_locked(struct fetch_resolver *r)
{
    for (struct fetch__dns **pp = &r->table; *pp; pp = &(*pp)->next) {
        struct fetch__dns *d = *pp;
        if (d->refs == 1 && !d->looking) {
            *pp = d->next;
            d->in_table = false;
            r->nentries--;
            entry_unref_locked(r, d);
            return;
        }
    }
}

static void *resolver_main(void *arg);

/* Starts the threads if they are not running. Returns 0 or a negative errno. */
static int start_locked(struct fetch_resolver *r)
{
    if (r->started)
        return 0;
    while (r->nstarted < r->nthreads) {
        int err = pthread_create(&r->threads[r->nstarted], NULL, resolver_main, r);
        if (err != 0)
            return r->nstarted > 0 ? 0 : -err; /* fewer threads still serve */
        r->nstarted++;
    }
    r->started = true;
    return 0;
}

int fetch__resolver_start(struct fetch_resolver *r)
{
    pthread_mutex_lock(&r->mu);
    int err = start_locked(r);
    pthread_mutex_unlock(&r->mu);
    return err;
}

static void enqueue_locked(struct fetch_resolver *r, struct fetch__dns *d)
{
    d->looking = true;
    d->refs++;
    d->qnext = NULL;
    if (r->qtail)
        r->qtail->qnext = d;
    else
        r->qhead = d;
    r->qtail = d;
    pthread_cond_signal(&r->cv);
}

/* The answer 'd' gives now: 1 (addresses copied), 0 (none yet) or -EHOSTUNREACH. */
static int answer_locked(const struct fetch__dns *d, char *addrs)
{
    switch (d->state) {
    case DNS_OK:
        memcpy(addrs, d->addrs, strlen(d->addrs) + 1);
        return 1;
    case DNS_FAIL:
        snprintf(addrs, FETCH__DNS_ADDRS_SIZE, "could not resolve host %s: %s", d->host,
                 gai_strerror(d->gai_err));
        return -EHOSTUNREACH;
    default:
        return 0;
    }
}

int fetch__resolve(struct fetch_resolver *r, const char *host, char *addrs,
                   struct fetch__dns **wait)
{
    *wait = NULL;
    int64_t now = mono_ms();
    pthread_mutex_lock(&r->mu);
    if (r->stopping) {
        pthread_mutex_unlock(&r->mu);
        snprintf(addrs, FETCH__DNS_ADDRS_SIZE, "fetch engine shutting down");
        return -ESHUTDOWN;
    }
    struct fetch__dns *d = r->table;
    while (d && strcmp(d->host, host) != 0)
        d = d->next;
    if (!d) {
        size_t hl = strlen(host) + 1;
        d = calloc(1, sizeof(*d) + hl);
        if (!d) {
            pthread_mutex_unlock(&r->mu);
            snprintf(addrs, FETCH__DNS_ADDRS_SIZE, "out of memory resolving %s", host);
            return -ENOMEM;
        }
        memcpy(d->host, host, hl);
        if (r->nentries >= TABLE_SOFT_MAX)
            evict_one_locked(r);
        d->refs = 1;
        d->in_table = true;
        d->next = r->table;
        r->table = d;
        r->nentries++;
    }
    bool stale = d->state == DNS_NONE || now >= d->expires;
    if (stale && !d->looking) {
        int err = start_locked(r);
        if (err != 0) {
            pthread_mutex_unlock(&r->mu);
            snprintf(addrs, FETCH__DNS_ADDRS_SIZE, "cannot start the resolver: %s",
                     strerror(-err));
            return -EHOSTUNREACH;
        }
        enqueue_locked(r, d);
    }
    /* A failure past its time waits for the new lookup; an old answer is used meanwhile. */
    int rc = d->state == DNS_FAIL && stale ? 0 : answer_locked(d, addrs);
    if (rc == 0) {
        d->refs++;
        *wait = d;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int fetch__resolve_poll(struct fetch_resolver *r, struct fetch__dns *d, char *addrs)
{
    pthread_mutex_lock(&r->mu);
    int rc = d->looking && d->state != DNS_OK ? 0 : answer_locked(d, addrs);
    if (rc == 0 && !d->looking && d->state == DNS_NONE) {
        /* The lookup was dropped (stopping): report it rather than wait for nothing. */
        snprintf(addrs, FETCH__DNS_ADDRS_SIZE, "fetch engine shutting down");
        rc = -ESHUTDOWN;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

const char *fetch__dns_host(const struct fetch__dns *d)
{
    return d->host;
}

void fetch__resolve_release(struct fetch_resolver *r, struct fetch__dns *d)
{
    pthread_mutex_lock(&r->mu);
    entry_unref_locked(r, d);
    pthread_mutex_unlock(&r->mu);
}

/* ---------------------------------------------------------------- threads */

static void *resolver_main(void *arg)
{
    struct fetch_resolver *r = arg;
    char *buf = malloc(FETCH__DNS_ADDRS_SIZE);
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->stopping && !r->qhead)
            pthread_cond_wait(&r->cv, &r->mu);
        if (r->stopping)
            break;
        struct fetch__dns *d = r->qhead;
        r->qhead = d->qnext;
        if (!r->qhead)
            r->qtail = NULL;
        d->qnext = NULL;
        if (d->state != DNS_OK && d->refs == (d->in_table ? 2u : 1u)) {
            /* Every transfer that wanted this first answer has gone (canceled or past its
             * deadline): skip it, so a backlog of dead names cannot delay live ones. A refresh
             * of a good answer still runs; it serves later transfers. */
            d->looking = false;
            entry_unref_locked(r, d);
            continue;
        }
        pthread_mutex_unlock(&r->mu);

        int rc = buf ? r->lookup(r->lookup_arg, d->host, buf, FETCH__DNS_ADDRS_SIZE) : EAI_MEMORY;
        int64_t now = mono_ms();

        pthread_mutex_lock(&r->mu);
        d->looking = false;
        if (rc == 0 && buf[0]) {
            d->state = DNS_OK;
            snprintf(d->addrs, sizeof(d->addrs), "%s", buf);
            d->expires = now + r->ttl_ms;
        } else {
            d->state = DNS_FAIL;
            d->gai_err = rc != 0 ? rc : EAI_NODATA;
            d->addrs[0] = 0;
            d->expires = now + r->neg_ttl_ms;
        }
        entry_unref_locked(r, d); /* the queue's reference */
        pthread_mutex_unlock(&r->mu);
        r->notify(r->notify_arg);
        pthread_mutex_lock(&r->mu);
    }
    pthread_mutex_unlock(&r->mu);
    free(buf);
    return NULL;
}

struct fetch_resolver *fetch__resolver_new(unsigned threads, int64_t ttl_ms, int64_t neg_ttl_ms,
                                           fetch_lookup_fn lookup, void *lookup_arg,
                                           void (*notify)(void *), void *notify_arg)
{
    struct fetch_resolver *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->threads = calloc(threads ? threads : 1, sizeof(*r->threads));
    if (!r->threads)
        goto fail_free;
    if (pthread_mutex_init(&r->mu, NULL) != 0)
        goto fail_threads;
    if (pthread_cond_init(&r->cv, NULL) != 0)
        goto fail_mutex;
    r->nthreads = threads ? threads : 1;
    r->ttl_ms = ttl_ms;
    r->neg_ttl_ms = neg_ttl_ms;
    r->lookup = lookup ? lookup : fetch_lookup_default;
    r->lookup_arg = lookup_arg;
    r->notify = notify;
    r->notify_arg = notify_arg;
    return r;
fail_mutex:
    pthread_mutex_destroy(&r->mu);
fail_threads:
    free(r->threads);
fail_free:
    free(r);
    return NULL;
}

void fetch__resolver_stop(struct fetch_resolver *r)
{
    pthread_mutex_lock(&r->mu);
    r->stopping = true;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

void fetch__resolver_free(struct fetch_resolver *r)
{
    if (!r)
        return;
    fetch__resolver_stop(r);
    for (unsigned i = 0; i < r->nstarted; i++)
        pthread_join(r->threads[i], NULL);
    /* Nothing runs now: drop the queue's references, then the table's. */
    for (struct fetch__dns *d = r->qhead, *next; d; d = next) {
        next = d->qnext;
        d->looking = false;
        entry_unref_locked(r, d);
    }
    for (struct fetch__dns *d = r->table, *next; d; d = next) {
        next = d->next;
        entry_unref_locked(r, d);
    }
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r->threads);
    free(r);
}
