/* Tests for the batch core (server/batch/batch.h, render.h) without HTTP: a request parsed
 * with request_parse(), run on a real fetch engine against in-process upstream stubs
 * (tests/upstub.h), and its answer rendered by the buffer writer.
 *
 * The stubs act on the last path segment, so an upstream template with a prefix before {id}
 * makes a whole upstream slow or failing: "http://A/items/sleep60000-{id}" answers every id
 * after a minute, "http://B/items/status503-{id}" fails every id with 503. Which upstream an
 * id tries first is its rendezvous ranking, so tests pick ids by asking upstreams_rank().
 *
 * Synchronization is by events: the batch's done callback (a latch), stub counters reaching a
 * value. Every bound is test_ms(); the failure modes (a minute-long upstream) lie far beyond. */
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "fetch/url.h"
#include "server/batch/attempt.h"
#include "server/batch/batch.h"
#include "server/batch/budget.h"
#include "server/batch/result.h"
#include "server/obs/metrics.h"
#include "server/batch/render.h"
#include "server/batch/request.h"
#include "tests/core_util.h"
#include "tests/srvtest.h"
#include "tests/support.h"
#include "tests/upstub.h"

#define WAIT_MS test_ms(10000)

/* An engine, stubs and the shared state a batch runs with. */
struct rig {
    struct upstub *stub[3];     /* up to three upstreams */
    unsigned nstub;
    char tmpl[3][UPSTUB_TMPL_MAX]; /* their templates */
    struct fetch *fetch;
    struct upstreams *ups;      /* the set the upstreams were made as (a reference) */
    struct upstream_live *live; /* what the flights read it from */
    struct budget hedge, retry;
    struct metrics *m;
    struct ctx *root;
    struct flights *flights;
    struct batch_env env;
    struct upstreams_opts uo;
    unsigned loops;             /* fetch loops (set before rig_init; 0: one) */
    unsigned max_conns;         /* fetch connections, all loops (set before rig_init; 0: 64) */
};

/* Starts 'n' stubs with templates "<stub i>/items/<prefix[i]>{id}" and the rest; the upstream
 * options are g->uo when its eject_after is set before the call, else no ejection. */
static bool rig_init(struct rig *g, unsigned n, const char *const *prefix, unsigned hedge_pct,
                     unsigned retry_pct)
{
    struct upstreams_opts uo = g->uo;
    unsigned loops = g->loops, max_conns = g->max_conns;
    memset(g, 0, sizeof(*g));
    g->uo = uo;
    g->loops = loops;
    g->max_conns = max_conns;
    g->nstub = n;
    const char *t[3];
    if (!upstub_start_set(n, prefix, g->stub, g->tmpl))
        return false;
    for (unsigned i = 0; i < n; i++)
        t[i] = g->tmpl[i];
    struct fetch_opts fo;
    fetch_opts_default(&fo);
    fo.loops = g->loops ? g->loops : 1;
    fo.max_conns = g->max_conns ? g->max_conns : 64;
    fo.idle_poll_ms = 600000; /* a missed wakeup would stall for minutes, not hide */
    if (fetch_new(&fo, &g->fetch) != 0)
        return false;
    if (!g->uo.eject_after)
        g->uo = (struct upstreams_opts){.policy = UPSTREAM_REPLICAS,
                                        .eject_after = 1000000,
                                        .eject_ms = 1000,
                                        .eject_max_ms = 1000,
                                        .max_ejected_pct = 50};
    char err[256];
    if (upstreams_new(t, n, &g->uo, &g->ups, err, sizeof(err)) != 0) {
        fprintf(stderr, "\n  %s\n", err);
        return false;
    }
    if (upstream_live_new(upstreams_ref(g->ups), &g->live) != 0)
        return false;
    budget_init(&g->hedge, hedge_pct, 0, ctx_now());
    budget_init(&g->retry, retry_pct, 0, ctx_now());
    for (int i = 0; i < 10; i++) { /* some credit to start with */
        budget_deposit(&g->hedge, ctx_now());
        budget_deposit(&g->retry, ctx_now());
    }
    g->m = calloc(1, sizeof(*g->m));
    if (!g->m)
        return false;
    metrics_init(g->m);
    g->root = ctx_new(ctx_background(), CTX_FOREVER);
    g->flights = flights_new();
    g->env = (struct batch_env){.flight = {.fetch = g->fetch,
                                           .ups = g->live,
                                           .root = g->root,
                                           .hedge_budget = &g->hedge,
                                           .retry_budget = &g->retry,
                                           .metrics = g->m,
                                           .flights = g->flights,
                                           .retries = 0},
                                .coalesce = true,
                                .limit = 8,
                                .max_response_bytes = 1 << 20,
                                .max_body = 1 << 20,
                                .spread_min = BATCH_SPREAD_MIN};
    return g->root != NULL && g->flights != NULL;
}

static void rig_free(struct rig *g)
{
    fetch_free(g->fetch);
    flights_free(g->flights);
    upstream_live_free(g->live);
    upstreams_free(g->ups);
    budget_destroy(&g->hedge);
    budget_destroy(&g->retry);
    for (unsigned i = 0; i < g->nstub; i++)
        upstub_free(g->stub[i]);
    ctx_free(g->root);
    free(g->m);
}

#define STUB(s, field) UPSTUB_STAT(s, field)
#define WAIT_STUB(s, field, n) UPSTUB_WAIT(s, field, n, WAIT_MS)
#define M(a) test_load(a)

/* A running batch and its answer. */
struct run {
    struct batch *b;
    bool streamed;          /* through a writer of the test's (run_start_stream()) */
    struct latch done;
    unsigned status;
    const char *code;
    cJSON *json;
    char *text;
    int64_t t0, elapsed;
};

static void on_done(void *arg)
{
    latch_add(&((struct run *)arg)->done, 1);
}

/* Parses 'body' and starts it, streaming its answer through 'stream' when not NULL; false (after
 * a message) if it cannot. */
static bool run_start_stream(struct rig *g, struct run *r, const char *body, struct writer *stream)
{
    memset(r, 0, sizeof(*r));
    latch_init(&r->done);
    struct request_limits lim = {1000, 5000, 60000};
    struct request rq;
    struct request_error e;
    char *copy = strdup(body);
    int rc = copy ? request_parse(&lim, copy, strlen(copy), NULL, &rq, &e) : -ENOMEM;
    free(copy);
    if (rc != 0) {
        fprintf(stderr, "\n  request refused: %s\n", e.message);
        return false;
    }
    r->t0 = ctx_now();
    if (batch_new(&g->env, &rq, "rid-1", on_done, r, &r->b) != 0)
        return false;
    r->streamed = stream != NULL;
    if ((stream && batch_stream(r->b, stream) != 0) || batch_run(r->b) != 0) {
        batch_free(r->b);
        r->b = NULL;
        return false;
    }
    return true;
}

static bool run_start(struct rig *g, struct run *r, const char *body)
{
    return run_start_stream(g, r, body, NULL);
}

/* Waits for the batch, renders it (unless it streamed), frees it. */
static bool run_finish(struct run *r)
{
    bool ok = latch_wait(&r->done, 1, WAIT_MS);
    r->elapsed = ctx_now() - r->t0;
    if (!ok) {
        fprintf(stderr, "\n  batch not done in time\n");
        return false; /* the batch is left to the engine's shutdown */
    }
    if (r->streamed) {
        batch_free(r->b);
        r->b = NULL;
        latch_destroy(&r->done);
        return true;
    }
    struct render_limits lim = {batch_timeout_ms(r->b), 1 << 20, 1 << 20};
    struct buf_writer bw;
    buf_writer_init(&bw, &lim);
    batch_render(r->b, &bw.w);
    r->status = bw.status;
    r->code = bw.code;
    r->text = bw.out.data ? strdup(bw.out.data) : NULL;
    r->json = r->text ? cJSON_Parse(r->text) : NULL;
    buf_writer_destroy(&bw);
    batch_free(r->b);
    r->b = NULL;
    latch_destroy(&r->done);
    return true;
}

static bool run_body(struct rig *g, struct run *r, const char *body)
{
    return run_start(g, r, body) && run_finish(r);
}

static void run_free(struct run *r)
{
    cJSON_Delete(r->json);
    free(r->text);
}

static const cJSON *item(const struct run *r, int i, const char *field)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(r->json, "results");
    const cJSON *o = cJSON_GetArrayItem(a, i);
    return field ? cJSON_GetObjectItemCaseSensitive(o, field) : o;
}

static const char *item_code(const struct run *r, int i)
{
    const cJSON *e = item(r, i, "error");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "code");
    return cJSON_IsString(c) ? c->valuestring : "";
}

static const char *data_id(const struct run *r, int i)
{
    const cJSON *d = item(r, i, "data");
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(d, "id");
    return cJSON_IsString(id) ? id->valuestring : "";
}

/* An id whose ranking puts upstream 'first' first (and, when second >= 0, 'second' next). */
static void id_ranked(const struct rig *g, unsigned first, int second, char *out, size_t cap)
{
    test_key_ranked(g->ups, first, second, out, cap);
}


/* ---------------------------------------------------------------- hedging */

/* What the hedge test reads before and after a batch, on its two replicas A and B. */
struct hedge_counts {
    uint64_t a_requests, b_requests; /* requests each stub received */
    uint64_t a_canceled;             /* requests A saw closed before it answered */
    uint64_t hedges_sent, hedges_won;
    uint64_t a_lost, b_ok;           /* attempts on A that lost, on B that answered */
};

static void hedge_counts_read(struct rig *g, struct hedge_counts *c)
{
    c->a_requests = STUB(g->stub[0], requests);
    c->b_requests = STUB(g->stub[1], requests);
    c->a_canceled = STUB(g->stub[0], canceled);
    c->hedges_sent = M(&g->m->hedges_sent);
    c->hedges_won = M(&g->m->hedges_won);
    c->a_lost = M(&upstream_stats(g->ups, 0)->fetches[OUTCOME_CANCELED]);
    c->b_ok = M(&upstream_stats(g->ups, 1)->fetches[OUTCOME_OK]);
}

/* An id starting with 'prefix' that ranks A first and B second. */
static void id_ranked_with(const struct rig *g, const char *prefix, char *out, size_t cap)
{
    for (unsigned i = 0;; i++) {
        uint16_t rank[UPSTREAM_MEMBERS_MAX];
        snprintf(out, cap, "%s%u", prefix, i);
        upstreams_rank(g->ups, out, strlen(out), ctx_now(), rank);
        if (rank[0] == 0 && rank[1] == 1)
            return;
    }
}

/* The first attempt hangs on A; after the hedge delay a second goes to B and wins; A's socket is
 * closed at once (seen at the stub); the metrics say one hedge sent and won. */
static void test_batch_hedge_wins_and_loser_is_closed(void)
{
    struct rig g = {0};
    const char *pre[] = {"sleep60000-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 100, 0));
    g.env.flight.hedge_after_ms = 20;
    char id[32], body[128];
    struct run r;
    /* A's closing can be seen only if the first attempt reached A before B answered the hedge;
     * on a loaded machine it may not have, so the batch is sent again (a fresh id, ranked A
     * then B) until a round has had it there. */
    uint64_t on_a = 0;
    for (unsigned round = 0; round < 5 && on_a == 0; round++) {
        struct hedge_counts before, after;
        hedge_counts_read(&g, &before);
        char prefix[12];
        snprintf(prefix, sizeof(prefix), "r%u-", round);
        id_ranked_with(&g, prefix, id, sizeof(id)); /* A first, B second */
        snprintf(body, sizeof(body), "{\"ids\":[\"%s\"],\"timeout_ms\":30000}", id);
        CU_ASSERT_FATAL(run_body(&g, &r, body));
        CU_ASSERT_EQUAL(r.status, 200);
        CU_ASSERT_STRING_EQUAL(data_id(&r, 0), id); /* B's answer: its id, not "sleep60000-..." */
        CU_ASSERT(r.elapsed < test_ms(5000));
        hedge_counts_read(&g, &after);
        /* One hedge to B, or (if B was slow to answer) a second one, back to A. */
        uint64_t sent = after.hedges_sent - before.hedges_sent;
        CU_ASSERT(sent >= 1 && sent <= ATTEMPT_MAX_HEDGES);
        CU_ASSERT_EQUAL(after.hedges_won - before.hedges_won, 1);
        CU_ASSERT_EQUAL(after.a_lost - before.a_lost, sent); /* every attempt on A lost */
        CU_ASSERT_EQUAL(after.b_ok - before.b_ok, 1);
        /* Every attempt that reached A is closed there (the loser, at once). */
        CU_ASSERT_EQUAL(after.b_requests - before.b_requests, 1);
        on_a = after.a_requests - before.a_requests;
        CU_ASSERT(on_a <= sent);
        CU_ASSERT(WAIT_STUB(g.stub[0], canceled, before.a_canceled + on_a));
        run_free(&r);
    }
    CU_ASSERT(on_a >= 1);

    /* "hedge": false in the body: no hedge, the deadline ends it. */
    uint64_t sent = M(&g.m->hedges_sent), b = STUB(g.stub[1], requests);
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"],\"timeout_ms\":200,\"hedge\":false}", id);
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT_EQUAL(r.status, 504);
    CU_ASSERT_STRING_EQUAL(r.code, "deadline_exceeded");
    CU_ASSERT_EQUAL(M(&g.m->hedges_sent), sent);
    CU_ASSERT_EQUAL(STUB(g.stub[1], requests), b);
    run_free(&r);
    rig_free(&g);
}

/* The second hedge goes out half a delay after the first, not a whole one: with both replicas
 * holding every request, the first attempt goes to A, the first hedge to B after the delay, the
 * second back to A. The gap between the two hedges is timed from the test's side (so a late
 * look only shortens it), against a bound well under one delay; the whole-delay spacing this
 * replaced fails it. */
static void test_batch_second_hedge_after_half_the_delay(void)
{
    struct rig g = {0};
    const char *pre[] = {"sleep60000-", "sleep60000-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 100, 0));
    int64_t delay = test_ms(1000);
    g.env.flight.hedge_after_ms = delay;
    char id[32], body[128];
    id_ranked(&g, 0, 1, id, sizeof(id));
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"],\"timeout_ms\":60000}", id);
    struct run r;
    CU_ASSERT_FATAL(run_start(&g, &r, body));
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[1], requests, 1)); /* the first hedge, at B */
    int64_t first = ctx_now();
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[0], requests, 2)); /* the second, back at A */
    int64_t gap = ctx_now() - first;
    CU_ASSERT(gap < delay * 85 / 100);
    CU_ASSERT_EQUAL(M(&g.m->hedges_sent), 2);
    ctx_cancel(batch_ctx(r.b), -EPIPE);
    CU_ASSERT_FATAL(run_finish(&r));
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 2));
    CU_ASSERT(WAIT_STUB(g.stub[1], canceled, 1));
    run_free(&r);
    rig_free(&g);
}

/* An empty hedge budget refuses the hedge: counted, and the first attempt's answer is used. */
static void test_batch_hedge_refused_by_budget(void)
{
    struct rig g = {0};
    const char *pre[] = {"sleep300-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 0));
    g.env.flight.hedge_after_ms = 20;
    while (budget_withdraw(&g.hedge, ctx_now())) /* spend the starting credit */
        ;
    char id[32], body[128];
    id_ranked(&g, 0, 1, id, sizeof(id));
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"]}", id);
    struct run r;
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT_EQUAL(r.status, 200);
    char want[64];
    snprintf(want, sizeof(want), "sleep300-%s", id); /* A's answer */
    CU_ASSERT_STRING_EQUAL(data_id(&r, 0), want);
    CU_ASSERT(r.elapsed >= 300);
    CU_ASSERT_EQUAL(M(&g.m->hedges_refused), 1);
    CU_ASSERT_EQUAL(M(&g.m->hedges_sent), 0);
    CU_ASSERT_EQUAL(STUB(g.stub[1], requests), 0);
    run_free(&r);
    rig_free(&g);
}

/* Shards: the hedge goes to the same upstream; canceling the batch closes both attempts. */
static void test_batch_shards_hedge_same_upstream_and_cancel_closes_all(void)
{
    struct rig g = {0};
    const char *pre[] = {"sleep60000-", "sleep60000-"};
    memset(&g, 0, sizeof(g));
    g.uo = (struct upstreams_opts){.policy = UPSTREAM_SHARDS,
                                   .eject_after = 5,
                                   .eject_ms = 1000,
                                   .eject_max_ms = 1000,
                                   .max_ejected_pct = 50};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 100, 0));
    g.env.flight.hedge_after_ms = 10;
    char a[32], b[32], body[160];
    id_ranked(&g, 0, -1, a, sizeof(a));
    id_ranked(&g, 1, -1, b, sizeof(b));
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\",\"%s\"],\"timeout_ms\":30000}", a, b);
    struct run r;
    CU_ASSERT_FATAL(run_start(&g, &r, body));
    /* Each id's two attempts reach its own shard. */
    CU_ASSERT(WAIT_STUB(g.stub[0], in_flight, 2));
    CU_ASSERT(WAIT_STUB(g.stub[1], in_flight, 2));
    ctx_cancel(batch_ctx(r.b), -EPIPE); /* as a client going away does */
    CU_ASSERT_FATAL(run_finish(&r));
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 2));
    CU_ASSERT(WAIT_STUB(g.stub[1], canceled, 2));
    uint64_t sent = M(&g.m->hedges_sent); /* each id hedged once or twice */
    CU_ASSERT(sent >= 2 && sent <= 2 * ATTEMPT_MAX_HEDGES);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]) + M(&upstream_stats(g.ups, 1)->fetches[OUTCOME_CANCELED]),
                    2 + sent);
    run_free(&r);
    rig_free(&g);
}

/* ---------------------------------------------------------------- retries */

/* A 503 from the first upstream is retried on the next; with no retries it is the answer; a 500
 * or a 404 is never retried. */
static void test_batch_retry_goes_to_the_next_upstream(void)
{
    struct rig g = {0};
    const char *pre[] = {"status503-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 100));
    g.env.flight.retries = 1;
    char id[32], body[128];
    id_ranked(&g, 0, 1, id, sizeof(id));
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"]}", id);
    struct run r;
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(data_id(&r, 0), id);
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 1);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_STATUS]), 1);
    run_free(&r);
    g.env.flight.retries = 0;
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(r.code, "upstream_status");
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 1);
    run_free(&r);
    rig_free(&g);

    const char *pre500[] = {"status500-", "status404-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre500, 0, 100));
    g.env.flight.retries = 3;
    char a[32], b2[32];
    id_ranked(&g, 0, 1, a, sizeof(a));
    id_ranked(&g, 1, 0, b2, sizeof(b2));
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\",\"%s\"],\"mode\":\"settled\"}", a, b2);
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(item_code(&r, 0), "upstream_status");
    CU_ASSERT_STRING_EQUAL(item_code(&r, 1), "upstream_status");
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 0);
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests) + STUB(g.stub[1], requests), 2);
    run_free(&r);
    rig_free(&g);
}

/* A connection refused is retried; an empty retry budget refuses (counted); every attempt that
 * reached an upstream went out before the deadline (it carried a positive remaining time). */
static void test_batch_retry_budget_and_deadline(void)
{
    struct rig g = {0};
    const char *pre[] = {"status503-", "status503-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 0));
    g.env.flight.retries = 1;
    while (budget_withdraw(&g.retry, ctx_now()))
        ;
    char id[32], body[160];
    id_ranked(&g, 0, 1, id, sizeof(id));
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"]}", id);
    struct run r;
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_EQUAL(M(&g.m->retries_refused), 1);
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 0);
    CU_ASSERT_EQUAL(STUB(g.stub[1], requests), 0);
    run_free(&r);
    /* Plenty of budget and retries, a short deadline: the chain stops at the deadline. */
    for (int i = 0; i < 2000; i++)
        budget_deposit(&g.retry, ctx_now());
    g.env.flight.retries = 10;
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"],\"timeout_ms\":60}", id);
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT(r.status == 502 || r.status == 504);
    struct upstub_req log[64];
    size_t late = 0, total = 0;
    for (unsigned s = 0; s < 2; s++) {
        size_t n = upstub_log(g.stub[s], log, 64);
        for (size_t i = 0; i < n; i++) {
            total++;
            late += !log[i].has_timeout_ms || atoll(log[i].timeout_ms) <= 0;
        }
    }
    CU_ASSERT(total >= 1);
    CU_ASSERT_EQUAL(late, 0);
    CU_ASSERT(M(&g.m->retries_sent) < 10); /* the backoffs outgrew the 60 ms */
    run_free(&r);
    rig_free(&g);
}

/* Canceled while backing off or retrying: no attempt starts afterwards. */
static void test_batch_no_retry_after_cancel(void)
{
    struct rig g = {0};
    const char *pre[] = {"status503-", "status503-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 1000));
    for (int i = 0; i < 2000; i++)
        budget_deposit(&g.retry, ctx_now());
    g.env.flight.retries = 10;
    char id[32], body[128];
    id_ranked(&g, 0, 1, id, sizeof(id));
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"],\"timeout_ms\":30000}", id);
    struct run r;
    CU_ASSERT_FATAL(run_start(&g, &r, body));
    CU_ASSERT(WAIT_STUB(g.stub[1], requests, 1)); /* the first retry went out */
    ctx_cancel(batch_ctx(r.b), -ECANCELED);
    uint64_t at_cancel = STUB(g.stub[0], requests) + STUB(g.stub[1], requests);
    CU_ASSERT_FATAL(run_finish(&r));
    uint64_t after = STUB(g.stub[0], requests) + STUB(g.stub[1], requests);
    CU_ASSERT(after <= at_cancel + 1); /* at most the one already on its way */
    CU_ASSERT(r.elapsed < test_ms(5000));
    run_free(&r);
    rig_free(&g);
}

/* ---------------------------------------------------------------- failover and ejection */

/* One of three replicas refuses connections: every batch still succeeds (retried on the next
 * replica), and after --eject-after failures it is ejected and no longer tried. */
static void test_batch_failover_and_ejection(void)
{
    struct rig g = {0};
    memset(&g, 0, sizeof(g));
    g.uo = (struct upstreams_opts){.policy = UPSTREAM_REPLICAS,
                                   .eject_after = 3,
                                   .eject_ms = 600000,
                                   .eject_max_ms = 600000,
                                   .max_ejected_pct = 50};
    CU_ASSERT_FATAL(rig_init(&g, 2, NULL, 0, 1000));
    for (int i = 0; i < 2000; i++)
        budget_deposit(&g.retry, ctx_now());
    g.env.flight.retries = 1;
    /* A third upstream whose port refuses: the next set has it first in the list. */
    uint16_t port = 0;
    int refusing = srvtest_refusing_port(&port);
    CU_ASSERT_FATAL(refusing >= 0);
    char dead[128];
    snprintf(dead, sizeof(dead), "http://127.0.0.1:%u/items/{id}", port);
    const char *t[] = {dead, g.tmpl[0], g.tmpl[1]};
    char err[256];
    struct upstreams *next = NULL;
    CU_ASSERT_FATAL(upstreams_with(g.ups, t, 3, &next, err, sizeof(err)) == 0);
    upstream_live_swap(g.live, upstreams_ref(next));
    upstreams_free(g.ups);
    g.ups = next;
    int failed = 0;
    for (int i = 0; i < 20; i++) {
        char id[32], body[128];
        snprintf(id, sizeof(id), "x%d", i);
        snprintf(body, sizeof(body), "{\"ids\":[\"%s\",\"%s-b\"]}", id, id);
        struct run r;
        CU_ASSERT_FATAL(run_body(&g, &r, body));
        failed += r.status != 200;
        run_free(&r);
    }
    CU_ASSERT_EQUAL(failed, 0);
    CU_ASSERT_TRUE(upstream_ejected(g.ups, 0, ctx_now()));
    CU_ASSERT_EQUAL(upstream_ejections(g.ups, 0), 1);
    uint64_t tried = M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_UNREACHABLE]);
    /* eject_after attempts, plus at most the batch's other id already on its way to it at the
     * moment of the ejection; then never again. Each was retried elsewhere. */
    CU_ASSERT(tried >= 3 && tried <= 4);
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), tried);
    close(refusing);
    rig_free(&g);
}

/* ---------------------------------------------------------------- settled mode */

/* mode settled: 200 with one entry per position, each a result or its own error: upstream
 * status (with upstream_status), unreachable, too large, deadline (in flight, and never started
 * behind the limit), duplicates at each position. */
static void test_batch_settled_every_error_kind(void)
{
    struct rig g = {0};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 5;
    g.env.max_body = 1000; /* for the message only: the engine's cap is set below */
    fetch_free(g.fetch);
    struct fetch_opts fo;
    fetch_opts_default(&fo);
    fo.loops = 1;
    fo.max_conns = 16;
    fo.max_body = 1000;
    fo.idle_poll_ms = 600000;
    CU_ASSERT_FATAL(fetch_new(&fo, &g.fetch) == 0);
    g.env.flight.fetch = g.fetch;
    /* The deadline is far longer than the fast fetches take, scaled like every bound. */
    int64_t tmo = test_ms(1000);
    char body[512];
    snprintf(body, sizeof(body),
             "{\"mode\":\"settled\",\"timeout_ms\":%lld,\"ids\":[\"ok\",\"fail-1\","
             "\"status404-2\",\"empty-3\",\"big5000\",\"sleep60000-4\",7,\"ok\","
             "\"sleep60000-5\",\"sleep60000-6\",\"sleep60000-7\"]}",
             (long long)tmo);
    struct run r;
    CU_ASSERT_FATAL(run_body(&g, &r, body));
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_PTR_NULL(r.code);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(cJSON_GetObjectItem(r.json, "results")), 11);
    CU_ASSERT_STRING_EQUAL(data_id(&r, 0), "ok");
    CU_ASSERT(cJSON_IsNumber(item(&r, 0, "status")));
    CU_ASSERT_STRING_EQUAL(item_code(&r, 1), "upstream_status");
    const cJSON *us = cJSON_GetObjectItem(item(&r, 1, "error"), "upstream_status");
    CU_ASSERT(cJSON_IsNumber(us) && us->valueint == 500);
    CU_ASSERT_STRING_EQUAL(item_code(&r, 2), "upstream_status");
    us = cJSON_GetObjectItem(item(&r, 2, "error"), "upstream_status");
    CU_ASSERT(cJSON_IsNumber(us) && us->valueint == 404);
    CU_ASSERT_STRING_EQUAL(item_code(&r, 3), "upstream_unreachable");
    CU_ASSERT_STRING_EQUAL(item_code(&r, 4), "upstream_too_large");
    CU_ASSERT_STRING_EQUAL(item_code(&r, 5), "deadline_exceeded");
    CU_ASSERT(cJSON_IsNumber(item(&r, 6, "id")) && item(&r, 6, "id")->valueint == 7);
    CU_ASSERT_STRING_EQUAL(data_id(&r, 6), "7");
    CU_ASSERT_STRING_EQUAL(data_id(&r, 7), "ok"); /* a duplicate, at its own position */
    for (int i = 8; i < 11; i++) /* queued behind the limit, or in flight: the deadline */
        CU_ASSERT_STRING_EQUAL(item_code(&r, i), "deadline_exceeded");
    const cJSON *msg = cJSON_GetObjectItem(item(&r, 5, "error"), "message");
    char want[64];
    snprintf(want, sizeof(want), "%lld ms", (long long)tmo);
    CU_ASSERT(cJSON_IsString(msg) && strstr(msg->valuestring, want));
    CU_ASSERT(r.elapsed >= tmo && r.elapsed < tmo + test_ms(5000));
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 1));
    run_free(&r);
    /* The same batch in mode all: the first error decides. */
    CU_ASSERT_FATAL(run_body(&g, &r, "{\"ids\":[\"ok\",\"fail-1\"]}"));
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(r.code, "upstream_status");
    run_free(&r);
    rig_free(&g);
}

/* ---------------------------------------------------------------- first error, answers */

/* Mode all: one 500 among slow siblings ends the batch at once; the siblings are closed at the
 * upstream and counted canceled, not as upstream status. */
static void test_batch_first_error_cancels_siblings_counted_canceled(void)
{
    struct rig g = {0};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    struct run r;
    CU_ASSERT_FATAL(run_start(&g, &r, "{\"ids\":[\"sleep60000-a\",\"sleep60000-b\","
                                      "\"sleep60000-c\",\"fail-x\"],\"timeout_ms\":30000}"));
    CU_ASSERT_FATAL(run_finish(&r));
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(r.code, "upstream_status");
    const cJSON *id = cJSON_GetObjectItem(cJSON_GetObjectItem(r.json, "error"), "id");
    CU_ASSERT(cJSON_IsString(id) && !strcmp(id->valuestring, "fail-x"));
    CU_ASSERT(r.elapsed < test_ms(5000));
    uint64_t sent = upstub_count(g.stub[0], "/items/sleep60000-a") +
                    upstub_count(g.stub[0], "/items/sleep60000-b") +
                    upstub_count(g.stub[0], "/items/sleep60000-c");
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, sent));
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_STATUS]), 1);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), sent);
    struct fetch_stats st;
    fetch_stats(g.fetch, &st);
    CU_ASSERT_EQUAL(st.status, 1);
    CU_ASSERT_EQUAL(st.canceled, sent);
    run_free(&r);
    rig_free(&g);
}

/* A response that would pass max_response_bytes fails with upstream_too_large; duplicates
 * count at each position. */
static void test_batch_response_cap(void)
{
    struct rig g = {0};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.max_response_bytes = 4096;
    struct run r;
    CU_ASSERT_FATAL(run_body(&g, &r, "{\"ids\":[\"big1000\",\"big1000\",\"big1000\"]}"));
    CU_ASSERT_EQUAL(r.status, 200);
    run_free(&r);
    CU_ASSERT_FATAL(run_body(&g, &r, "{\"ids\":[\"big1500\",\"big1500\",\"big1500\"]}"));
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(r.code, "upstream_too_large");
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 2); /* one fetch per distinct id */
    run_free(&r);
    rig_free(&g);
}

/* Many concurrent batches with hedges, retries and cancels on two loops, for make tsan: each
 * ends exactly once, nothing is left in the engine. */
struct storm {
    struct rig *g;
    int rounds;
    int bad;
};

static void *storm_main(void *arg)
{
    struct storm *s = arg;
    for (int i = 0; i < s->rounds; i++) {
        char body[256];
        snprintf(body, sizeof(body),
                 "{\"ids\":[\"a%d\",\"sleep%d-b\",\"fail-%d\",\"c%d\",\"a%d\"],\"mode\":\"%s\","
                 "\"timeout_ms\":%d}",
                 i % 7, i % 30, i, i % 5, i % 7, i % 2 ? "settled" : "all", 5 + i % 40);
        struct run r;
        if (!run_start(s->g, &r, body)) {
            s->bad++;
            continue;
        }
        if (i % 3 == 0)
            ctx_cancel(batch_ctx(r.b), -EPIPE);
        if (!run_finish(&r))
            s->bad++;
        run_free(&r);
    }
    return NULL;
}

static void test_batch_storm(void)
{
    int threads0 = test_thread_count(), fds0 = test_fd_count();
    struct rig g = {0};
    const char *pre[] = {"", "status503-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 50, 1000));
    g.env.flight.hedge_after_ms = 3;
    g.env.flight.retries = 2;
    enum { T = 4 };
    pthread_t t[T];
    struct storm s[T];
    for (int i = 0; i < T; i++) {
        s[i] = (struct storm){&g, core_rounds(60), 0};
        CU_ASSERT_FATAL(pthread_create(&t[i], NULL, storm_main, &s[i]) == 0);
    }
    int bad = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(t[i], NULL);
        bad += s[i].bad;
    }
    CU_ASSERT_EQUAL(bad, 0);
    struct fetch_stats st;
    fetch_stats(g.fetch, &st);
    CU_ASSERT_EQUAL(st.in_flight, 0);
    rig_free(&g);
    CU_ASSERT(test_settles_to(threads0 + 1 /* ctx timer */, fds0, test_ms(5000)) ||
              test_settles_to(threads0, fds0, test_ms(5000)));
}

/* ---------------------------------------------------------------- coalescing */

static bool batch_is_done(void *arg)
{
    return latch_get(&((struct run *)arg)->done) > 0;
}

/* Two batches ask for the same key: one upstream request. The first one to leave (a client
 * gone) does not disturb the other; when the last one leaves, the flight is canceled and its
 * socket closed at the upstream. */
static void test_coalesce_last_waiter_cancels_flight(void)
{
    struct rig g = {0};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    const char *body = "{\"ids\":[\"fault-silent\"],\"timeout_ms\":60000}";
    struct run a, b;
    CU_ASSERT_FATAL(run_start(&g, &a, body));
    CU_ASSERT(WAIT_STUB(g.stub[0], in_flight, 1));
    CU_ASSERT_FATAL(run_start(&g, &b, body));
    CU_ASSERT(test_wait_counter(&g.m->flights_joined, 1,
                              WAIT_MS));
    ctx_cancel(batch_ctx(a.b), -EPIPE); /* a's client goes away */
    CU_ASSERT_FATAL(run_finish(&a));
    CU_ASSERT_NOT_EQUAL(a.status, 200); /* canceled: its client is gone */
    CU_ASSERT_FALSE(batch_is_done(&b)); /* b still waits on the flight */
    CU_ASSERT_EQUAL(STUB(g.stub[0], canceled), 0);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 0);
    ctx_cancel(batch_ctx(b.b), -EPIPE);
    CU_ASSERT_FATAL(run_finish(&b));
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 1)); /* the flight's attempt, closed */
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 1);
    CU_ASSERT_EQUAL(M(&g.m->flights_started), 1);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 1);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), 1);
    run_free(&a);
    run_free(&b);
    rig_free(&g);
}

/* A waiter's own deadline ends that waiter alone, with a deadline error; the flight goes on
 * for the later one, with a fresh attempt once the first attempt's deadline (the earlier
 * waiter's) has passed; a batch that fails (mode all) leaves its flights to the others. */
static void test_coalesce_deadline_is_per_waiter(void)
{
    struct rig g = {0};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    struct run a, b, c;
    CU_ASSERT_FATAL(run_start(&g, &a, "{\"ids\":[\"fault-silent\"],\"timeout_ms\":300}"));
    CU_ASSERT(WAIT_STUB(g.stub[0], in_flight, 1));
    CU_ASSERT_FATAL(run_start(&g, &b, "{\"ids\":[\"fault-silent\"],\"timeout_ms\":60000}"));
    CU_ASSERT_FATAL(run_finish(&a));
    CU_ASSERT_EQUAL(a.status, 504);
    CU_ASSERT_STRING_EQUAL(a.code, "deadline_exceeded");
    CU_ASSERT_FALSE(batch_is_done(&b));
    if (M(&g.m->flights_joined) == 1) { /* b joined before a's deadline (not a given) */
        /* The first attempt ended at a's deadline; the next one carries b's. */
        CU_ASSERT(WAIT_STUB(g.stub[0], requests, 2));
        CU_ASSERT(WAIT_STUB(g.stub[0], in_flight, 1));
        struct upstub_req log[4];
        size_t n = upstub_log(g.stub[0], log, 4);
        CU_ASSERT_FATAL(n == 2);
        CU_ASSERT(atoll(log[0].timeout_ms) <= 300);
        CU_ASSERT(atoll(log[1].timeout_ms) > 300);
    }
    /* c fails at once (a 500) while sharing the silent key with b: b is not disturbed. */
    CU_ASSERT_FATAL(run_start(&g, &c, "{\"ids\":[\"fault-silent\",\"fail-c\"],\"timeout_ms\":60000}"));
    CU_ASSERT_FATAL(run_finish(&c));
    CU_ASSERT_EQUAL(c.status, 502);
    CU_ASSERT_FALSE(batch_is_done(&b));
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 0);
    ctx_cancel(batch_ctx(b.b), -EPIPE);
    CU_ASSERT_FATAL(run_finish(&b));
    CU_ASSERT(test_wait_counter(&g.m->flights_abandoned, 1,
                              WAIT_MS));
    run_free(&a);
    run_free(&b);
    run_free(&c);
    rig_free(&g);
}

/* A flight that has failed is never joined: the next batch starts a new one. Opting out per
 * request ("coalesce": false) or for the server (--coalesce off) fetches for each batch. */
static void test_coalesce_never_joins_a_finished_flight_and_opt_out(void)
{
    struct rig g = {0};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    struct run a, b;
    CU_ASSERT_FATAL(run_body(&g, &a, "{\"ids\":[\"fail-x\"]}"));
    CU_ASSERT_EQUAL(a.status, 502);
    CU_ASSERT_FATAL(run_body(&g, &b, "{\"ids\":[\"fail-x\"]}"));
    CU_ASSERT_EQUAL(b.status, 502);
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 2);
    CU_ASSERT_EQUAL(M(&g.m->flights_started), 2);
    CU_ASSERT_EQUAL(M(&g.m->flights_joined), 0);
    run_free(&a);
    run_free(&b);

    for (int off = 0; off < 2; off++) { /* per request, then for the server */
        g.env.coalesce = off == 1 ? false : true;
        const char *body = off ? "{\"ids\":[\"fault-silent\"],\"timeout_ms\":60000}"
                               : "{\"ids\":[\"fault-silent\"],\"timeout_ms\":60000,"
                                 "\"coalesce\":false}";
        uint64_t req0 = STUB(g.stub[0], requests), can0 = STUB(g.stub[0], canceled);
        CU_ASSERT_FATAL(run_start(&g, &a, body));
        CU_ASSERT_FATAL(run_start(&g, &b, body));
        CU_ASSERT(WAIT_STUB(g.stub[0], requests, req0 + 2)); /* one each */
        ctx_cancel(batch_ctx(a.b), -EPIPE);
        CU_ASSERT_FATAL(run_finish(&a));
        CU_ASSERT(WAIT_STUB(g.stub[0], canceled, can0 + 1)); /* a's own, at once */
        CU_ASSERT_FALSE(batch_is_done(&b));
        ctx_cancel(batch_ctx(b.b), -EPIPE);
        CU_ASSERT_FATAL(run_finish(&b));
        CU_ASSERT(WAIT_STUB(g.stub[0], canceled, can0 + 2));
        run_free(&a);
        run_free(&b);
    }
    CU_ASSERT_EQUAL(M(&g.m->flights_joined), 0);
    rig_free(&g);
}

/* Hot keys: 1000 batches in flight at once over 10 ids on two loops (for make tsan): every
 * batch gets every id's own answer, and the upstream sees far fewer requests than calls. */
enum { HOT_BATCHES = 1000, HOT_KEYS = 10, HOT_PER = 4 };

struct hot {
    struct rig *g;
    struct run r[HOT_BATCHES / 4];
    int n, bad;
};

static void *hot_main(void *arg)
{
    struct hot *h = arg;
    for (int i = 0; i < h->n; i++) {
        char body[256];
        int k = i % HOT_KEYS;
        snprintf(body, sizeof(body), "{\"ids\":[\"sleep20-h%d\",\"sleep20-h%d\",\"h%d\",\"sleep20-h%d\"]}",
                 k, (k + 1) % HOT_KEYS, k, (k + 3) % HOT_KEYS);
        if (!run_start(h->g, &h->r[i], body))
            h->bad++;
    }
    for (int i = 0; i < h->n; i++) {
        struct run *r = &h->r[i];
        if (!r->b || !run_finish(r)) {
            h->bad++;
            continue;
        }
        int k = i % HOT_KEYS;
        char want[HOT_PER][32];
        snprintf(want[0], 32, "sleep20-h%d", k);
        snprintf(want[1], 32, "sleep20-h%d", (k + 1) % HOT_KEYS);
        snprintf(want[2], 32, "h%d", k);
        snprintf(want[3], 32, "sleep20-h%d", (k + 3) % HOT_KEYS);
        if (r->status != 200)
            h->bad++;
        for (int j = 0; j < HOT_PER && r->status == 200; j++)
            h->bad += strcmp(data_id(r, j), want[j]) != 0;
        run_free(r);
    }
    return NULL;
}

static void test_coalesce_hot_keys_many_batches(void)
{
    int threads0 = test_thread_count(), fds0 = test_fd_count();
    struct rig g = {.loops = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 4;
    enum { T = 4 };
    pthread_t t[T];
    static struct hot h[T];
    for (int i = 0; i < T; i++) {
        h[i] = (struct hot){.g = &g, .n = HOT_BATCHES / T};
        CU_ASSERT_FATAL(pthread_create(&t[i], NULL, hot_main, &h[i]) == 0);
    }
    int bad = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(t[i], NULL);
        bad += h[i].bad;
    }
    CU_ASSERT_EQUAL(bad, 0);
    uint64_t started = M(&g.m->flights_started), joined = M(&g.m->flights_joined);
    CU_ASSERT_EQUAL(started + joined, (uint64_t)HOT_BATCHES * HOT_PER);
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), started);
    CU_ASSERT(joined > 0);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 0);
    fprintf(stderr, "\n  %d calls, %llu upstream requests (not asserted beyond > 0 joins) ",
            HOT_BATCHES * HOT_PER, (unsigned long long)started);
    struct fetch_stats st;
    fetch_stats(g.fetch, &st);
    CU_ASSERT_EQUAL(st.in_flight, 0);
    rig_free(&g);
    CU_ASSERT(test_settles_to(threads0 + 1 /* ctx timer */, fds0, test_ms(5000)) ||
              test_settles_to(threads0, fds0, test_ms(5000)));
}

/* ---------------------------------------------------------------- spreading over the loops */

/* What the tests below see of the loops: which thread a loop is, a loop's thread held inside a
 * timer callback, and a batch's streamed items with the thread each came on. The loop a batch
 * runs on is known in advance: batch_new() takes the next loop round-robin, and nothing else
 * takes one here, so a test that takes a turn itself (fetch_pick_loop()) knows that the next
 * batch runs on the other of the two loops. */

struct probe {
    struct latch ran;
    pthread_t tid;
};

static void probe_fired(void *arg, struct fetch_result *r)
{
    struct probe *p = arg;
    (void)r;
    p->tid = pthread_self();
    latch_add(&p->ran, 1);
}

/* The thread of fetch loop 'loop'. */
static bool loop_thread(struct rig *g, unsigned loop, pthread_t *out)
{
    struct probe p;
    latch_init(&p.ran);
    bool ok = fetch_after(g->fetch, loop, ctx_background(), 0, probe_fired, &p) == 0 &&
              latch_wait(&p.ran, 1, WAIT_MS);
    if (ok)
        *out = p.tid;
    latch_destroy(&p.ran);
    return ok;
}

/* Holds a loop's thread inside a timer callback until released (bounded, so that a failed test
 * cannot hang the engine's shutdown). Destroyed after the engine is freed. */
struct blocker {
    struct latch in, go;
};

static void blocker_fired(void *arg, struct fetch_result *r)
{
    struct blocker *k = arg;
    (void)r;
    latch_add(&k->in, 1);
    latch_wait(&k->go, 1, 3 * WAIT_MS);
}

static bool block_loop(struct rig *g, unsigned loop, struct blocker *k)
{
    latch_init(&k->in);
    latch_init(&k->go);
    return fetch_after(g->fetch, loop, ctx_background(), 0, blocker_fired, k) == 0 &&
           latch_wait(&k->in, 1, WAIT_MS);
}

static void unblock_loop(struct blocker *k)
{
    latch_add(&k->go, 1);
}

static void blocker_destroy(struct blocker *k)
{
    latch_destroy(&k->in);
    latch_destroy(&k->go);
}

/* A writer that records the positions streamed to it, in the order they came, and whether each
 * came on the batch's loop thread. Written on that thread only; read after items reached a count
 * (the latch orders them). */
enum { REC_MAX = 128 };

struct rec_writer {
    struct writer w;      /* first */
    pthread_t loop;       /* the batch's loop thread */
    struct latch items;   /* item() calls so far */
    size_t pos[REC_MAX];  /* their positions */
    int err[REC_MAX];     /* their errors */
    bool wrong_thread;    /* an item came on another thread */
    bool failed;          /* fail() came */
    bool ended;
};

static void rec_begin(struct writer *w)
{
    (void)w;
}

static void rec_item(struct writer *w, size_t pos, const char *echo, const struct call_result *r)
{
    struct rec_writer *rw = (struct rec_writer *)w;
    (void)echo;
    long n = latch_get(&rw->items);
    if (n < REC_MAX) {
        rw->pos[n] = pos;
        rw->err[n] = r->err;
    }
    if (!pthread_equal(pthread_self(), rw->loop))
        rw->wrong_thread = true;
    latch_add(&rw->items, 1);
}

static void rec_fail(struct writer *w, const char *echo, const struct call_result *r)
{
    (void)echo;
    (void)r;
    ((struct rec_writer *)w)->failed = true;
}

static void rec_end(struct writer *w)
{
    ((struct rec_writer *)w)->ended = true;
}

static const struct writer_ops rec_ops = {rec_begin, rec_item, rec_fail, rec_end};

static void rec_init(struct rec_writer *rw, pthread_t loop)
{
    memset(rw, 0, sizeof(*rw));
    rw->w.ops = &rec_ops;
    rw->w.lim = (struct render_limits){60000, 1 << 20, 1 << 20};
    rw->w.fail_pos = SIZE_MAX;
    rw->loop = loop;
    latch_init(&rw->items);
}

/* Whether the first n recorded items are exactly positions [0, n), each once, each with 'err'. */
static bool rec_first_are_own_stripe(const struct rec_writer *rw, size_t n, int err)
{
    bool seen[REC_MAX] = {false};
    for (size_t i = 0; i < n; i++) {
        if (rw->pos[i] >= n || seen[rw->pos[i]] || rw->err[i] != err)
            return false;
        seen[rw->pos[i]] = true;
    }
    return true;
}

/* {"ids":["<prefix>0",...,"<prefix><n-1>"],<extra>} (malloc'd). */
static char *ids_body(const char *prefix, int n, const char *extra)
{
    size_t cap = (size_t)n * (strlen(prefix) + 16) + strlen(extra) + 32;
    char *b = malloc(cap);
    if (!b)
        return NULL;
    size_t k = (size_t)snprintf(b, cap, "{\"ids\":[");
    for (int i = 0; i < n; i++)
        k += (size_t)snprintf(b + k, cap - k, "%s\"%s%d\"", i ? "," : "", prefix, i);
    snprintf(b + k, cap - k, "]%s%s}", *extra ? "," : "", extra);
    return b;
}

/* Cancels the batch ctx 'arg' (-EPIPE) from a loop's thread: with the batch's own loop, every
 * waiter of the batch is then done before that loop's next pass. */
static void cancel_fired(void *arg, struct fetch_result *r)
{
    (void)r;
    ctx_cancel(arg, -EPIPE);
}

static bool fetches_in_flight(void *arg)
{
    struct fetch_stats st;
    fetch_stats(((struct rig *)arg)->fetch, &st);
    return st.in_flight >= 64;
}

static uint64_t up_fetches(const struct rig *g)
{
    uint64_t n = 0;
    for (int k = 0; k < OUTCOME_KINDS; k++)
        n += M(&upstream_stats(g->ups, 0)->fetches[k]);
    return n;
}

/* 64 calls on two loops with one connection each, every id held at the stub: each loop can
 * have one request out and no more, so two at the stub at once means that both loops fetch for
 * the batch: call 0 (the first of the batch's own stripe) and one of calls 32-63 (the other
 * loop's stripe). Canceled once all 64 attempts have started, the batch is answered once every
 * one of them has been counted, the 62 still queued in their loops too. */
static void test_spread_runs_on_every_loop(void)
{
    struct rig g = {.loops = 2, .max_conns = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 1000;
    char *body = ids_body("sleep60000-s", 64, "\"timeout_ms\":60000");
    CU_ASSERT_FATAL(body != NULL);
    struct run r;
    CU_ASSERT_FATAL(run_start(&g, &r, body));
    CU_ASSERT(WAIT_STUB(g.stub[0], in_flight, 2)); /* one loop alone could never have two */
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 2); /* each loop's connection stays taken */
    struct upstub_req log[4];
    size_t n = upstub_log(g.stub[0], log, 4);
    int own = 0, other = 0;
    for (size_t i = 0; i < n; i++) {
        int k = atoi(log[i].target + strlen("/items/sleep60000-s"));
        own += k == 0;
        other += k >= 32 && k < 64;
    }
    CU_ASSERT(n == 2 && own == 1 && other == 1);
    CU_ASSERT(test_wait_until(fetches_in_flight, &g, WAIT_MS)); /* every run has started */
    ctx_cancel(batch_ctx(r.b), -EPIPE);
    CU_ASSERT_FATAL(run_finish(&r));
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), 64); /* before the answer */
    struct fetch_stats st;
    fetch_stats(g.fetch, &st);
    CU_ASSERT_EQUAL(st.in_flight, 0);
    CU_ASSERT_EQUAL(M(&g.m->flights_started), 64);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 64);
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 2));
    run_free(&r);
    free(body);
    rig_free(&g);
}

/* A large batch spread over two loops answers every position with its own id's result, in
 * request order, duplicates and errors (settled) included: with the errgroup limit above its
 * calls (one stripe per loop over the whole batch) and below them (stripes over each round of
 * calls in flight at once). */
static void test_spread_results_in_order(void)
{
    struct rig g = {.loops = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    enum { N = 100, DISTINCT = 90 };
    char body[4096];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"mode\":\"settled\",\"ids\":[");
    for (int i = 0; i < N; i++) { /* every 10th id a 404; the last 10 repeat the first 10 */
        int id = i % DISTINCT;
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"%sv%d\"", i ? "," : "",
                              id % 10 == 3 ? "status404-" : "", id);
    }
    snprintf(body + k, sizeof(body) - k, "]}");
    for (int round = 0; round < 2; round++) {
        g.env.limit = round == 0 ? 1000 : BATCH_SPREAD_MIN;
        uint64_t req0 = STUB(g.stub[0], requests), started0 = M(&g.m->flights_started);
        struct run r;
        CU_ASSERT_FATAL(run_body(&g, &r, body));
        CU_ASSERT_EQUAL(r.status, 200);
        CU_ASSERT_EQUAL(cJSON_GetArraySize(cJSON_GetObjectItem(r.json, "results")), N);
        int wrong = 0;
        for (int i = 0; i < N; i++) {
            int id = i % DISTINCT;
            char want[32];
            snprintf(want, sizeof(want), "v%d", id);
            if (id % 10 == 3)
                wrong += strcmp(item_code(&r, i), "upstream_status") != 0;
            else
                wrong += strcmp(data_id(&r, i), want) != 0;
        }
        CU_ASSERT_EQUAL(wrong, 0);
        CU_ASSERT_EQUAL(STUB(g.stub[0], requests) - req0, DISTINCT);
        CU_ASSERT_EQUAL(M(&g.m->flights_started) - started0, DISTINCT);
        run_free(&r);
    }
    rig_free(&g);
}

/* A batch below BATCH_SPREAD_MIN calls, or one with fewer calls in flight at once (its limit),
 * keeps every flight on its own loop: it completes while the other loop is held. */
static void test_spread_small_batch_keeps_to_its_loop(void)
{
    struct rig g = {.loops = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 1000;
    unsigned other = fetch_pick_loop(g.fetch); /* the next batch runs on the other loop */
    struct blocker k;
    CU_ASSERT_FATAL(block_loop(&g, other, &k));
    char *small = ids_body("w", BATCH_SPREAD_MIN - 1, "");
    char *big = ids_body("x", 100, "");
    CU_ASSERT_FATAL(small && big);
    struct run r;
    CU_ASSERT(run_body(&g, &r, small));
    CU_ASSERT_EQUAL(r.status, 200);
    run_free(&r);
    g.env.limit = 8;
    CU_ASSERT_EQUAL(fetch_pick_loop(g.fetch), other); /* again the other loop for the batch */
    CU_ASSERT(run_body(&g, &r, big));
    CU_ASSERT_EQUAL(r.status, 200);
    run_free(&r);
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), BATCH_SPREAD_MIN - 1 + 100);
    unblock_loop(&k);
    free(small);
    free(big);
    rig_free(&g);
    blocker_destroy(&k);
}

/* A large batch canceled while the other loop's thread is held: the calls of its own stripe
 * are answered (their attempts ended and counted on the batch's loop), those of the other
 * stripe are not, until that loop has ended and counted their attempts too; only then is the
 * batch done. Every item comes on the batch's loop thread. With the cancel made on the batch's
 * loop, every waiter is done before that loop's next pass, so a callback that did not wait for
 * its flight on the other loop would come first. */
static void test_spread_cancel_waits_for_every_attempt(void)
{
    struct rig g = {.loops = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 1000;
    unsigned other = fetch_pick_loop(g.fetch), mine = (other + 1) % 2;
    pthread_t tid;
    CU_ASSERT_FATAL(loop_thread(&g, mine, &tid));
    struct rec_writer rw;
    rec_init(&rw, tid);
    char *body = ids_body("sleep60000-c", 64, "\"mode\":\"settled\",\"timeout_ms\":60000");
    CU_ASSERT_FATAL(body != NULL);
    struct run r;
    CU_ASSERT_FATAL(run_start_stream(&g, &r, body, &rw.w));
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[0], in_flight, 64));
    struct blocker k;
    CU_ASSERT_FATAL(block_loop(&g, other, &k));
    CU_ASSERT_FATAL(fetch_after(g.fetch, mine, ctx_background(), 0, cancel_fired,
                                batch_ctx(r.b)) == 0);
    CU_ASSERT(latch_wait(&rw.items, 32, WAIT_MS));
    CU_ASSERT(rec_first_are_own_stripe(&rw, 32, -EPIPE));
    CU_ASSERT_EQUAL(latch_get(&rw.items), 32); /* the other stripe waits for its loop */
    CU_ASSERT_FALSE(batch_is_done(&r));
    unblock_loop(&k);
    CU_ASSERT_FATAL(run_finish(&r));
    CU_ASSERT_EQUAL(latch_get(&rw.items), 64);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), 64); /* before the answer */
    CU_ASSERT_EQUAL(up_fetches(&g), 64);
    CU_ASSERT_FALSE(rw.wrong_thread);
    CU_ASSERT(rw.ended);
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 64)); /* every attempt closed at the upstream */
    free(body);
    latch_destroy(&rw.items);
    rig_free(&g);
    blocker_destroy(&k);
}

/* The same with the deadline: a large batch whose upstream is too slow is answered at its
 * deadline, but only once every attempt, on either loop, has ended and been counted. The other
 * loop is held from before the deadline (far after every attempt has gone out) until the
 * batch's own stripe has its deadline errors. */
static void test_spread_deadline_waits_for_every_attempt(void)
{
    struct rig g = {.loops = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 1000;
    unsigned other = fetch_pick_loop(g.fetch), mine = (other + 1) % 2;
    pthread_t tid;
    CU_ASSERT_FATAL(loop_thread(&g, mine, &tid));
    struct rec_writer rw;
    rec_init(&rw, tid);
    int64_t tmo = test_ms(1000);
    char extra[64];
    snprintf(extra, sizeof(extra), "\"mode\":\"settled\",\"timeout_ms\":%lld", (long long)tmo);
    char *body = ids_body("sleep60000-d", 64, extra);
    CU_ASSERT_FATAL(body != NULL);
    struct run r;
    CU_ASSERT_FATAL(run_start_stream(&g, &r, body, &rw.w));
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[0], in_flight, 64));
    struct blocker k;
    CU_ASSERT_FATAL(block_loop(&g, other, &k));
    CU_ASSERT(ctx_now() < r.t0 + tmo); /* held before the deadline (the test's premise) */
    CU_ASSERT(latch_wait(&rw.items, 32, WAIT_MS));
    CU_ASSERT(rec_first_are_own_stripe(&rw, 32, -ETIMEDOUT));
    CU_ASSERT_EQUAL(latch_get(&rw.items), 32);
    CU_ASSERT_FALSE(batch_is_done(&r));
    unblock_loop(&k);
    CU_ASSERT_FATAL(run_finish(&r));
    CU_ASSERT_EQUAL(latch_get(&rw.items), 64);
    CU_ASSERT_EQUAL(up_fetches(&g), 64); /* every attempt counted before the answer */
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_DEADLINE]) + M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]),
                    64);
    struct fetch_stats st;
    fetch_stats(g.fetch, &st);
    CU_ASSERT_EQUAL(st.in_flight, 0);
    CU_ASSERT_FALSE(rw.wrong_thread);
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 64));
    free(body);
    latch_destroy(&rw.items);
    rig_free(&g);
    blocker_destroy(&k);
}

/* Every waiter gone before a flight's run could start on its loop (held meanwhile): the flight
 * is decided canceled without an attempt, and its batch is answered after that. */
static void test_spread_left_before_the_run_started(void)
{
    struct rig g = {.loops = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 1000;
    unsigned other = fetch_pick_loop(g.fetch), mine = (other + 1) % 2;
    pthread_t tid;
    CU_ASSERT_FATAL(loop_thread(&g, mine, &tid));
    struct blocker k;
    CU_ASSERT_FATAL(block_loop(&g, other, &k));
    struct rec_writer rw;
    rec_init(&rw, tid);
    char *body = ids_body("sleep60000-e", 64, "\"mode\":\"settled\",\"timeout_ms\":60000");
    CU_ASSERT_FATAL(body != NULL);
    struct run r;
    CU_ASSERT_FATAL(run_start_stream(&g, &r, body, &rw.w));
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[0], in_flight, 32)); /* the batch's own stripe */
    CU_ASSERT_FATAL(fetch_after(g.fetch, mine, ctx_background(), 0, cancel_fired,
                                batch_ctx(r.b)) == 0);
    CU_ASSERT(latch_wait(&rw.items, 32, WAIT_MS));
    CU_ASSERT(rec_first_are_own_stripe(&rw, 32, -EPIPE));
    CU_ASSERT_FALSE(batch_is_done(&r));
    unblock_loop(&k);
    CU_ASSERT_FATAL(run_finish(&r));
    CU_ASSERT_EQUAL(latch_get(&rw.items), 64);
    CU_ASSERT_EQUAL(up_fetches(&g), 32); /* the other stripe never made an attempt */
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 32);
    CU_ASSERT_EQUAL(M(&g.m->flights_started), 64);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 64);
    CU_ASSERT_FALSE(rw.wrong_thread);
    free(body);
    latch_destroy(&rw.items);
    rig_free(&g);
    blocker_destroy(&k);
}

static void *free_engine(void *arg)
{
    fetch_free(arg);
    return NULL;
}

/* A new engine in place of the one freed. */
static bool rig_new_fetch(struct rig *g)
{
    struct fetch_opts fo;
    fetch_opts_default(&fo);
    fo.loops = g->loops;
    fo.max_conns = 64;
    fo.idle_poll_ms = 600000;
    if (fetch_new(&fo, &g->fetch) != 0)
        return false;
    g->env.flight.fetch = g->fetch;
    return true;
}

/* The engine stops with a large batch spread over both loops: at once after the start (runs
 * still queued on the other loop), once every flight has started, with every attempt out; and
 * twice while the other loop is held, the batch being freed before that loop winds its flights
 * down: canceled first, so that the other stripe's callbacks wait for that loop and then come
 * with the stop; or not, so that the other stripe's waiters leave with the stop, when no
 * deferral can be armed any more. Each time the batch is done exactly once by the time the
 * engine is freed, with an error at every position; ASan and TSan watch the rest. */
static void test_spread_shutdown_mid_batch(void)
{
    struct rig g = {.loops = 2};
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 0, 0));
    g.env.limit = 1000;
    char *body = ids_body("sleep60000-z", 64, "\"mode\":\"settled\",\"timeout_ms\":60000");
    CU_ASSERT_FATAL(body != NULL);
    for (int round = 0; round < 5; round++) {
        uint64_t started0 = M(&g.m->flights_started), req0 = STUB(g.stub[0], requests);
        unsigned other = fetch_pick_loop(g.fetch), mine = (other + 1) % 2;
        pthread_t tid;
        CU_ASSERT_FATAL(loop_thread(&g, mine, &tid));
        struct rec_writer rw;
        rec_init(&rw, tid);
        struct run r;
        CU_ASSERT_FATAL(run_start_stream(&g, &r, body, &rw.w));
        if (round == 1) /* every flight started: the other stripe's runs posted, maybe queued */
            CU_ASSERT(test_wait_counter(&g.m->flights_started, started0 + 64, WAIT_MS));
        if (round >= 2)
            CU_ASSERT(WAIT_STUB(g.stub[0], requests, req0 + 64));
        if (round < 3) {
            fetch_free(g.fetch);
            CU_ASSERT_EQUAL(latch_get(&r.done), 1);
        } else {
            struct blocker k;
            CU_ASSERT_FATAL(block_loop(&g, other, &k));
            if (round == 3) {
                CU_ASSERT_FATAL(fetch_after(g.fetch, mine, ctx_background(), 0, cancel_fired,
                                            batch_ctx(r.b)) == 0);
                CU_ASSERT(latch_wait(&rw.items, 32, WAIT_MS)); /* the others wait */
            }
            pthread_t t;
            CU_ASSERT_FATAL(pthread_create(&t, NULL, free_engine, g.fetch) == 0);
            CU_ASSERT_FATAL(run_finish(&r)); /* freed while the held loop still has its flights */
            unblock_loop(&k);
            pthread_join(t, NULL);
            blocker_destroy(&k);
        }
        if (round < 3)
            CU_ASSERT_FATAL(run_finish(&r));
        /* Stopped before its calls could wait, a batch fails whole (fail(), no items). */
        long items = latch_get(&rw.items);
        CU_ASSERT(items == 64 || (round == 0 && rw.failed));
        int ok = 0;
        for (long i = 0; i < items && i < REC_MAX; i++)
            ok += rw.err[i] == 0;
        CU_ASSERT_EQUAL(ok, 0);
        CU_ASSERT_FALSE(rw.wrong_thread);
        CU_ASSERT(rw.ended);
        latch_destroy(&rw.items);
        CU_ASSERT_FATAL(rig_new_fetch(&g));
    }
    free(body);
    rig_free(&g);
}

/* The set is swapped while batches run: a writer keeps publishing the two upstreams in one
 * order, then the other, so every index changes meaning at each swap. Every id is still fetched
 * whole from an upstream of the set, and the attempts counted on each upstream (which lives on
 * from snapshot to snapshot) add up to the ids fetched. */
struct swapper {
    struct rig *g;
    atomic_bool stop;
    atomic_uint swaps;
    atomic_uint failed;
};

static void *swap_main(void *arg)
{
    struct swapper *w = arg;
    const char *order[2][2] = {{w->g->tmpl[1], w->g->tmpl[0]}, {w->g->tmpl[0], w->g->tmpl[1]}};
    for (unsigned k = 0; !atomic_load(&w->stop); k++) {
        struct upstreams *cur = upstream_live_get(w->g->live), *next = NULL;
        char err[256];
        int rc = upstreams_with(cur, order[k % 2], 2, &next, err, sizeof(err));
        upstreams_free(cur);
        if (rc != 0) {
            atomic_fetch_add(&w->failed, 1);
            break;
        }
        upstream_live_swap(w->g->live, next);
        atomic_fetch_add(&w->swaps, 1);
    }
    return NULL;
}

static bool swapping(void *arg)
{
    struct swapper *w = arg;
    return atomic_load(&w->swaps) >= 10;
}

static void test_batch_set_swapped_while_batches_run(void)
{
    struct rig g = {0};
    CU_ASSERT_FATAL(rig_init(&g, 2, NULL, 0, 0));
    struct swapper w = {.g = &g};
    pthread_t th;
    CU_ASSERT_FATAL(pthread_create(&th, NULL, swap_main, &w) == 0);
    CU_ASSERT(test_wait_until(swapping, &w, test_ms(10000)));
    int bad = 0;
    for (int b = 0; b < 30; b++) {
        char body[512];
        int n = snprintf(body, sizeof(body), "{\"ids\":[");
        for (int i = 0; i < 20; i++)
            n += snprintf(body + n, sizeof(body) - (size_t)n, "%s\"s%d-%d\"", i ? "," : "", b, i);
        snprintf(body + n, sizeof(body) - (size_t)n, "]}");
        struct run r;
        CU_ASSERT_FATAL(run_body(&g, &r, body));
        bad += r.status != 200;
        for (int i = 0; r.status == 200 && i < 20; i++) {
            char id[32];
            snprintf(id, sizeof(id), "s%d-%d", b, i);
            bad += strcmp(data_id(&r, i), id) != 0;
        }
        run_free(&r);
    }
    unsigned swaps_during = atomic_load(&w.swaps);
    atomic_store(&w.stop, true);
    pthread_join(th, NULL);
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(atomic_load(&w.failed), 0);
    CU_ASSERT(swaps_during > 10);
    /* g.ups is the first snapshot: the same two upstreams, whatever order came after. */
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_OK]) +
                        M(&upstream_stats(g.ups, 1)->fetches[OUTCOME_OK]),
                    600);
    rig_free(&g);
}

static CU_TestInfo batch_tests[] = {
    {"the upstream set swapped while batches run", test_batch_set_swapped_while_batches_run},
    {"hedge: sent after the delay, wins, the loser is closed", test_batch_hedge_wins_and_loser_is_closed},
    {"hedge: the second after half the delay more", test_batch_second_hedge_after_half_the_delay},
    {"hedge: refused when the budget is spent", test_batch_hedge_refused_by_budget},
    {"shards: hedge to the same upstream; a cancel closes every attempt",
     test_batch_shards_hedge_same_upstream_and_cancel_closes_all},
    {"retry: 503 goes to the next upstream; 500 and 404 never retried",
     test_batch_retry_goes_to_the_next_upstream},
    {"retry: budget refuses; never past the deadline", test_batch_retry_budget_and_deadline},
    {"retry: none after the batch was canceled", test_batch_no_retry_after_cancel},
    {"failover and ejection of a dead replica", test_batch_failover_and_ejection},
    {"settled: one entry per position for every error kind", test_batch_settled_every_error_kind},
    {"first error: siblings closed and counted canceled",
     test_batch_first_error_cancels_siblings_counted_canceled},
    {"response cap, duplicates counted at each position", test_batch_response_cap},
    {"storm: concurrent batches with hedges, retries, cancels", test_batch_storm},
    {"coalesce: one fetch for two batches; the last to leave cancels it",
     test_coalesce_last_waiter_cancels_flight},
    {"coalesce: a deadline or a failure ends that waiter alone", test_coalesce_deadline_is_per_waiter},
    {"coalesce: a finished flight is never joined; opting out", test_coalesce_never_joins_a_finished_flight_and_opt_out},
    {"coalesce: 1000 batches on 10 hot ids, two loops", test_coalesce_hot_keys_many_batches},
    {"spread: a large batch's flights run on both loops", test_spread_runs_on_every_loop},
    {"spread: every result in its place, limit above and below the calls",
     test_spread_results_in_order},
    {"spread: a small batch, or few calls at once, keeps to its loop",
     test_spread_small_batch_keeps_to_its_loop},
    {"spread: canceled, answered after every attempt on either loop",
     test_spread_cancel_waits_for_every_attempt},
    {"spread: past the deadline, answered after every attempt on either loop",
     test_spread_deadline_waits_for_every_attempt},
    {"spread: every waiter gone before the run started on its loop",
     test_spread_left_before_the_run_started},
    {"spread: the engine stops mid-batch", test_spread_shutdown_mid_batch},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(batch, batch_tests)
