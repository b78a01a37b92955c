/* admit: admission, the 'active' count and the in-flight gauge, and the one refusal path.
 *
 * THREADS: everything here runs on the request's libmicrohttpd worker. 'active' and the gauge
 * are sequentially consistent and relaxed atomics of struct srv; the last active request to
 * complete signals s->cv (under s->mu) for srv.c's drain. The rejection counter is a relaxed
 * atomic (metrics.h), raised once per request (r->rejected).
 *
 * OWNERSHIP: a rendered refusal's body is taken and handed to conn_respond(), which frees it
 * with the response. Nothing else here allocates. */
#include "server/http/admit.h"

#include <stdatomic.h>
#include <stdio.h>

#include "server/http/srv_impl.h"

/* Wakes srv_drain() when the last active batch is gone. */
static void active_dec(struct srv *s)
{
    if (atomic_fetch_sub(&s->active, 1) == 1) {
        pthread_mutex_lock(&s->mu);
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
}

/* The one place fanout_admission_rejections_total is raised: once for each refused request. */
static void count_rejection(struct req *r)
{
    if (r->rejected)
        return;
    r->rejected = true;
    atomic_fetch_add(&r->s->metrics.rejected, 1);
}

/* Admission: at most --max-requests batches in flight; none while draining.
 * 'active' is raised before 'draining' is read (both sequentially consistent), the mirror of
 * srv_drain(), which sets 'draining' and then waits for 'active' to reach 0: either the drain
 * sees this request and waits for it, or this request sees the drain and backs out. Checking
 * 'draining' first would let a request slip in after the drain found the server idle, and be
 * suspended while the daemon is being stopped. */
bool admit(struct req *r)
{
    struct srv *s = r->s;
    atomic_fetch_add(&s->active, 1);
    int64_t before = atomic_fetch_add(&s->metrics.in_flight, 1);
    r->admitted = r->in_gauge = true;
    const char *why = NULL;
    char msg[160];
    if (atomic_load(&s->draining)) {
        why = "the server is draining; retry on another instance";
    } else if (before >= (int64_t)s->cfg.max_requests) {
        snprintf(msg, sizeof(msg), "%u batch requests already in flight (--max-requests)",
                 s->cfg.max_requests);
        why = msg;
    } else if (!membudget_room(&s->mem, s->cfg.max_body, r->body_cap)) {
        /* a batch that could not hold even one upstream body would only fail later */
        snprintf(msg, sizeof(msg), "the memory for requests in flight is spent (--max-memory "
                 "%zu bytes); retry later", s->cfg.max_memory);
        why = msg;
    }
    if (!why)
        return true;
    /* Backing out: the gauge first, then 'active'. srv_drain() returns once 'active' is 0, and
     * what it promises then is a zero gauge too; the other order left a moment in which a
     * drain could return with this refused request still counted in flight. */
    r->admitted = false;
    admit_leave_gauge(r);
    active_dec(s);
    admit_reject(r, why);
    return false;
}

void admit_leave_gauge(struct req *r)
{
    if (r->in_gauge) {
        r->in_gauge = false;
        atomic_fetch_sub(&r->s->metrics.in_flight, 1);
    }
}

void admit_release(struct req *r)
{
    admit_leave_gauge(r); /* a connection that failed before its answer was queued */
    if (r->admitted)
        active_dec(r->s);
}

enum MHD_Result admit_reject(struct req *r, const char *why)
{
    count_rejection(r);
    return conn_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded", why);
}

enum MHD_Result admit_reject_rendered(struct req *r, char *body, size_t len)
{
    count_rejection(r);
    r->err_code = "overloaded";
    return conn_respond(r, MHD_HTTP_SERVICE_UNAVAILABLE, "application/json", body, len, true,
                        true);
}

void admit_reject_streamed(struct req *r)
{
    count_rejection(r);
}
