/* demo set: the demo upstream behind `fanout --demo` as one or more members, so that upstream
 * discovery can be seen on one machine.
 *
 * One member (--demo-members 1, the default): one demo (demo.h) on 127.0.0.1 with a free port,
 * and the URL template names that address ("http://127.0.0.1:<port>/items/{id}"): one
 * upstream with one member, never looked up.
 *
 * N members (2..DEMO_SET_MAX): N demos on 127.0.0.2, 127.0.0.3, ... 127.0.0.<N+1>, all on the
 * same port, and the template names DEMO_SET_NAME ("http://fanout-demo.internal:<port>/items/
 * {id}"). That name is answered by demo_set_lookup() with the N addresses (every other name goes
 * to fetch_lookup_default()), so fanout's discovery makes each address a member, as it would for
 * a name with N A records. Linux routes all of 127.0.0.0/8 to the loopback interface; where only
 * 127.0.0.1 is configured (macOS, the BSDs) binding 127.0.0.2 fails, and demo_set_start() says
 * so.
 *
 * Threads: each demo's own (demo.h); demo_set_start() and demo_set_stop() run on the owner's
 * thread; everything else is thread-safe (the set does not change once started). */
#ifndef FANOUT_DEMO_SET_H
#define FANOUT_DEMO_SET_H

#include <stddef.h>

struct demo;
struct demo_set;

/* The host name of a set of more than one member. ".internal" is reserved for private use
 * (ICANN, 2024): no public DNS name can clash with it. */
#define DEMO_SET_NAME "fanout-demo.internal"

/* Most members a set may have (127.0.0.2 .. 127.0.0.17). */
#define DEMO_SET_MAX 16

/* Starts 'n' (1..DEMO_SET_MAX) demo members as described above and stores the set in *out,
 * which the caller owns and must pass to demo_set_stop(). Returns 0, or a negative errno with a
 * one-line reason in err (-EINVAL for a bad n; the bind error, e.g. -EADDRNOTAVAIL where
 * 127.0.0.2 and up are not local addresses). Nothing is left running on failure. */
int demo_set_start(unsigned n, struct demo_set **out, char *err, size_t errlen);

/* The members, 0..demo_set_count()-1 in address order (member i listens on 127.0.0.<i+2>, or
 * on 127.0.0.1 for a set of one). */
unsigned demo_set_count(const struct demo_set *s);
struct demo *demo_set_member(const struct demo_set *s, unsigned i);

/* Writes the URL template for fanout's upstream (see above), truncated to 'size' bytes. */
void demo_set_url_template(const struct demo_set *s, char *buf, size_t size);

/* A fetch_lookup_fn (fetch/lookup.h) with 'arg' the set: DEMO_SET_NAME (any case) gets the
 * members' addresses ("127.0.0.2,127.0.0.3,..."); any other name is fetch_lookup_default()'s.
 * Thread-safe. */
int demo_set_lookup(void *arg, const char *host, char *addrs, size_t size);

/* Stops every member (demo_stop()) and frees the set. NULL is allowed. */
void demo_set_stop(struct demo_set *s);

#endif
