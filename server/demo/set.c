/* demo set: one or more demo members behind one name (see set.h).
 *
 * The first member of a set of several binds port 0 and the kernel picks a port; the others
 * bind that port on their own addresses. Another program may hold that port on one of the
 * other addresses: then every member started is stopped and the set tries again with a fresh
 * port, a few times. Any other bind error is final (an address that is not local is not going
 * to become one). */
#include "server/demo/set.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fetch/lookup.h"
#include "server/demo/demo.h"

/* Fresh ports tried when another program holds the first one on some member's address. */
#define PORT_TRIES 8

struct demo_set {
    unsigned n;                   /* members */
    struct demo *m[DEMO_SET_MAX]; /* the members, by address */
    char addrs[DEMO_SET_MAX * 16]; /* their addresses, comma-separated (the lookup's answer) */
    uint16_t port;                /* the members' port */
};

/* Member i's address: 127.0.0.1 alone, 127.0.0.<i+2> in a set of several. */
static void member_addr(unsigned n, unsigned i, char *out, size_t cap)
{
    if (n == 1)
        snprintf(out, cap, "127.0.0.1");
    else
        snprintf(out, cap, "127.0.0.%u", i + 2);
}

static void stop_members(struct demo_set *s, unsigned started)
{
    while (started > 0) {
        demo_stop(s->m[--started]);
        s->m[started] = NULL;
    }
}

/* One try: every member on one port. Returns 0, or the error with its reason in err; the
 * members are then all stopped. */
static int try_start(struct demo_set *s, char *err, size_t errlen)
{
    uint16_t port = 0;
    for (unsigned i = 0; i < s->n; i++) {
        char addr[16];
        member_addr(s->n, i, addr, sizeof(addr));
        int rc = demo_start(addr, port, &s->m[i]);
        if (rc != 0) {
            stop_members(s, i);
            if (s->n > 1 && rc == -EADDRNOTAVAIL)
                snprintf(err, errlen,
                         "cannot start demo member %u of %u on %s: %s (--demo-members above 1 "
                         "needs the loopback addresses 127.0.0.2 to 127.0.0.%u, which Linux has; "
                         "elsewhere add them to the loopback interface, or use --demo-members 1)",
                         i + 1, s->n, addr, strerror(-rc), s->n + 1);
            else if (port)
                snprintf(err, errlen, "cannot start demo member %u of %u on %s:%u: %s", i + 1,
                         s->n, addr, (unsigned)port, strerror(-rc));
            else
                snprintf(err, errlen, "cannot start the demo upstream: %s", strerror(-rc));
            return rc;
        }
        port = demo_port(s->m[i]);
    }
    s->port = port;
    return 0;
}

int demo_set_start(unsigned n, struct demo_set **out, char *err, size_t errlen)
{
    if (n < 1 || n > DEMO_SET_MAX) {
        snprintf(err, errlen, "demo members: want 1 to %d, got %u", DEMO_SET_MAX, n);
        return -EINVAL;
    }
    struct demo_set *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->n = n;
    int rc = -EADDRINUSE;
    for (int t = 0; t < PORT_TRIES && rc == -EADDRINUSE; t++)
        rc = try_start(s, err, errlen);
    if (rc != 0) {
        free(s);
        return rc;
    }
    size_t used = 0;
    for (unsigned i = 0; i < n; i++) {
        char addr[16];
        member_addr(n, i, addr, sizeof(addr));
        used += (size_t)snprintf(s->addrs + used, sizeof(s->addrs) - used, "%s%s", i ? "," : "",
                                 addr);
    }
    *out = s;
    return 0;
}

unsigned demo_set_count(const struct demo_set *s)
{
    return s->n;
}

struct demo *demo_set_member(const struct demo_set *s, unsigned i)
{
    return i < s->n ? s->m[i] : NULL;
}

void demo_set_url_template(const struct demo_set *s, char *buf, size_t size)
{
    if (s->n == 1)
        demo_url_template(s->m[0], buf, size);
    else if (size > 0)
        snprintf(buf, size, "http://%s:%u/items/{id}", DEMO_SET_NAME, (unsigned)s->port);
}

int demo_set_lookup(void *arg, const char *host, char *addrs, size_t size)
{
    const struct demo_set *s = arg;
    if (strcasecmp(host, DEMO_SET_NAME) != 0)
        return fetch_lookup_default(NULL, host, addrs, size);
    size_t used = 0; /* as many whole addresses as fit */
    for (const char *p = s->addrs; *p;) {
        size_t n = strcspn(p, ",");
        if (used + (used ? 1 : 0) + n + 1 > size)
            break;
        if (used)
            addrs[used++] = ',';
        memcpy(addrs + used, p, n);
        used += n;
        p += n + (p[n] == ',');
    }
    if (size > 0)
        addrs[used] = '\0';
    return 0;
}

void demo_set_stop(struct demo_set *s)
{
    if (!s)
        return;
    stop_members(s, s->n);
    free(s);
}
