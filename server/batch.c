/* batch: POST /v1/batch, from the request body to the response.
 *
 * FLOW (all on one libmicrohttpd worker, except where noted):
 *   admission (in-flight cap; counted before the drain flag is read, see admit()) -> parse with
 *   cJSON, the text also checked by the strict validator (json_valid) -> validate every id (type,
 *   length, UTF-8, no \u0000)
 *   -> one slot per distinct upstream URL (duplicates share it) -> request ctx (child of the
 *   server root, effective deadline) -> errgroup with --limit on that ctx -> suspend the
 *   connection and watch its socket for a hang-up -> one async task per slot: fetch_get() on the
 *   request's fetch loop -> return.
 *   On the fetch loop thread: each completion stores its result in its slot, remembers the first
 *   failing slot and completes the task; the group's first error cancels its ctx, which aborts
 *   the request's other transfers and drops its queued ones. When the group ends, the done
 *   callback unwatches the socket and resumes the connection, exactly once; from then on no
 *   other thread touches the batch.
 *   Back on the worker (the handler is called again after resume): the response, results in
 *   request order or the error, is written into one buffer and queued.
 * Ownership: the batch belongs to its req and is freed with it when the request completes. */
#include "server/srv_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "pool/errgroup.h"
#include "server/json.h"
#include "server/watch.h"

#define ID_MAX_BYTES 256

/* One distinct upstream fetch, shared by every position that names the same id. */
struct slot {
    struct batch *b;     /* owner */
    char *url;           /* upstream URL; the dedup key */
    size_t first_pos;    /* first position naming it, for error reports */
    int err;             /* fetch result: 0 or a code; written by the loop thread */
    long status;         /* upstream status */
    char *body;          /* upstream body (malloc'd) */
    size_t len;          /* its length */
    char *detail;        /* error detail (malloc'd) or NULL */
    size_t mult;         /* positions that report it */
    int8_t valid;        /* body is JSON: -1 unknown, 0 no, 1 yes (response building) */
    size_t vstart, vend; /* the JSON value's span when valid */
};

/* A batch result that would make the response larger than --max-response-bytes. */
#define BATCH_ERESPONSE (-3001)

/* Bytes a result adds to the response besides its body: {"id":..,"status":..,"data":..}. */
#define RESULT_OVERHEAD 48

struct batch {
    struct req *r;             /* the request */
    atomic_size_t resp_bytes;  /* response size so far, counted as results arrive */
    int start_err;             /* a task could not even be queued (out of memory) */
    struct ctx *ctx;           /* request ctx: deadline, disconnect, shutdown */
    struct eg *g;              /* the errgroup over the slots */
    unsigned loop;             /* fetch loop for all of this request's transfers */
    int64_t timeout_ms;        /* effective deadline, for messages */
    struct slot *slots;        /* distinct ids */
    size_t nslots;
    uint32_t *pos_slot;        /* position -> slot */
    char **pos_echo;           /* position -> JSON text of the id as received */
    size_t npos;
    atomic_long fail_slot;     /* first slot that failed, or -1 */
    int err;                   /* the group's result; set before the resume */
    bool done;                 /* the group ended; set before the resume */
    bool watched;              /* the socket is in the watch */
    uint64_t watch_token;      /* its token */
    atomic_bool resumed;       /* the connection was resumed (exactly once) */
    bool nul_marked;           /* the body had \u0000 escapes, now NUL_MARK (parse only) */
};

/* ---------------------------------------------------------------- helpers */

static enum MHD_Result bad_request(struct req *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static enum MHD_Result bad_request(struct req *r, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return srv_error(r, MHD_HTTP_BAD_REQUEST, "bad_request", msg, NULL);
}

/* cJSON cuts a string at a \u0000 escape, so an id "a\u0000b" would silently become "a". Before
 * parsing, every such escape in the raw text is overwritten with NUL_MARK: six 0xFF bytes, the
 * escape's own length, which valid UTF-8 never holds. cJSON copies them into the string as they
 * are, and the id check then names the position. The strict validity of the original text is
 * decided before this (see parse()), so a marker elsewhere (a key, an unknown field) is harmless.
 * Returns whether any escape was marked. */
static const char NUL_MARK[6] = {'\xff', '\xff', '\xff', '\xff', '\xff', '\xff'};

static bool mark_nul_escapes(char *s, size_t n)
{
    bool found = false;
    for (size_t i = 0; i + 1 < n; i++) {
        if (s[i] != '\\')
            continue;
        if (s[i + 1] == 'u' && i + 5 < n && !memcmp(s + i + 2, "0000", 4)) {
            memcpy(s + i, NUL_MARK, sizeof(NUL_MARK));
            found = true;
            i += 5;
            continue;
        }
        i++; /* skip the escaped character, so "\\u0000" is left alone */
    }
    return found;
}

/* A positive whole number of milliseconds from JSON or a header; false if it is not one. */
static bool parse_timeout_num(double v, int64_t *out)
{
    if (!(v >= 1 && v <= 9007199254740992.0) || v != (double)(int64_t)v)
        return false;
    *out = (int64_t)v;
    return true;
}

/* The header's digits; any length is a valid (if huge) deadline, clamped to 2^53 like the body's
 * timeout_ms and then to --max-timeout-ms. */
static bool parse_timeout_text(const char *t, int64_t *out)
{
    if (!*t)
        return false;
    int64_t v = 0;
    for (; *t; t++) {
        if (*t < '0' || *t > '9')
            return false;
        if (v < ((int64_t)1 << 53))
            v = v * 10 + (*t - '0');
    }
    if (v < 1)
        return false;
    *out = v;
    return true;
}

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

void batch_free(struct batch *b)
{
    if (!b)
        return;
    eg_free(b->g);
    ctx_free(b->ctx);
    for (size_t i = 0; i < b->nslots; i++) {
        free(b->slots[i].url);
        free(b->slots[i].body);
        free(b->slots[i].detail);
    }
    for (size_t i = 0; i < b->npos; i++)
        free(b->pos_echo[i]);
    free(b->slots);
    free(b->pos_slot);
    free(b->pos_echo);
    free(b);
}

/* ---------------------------------------------------------------- building the batch */

/* The JSON text a position echoes, and the id's text for the URL. */
static int id_of(struct req *r, const struct batch *bt, const cJSON *it, size_t i, char **echo,
                 char **url)
{
    const struct srv *s = r->s;
    struct json_buf b;
    json_buf_init(&b);
    size_t ulen;
    int rc;
    if (cJSON_IsString(it)) {
        const char *v = it->valuestring;
        size_t n = strlen(v);
        if (n == 0) {
            bad_request(r, "ids[%zu] is an empty string", i);
            return -EINVAL;
        }
        if (bt->nul_marked && memmem(v, n, NUL_MARK, sizeof(NUL_MARK))) {
            bad_request(r, "ids[%zu] contains \\u0000", i);
            return -EINVAL;
        }
        if (n > ID_MAX_BYTES) {
            bad_request(r, "ids[%zu] is %zu bytes long; the limit is %d", i, n, ID_MAX_BYTES);
            return -EINVAL;
        }
        if (!json_utf8_valid(v, n)) {
            bad_request(r, "ids[%zu] is not valid UTF-8", i);
            return -EINVAL;
        }
        json_append_string(&b, v, n);
        rc = url_build(&s->tmpl, v, n, url, &ulen);
    } else if (cJSON_IsNumber(it)) {
        int64_t v;
        if (json_id_from_number(it->valuedouble, &v) != 0) {
            bad_request(r, "ids[%zu] must be a whole number from -(2^53-1) to 2^53-1 (larger ids as "
                           "strings)", i);
            return -EINVAL;
        }
        json_append_int64(&b, v);
        rc = url_build_int64(&s->tmpl, v, url, &ulen);
    } else {
        bad_request(r, "ids[%zu] must be a string or an integer", i);
        return -EINVAL;
    }
    if (rc != 0 || json_buf_failed(&b)) {
        json_buf_destroy(&b);
        if (rc == 0)
            free(*url);
        return -ENOMEM;
    }
    size_t elen;
    *echo = json_buf_take(&b, &elen);
    return 0;
}

/* Fills the positions and the distinct slots. Returns 0, -EINVAL (response queued) or -ENOMEM. */
static int build_slots(struct req *r, struct batch *b, const cJSON *ids, size_t n)
{
    b->pos_slot = calloc(n ? n : 1, sizeof(*b->pos_slot));
    b->pos_echo = calloc(n ? n : 1, sizeof(*b->pos_echo));
    b->slots = calloc(n ? n : 1, sizeof(*b->slots));
    size_t tcap = 16;
    while (tcap < 2 * n)
        tcap *= 2;
    int64_t *table = malloc(tcap * sizeof(*table)); /* open addressing: slot index or -1 */
    if (!b->pos_slot || !b->pos_echo || !b->slots || !table) {
        free(table);
        return -ENOMEM;
    }
    memset(table, 0xff, tcap * sizeof(*table));
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, ids)
    {
        char *url = NULL;
        int rc = id_of(r, b, it, i, &b->pos_echo[i], &url);
        if (rc) {
            free(table);
            return rc;
        }
        b->npos = i + 1;
        size_t h = hash_str(url) & (tcap - 1);
        while (table[h] >= 0 && strcmp(b->slots[table[h]].url, url) != 0)
            h = (h + 1) & (tcap - 1);
        if (table[h] < 0) {
            struct slot *sl = &b->slots[b->nslots];
            sl->b = b;
            sl->url = url;
            sl->first_pos = i;
            sl->valid = -1;
            table[h] = (int64_t)b->nslots++;
        } else {
            free(url); /* a duplicate: fetched once, reported at each position */
        }
        b->pos_slot[i] = (uint32_t)table[h];
        b->slots[table[h]].mult++;
        i++;
    }
    free(table);
    return 0;
}

/* ---------------------------------------------------------------- the fan-out */

static void record_fail(struct batch *b, struct slot *sl)
{
    long none = -1;
    atomic_compare_exchange_strong(&b->fail_slot, &none, (long)(sl - b->slots));
}

static void on_fetched(void *arg, struct fetch_result *res)
{
    struct slot *sl = arg;
    struct batch *b = sl->b;
    sl->err = res->err;
    sl->status = res->status;
    sl->body = res->body;
    sl->len = res->len;
    res->body = NULL;
    int err = res->err;
    /* Each position repeats the body, so one fetch can cost mult times its size: refuse to
     * grow past --max-response-bytes here, while the other fetches can still be stopped. */
    size_t add = (res->len + strlen(b->pos_echo[sl->first_pos]) + RESULT_OVERHEAD) * sl->mult;
    if (!err && atomic_fetch_add(&b->resp_bytes, add) + add > b->r->s->cfg.max_response_bytes)
        err = sl->err = BATCH_ERESPONSE;
    if (err) {
        sl->detail = strdup(res->detail ? res->detail : "");
        record_fail(b, sl);
    }
    metrics_observe(&b->r->s->metrics.fetch_seconds, res->elapsed_us);
    eg_complete(b->g, err); /* last: the group may end and the request resume here */
}

static int start_fetch(struct eg *g, struct ctx *c, void *arg)
{
    (void)g;
    struct slot *sl = arg;
    struct batch *b = sl->b;
    struct fetch_req fr = {
        .url = sl->url, .request_id = b->r->request_id, .cb = on_fetched, .arg = sl};
    int rc = fetch_get(b->r->s->fetch, b->loop, c, &fr);
    if (rc) {
        sl->err = rc;
        sl->detail = strdup("could not start the fetch");
        record_fail(b, sl);
    }
    return rc;
}

static void on_group_done(void *arg, int err)
{
    struct batch *b = arg;
    b->err = err;
    if (b->watched)
        watch_remove(b->r->s->watch, b->watch_token);
    b->done = true;
    if (!atomic_exchange(&b->resumed, true))
        MHD_resume_connection(b->r->conn); /* last touch of the batch from this thread */
}

/* ---------------------------------------------------------------- answering */

static void append_data(struct json_buf *o, struct slot *sl)
{
    if (sl->valid < 0)
        sl->valid = sl->body && json_valid(sl->body, sl->len, &sl->vstart, &sl->vend);
    if (sl->valid)
        json_buf_append(o, sl->body + sl->vstart, sl->vend - sl->vstart);
    else
        json_append_string(o, sl->body ? sl->body : "", sl->len);
}

static enum MHD_Result answer_results(struct req *r, struct batch *b)
{
    struct json_buf o;
    json_buf_init(&o);
    size_t est = 16 + b->npos * 48;
    for (size_t i = 0; i < b->nslots; i++)
        est += b->slots[i].len;
    json_buf_reserve(&o, est);
    json_buf_append_str(&o, "{\"results\":[");
    for (size_t i = 0; i < b->npos; i++) {
        struct slot *sl = &b->slots[b->pos_slot[i]];
        json_buf_append_str(&o, i ? ",{\"id\":" : "{\"id\":");
        json_buf_append_str(&o, b->pos_echo[i]);
        json_buf_printf(&o, ",\"status\":%ld,\"data\":", sl->status);
        append_data(&o, sl);
        json_buf_append_char(&o, '}');
        if (o.len > r->s->cfg.max_response_bytes) { /* escaping text bodies can grow them */
            json_buf_destroy(&o);
            char msg[160];
            snprintf(msg, sizeof(msg), "the response would exceed %zu bytes (--max-response-bytes)",
                     r->s->cfg.max_response_bytes);
            return srv_error(r, MHD_HTTP_BAD_GATEWAY, "upstream_too_large", msg, NULL);
        }
    }
    json_buf_append_str(&o, "]}\n");
    if (json_buf_failed(&o)) {
        json_buf_destroy(&o);
        return srv_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory", NULL);
    }
    size_t len;
    char *body = json_buf_take(&o, &len);
    return srv_respond(r, MHD_HTTP_OK, "application/json", body, len, true);
}

/* The error for a failed group. The failing id is echoed as the request gave it; an id may take
 * up to 6 bytes per input byte once escaped, so the extra members are built in a json_buf and the
 * message has room for the longest. */
static enum MHD_Result answer_error(struct req *r, struct batch *b)
{
    long fs = atomic_load(&b->fail_slot);
    struct slot *sl = fs >= 0 ? &b->slots[fs] : NULL;
    int err = sl ? sl->err : b->err;
    const char *id = sl ? b->pos_echo[sl->first_pos] : NULL;
    if (id)
        r->fail_id = strdup(id);
    char msg[ID_MAX_BYTES * 6 + 512];
    struct json_buf extra;
    json_buf_init(&extra);
    if (id) {
        json_buf_append_str(&extra, ",\"id\":");
        json_buf_append_str(&extra, id);
    }
    const char *detail = sl && sl->detail ? sl->detail : "";
    unsigned status;
    const char *code;
    switch (err) {
    case FETCH_ESTATUS:
        json_buf_printf(&extra, ",\"upstream_status\":%ld", sl->status);
        snprintf(msg, sizeof(msg), "upstream answered %ld for id %s", sl->status, id);
        status = MHD_HTTP_BAD_GATEWAY;
        code = "upstream_status";
        break;
    case FETCH_EUNREACH:
        snprintf(msg, sizeof(msg), "upstream unreachable for id %s: %s", id ? id : "?", detail);
        status = MHD_HTTP_BAD_GATEWAY;
        code = "upstream_unreachable";
        break;
    case FETCH_ETOOBIG:
        snprintf(msg, sizeof(msg), "upstream body for id %s exceeds %zu bytes (--max-body)",
                 id ? id : "?", r->s->cfg.max_body);
        status = MHD_HTTP_BAD_GATEWAY;
        code = "upstream_too_large";
        break;
    case BATCH_ERESPONSE:
        snprintf(msg, sizeof(msg), "the response would exceed %zu bytes (--max-response-bytes); "
                 "it failed at id %s", r->s->cfg.max_response_bytes, id ? id : "?");
        status = MHD_HTTP_BAD_GATEWAY;
        code = "upstream_too_large";
        break;
    case -ETIMEDOUT:
        snprintf(msg, sizeof(msg), "deadline of %" PRId64 " ms exceeded%s%s", b->timeout_ms,
                 id ? " while fetching id " : "", id ? id : "");
        status = MHD_HTTP_GATEWAY_TIMEOUT;
        code = "deadline_exceeded";
        break;
    case -ESHUTDOWN:
    case FETCH_ESHUTDOWN:
        json_buf_destroy(&extra);
        atomic_fetch_add(&r->s->metrics.rejected, 1);
        return srv_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded",
                         "the server is shutting down; retry on another instance", NULL);
    default:
        json_buf_destroy(&extra);
        snprintf(msg, sizeof(msg), "internal error (%d)%s%s", err, *detail ? ": " : "", detail);
        return srv_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", msg, NULL);
    }
    enum MHD_Result ret;
    if (json_buf_failed(&extra))
        ret = srv_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory", NULL);
    else
        ret = srv_error(r, status, code, msg, extra.data ? extra.data : NULL);
    json_buf_destroy(&extra);
    return ret;
}

static enum MHD_Result answer(struct req *r, struct batch *b)
{
    if (b->err == -EPIPE || ctx_err(b->ctx) == -EPIPE) {
        r->err_code = "client_closed";
        return MHD_NO; /* the client went away: close, nobody to answer */
    }
    if (b->start_err)
        return srv_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory", NULL);
    if (b->err == 0)
        return answer_results(r, b);
    return answer_error(r, b);
}

/* ---------------------------------------------------------------- entry */

/* Takes back an admission that was counted but refused, waking srv_drain() if it waits for it. */
static void unadmit(struct srv *s)
{
    atomic_fetch_sub(&s->metrics.in_flight, 1);
    pthread_mutex_lock(&s->mu);
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Admission: at most --max-requests batches in flight; none while draining.
 * The count is raised before 'draining' is read (both sequentially consistent), the mirror of
 * srv_drain(), which sets 'draining' and then waits for the count to reach 0: either the drain
 * sees this request in flight and waits for it, or this request sees the drain and backs out.
 * Checking 'draining' first would let a request slip in after the drain found the server idle,
 * and be suspended while the daemon is being stopped. */
static bool admit(struct req *r)
{
    struct srv *s = r->s;
    char msg[160];
    int64_t before = atomic_fetch_add(&s->metrics.in_flight, 1);
    if (atomic_load(&s->draining)) {
        unadmit(s);
        atomic_fetch_add(&s->metrics.rejected, 1);
        srv_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded",
                  "the server is draining; retry on another instance", NULL);
        return false;
    }
    if (before >= (int64_t)s->cfg.max_requests) {
        unadmit(s);
        atomic_fetch_add(&s->metrics.rejected, 1);
        snprintf(msg, sizeof(msg), "%u batch requests already in flight (--max-requests)",
                 s->cfg.max_requests);
        srv_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded", msg, NULL);
        return false;
    }
    r->admitted = true;
    return true;
}

/* Parses and validates the body into a batch; on failure a response is queued and NULL
 * returned. */
static struct batch *parse(struct req *r, int64_t *timeout_ms)
{
    struct srv *s = r->s;
    if (r->bad_request_id) {
        bad_request(r, "X-Request-Id must be 1-%d visible ASCII characters without quotes or "
                       "backslashes", REQUEST_ID_MAX);
        return NULL;
    }
    int64_t given = -1, t;
    const char *th = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Request-Timeout-Ms");
    if (th) {
        if (!parse_timeout_text(th, &t)) {
            bad_request(r, "X-Request-Timeout-Ms must be a positive whole number of milliseconds");
            return NULL;
        }
        given = t;
    }
    if (!r->body || r->body_len == 0) {
        bad_request(r, "empty request body; want {\"ids\": [...]}");
        return NULL;
    }
    /* cJSON is lenient (raw control bytes and any bytes in strings, "01", "1.", trailing data
     * with the length API); the strict validator decides what is JSON. It runs first, on the
     * text as received, but its verdict is given last, so that a bad id is still reported with
     * its index. */
    bool strict = json_valid(r->body, r->body_len, NULL, NULL);
    bool nul_marked = mark_nul_escapes(r->body, r->body_len);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(r->body, r->body_len, &end, 0);
    if (!root) {
        size_t at = end && end >= r->body ? (size_t)(end - r->body) : 0;
        bad_request(r, "malformed JSON near byte %zu", at);
        return NULL;
    }
    while (end && (size_t)(end - r->body) < r->body_len &&
           (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n'))
        end++;
    struct batch *b = NULL;
    if (end && (size_t)(end - r->body) < r->body_len) {
        bad_request(r, "malformed JSON: unexpected data after the object at byte %zu",
                    (size_t)(end - r->body));
        goto out;
    }
    if (!cJSON_IsObject(root)) {
        bad_request(r, "the request body must be a JSON object like {\"ids\": [...]}");
        goto out;
    }
    const cJSON *tm = cJSON_GetObjectItemCaseSensitive(root, "timeout_ms");
    if (tm) {
        if (!cJSON_IsNumber(tm) || !parse_timeout_num(tm->valuedouble, &t)) {
            bad_request(r, "timeout_ms must be a positive whole number of milliseconds");
            goto out;
        }
        given = given < 0 || t < given ? t : given;
    }
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(root, "ids");
    if (!ids) {
        bad_request(r, "\"ids\" is required");
        goto out;
    }
    if (!cJSON_IsArray(ids)) {
        bad_request(r, "\"ids\" must be an array");
        goto out;
    }
    size_t n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, ids) n++;
    if (n > s->cfg.max_batch) {
        char msg[160];
        snprintf(msg, sizeof(msg), "%zu ids exceed the limit of %u per request (--max-batch)", n,
                 s->cfg.max_batch);
        srv_error(r, 413, "too_many_ids", msg, NULL);
        goto out;
    }
    r->nids = (unsigned)n;
    b = calloc(1, sizeof(*b));
    if (!b)
        goto oom;
    b->r = r;
    b->nul_marked = nul_marked;
    atomic_init(&b->fail_slot, -1);
    int rc = build_slots(r, b, ids, n);
    if (rc == -EINVAL) {
        batch_free(b);
        b = NULL;
        goto out;
    }
    if (rc)
        goto oom;
    if (!strict) {
        /* cJSON took it and every id is fine, but the text is not RFC 8259 JSON: not UTF-8
         * outside the ids, raw control bytes in a string (a raw NUL would cut an id), lone
         * surrogates, non-standard numbers or nesting deeper than JSON_MAX_DEPTH. */
        batch_free(b);
        b = NULL;
        if (!json_utf8_valid(r->body, r->body_len) && !nul_marked)
            bad_request(r, "the request body is not valid UTF-8");
        else
            bad_request(r, "malformed JSON: not strict RFC 8259 (raw control characters in a "
                           "string, a non-standard number, a lone surrogate or nesting deeper "
                           "than %d)", JSON_MAX_DEPTH);
        goto out;
    }
    *timeout_ms = given < 0 ? s->cfg.timeout_ms : given;
    if (*timeout_ms > s->cfg.max_timeout_ms)
        *timeout_ms = s->cfg.max_timeout_ms;
    goto out;
oom:
    batch_free(b);
    b = NULL;
    srv_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory", NULL);
out:
    cJSON_Delete(root);
    return b;
}

enum MHD_Result batch_handle(struct req *r)
{
    struct batch *b = r->batch;
    if (b) /* called again after the resume */
        return b->done ? answer(r, b) : MHD_YES;
    /* A refusal that could not even be queued (out of memory) closes the connection rather
     * than leave the client waiting for an answer that will never come. */
    if (!admit(r))
        return r->answered ? MHD_YES : MHD_NO;
    int64_t timeout_ms;
    b = parse(r, &timeout_ms);
    if (!b)
        return r->answered ? MHD_YES : MHD_NO;
    r->batch = b;
    if (b->npos == 0) {
        static char empty[] = "{\"results\":[]}\n";
        return srv_respond(r, MHD_HTTP_OK, "application/json", empty, sizeof(empty) - 1, false);
    }
    struct srv *s = r->s;
    b->timeout_ms = timeout_ms;
    b->ctx = ctx_new(s->root, ctx_now() + timeout_ms);
    b->g = b->ctx ? eg_new(b->ctx, NULL) : NULL;
    if (!b->g)
        return srv_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory", NULL);
    eg_set_limit(b->g, s->cfg.limit);
    b->loop = fetch_pick_loop(s->fetch);

    /* Suspend before any other thread can see the batch: a resume may then come at any time. */
    MHD_suspend_connection(r->conn);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci && watch_add(s->watch, ci->connect_fd, b->ctx, &b->watch_token) == 0)
        b->watched = true;
    for (size_t i = 0; i < b->nslots; i++) {
        int rc = eg_go_async(b->g, start_fetch, &b->slots[i]);
        if (rc == -ENOMEM) { /* not a failed fetch: stop the group, answer 500 */
            b->start_err = rc;
            ctx_cancel(b->ctx, rc);
        }
        if (rc)
            break; /* the group failed: the rest never start */
    }
    eg_wait_async(b->g, on_group_done, b);
    return MHD_YES;
}
