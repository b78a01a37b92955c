/* Tests for server/batch/render.h and json_error_doc() (server/json.h): render_error()'s status,
 * code and message for every kind of error result; the buffer writer's answer (results in
 * order, upstream bodies spliced or quoted, errors in place, a batch failure as an error
 * document, the response cap); the line writer's NDJSON (a whole line per emit, the done line,
 * the first error ending the stream, the cap per line). Pure code: writers are driven by hand. */
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/fetch.h"
#include "server/batch/render.h"
#include "server/batch/result.h"
#include "server/json.h"
#include "tests/support.h"

static const struct render_limits LIM = {.timeout_ms = 1234, .max_body = 5000,
                                         .max_response_bytes = 1 << 20};

static struct call_result ok_result(const char *body)
{
    return (struct call_result){.status = 200, .body = body, .len = strlen(body), .valid = -1,
                                .decided = true};
}

static struct call_result err_result(int err, long status, const char *detail)
{
    return (struct call_result){.err = err, .status = status, .detail = detail, .valid = -1,
                                .decided = true};
}

static const char *sget(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static double nget(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

/* ---------------------------------------------------------------- render_error */

struct err_case {
    int err;
    long status;           /* the result's upstream status */
    const char *detail;
    unsigned want_status;  /* HTTP status */
    const char *want_code;
    bool want_upstream;    /* upstream_status member */
    const char *needles[3]; /* in the message */
};

static void test_render_error_every_kind(void)
{
    static const struct err_case cases[] = {
        {FETCH_ESTATUS, 404, NULL, 502, "upstream_status", true, {"404", "\"k\""}},
        {FETCH_EUNREACH, 0, "connection refused", 502, "upstream_unreachable", false,
         {"\"k\"", "connection refused"}},
        {FETCH_ETOOBIG, 200, NULL, 502, "upstream_too_large", false,
         {"\"k\"", "5000", "--max-body"}},
        {CALL_ERESPONSE, 200, NULL, 502, "upstream_too_large", false,
         {"\"k\"", "1048576", "--max-response-bytes"}},
        {-ETIMEDOUT, 0, NULL, 504, "deadline_exceeded", false, {"1234 ms", "\"k\""}},
        {-ESHUTDOWN, 0, NULL, 503, "overloaded", false, {"shutting down"}},
        {FETCH_ESHUTDOWN, 0, NULL, 503, "overloaded", false, {"shutting down"}},
        {-ECANCELED, 0, NULL, 500, "canceled", false, {"\"k\"", "canceled"}},
        {-ENOMEM, 0, "no memory here", 500, "internal", false, {"no memory here"}},
        {-9999, 0, NULL, 500, "internal", false, {"-9999"}},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct err_case *c = &cases[i];
        struct call_result r = err_result(c->err, c->status, c->detail);
        struct render_error e;
        memset(&e, 0x5a, sizeof(e));
        render_error(&LIM, "\"k\"", &r, &e);
        bool ok = e.status == c->want_status && e.code && !strcmp(e.code, c->want_code) &&
                  e.upstream_status == c->want_upstream && e.message[0] &&
                  strlen(e.message) < sizeof(e.message) && !strchr(e.message, '\n');
        for (int n = 0; n < 3 && c->needles[n]; n++)
            ok = ok && strstr(e.message, c->needles[n]);
        CU_ASSERT(ok);
        if (!ok)
            fprintf(stderr, "\n  err %d: %u %s \"%s\"\n", c->err, e.status, e.code, e.message);
    }
}

/* Without an id to blame the message still reads; the deadline names no id. */
static void test_render_error_without_id(void)
{
    struct render_error e;
    struct call_result r = err_result(-ETIMEDOUT, 0, NULL);
    render_error(&LIM, NULL, &r, &e);
    CU_ASSERT_EQUAL(e.status, 504);
    CU_ASSERT_PTR_NOT_NULL(strstr(e.message, "1234 ms"));
    CU_ASSERT_PTR_NULL(strstr(e.message, "id"));
    r = err_result(FETCH_ESTATUS, 503, NULL);
    render_error(&LIM, NULL, &r, &e);
    CU_ASSERT_EQUAL(e.status, 502);
    CU_ASSERT(e.upstream_status);
    CU_ASSERT_PTR_NOT_NULL(strstr(e.message, "503"));
}

/* The longest id, escaped to six bytes a byte, fits the message whole. */
static void test_render_error_longest_id_fits(void)
{
    char id[256];
    memset(id, 0x01, sizeof(id));
    struct json_buf echo;
    json_buf_init(&echo);
    json_append_string(&echo, id, sizeof(id));
    CU_ASSERT_FATAL(!json_buf_failed(&echo));
    CU_ASSERT(echo.len > 1500);
    static const int errs[] = {FETCH_ESTATUS, FETCH_EUNREACH, FETCH_ETOOBIG, CALL_ERESPONSE,
                               -ETIMEDOUT, -ECANCELED};
    for (size_t i = 0; i < sizeof(errs) / sizeof(errs[0]); i++) {
        struct call_result r = err_result(errs[i], 500, "reset by peer");
        struct render_error e;
        render_error(&LIM, echo.data, &r, &e);
        CU_ASSERT_PTR_NOT_NULL(strstr(e.message, echo.data));
    }
    json_buf_destroy(&echo);
}

/* ---------------------------------------------------------------- json_error_doc */

static void test_render_json_error_doc(void)
{
    struct json_buf b;
    json_buf_init(&b);
    json_error_doc(&b, "bad_request", "a \"quoted\" word,\na line and \xff", NULL);
    CU_ASSERT_FATAL(!json_buf_failed(&b));
    CU_ASSERT(b.len > 0 && b.data[b.len - 1] == '\n');
    CU_ASSERT(json_valid(b.data, b.len, NULL, NULL));
    CU_ASSERT_PTR_NULL(memchr(b.data, '\n', b.len - 1)); /* one line */
    cJSON *j = cJSON_ParseWithLength(b.data, b.len);
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(j, "error");
    CU_ASSERT_FATAL(cJSON_IsObject(err));
    CU_ASSERT_EQUAL(cJSON_GetArraySize(j), 1);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(err), 2);
    CU_ASSERT_STRING_EQUAL(sget(err, "code"), "bad_request");
    CU_ASSERT_STRING_EQUAL(sget(err, "message"), "a \"quoted\" word,\na line and \xef\xbf\xbd");
    cJSON_Delete(j);
    /* Extra members follow the message; the document is appended to what the buffer holds. */
    json_buf_clear(&b);
    json_buf_append_str(&b, "X");
    json_error_doc(&b, "upstream_status", "m", ",\"id\":[1,\"x\"],\"upstream_status\":404");
    CU_ASSERT_EQUAL(b.data[0], 'X');
    j = cJSON_ParseWithLength(b.data + 1, b.len - 1);
    err = cJSON_GetObjectItemCaseSensitive(j, "error");
    CU_ASSERT_EQUAL(cJSON_GetArraySize(err), 4);
    CU_ASSERT_EQUAL(nget(err, "upstream_status"), 404);
    CU_ASSERT(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(err, "id")));
    cJSON_Delete(j);
    json_buf_destroy(&b);
}

/* ---------------------------------------------------------------- the buffer writer */

/* The buffer writer's answer, parsed; asserts it is strict JSON ending in a newline. */
static cJSON *answer_of(const struct buf_writer *bw)
{
    CU_ASSERT_FATAL(!json_buf_failed(&bw->out) && bw->out.data);
    CU_ASSERT(bw->out.data[bw->out.len - 1] == '\n');
    CU_ASSERT(json_valid(bw->out.data, bw->out.len, NULL, NULL));
    return cJSON_ParseWithLength(bw->out.data, bw->out.len);
}

static void test_render_buf_results_in_order(void)
{
    struct buf_writer bw;
    buf_writer_init(&bw, &LIM);
    CU_ASSERT_EQUAL(bw.w.fail_pos, SIZE_MAX);
    struct call_result r[5] = {
        ok_result("{\"n\": [1, 2]}"),
        ok_result("  \"padded\"\r\n"), /* JSON with whitespace around it: the value alone */
        ok_result("plain \"text\"\n"),
        ok_result("\xff\xfe bytes"),
        ok_result(""),
    };
    r[4].status = 204;
    static const char *const echo[] = {"\"a\"", "7", "\"c\\\"q\"", "\"d\"", "\"e\""};
    bw.w.ops->begin(&bw.w);
    for (size_t i = 0; i < 5; i++)
        bw.w.ops->item(&bw.w, i, echo[i], &r[i]);
    bw.w.ops->end(&bw.w);
    CU_ASSERT_EQUAL(bw.status, 200);
    CU_ASSERT_PTR_NULL(bw.code);
    CU_ASSERT_FALSE(bw.too_large);
    cJSON *j = answer_of(&bw);
    const cJSON *res = cJSON_GetObjectItemCaseSensitive(j, "results");
    CU_ASSERT_FATAL(cJSON_IsArray(res) && cJSON_GetArraySize(res) == 5);
    const cJSON *e0 = cJSON_GetArrayItem(res, 0);
    CU_ASSERT_STRING_EQUAL(sget(e0, "id"), "a");
    CU_ASSERT_EQUAL(nget(e0, "status"), 200);
    cJSON *want = cJSON_Parse("{\"n\":[1,2]}");
    CU_ASSERT(cJSON_Compare(cJSON_GetObjectItemCaseSensitive(e0, "data"), want, true));
    cJSON_Delete(want);
    CU_ASSERT_EQUAL(nget(cJSON_GetArrayItem(res, 1), "id"), 7);
    CU_ASSERT_STRING_EQUAL(sget(cJSON_GetArrayItem(res, 1), "data"), "padded");
    CU_ASSERT_STRING_EQUAL(sget(cJSON_GetArrayItem(res, 2), "id"), "c\"q");
    CU_ASSERT_STRING_EQUAL(sget(cJSON_GetArrayItem(res, 2), "data"), "plain \"text\"\n");
    CU_ASSERT_STRING_EQUAL(sget(cJSON_GetArrayItem(res, 3), "data"),
                           "\xef\xbf\xbd\xef\xbf\xbd bytes");
    CU_ASSERT_EQUAL(nget(cJSON_GetArrayItem(res, 4), "status"), 204);
    CU_ASSERT_STRING_EQUAL(sget(cJSON_GetArrayItem(res, 4), "data"), "");
    /* The results remember what their bodies are. */
    CU_ASSERT_EQUAL(r[0].valid, 1);
    CU_ASSERT_EQUAL(r[2].valid, 0);
    cJSON_Delete(j);
    buf_writer_destroy(&bw);
}

/* Settled mode: an error result is an error object in its place, with upstream_status when the
 * upstream answered. */
static void test_render_buf_errors_in_place(void)
{
    struct buf_writer bw;
    buf_writer_init(&bw, &LIM);
    struct call_result r0 = ok_result("1");
    struct call_result r1 = err_result(FETCH_ESTATUS, 418, NULL);
    struct call_result r2 = err_result(-ETIMEDOUT, 0, NULL);
    bw.w.ops->begin(&bw.w);
    bw.w.ops->item(&bw.w, 0, "\"a\"", &r0);
    bw.w.ops->item(&bw.w, 1, "\"b\"", &r1);
    bw.w.ops->item(&bw.w, 2, "\"c\"", &r2);
    bw.w.ops->end(&bw.w);
    CU_ASSERT_EQUAL(bw.status, 200);
    cJSON *j = answer_of(&bw);
    const cJSON *res = cJSON_GetObjectItemCaseSensitive(j, "results");
    CU_ASSERT_FATAL(cJSON_GetArraySize(res) == 3);
    const cJSON *b = cJSON_GetArrayItem(res, 1);
    const cJSON *be = cJSON_GetObjectItemCaseSensitive(b, "error");
    CU_ASSERT_STRING_EQUAL(sget(b, "id"), "b");
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(b, "data"));
    CU_ASSERT_STRING_EQUAL(sget(be, "code"), "upstream_status");
    CU_ASSERT_EQUAL(nget(be, "upstream_status"), 418);
    CU_ASSERT_PTR_NOT_NULL(strstr(sget(be, "message"), "418"));
    const cJSON *ce = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(res, 2), "error");
    CU_ASSERT_STRING_EQUAL(sget(ce, "code"), "deadline_exceeded");
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(ce, "upstream_status"));
    cJSON_Delete(j);
    buf_writer_destroy(&bw);
}

/* A batch failure replaces what was written with the error document, with the status, the code,
 * the failing id (in the document and in fail_id) and upstream_status. */
static void test_render_buf_fail(void)
{
    struct buf_writer bw;
    buf_writer_init(&bw, &LIM);
    struct call_result ok = ok_result("{}");
    struct call_result bad = err_result(FETCH_ESTATUS, 500, NULL);
    bw.w.ops->begin(&bw.w);
    bw.w.ops->item(&bw.w, 0, "\"a\"", &ok);
    bw.w.fail_pos = 3;
    bw.w.ops->fail(&bw.w, "\"x\\\"y\"", &bad);
    bw.w.ops->end(&bw.w);
    CU_ASSERT_EQUAL(bw.status, 502);
    CU_ASSERT_STRING_EQUAL(bw.code, "upstream_status");
    CU_ASSERT_STRING_EQUAL(bw.fail_id, "\"x\\\"y\"");
    cJSON *j = answer_of(&bw);
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(j, "results"));
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    CU_ASSERT_STRING_EQUAL(sget(e, "code"), "upstream_status");
    CU_ASSERT_STRING_EQUAL(sget(e, "id"), "x\"y");
    CU_ASSERT_EQUAL(nget(e, "upstream_status"), 500);
    cJSON_Delete(j);
    buf_writer_destroy(&bw);
    CU_ASSERT_PTR_NULL(bw.fail_id);

    /* No id to blame: no id member, no fail_id; the status is the error's. */
    buf_writer_init(&bw, &LIM);
    struct call_result down = err_result(-ESHUTDOWN, 0, NULL);
    bw.w.ops->begin(&bw.w);
    bw.w.ops->fail(&bw.w, NULL, &down);
    bw.w.ops->end(&bw.w);
    CU_ASSERT_EQUAL(bw.status, 503);
    CU_ASSERT_STRING_EQUAL(bw.code, "overloaded");
    CU_ASSERT_PTR_NULL(bw.fail_id);
    j = answer_of(&bw);
    const cJSON *down_err = cJSON_GetObjectItemCaseSensitive(j, "error");
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(down_err, "id"));
    cJSON_Delete(j);
    buf_writer_destroy(&bw);

    /* A deadline: 504 naming the id and the deadline. */
    buf_writer_init(&bw, &LIM);
    struct call_result late = err_result(-ETIMEDOUT, 0, NULL);
    bw.w.ops->begin(&bw.w);
    bw.w.ops->fail(&bw.w, "42", &late);
    bw.w.ops->end(&bw.w);
    CU_ASSERT_EQUAL(bw.status, 504);
    j = answer_of(&bw);
    e = cJSON_GetObjectItemCaseSensitive(j, "error");
    CU_ASSERT_EQUAL(nget(e, "id"), 42);
    CU_ASSERT_PTR_NOT_NULL(strstr(sget(e, "message"), "1234"));
    cJSON_Delete(j);
    buf_writer_destroy(&bw);
}

/* Bodies that are quoted grow (escaping): past max_response_bytes the answer becomes a 502
 * upstream_too_large document; an answer that fits stays. */
static void test_render_buf_response_cap(void)
{
    char body[1000];
    memset(body, 0x01, sizeof(body) - 1); /* six bytes each once escaped */
    body[sizeof(body) - 1] = '\0';
    struct call_result r = ok_result(body);
    /* The whole answer's length with room to spare. */
    struct render_limits lim = LIM;
    struct buf_writer bw;
    buf_writer_init(&bw, &lim);
    bw.w.ops->begin(&bw.w);
    for (size_t i = 0; i < 3; i++)
        bw.w.ops->item(&bw.w, i, "\"k\"", &r);
    bw.w.ops->end(&bw.w);
    size_t whole = bw.out.len;
    CU_ASSERT(whole > 3 * 6 * 999);
    CU_ASSERT_EQUAL(bw.status, 200);
    buf_writer_destroy(&bw);
    /* A cap of exactly that length: it fits. */
    lim.max_response_bytes = whole;
    buf_writer_init(&bw, &lim);
    bw.w.ops->begin(&bw.w);
    for (size_t i = 0; i < 3; i++)
        bw.w.ops->item(&bw.w, i, "\"k\"", &r);
    bw.w.ops->end(&bw.w);
    CU_ASSERT_EQUAL(bw.status, 200);
    CU_ASSERT_FALSE(bw.too_large);
    buf_writer_destroy(&bw);
    /* Room for two bodies' worth (each under the cap alone), not three. */
    lim.max_response_bytes = 2 * 6 * 999 + 100;
    buf_writer_init(&bw, &lim);
    bw.w.ops->begin(&bw.w);
    for (size_t i = 0; i < 3; i++)
        bw.w.ops->item(&bw.w, i, "\"k\"", &r);
    CU_ASSERT_TRUE(bw.too_large);
    bw.w.ops->end(&bw.w);
    CU_ASSERT_EQUAL(bw.status, 502);
    CU_ASSERT_STRING_EQUAL(bw.code, "upstream_too_large");
    CU_ASSERT(bw.out.len < lim.max_response_bytes);
    cJSON *j = answer_of(&bw);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    CU_ASSERT_STRING_EQUAL(sget(e, "code"), "upstream_too_large");
    char cap[32];
    snprintf(cap, sizeof(cap), "%zu", lim.max_response_bytes);
    CU_ASSERT_PTR_NOT_NULL(strstr(sget(e, "message"), cap));
    cJSON_Delete(j);
    buf_writer_destroy(&bw);
}

/* ---------------------------------------------------------------- the line writer */

#define MAX_LINES 64

/* Everything the line writer emitted, one entry per emit. */
struct emitted {
    char *line[MAX_LINES];
    size_t len[MAX_LINES];
    int n;
    int nulls;  /* emits of NULL (a line lost) */
    size_t bytes;
};

static void on_emit(void *arg, const char *data, size_t len)
{
    struct emitted *em = arg;
    if (!data) {
        em->nulls++;
        return;
    }
    if (em->n == MAX_LINES)
        return;
    em->line[em->n] = malloc(len + 1);
    CU_ASSERT_FATAL(em->line[em->n] != NULL);
    memcpy(em->line[em->n], data, len);
    em->line[em->n][len] = '\0';
    em->len[em->n] = len;
    em->n++;
    em->bytes += len;
}

static void emitted_free(struct emitted *em)
{
    for (int i = 0; i < em->n; i++)
        free(em->line[i]);
    memset(em, 0, sizeof(*em));
}

/* Every emit is exactly one line: strict JSON, an object, one newline at its end. */
static void expect_whole_lines(const struct emitted *em)
{
    int bad = 0;
    for (int i = 0; i < em->n; i++) {
        const char *l = em->line[i];
        size_t n = em->len[i];
        bad += n < 2 || l[n - 1] != '\n' || memchr(l, '\n', n - 1) != NULL || l[0] != '{' ||
               !json_valid(l, n, NULL, NULL);
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(em->nulls, 0);
}

static cJSON *line_json(const struct emitted *em, int i)
{
    CU_ASSERT_FATAL(i >= 0 && i < em->n);
    return cJSON_ParseWithLength(em->line[i], em->len[i]);
}

static void test_render_lines_items_and_done(void)
{
    struct emitted em = {0};
    struct line_writer lw;
    line_writer_init(&lw, &LIM, on_emit, &em);
    CU_ASSERT_EQUAL(lw.w.fail_pos, SIZE_MAX);
    struct call_result a = ok_result("{\"x\":1}");
    struct call_result b = err_result(FETCH_EUNREACH, 0, "refused");
    struct call_result c = ok_result("text");
    lw.w.ops->begin(&lw.w);
    CU_ASSERT_EQUAL(em.n, 0); /* the status line and headers are the owner's */
    lw.w.ops->item(&lw.w, 2, "\"c\"", &c); /* completion order, not request order */
    CU_ASSERT_EQUAL(em.n, 1);              /* each line goes out as it is made */
    lw.w.ops->item(&lw.w, 0, "\"a\"", &a);
    lw.w.ops->item(&lw.w, 1, "5", &b);
    lw.w.ops->end(&lw.w);
    expect_whole_lines(&em);
    CU_ASSERT_EQUAL_FATAL(em.n, 4);
    CU_ASSERT_EQUAL(lw.results, 2);
    CU_ASSERT_EQUAL(lw.errors, 1);
    CU_ASSERT_EQUAL(lw.sent, em.bytes);
    CU_ASSERT_PTR_NULL(lw.code);
    cJSON *l0 = line_json(&em, 0), *l1 = line_json(&em, 1), *l2 = line_json(&em, 2),
          *l3 = line_json(&em, 3);
    CU_ASSERT_EQUAL(nget(l0, "index"), 2);
    CU_ASSERT_STRING_EQUAL(sget(l0, "id"), "c");
    CU_ASSERT_EQUAL(nget(l0, "status"), 200);
    CU_ASSERT_STRING_EQUAL(sget(l0, "data"), "text");
    CU_ASSERT_EQUAL(nget(l1, "index"), 0);
    CU_ASSERT_EQUAL(nget(cJSON_GetObjectItemCaseSensitive(l1, "data"), "x"), 1);
    CU_ASSERT_EQUAL(nget(l2, "index"), 1);
    CU_ASSERT_EQUAL(nget(l2, "id"), 5);
    CU_ASSERT_STRING_EQUAL(sget(cJSON_GetObjectItemCaseSensitive(l2, "error"), "code"),
                           "upstream_unreachable");
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(l3, "done")));
    CU_ASSERT_EQUAL(nget(l3, "results"), 2);
    CU_ASSERT_EQUAL(nget(l3, "errors"), 1);
    cJSON_Delete(l0);
    cJSON_Delete(l1);
    cJSON_Delete(l2);
    cJSON_Delete(l3);
    line_writer_destroy(&lw);
    emitted_free(&em);
}

/* Mode all: the failing position's error line, then the done line with the error and the id;
 * nothing after that, and a second failure changes nothing. */
static void test_render_lines_fail_ends_the_stream(void)
{
    struct emitted em = {0};
    struct line_writer lw;
    line_writer_init(&lw, &LIM, on_emit, &em);
    struct call_result a = ok_result("1");
    struct call_result bad = err_result(FETCH_ESTATUS, 503, NULL);
    struct call_result late = err_result(-ETIMEDOUT, 0, NULL);
    lw.w.ops->begin(&lw.w);
    lw.w.ops->item(&lw.w, 0, "\"a\"", &a);
    lw.w.fail_pos = 4;
    lw.w.ops->fail(&lw.w, "\"b\"", &bad);
    int after_fail = em.n;
    lw.w.ops->item(&lw.w, 1, "\"c\"", &a); /* late completions are not written */
    lw.w.ops->fail(&lw.w, "\"d\"", &late);
    lw.w.ops->end(&lw.w);
    CU_ASSERT_EQUAL(em.n, after_fail);
    expect_whole_lines(&em);
    CU_ASSERT_EQUAL_FATAL(em.n, 3);
    CU_ASSERT_STRING_EQUAL(lw.code, "upstream_status");
    CU_ASSERT_EQUAL(lw.status, 502);
    CU_ASSERT_STRING_EQUAL(lw.fail_id, "\"b\"");
    cJSON *l1 = line_json(&em, 1), *l2 = line_json(&em, 2);
    CU_ASSERT_EQUAL(nget(l1, "index"), 4);
    CU_ASSERT_STRING_EQUAL(sget(l1, "id"), "b");
    const cJSON *e1 = cJSON_GetObjectItemCaseSensitive(l1, "error");
    CU_ASSERT_STRING_EQUAL(sget(e1, "code"), "upstream_status");
    CU_ASSERT_EQUAL(nget(e1, "upstream_status"), 503);
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(l2, "done")));
    const cJSON *e2 = cJSON_GetObjectItemCaseSensitive(l2, "error");
    CU_ASSERT_STRING_EQUAL(sget(e2, "code"), "upstream_status");
    CU_ASSERT_STRING_EQUAL(sget(e2, "id"), "b");
    CU_ASSERT_EQUAL(nget(e2, "upstream_status"), 503);
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(l2, "results"));
    cJSON_Delete(l1);
    cJSON_Delete(l2);
    line_writer_destroy(&lw);
    emitted_free(&em);

    /* A failure with no id to blame: the done line alone, with no id. */
    line_writer_init(&lw, &LIM, on_emit, &em);
    struct call_result down = err_result(FETCH_ESHUTDOWN, 0, NULL);
    lw.w.ops->begin(&lw.w);
    lw.w.ops->fail(&lw.w, NULL, &down);
    lw.w.ops->end(&lw.w);
    expect_whole_lines(&em);
    CU_ASSERT_EQUAL_FATAL(em.n, 1);
    CU_ASSERT_EQUAL(lw.status, 503);
    CU_ASSERT_PTR_NULL(lw.fail_id);
    cJSON *l0 = line_json(&em, 0);
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(l0, "done")));
    const cJSON *e0 = cJSON_GetObjectItemCaseSensitive(l0, "error");
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(e0, "id"));
    cJSON_Delete(l0);
    line_writer_destroy(&lw);
    emitted_free(&em);
}

/* A result whose line would take the answer past max_response_bytes is an upstream_too_large
 * error line instead; what is emitted passes the cap by no more than those error lines. */
static void test_render_lines_response_cap(void)
{
    char body[2000];
    memset(body, 'z', sizeof(body) - 1);
    body[sizeof(body) - 1] = '\0';
    struct call_result r = ok_result(body);
    struct render_limits lim = LIM;
    lim.max_response_bytes = 5000; /* two lines of a body fit, the third does not */
    struct emitted em = {0};
    struct line_writer lw;
    line_writer_init(&lw, &lim, on_emit, &em);
    lw.w.ops->begin(&lw.w);
    for (size_t i = 0; i < 5; i++)
        lw.w.ops->item(&lw.w, i, "\"k\"", &r);
    lw.w.ops->end(&lw.w);
    expect_whole_lines(&em);
    CU_ASSERT_EQUAL_FATAL(em.n, 6);
    CU_ASSERT_EQUAL(lw.results, 2);
    CU_ASSERT_EQUAL(lw.errors, 3);
    size_t err_lines = 0;
    for (int i = 0; i < 5; i++) {
        cJSON *l = line_json(&em, i);
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(l, "error");
        if (i < 2) {
            CU_ASSERT_PTR_NOT_NULL(cJSON_GetObjectItemCaseSensitive(l, "data"));
        } else {
            CU_ASSERT_STRING_EQUAL(sget(e, "code"), "upstream_too_large");
            CU_ASSERT_PTR_NOT_NULL(strstr(sget(e, "message"), "5000"));
            err_lines += em.len[i];
        }
        cJSON_Delete(l);
    }
    CU_ASSERT(em.bytes - em.len[5] <= lim.max_response_bytes + err_lines);
    CU_ASSERT(em.len[0] + em.len[1] <= lim.max_response_bytes);
    cJSON *done = line_json(&em, 5);
    CU_ASSERT_EQUAL(nget(done, "results"), 2);
    CU_ASSERT_EQUAL(nget(done, "errors"), 3);
    cJSON_Delete(done);
    line_writer_destroy(&lw);
    emitted_free(&em);
}

/* An upstream body that is JSON with line breaks between its tokens (pretty-printed) is still
 * one line, and the same value (found by fuzz_render). */
static void test_render_lines_pretty_body_is_one_line(void)
{
    struct emitted em = {0};
    struct render_limits lim = {1000, 1 << 20, 1 << 20};
    struct line_writer lw;
    line_writer_init(&lw, &lim, on_emit, &em);
    static const char body[] = "{\n  \"a\": [1,\r\n 2],\n  \"s\": \"x\\ny\"\n}\n";
    struct call_result r = {.status = 200, .body = body, .len = sizeof(body) - 1, .valid = -1,
                            .decided = true};
    lw.w.ops->begin(&lw.w);
    lw.w.ops->item(&lw.w, 0, "\"k\"", &r);
    lw.w.ops->end(&lw.w);
    expect_whole_lines(&em);
    CU_ASSERT_EQUAL_FATAL(em.n, 2);
    cJSON *l = line_json(&em, 0);
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(l, "data");
    cJSON *want = cJSON_Parse(body);
    CU_ASSERT(cJSON_Compare(d, want, true));
    cJSON_Delete(want);
    cJSON_Delete(l);
    line_writer_destroy(&lw);
    emitted_free(&em);
}

static CU_TestInfo render_tests[] = {
    {"render_error: status, code and message for every kind", test_render_error_every_kind},
    {"render_error: no id to blame", test_render_error_without_id},
    {"render_error: the longest escaped id fits the message", test_render_error_longest_id_fits},
    {"json_error_doc: one line, escaped, extra members", test_render_json_error_doc},
    {"buffer writer: results in order, bodies spliced or quoted", test_render_buf_results_in_order},
    {"buffer writer: errors in place (settled)", test_render_buf_errors_in_place},
    {"buffer writer: a batch failure is the error document", test_render_buf_fail},
    {"buffer writer: past max_response_bytes, 502 upstream_too_large",
     test_render_buf_response_cap},
    {"line writer: a whole line per position, then done", test_render_lines_items_and_done},
    {"line writer: the first error ends the stream", test_render_lines_fail_ends_the_stream},
    {"line writer: a line past the cap is an error line", test_render_lines_response_cap},
    {"line writer: a pretty-printed body stays one line",
     test_render_lines_pretty_body_is_one_line},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(render, render_tests)
