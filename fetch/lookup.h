/* lookup: how fetch turns a host name into addresses, and the default way (getaddrinfo()).
 *
 * Pure functions of the system resolver; fetch's resolver threads (resolve.h) call them. */
#ifndef FANOUT_FETCH_LOOKUP_H
#define FANOUT_FETCH_LOOKUP_H

#include <stddef.h>

/* Most addresses fetch's resolver pins for one name (its lookups get room for about these). */
#define FETCH_LOOKUP_MAX_ADDRS 16

/* A name lookup, as fetch's resolver threads run it: writes the addresses of 'host' into 'addrs'
 * ('size' bytes) as a NUL-terminated, comma-separated list of numeric addresses, IPv6 ones in
 * brackets ("192.0.2.1,[2001:db8::1]"), and returns 0; or returns an EAI_* code (<netdb.h>) when
 * the name does not resolve. Called on a resolver thread, never on a loop thread; it may block
 * (a transfer waiting on it ends at its deadline or cancel regardless). */
typedef int (*fetch_lookup_fn)(void *arg, const char *host, char *addrs, size_t size);

/* The default lookup: getaddrinfo() (so /etc/hosts and the system resolver), as many distinct
 * addresses as fit in 'size'; a name under "invalid." (RFC 6761) fails at once with
 * EAI_NONAME. 'arg' is unused. */
int fetch_lookup_default(void *arg, const char *host, char *addrs, size_t size);

#endif
