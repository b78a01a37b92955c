/* discover: the live upstream set, followed (see discover.h).
 *
 * The thread keeps one record per upstream (struct name): its template, its host, the
 * addresses of its members now, and when it is next looked up. A pass of the thread's loop
 * reads the file if it asked to be read, looks up every name that is due, builds the next
 * snapshot if any member list changed, starts a health round if one is due, then sleeps on
 * its condition variable until the next thing is due (or a reload, or the stop).
 *
 * Locking: 'mu' guards the flags other threads set (stop, reload) and the pass count; the
 * records are the thread's own (discover_new() fills them before the thread starts). No lock
 * is held during a lookup or while building a snapshot. */
#include "server/upstream/discover.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "ctx/ctx.h"
#include "server/obs/log.h"
#include "server/rng.h"
#include "server/upstream/health.h"

#define ANSWER_SIZE 65536 /* a lookup's answer: about 1,300 IPv6 addresses */

/* One upstream as the thread follows it. */
struct name {
    char *tmpl;                 /* its template (malloc'd) */
    char host[256];             /* the template's host, as looked up */
    char label[280];            /* host:port, for logs */
    bool literal;               /* an IP literal: one member, never looked up */
    char (*addrs)[UPSTREAM_ADDR_MAX]; /* its members' addresses, sorted (malloc'd) */
    unsigned naddrs;
    bool looked;                /* looked up at least once (static: never again) */
    bool answered;              /* some lookup has answered */
    bool failing;               /* the latest lookup got no answer (logged once) */
    int64_t next_ms;            /* next lookup (monotonic) */
    int64_t backoff_ms;         /* the wait after the next failure */
    int64_t empty_since;        /* NXDOMAIN or empty since, or 0 */
    char why[UPSTREAM_WHY_MAX]; /* why it has no member, when it has none */
};

struct discover {
    struct discover_opts o;
    char *file;                 /* o.file, copied */
    char *health_path;          /* o.health_path, copied */
    struct upstream_live *live;
    struct health *health;      /* with health_path */
    struct name *names;         /* the thread's records */
    unsigned nnames;
    char *answer;               /* ANSWER_SIZE bytes, the thread's */
    char (*parsed)[UPSTREAM_ADDR_MAX]; /* max_members addresses, the thread's */
    char **tokens;              /* ANSWER_SIZE / 2: an answer's addresses, the thread's */
    struct stat file_st;        /* the file as last read */
    int64_t file_next_ms;       /* next look at the file */
    int64_t health_next_ms;     /* next health round */
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;         /* guards the rest */
    pthread_cond_t cv;          /* stop, reload */
    bool stop, reload;
    uint64_t passes;
};

static uint64_t draw(const struct discover *d, uint64_t n)
{
    return d->o.jitter ? d->o.jitter(n) : rng_upto(n);
}

/* every_ms, jittered by +-20%. */
static int64_t next_delay(const struct discover *d)
{
    int64_t span = d->o.every_ms * 2 / 5;
    return d->o.every_ms - span / 2 + (int64_t)draw(d, (uint64_t)span);
}

/* ---------------------------------------------------------------- the upstreams file */

int discover_parse_file(char *text, const char **out, unsigned max, char *err, size_t errlen)
{
    unsigned n = 0, line = 0;
    for (char *p = text, *next; p && *p; p = next) {
        line++;
        char *nl = strchr(p, '\n');
        next = nl ? nl + 1 : NULL;
        if (nl)
            *nl = 0;
        p += strspn(p, " \t\r");
        size_t len = strlen(p);
        while (len > 0 && strchr(" \t\r", p[len - 1]))
            p[--len] = 0;
        if (len == 0 || p[0] == '#')
            continue;
        if (strcspn(p, " \t") != len) {
            snprintf(err, errlen, "line %u: one URL template per line, no spaces inside", line);
            return -EINVAL;
        }
        if (n == max) {
            snprintf(err, errlen, "line %u: more than %u upstreams", line, max);
            return -EINVAL;
        }
        out[n++] = p;
    }
    return (int)n;
}

/* Reads the file into a malloc'd text. Returns 0, or -errno / -EFBIG with the reason. */
static int read_file(const char *path, char **text, struct stat *st, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        int e = errno;
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(e));
        return -e;
    }
    int rc = 0;
    char *buf = NULL;
    if (fstat(fileno(f), st) != 0 || !S_ISREG(st->st_mode)) {
        snprintf(err, errlen, "%s is not a regular file", path);
        rc = -EINVAL;
    } else if (st->st_size > DISCOVER_FILE_MAX) {
        snprintf(err, errlen, "%s is %lld bytes; at most %d", path, (long long)st->st_size,
                 DISCOVER_FILE_MAX);
        rc = -EFBIG;
    } else if (!(buf = malloc((size_t)st->st_size + 1))) {
        rc = -ENOMEM;
    } else {
        size_t got = fread(buf, 1, (size_t)st->st_size, f);
        buf[got] = 0;
        if (memchr(buf, 0, got)) {
            snprintf(err, errlen, "%s holds a NUL byte", path);
            rc = -EINVAL;
        }
    }
    fclose(f);
    if (rc != 0)
        free(buf);
    else
        *text = buf;
    return rc;
}

/* ---------------------------------------------------------------- names */

static void name_destroy(struct name *nm)
{
    free(nm->tmpl);
    free(nm->addrs);
    memset(nm, 0, sizeof(*nm));
}

/* The template's host (brackets of an IPv6 literal removed) and host:port label. */
static int name_init(struct name *nm, const char *tmpl)
{
    memset(nm, 0, sizeof(*nm));
    const char *a = strstr(tmpl, "://");
    if (!a)
        return -EINVAL;
    a += 3;
    size_t n = strcspn(a, "/?#");
    const char *at = memchr(a, '@', n);
    if (at) {
        n -= (size_t)(at + 1 - a);
        a = at + 1;
    }
    size_t hl = n;
    if (a[0] == '[') {
        const char *close = memchr(a, ']', n);
        hl = close ? (size_t)(close - a) + 1 : n;
    } else {
        const char *colon = memchr(a, ':', n);
        hl = colon ? (size_t)(colon - a) : n;
    }
    if (hl == 0 || hl >= sizeof(nm->host))
        return -EINVAL;
    memcpy(nm->host, a, hl);
    nm->host[hl] = 0;
    snprintf(nm->label, sizeof(nm->label), "%.*s", (int)n, a);
    struct in_addr a4;
    struct in6_addr a6;
    char inner[256];
    snprintf(inner, sizeof(inner), "%.*s", hl > 2 ? (int)hl - 2 : 0, nm->host + 1);
    nm->literal = inet_pton(AF_INET, nm->host, &a4) == 1 ||
                  (nm->host[0] == '[' && inet_pton(AF_INET6, inner, &a6) == 1);
    if (!(nm->tmpl = strdup(tmpl)))
        return -ENOMEM;
    nm->backoff_ms = DISCOVER_BACKOFF_MIN_MS;
    return 0;
}

static int by_text(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Splits a lookup's comma-separated answer into its distinct addresses, sorted, and keeps the
 * first 'max' (so that the same addresses in any order give the same members). 'tok' has room
 * for ANSWER_SIZE / 2 of them (each is a byte at least, and a comma). Returns how many it kept,
 * and in *all how many there were. */
static unsigned parse_answer(char *answer, char (*out)[UPSTREAM_ADDR_MAX], unsigned max,
                             char **tok, unsigned *all)
{
    unsigned nt = 0, n = 0;
    for (char *save = NULL, *t = strtok_r(answer, ",", &save); t && nt < ANSWER_SIZE / 2;
         t = strtok_r(NULL, ",", &save))
        if (strlen(t) < UPSTREAM_ADDR_MAX)
            tok[nt++] = t;
    qsort(tok, nt, sizeof(*tok), by_text);
    *all = 0;
    for (unsigned i = 0; i < nt; i++) {
        if (i > 0 && !strcmp(tok[i - 1], tok[i]))
            continue;
        ++*all;
        if (n < max)
            snprintf(out[n++], UPSTREAM_ADDR_MAX, "%s", tok[i]);
    }
    return n;
}

/* Logs the members that 'next' has and 'prev' had not ("member added"), and the reverse. */
static void log_diff(struct discover *d, const struct name *nm, char (*prev)[UPSTREAM_ADDR_MAX],
                     unsigned np, char (*next)[UPSTREAM_ADDR_MAX], unsigned nn)
{
    unsigned i = 0, j = 0;
    const char *colon = strrchr(nm->label, ':'); /* host:port, [v6]:port */
    const char *port = colon ? colon + 1 : "";
    while (i < np || j < nn) {
        int c = i == np ? 1 : j == nn ? -1 : strcmp(prev[i], next[j]);
        if (c == 0) {
            i++, j++;
            continue;
        }
        const char *a = c < 0 ? prev[i++] : next[j++];
        log_fieldsf(d->o.log, LOG_INFO, c < 0 ? "member removed" : "member added",
                    ",\"upstream\":\"%s\",\"member\":\"%s:%s\"", nm->label, a, port);
    }
}

/* Sets the name's members to the answer's addresses (logging what changed); true if they
 * changed. */
static bool set_members(struct discover *d, struct name *nm, char (*addrs)[UPSTREAM_ADDR_MAX],
                        unsigned n)
{
    if (n == nm->naddrs && (n == 0 || memcmp(addrs, nm->addrs, n * UPSTREAM_ADDR_MAX) == 0))
        return false;
    void *copy = n ? malloc(n * UPSTREAM_ADDR_MAX) : NULL;
    if (n && !copy)
        return false; /* out of memory: keep the old ones, try again next time */
    if (n)
        memcpy(copy, addrs, n * UPSTREAM_ADDR_MAX);
    log_diff(d, nm, nm->addrs, nm->naddrs, addrs, n);
    free(nm->addrs);
    nm->addrs = copy;
    nm->naddrs = n;
    return true;
}

/* Looks the name up now and applies the answer. Returns true if its members changed. */
static bool look_up_once(struct discover *d, struct upstreams *cur, unsigned idx, struct name *nm)
{
    fetch_lookup_fn fn = d->o.lookup ? d->o.lookup : fetch_lookup_default;
    d->answer[0] = 0;
    int rc = fn(d->o.lookup_arg, nm->host, d->answer, ANSWER_SIZE);
    int64_t now = ctx_now(); /* after the lookup, which may have taken a while */
    nm->looked = true;
    char(*addrs)[UPSTREAM_ADDR_MAX] = d->parsed;
    unsigned all = 0;
    unsigned n = rc == 0 ? parse_answer(d->answer, addrs, d->o.max_members, d->tokens, &all) : 0;
    bool empty = (rc == 0 && n == 0) || rc == EAI_NONAME
#ifdef EAI_NODATA
                 || rc == EAI_NODATA
#endif
        ;
    enum upstream_resolve kind = rc == 0 && n > 0 ? UPSTREAM_RESOLVE_OK
                                 : empty          ? UPSTREAM_RESOLVE_EMPTY
                                                  : UPSTREAM_RESOLVE_FAILED;
    if (cur && idx < upstreams_count(cur) && !strcmp(upstream_template(cur, idx), nm->tmpl))
        upstream_count_resolve(cur, idx, kind);
    if (kind == UPSTREAM_RESOLVE_OK) {
        if (nm->failing)
            log_fieldsf(d->o.log, LOG_INFO, "upstream lookup answers again",
                        ",\"upstream\":\"%s\",\"members\":%u", nm->label, n);
        nm->failing = false;
        nm->answered = true;
        nm->empty_since = 0;
        nm->backoff_ms = DISCOVER_BACKOFF_MIN_MS;
        nm->next_ms = now + next_delay(d);
        bool changed = set_members(d, nm, addrs, n);
        if (changed && all > n)
            log_fieldsf(d->o.log, LOG_WARN, "members left out",
                        ",\"upstream\":\"%s\",\"left_out\":%u,\"max_members\":%u", nm->label,
                        all - n, d->o.max_members);
        return changed;
    }
    const char *what = rc == 0 ? "no address" : gai_strerror(rc);
    if (!nm->failing)
        log_fieldsf(d->o.log, LOG_WARN, "upstream lookup failed",
                    ",\"upstream\":\"%s\",\"result\":\"%s\",\"detail\":\"%s\"", nm->label,
                    empty ? "empty" : "failed", what);
    nm->failing = true;
    if (kind == UPSTREAM_RESOLVE_FAILED) { /* keep what we have; try again soon */
        nm->next_ms = now + nm->backoff_ms;
        nm->backoff_ms = nm->backoff_ms * 2 > DISCOVER_BACKOFF_MAX_MS ? DISCOVER_BACKOFF_MAX_MS
                                                                      : nm->backoff_ms * 2;
        snprintf(nm->why, sizeof(nm->why), "upstream %.60s has no member: its lookup failed (%.50s)",
                 nm->label, what);
        return false;
    }
    if (nm->empty_since == 0)
        nm->empty_since = now;
    int64_t drop_at = nm->empty_since + d->o.hold_ms;
    snprintf(nm->why, sizeof(nm->why), "upstream %.60s has no member: its name resolves to %s",
             nm->label, rc == 0 ? "no address" : "nothing (NXDOMAIN)");
    nm->next_ms = now + next_delay(d);
    if (nm->naddrs > 0 && now < drop_at) { /* held: look again by the end of the hold */
        if (drop_at < nm->next_ms)
            nm->next_ms = drop_at;
        return false;
    }
    return set_members(d, nm, addrs, 0);
}

/* ---------------------------------------------------------------- snapshots */

/* Builds the next snapshot from the records and swaps it in. Returns 0 or an error (logged;
 * the set is unchanged). */
static int publish(struct discover *d, struct upstreams *cur, char *err, size_t errlen)
{
    struct upstream_spec specs[UPSTREAMS_MAX];
    const char **addrp = calloc(d->o.max_members + 1, sizeof(*addrp));
    if (!addrp)
        return -ENOMEM;
    unsigned used = 0, left_out = 0;
    for (unsigned i = 0; i < d->nnames; i++) {
        struct name *nm = &d->names[i];
        specs[i] = (struct upstream_spec){.tmpl = nm->tmpl, .why = nm->why[0] ? nm->why : NULL};
        if (nm->literal)
            continue; /* one member, by its literal */
        specs[i].addrs = addrp + used;
        for (unsigned a = 0; a < nm->naddrs; a++) {
            if (used == d->o.max_members) {
                left_out++;
                continue;
            }
            addrp[used++] = nm->addrs[a];
            specs[i].naddrs++;
        }
    }
    if (left_out)
        log_fieldsf(d->o.log, LOG_WARN, "members left out",
                    ",\"left_out\":%u,\"max_members\":%u", left_out, d->o.max_members);
    struct upstreams *next = NULL;
    int rc = upstreams_with_members(cur, specs, d->nnames, ctx_now(), &next, err, errlen);
    free(addrp);
    if (rc == 0)
        upstream_live_swap(d->live, next);
    return rc;
}

/* The record of the name with template 'tmpl', or NULL. */
static struct name *find_name(struct discover *d, const char *tmpl)
{
    for (unsigned j = 0; j < d->nnames; j++)
        if (d->names[j].tmpl && !strcmp(d->names[j].tmpl, tmpl))
            return &d->names[j];
    return NULL;
}

/* Replaces the records by 'tmpls' (keeping the members of names that stay). The new names are
 * made first, so that a failure leaves the records as they were. */
static int set_names(struct discover *d, const char *const *tmpls, unsigned n)
{
    struct name *nn = calloc(n ? n : 1, sizeof(*nn));
    if (!nn)
        return -ENOMEM;
    for (unsigned i = 0; i < n; i++) {
        if (find_name(d, tmpls[i]))
            continue;
        int rc = name_init(&nn[i], tmpls[i]);
        if (rc != 0) {
            for (unsigned k = 0; k <= i; k++)
                name_destroy(&nn[k]);
            free(nn);
            return rc;
        }
    }
    for (unsigned i = 0; i < n; i++) {
        struct name *old = find_name(d, tmpls[i]);
        if (old) {
            nn[i] = *old;
            memset(old, 0, sizeof(*old));
        }
    }
    for (unsigned j = 0; j < d->nnames; j++) {
        if (d->names[j].tmpl)
            log_diff(d, &d->names[j], d->names[j].addrs, d->names[j].naddrs, NULL, 0);
        name_destroy(&d->names[j]);
    }
    free(d->names);
    d->names = nn;
    d->nnames = n;
    return 0;
}

/* look_up_once(), and true also when an upstream without members has a new reason for it, so
 * that the error its ids get says the latest one. */
static bool look_up(struct discover *d, struct upstreams *cur, unsigned idx, struct name *nm)
{
    char was[UPSTREAM_WHY_MAX];
    memcpy(was, nm->why, sizeof(was));
    bool changed = look_up_once(d, cur, idx, nm);
    return changed || (nm->naddrs == 0 && strcmp(was, nm->why) != 0);
}

/* Whether the name is looked up again: with dns, always; static, until it first answers (then
 * its members are fixed); a literal, never. */
static bool followed(const struct discover *d, const struct name *nm)
{
    return !nm->literal && (d->o.dns || !nm->answered);
}

/* Looks up every name that is due (all with 'all'); true if some members changed. */
static bool look_up_due(struct discover *d, bool all)
{
    struct upstreams *cur = upstream_live_get(d->live);
    bool changed = false;
    for (unsigned i = 0; i < d->nnames; i++) {
        struct name *nm = &d->names[i];
        if (followed(d, nm) && (!nm->looked || all || ctx_now() >= nm->next_ms))
            changed |= look_up(d, cur, i, nm);
    }
    upstreams_free(cur);
    return changed;
}

/* Reads the upstreams file and, if it parses and makes a valid set, makes it the set's list.
 * Returns 0, or an error with the reason in err (the set is unchanged). */
static int load_file(struct discover *d, char *err, size_t errlen)
{
    char *text = NULL;
    struct stat st;
    int rc = read_file(d->file, &text, &st, err, errlen);
    if (rc != 0)
        return rc;
    d->file_st = st;
    const char *t[UPSTREAMS_MAX];
    char why[256];
    rc = discover_parse_file(text, t, UPSTREAMS_MAX, why, sizeof(why));
    if (rc == 0) {
        snprintf(why, sizeof(why), "no upstream in it");
        rc = -EINVAL;
    }
    if (rc > 0) { /* check every template before anything changes */
        struct upstreams_opts o = d->o.set;
        struct upstreams *probe = NULL;
        unsigned n = (unsigned)rc;
        rc = upstreams_new(t, n, &o, &probe, why, sizeof(why));
        upstreams_free(probe);
        if (rc == 0 && (rc = set_names(d, t, n)) == -EINVAL)
            snprintf(why, sizeof(why), "a template's host is too long (at most %zu bytes)",
                     sizeof(d->names[0].host) - 1);
    }
    if (rc < 0)
        snprintf(err, errlen, "%s: %s", d->file, rc == -ENOMEM ? "out of memory" : why);
    free(text);
    return rc < 0 ? rc : 0;
}

/* Whether the file was replaced or changed since it was read (a ConfigMap swaps a symlink). */
static bool file_changed(const struct discover *d)
{
    struct stat st;
    if (stat(d->file, &st) != 0)
        return false; /* gone for now: keep the set, look again later */
    return st.st_ino != d->file_st.st_ino || st.st_dev != d->file_st.st_dev ||
           st.st_size != d->file_st.st_size ||
           st.st_mtim.tv_sec != d->file_st.st_mtim.tv_sec ||
           st.st_mtim.tv_nsec != d->file_st.st_mtim.tv_nsec;
}

/* ---------------------------------------------------------------- the thread */

/* One pass: the file, the lookups, the snapshot, the health round. */
static void pass(struct discover *d, bool reload)
{
    bool changed = false;
    int64_t now = ctx_now();
    if (d->file && (reload || now >= d->file_next_ms)) {
        d->file_next_ms = now + (d->o.file_check_ms > 0 ? d->o.file_check_ms : 1000);
        if (reload || file_changed(d)) {
            char err[512];
            if (load_file(d, err, sizeof(err)) != 0)
                log_fieldsf(d->o.log, LOG_ERROR, "upstreams file refused; the set is unchanged",
                            ",\"detail\":\"%s\"", err);
            else
                changed = true;
        }
    }
    changed |= look_up_due(d, reload);
    if (changed) {
        struct upstreams *cur = upstream_live_get(d->live);
        char err[512];
        if (publish(d, cur, err, sizeof(err)) != 0)
            log_fieldsf(d->o.log, LOG_ERROR, "upstream set not changed", ",\"detail\":\"%s\"",
                        err);
        upstreams_free(cur);
    }
    if (d->health && ctx_now() >= d->health_next_ms) {
        d->health_next_ms = ctx_now() + d->o.health_every_ms;
        struct upstreams *cur = upstream_live_get(d->live);
        health_round(d->health, cur);
        upstreams_free(cur);
    }
}

/* When the next thing is due. */
static int64_t next_due(const struct discover *d)
{
    int64_t due = INT64_MAX;
    for (unsigned i = 0; i < d->nnames; i++)
        if (followed(d, &d->names[i]) && d->names[i].next_ms < due)
            due = d->names[i].next_ms;
    if (d->file && d->file_next_ms < due)
        due = d->file_next_ms;
    if (d->health && d->health_next_ms < due)
        due = d->health_next_ms;
    return due;
}

static void *discover_main(void *arg)
{
    struct discover *d = arg;
    pthread_mutex_lock(&d->mu);
    while (!d->stop) {
        int64_t due = next_due(d);
        while (!d->stop && !d->reload && ctx_now() < due) {
            if (due == INT64_MAX) {
                pthread_cond_wait(&d->cv, &d->mu);
                continue;
            }
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            int64_t ms = due - ctx_now();
            ts.tv_sec += ms / 1000;
            ts.tv_nsec += (ms % 1000) * 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&d->cv, &d->mu, &ts);
        }
        if (d->stop)
            break;
        bool reload = d->reload;
        d->reload = false;
        pthread_mutex_unlock(&d->mu);
        pass(d, reload);
        pthread_mutex_lock(&d->mu);
        d->passes++;
        pthread_cond_broadcast(&d->cv);
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* ---------------------------------------------------------------- the API */

static int init_sync(struct discover *d)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&d->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (rc != 0)
        return -rc;
    if ((rc = pthread_mutex_init(&d->mu, NULL)) != 0) {
        pthread_cond_destroy(&d->cv);
        return -rc;
    }
    return 0;
}

/* The first set: the names, looked up once, in a fresh group. */
static int first_set(struct discover *d, const char *const *templates, unsigned n, char *err,
                     size_t errlen)
{
    int rc;
    if (d->file) {
        if ((rc = load_file(d, err, errlen)) != 0)
            return rc;
        n = d->nnames;
    } else if ((rc = set_names(d, templates, n)) != 0) {
        snprintf(err, errlen, "%s",
                 rc == -ENOMEM ? "out of memory" : "a template's host is empty or over 255 bytes");
        return rc;
    }
    const char *t[UPSTREAMS_MAX];
    for (unsigned i = 0; i < n; i++)
        t[i] = d->names[i].tmpl;
    struct upstreams *first = NULL;
    if ((rc = upstreams_new(t, n, &d->o.set, &first, err, errlen)) != 0)
        return rc;
    if ((rc = upstream_live_new(first, &d->live)) != 0) {
        upstreams_free(first);
        return rc;
    }
    look_up_due(d, true);
    return publish(d, first, err, errlen);
}

int discover_new(const struct discover_opts *o, const char *const *templates, unsigned n,
                 struct discover **out, char *err, size_t errlen)
{
    *out = NULL;
    if (o->every_ms <= 0 || o->hold_ms < 0 || o->max_members == 0 ||
        o->max_members > UPSTREAM_MEMBERS_MAX) {
        snprintf(err, errlen, "bad discovery settings");
        return -EINVAL;
    }
    struct discover *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->o = *o;
    d->o.set.health_gated = o->health_path != NULL;
    int rc = init_sync(d);
    if (rc != 0) {
        free(d);
        return rc;
    }
    if ((o->file && !(d->file = strdup(o->file))) || !(d->answer = malloc(ANSWER_SIZE)) ||
        !(d->parsed = malloc((size_t)o->max_members * UPSTREAM_ADDR_MAX)) ||
        !(d->tokens = malloc(ANSWER_SIZE / 2 * sizeof(*d->tokens))))
        rc = -ENOMEM;
    if (o->health_path && !(d->health_path = strdup(o->health_path)))
        rc = -ENOMEM;
    if (rc == 0)
        rc = first_set(d, templates, n, err, errlen);
    if (rc != 0) {
        if (rc == -ENOMEM)
            snprintf(err, errlen, "out of memory");
        discover_free(d);
        return rc;
    }
    *out = d;
    return 0;
}

int discover_start(struct discover *d, struct fetch *fetch)
{
    if (d->health_path) {
        struct health_opts ho = {.fetch = fetch,
                                 .path = d->health_path,
                                 .timeout_ms = d->o.health_timeout_ms,
                                 .healthy_after = d->o.healthy_after,
                                 .unhealthy_after = d->o.unhealthy_after,
                                 .log = d->o.log};
        int rc = health_new(&ho, &d->health);
        if (rc != 0)
            return rc;
    }
    int rc = pthread_create(&d->thread, NULL, discover_main, d);
    if (rc != 0) {
        health_free(d->health);
        d->health = NULL;
        return -rc;
    }
    d->started = true;
    return 0;
}

void discover_stop(struct discover *d)
{
    if (!d || !d->started)
        return;
    pthread_mutex_lock(&d->mu);
    d->stop = true;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
    pthread_join(d->thread, NULL);
    d->started = false;
    health_free(d->health);
    d->health = NULL;
}

struct upstream_live *discover_live(struct discover *d)
{
    return d->live;
}

void discover_reload(struct discover *d)
{
    pthread_mutex_lock(&d->mu);
    d->reload = true;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

uint64_t discover_passes(struct discover *d)
{
    pthread_mutex_lock(&d->mu);
    uint64_t n = d->passes;
    pthread_mutex_unlock(&d->mu);
    return n;
}

void discover_free(struct discover *d)
{
    if (!d)
        return;
    discover_stop(d);
    for (unsigned i = 0; i < d->nnames; i++)
        name_destroy(&d->names[i]);
    free(d->names);
    upstream_live_free(d->live);
    free(d->answer);
    free(d->parsed);
    free(d->tokens);
    free(d->file);
    free(d->health_path);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    free(d);
}
