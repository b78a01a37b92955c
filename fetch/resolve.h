/* resolve: fetch's own name resolver, so that no curl transfer ever waits on a lookup.
 *
 * libcurl 7.88's threaded resolver runs one thread per lookup, and removing a transfer while
 * its lookup runs joins that thread: the loop that aborts it (a cancel or a deadline) blocks
 * until getaddrinfo() returns. fetch therefore resolves names itself, before a transfer enters
 * curl: a fixed set of resolver threads (started by fetch__resolver_start(), joined by
 * fetch__resolver_free()) run the lookups and keep the answers in a cache; a transfer waits for
 * its answer outside curl, where dropping it costs nothing, and enters curl with the answer
 * pinned (CURLOPT_RESOLVE), so curl never resolves it.
 *
 * Internal to fetch/. Loop threads call fetch__resolve*(); resolver threads call the notify
 * function given to fetch__resolver_new() after each answer. */
#ifndef FANOUT_FETCH_RESOLVE_H
#define FANOUT_FETCH_RESOLVE_H

#include <stddef.h>
#include <stdint.h>

#include <stdbool.h>

#include "fetch/lookup.h"

struct fetch_resolver;
struct fetch__dns; /* one cache entry, held by a waiting transfer */

/* Room for an answer: up to FETCH__DNS_MAX_ADDRS numeric addresses, comma-separated. */
#define FETCH__DNS_ADDRS_SIZE 1024
#define FETCH__DNS_MAX_ADDRS FETCH_LOOKUP_MAX_ADDRS

/* Creates a resolver with 'threads' lookup threads (started by the first lookup), answers
 * kept 'ttl_ms', failures 'neg_ttl_ms'. 'lookup' (NULL: fetch_lookup_default) runs on the
 * resolver threads; notify(arg) is called on a resolver thread, no lock held, after each
 * answer. Returns NULL if out of memory. */
struct fetch_resolver *fetch__resolver_new(unsigned threads, int64_t ttl_ms, int64_t neg_ttl_ms,
                                           fetch_lookup_fn lookup, void *lookup_arg,
                                           void (*notify)(void *), void *notify_arg);

/* Starts the threads (fetch_new() does, so that every thread exists once the engine does).
 * Returns 0 or a negative errno. Thread-safe; a second call does nothing. */
int fetch__resolver_start(struct fetch_resolver *r);

/* Tells the threads to stop: queued lookups are dropped, running ones finish. Thread-safe. */
void fetch__resolver_stop(struct fetch_resolver *r);

/* Stops, joins the threads (waiting for lookups still running) and frees. No entry may still be
 * held. */
void fetch__resolver_free(struct fetch_resolver *r);

/* Whether curl answers 'host' by itself without a lookup: an IPv4 or bracketed IPv6 literal,
 * "localhost" or a name under "localhost". */
bool fetch__host_is_literal(const char *host);

/* Looks 'host' up. Returns 1 with the addresses copied into 'addrs' (FETCH__DNS_ADDRS_SIZE
 * bytes) when an answer is usable now; 0 when a lookup is under way, with *wait holding an entry
 * to poll with fetch__resolve_poll() after a notify (and to release); or a negative code
 * (-EHOSTUNREACH: it does not resolve; -ESHUTDOWN: the resolver is
 * stopping; -ENOMEM) with a reason in 'addrs'. Thread-safe. */
int fetch__resolve(struct fetch_resolver *r, const char *host, char *addrs,
                   struct fetch__dns **wait);

/* For an entry from fetch__resolve(): 1, 0 or negative as fetch__resolve() (0: still under way;
 * the entry is still held). Thread-safe. */
int fetch__resolve_poll(struct fetch_resolver *r, struct fetch__dns *d, char *addrs);

/* The host name of a held entry (constant while it is held). Thread-safe. */
const char *fetch__dns_host(const struct fetch__dns *d);

/* Drops a held entry. Thread-safe. */
void fetch__resolve_release(struct fetch_resolver *r, struct fetch__dns *d);

#endif
