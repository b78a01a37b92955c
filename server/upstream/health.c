/* health: active health checks (see health.h). */
#include "server/upstream/health.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/obs/log.h"

#define HEALTH_PATH_MAX 256

struct health {
    struct health_opts o;
    char path[HEALTH_PATH_MAX];
    struct ctx *ctx;          /* parent of every check; canceled by health_free() */
    pthread_mutex_t mu;       /* guards what follows */
    pthread_cond_t idle;      /* 'out' fell to 0 */
    unsigned out;             /* checks not yet called back */
    uint64_t rounds_done;     /* rounds whose checks have all called back */
};

/* One check: a member of a snapshot (a reference held until it calls back). */
struct check {
    struct health *h;
    struct upstreams *snap;
    unsigned m;
    struct ctx *ctx;          /* child of h->ctx with the check's deadline */
};

int health_new(const struct health_opts *o, struct health **out)
{
    size_t n = o->path ? strlen(o->path) : 0;
    if (n == 0 || n >= HEALTH_PATH_MAX || o->path[0] != '/' || o->timeout_ms <= 0)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)o->path[i] <= 0x20 || o->path[i] == 0x7f || o->path[i] == '#')
            return -EINVAL;
    struct health *h = calloc(1, sizeof(*h));
    if (!h)
        return -ENOMEM;
    h->o = *o;
    memcpy(h->path, o->path, n + 1);
    h->o.path = h->path;
    if (!(h->ctx = ctx_new(ctx_background(), CTX_FOREVER))) {
        free(h);
        return -ENOMEM;
    }
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->idle, NULL);
    *out = h;
    return 0;
}

/* The check's URL: the template's scheme and authority, then the health path. */
static int check_url(const struct health *h, const struct upstreams *snap, unsigned m, char *url,
                     size_t cap)
{
    const char *t = upstream_template(snap, upstream_member_upstream(snap, m));
    const char *auth = strstr(t, "://");
    size_t n = auth ? (size_t)(auth + 3 - t) + strcspn(auth + 3, "/?#") : 0;
    int w = snprintf(url, cap, "%.*s%s", (int)n, t, h->path);
    return n > 0 && w > 0 && (size_t)w < cap ? 0 : -EINVAL;
}

static void check_done(void *arg, struct fetch_result *r)
{
    struct check *c = arg;
    struct health *h = c->h;
    bool passed = r->err == 0;
    int turn = upstream_health(c->snap, c->m, passed, h->o.healthy_after, h->o.unhealthy_after,
                               ctx_now());
    if (turn != 0) {
        const char *u = upstream_label(c->snap, upstream_member_upstream(c->snap, c->m));
        if (turn > 0)
            log_fieldsf(h->o.log, LOG_INFO, "member healthy",
                        ",\"upstream\":\"%s\",\"member\":\"%s\"", u,
                        upstream_member_label(c->snap, c->m));
        else
            log_fieldsf(h->o.log, LOG_WARN, "member unhealthy",
                        ",\"upstream\":\"%s\",\"member\":\"%s\",\"status\":%ld,\"err\":%d", u,
                        upstream_member_label(c->snap, c->m), r->status, r->err);
    }
    free(r->body);
    r->body = NULL;
    ctx_free(c->ctx);
    upstreams_free(c->snap);
    free(c);
    pthread_mutex_lock(&h->mu);
    if (--h->out == 0) {
        h->rounds_done++;
        pthread_cond_broadcast(&h->idle);
    }
    pthread_mutex_unlock(&h->mu);
}

/* Starts one check; false if it could not be (then nothing is out for it). */
static bool check_start(struct health *h, struct upstreams *snap, unsigned m)
{
    char url[1024];
    struct check *c = calloc(1, sizeof(*c));
    if (!c || check_url(h, snap, m, url, sizeof(url)) != 0 ||
        !(c->ctx = ctx_new(h->ctx, ctx_now() + h->o.timeout_ms))) {
        free(c);
        return false;
    }
    c->h = h;
    c->snap = upstreams_ref(snap);
    c->m = m;
    struct fetch_req fr = {.url = url,
                           .connect_to = upstream_member_connect_to(snap, m),
                           .max_body = 64 * 1024,
                           .cb = check_done,
                           .arg = c};
    pthread_mutex_lock(&h->mu);
    h->out++;
    pthread_mutex_unlock(&h->mu);
    if (fetch_get(h->o.fetch, fetch_pick_loop(h->o.fetch), c->ctx, &fr) == 0)
        return true;
    pthread_mutex_lock(&h->mu);
    h->out--;
    pthread_mutex_unlock(&h->mu);
    ctx_free(c->ctx);
    upstreams_free(c->snap);
    free(c);
    return false;
}

unsigned health_round(struct health *h, struct upstreams *snap)
{
    pthread_mutex_lock(&h->mu);
    bool busy = h->out > 0;
    if (!busy)
        h->out++; /* held while the round starts, so that it cannot end half started */
    pthread_mutex_unlock(&h->mu);
    if (busy)
        return 0;
    unsigned started = 0;
    for (unsigned m = 0; m < upstreams_member_count(snap); m++)
        started += check_start(h, snap, m);
    pthread_mutex_lock(&h->mu);
    if (--h->out == 0) {
        h->rounds_done++;
        pthread_cond_broadcast(&h->idle);
    }
    pthread_mutex_unlock(&h->mu);
    return started;
}

uint64_t health_rounds_done(struct health *h)
{
    pthread_mutex_lock(&h->mu);
    uint64_t n = h->rounds_done;
    pthread_mutex_unlock(&h->mu);
    return n;
}

void health_free(struct health *h)
{
    if (!h)
        return;
    ctx_cancel(h->ctx, -ECANCELED);
    pthread_mutex_lock(&h->mu);
    while (h->out > 0)
        pthread_cond_wait(&h->idle, &h->mu);
    pthread_mutex_unlock(&h->mu);
    ctx_free(h->ctx);
    pthread_cond_destroy(&h->idle);
    pthread_mutex_destroy(&h->mu);
    free(h);
}
