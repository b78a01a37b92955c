/* Tests for server/obs/log.h: JSON lines on a pipe (time, level, msg and the caller's fields),
 * levels, lines dropped and counted when the ring is full (never waited for), log_free() that
 * writes what is queued, and log_free() that gives up on a reader that stopped reading.
 *
 * A full ring is made without timing: the pipe is filled first, so the writer thread cannot
 * take a byte out of the ring until the test reads the pipe. */
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "server/json.h"
#include "server/obs/log.h"
#include "tests/support.h"

#define WAIT_MS test_ms(20000)

/* ---------------------------------------------------------------- pipes */

/* Everything read from 'fd' until EOF (NUL-terminated, free() it); *len its length. */
static char *read_all(int fd, size_t *len)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    CU_ASSERT_FATAL(buf != NULL);
    for (;;) {
        if (n + 1 == cap) {
            char *nb = realloc(buf, cap *= 2);
            CU_ASSERT_FATAL(nb != NULL);
            buf = nb;
        }
        ssize_t k = read(fd, buf + n, cap - 1 - n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        n += (size_t)k;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Fills the pipe's write end until it takes no byte more (the pipe made one page long first).
 * Returns how many bytes it holds. */
static size_t fill_pipe(int wfd)
{
    fcntl(wfd, F_SETPIPE_SZ, 4096); /* smaller is quicker; the default size works too */
    int fl = fcntl(wfd, F_GETFL);
    fcntl(wfd, F_SETFL, fl | O_NONBLOCK);
    static const char page[4096];
    size_t total = 0;
    ssize_t k;
    while ((k = write(wfd, page, sizeof(page))) > 0)
        total += (size_t)k;
    while ((k = write(wfd, page, 1)) > 0) /* the last page's tail */
        total += (size_t)k;
    fcntl(wfd, F_SETFL, fl);
    return total;
}

/* Reads exactly n bytes from 'fd'. */
static bool read_exactly(int fd, size_t n)
{
    char buf[4096];
    while (n) {
        ssize_t k = read(fd, buf, n < sizeof(buf) ? n : sizeof(buf));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return false;
        n -= (size_t)k;
    }
    return true;
}

/* ---------------------------------------------------------------- lines */

#define MAX_LINES 4096

struct lines {
    cJSON *line[MAX_LINES];
    int n;
    int bad; /* lines that are not one JSON object ending in a newline */
};

static void lines_parse(const char *text, size_t len, struct lines *l)
{
    memset(l, 0, sizeof(*l));
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) {
            l->bad++;
            return;
        }
        cJSON *j = json_valid(p, (size_t)(nl - p), NULL, NULL)
                       ? cJSON_ParseWithLength(p, (size_t)(nl - p))
                       : NULL;
        if (!cJSON_IsObject(j) || l->n == MAX_LINES) {
            cJSON_Delete(j);
            l->bad++;
        } else {
            l->line[l->n++] = j;
        }
        p = nl + 1;
    }
}

static void lines_free(struct lines *l)
{
    for (int i = 0; i < l->n; i++)
        cJSON_Delete(l->line[i]);
    l->n = 0;
}

static const char *sget(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* The seconds since the epoch of an RFC 3339 UTC time with milliseconds
 * ("2024-01-02T03:04:05.678Z"), or -1 if it is not one. */
static time_t rfc3339_utc(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    int ms = -1, used = 0;
    if (strlen(s) != 24 ||
        sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
               &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms, &used) != 7 ||
        used != 24 || ms < 0 || ms > 999)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return timegm(&tm);
}

/* The length of every line that log_begin(level, msg) starts, closed by log_end(). */
static size_t line_len(enum log_level level, const char *msg)
{
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, level, msg);
    size_t n = b.len + 2; /* "}\n" */
    json_buf_destroy(&b);
    return n;
}

/* ---------------------------------------------------------------- tests */

static void test_log_lines_and_fields(void)
{
    int p[2];
    CU_ASSERT_FATAL(pipe(p) == 0);
    atomic_uint_fast64_t dropped;
    atomic_init(&dropped, 0);
    struct log *l = NULL;
    CU_ASSERT_FATAL(log_new(p[1], LOG_DEBUG, 1 << 16, &dropped, &l) == 0);
    time_t before = time(NULL);
    log_msg(l, LOG_INFO, "hello \"x\"\n\xff");
    struct json_buf b;
    json_buf_init(&b);
    json_buf_append_str(&b, "leftover"); /* log_begin starts the line afresh */
    log_begin(&b, LOG_WARN, "with fields");
    json_buf_append_str(&b, ",\"n\":7,\"s\":");
    json_append_string(&b, "v\x01", 2);
    log_end(l, &b);
    CU_ASSERT(b.data != NULL && b.len > 0); /* the buffer stays the caller's */
    log_begin(&b, LOG_ERROR, "again"); /* and can start the next line */
    log_end(l, &b);
    json_buf_destroy(&b);
    time_t after = time(NULL);
    log_free(l);
    close(p[1]);
    size_t len;
    char *text = read_all(p[0], &len);
    close(p[0]);
    struct lines ls;
    lines_parse(text, len, &ls);
    CU_ASSERT_EQUAL(ls.bad, 0);
    CU_ASSERT_EQUAL_FATAL(ls.n, 3);
    static const char *const level[] = {"info", "warn", "error"};
    static const char *const msg[] = {"hello \"x\"\n\xef\xbf\xbd", "with fields", "again"};
    for (int i = 0; i < 3; i++) {
        const cJSON *j = ls.line[i];
        CU_ASSERT_STRING_EQUAL(sget(j, "level"), level[i]);
        CU_ASSERT_STRING_EQUAL(sget(j, "msg"), msg[i]);
        time_t t = rfc3339_utc(sget(j, "time"));
        CU_ASSERT(t >= before && t <= after);
        /* time, level and msg come first, in that order */
        CU_ASSERT(j->child && !strcmp(j->child->string, "time") && j->child->next &&
                  !strcmp(j->child->next->string, "level") && j->child->next->next &&
                  !strcmp(j->child->next->next->string, "msg"));
    }
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(ls.line[1], "n");
    CU_ASSERT(cJSON_IsNumber(n) && n->valuedouble == 7);
    CU_ASSERT_STRING_EQUAL(sget(ls.line[1], "s"), "v\x01");
    CU_ASSERT_EQUAL(cJSON_GetArraySize(ls.line[0]), 3);
    CU_ASSERT_EQUAL(atomic_load(&dropped), 0);
    lines_free(&ls);
    free(text);
}

/* Lines above the level are not written; log_enabled says which are. */
static void test_log_levels(void)
{
    CU_ASSERT_STRING_EQUAL(log_level_name(LOG_ERROR), "error");
    CU_ASSERT_STRING_EQUAL(log_level_name(LOG_WARN), "warn");
    CU_ASSERT_STRING_EQUAL(log_level_name(LOG_INFO), "info");
    CU_ASSERT_STRING_EQUAL(log_level_name(LOG_DEBUG), "debug");
    static const enum log_level all[] = {LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG};
    for (int lv = 0; lv < 4; lv++) {
        int p[2];
        CU_ASSERT_FATAL(pipe(p) == 0);
        struct log *l = NULL;
        CU_ASSERT_FATAL(log_new(p[1], all[lv], 1 << 16, NULL, &l) == 0);
        for (int m = 0; m < 4; m++) {
            CU_ASSERT_EQUAL(log_enabled(l, all[m]), m <= lv);
            log_msg(l, all[m], log_level_name(all[m]));
        }
        log_free(l);
        close(p[1]);
        size_t len;
        char *text = read_all(p[0], &len);
        close(p[0]);
        struct lines ls;
        lines_parse(text, len, &ls);
        CU_ASSERT_EQUAL(ls.bad, 0);
        CU_ASSERT_EQUAL(ls.n, lv + 1);
        for (int i = 0; i < ls.n; i++) { /* in order, each at its own level */
            CU_ASSERT_STRING_EQUAL(sget(ls.line[i], "level"), log_level_name(all[i]));
            CU_ASSERT_STRING_EQUAL(sget(ls.line[i], "msg"), log_level_name(all[i]));
        }
        lines_free(&ls);
        free(text);
    }
}

/* With the fd taking nothing, the ring fills: the lines that fit are kept whole, every later one
 * is dropped and counted at once (the caller never waits), and once the fd takes bytes again
 * log_free writes what was kept. */
static void test_log_full_ring_drops_and_counts(void)
{
    enum { FIT = 10, TRIES = 25 };
    int p[2];
    CU_ASSERT_FATAL(pipe(p) == 0);
    size_t prefill = fill_pipe(p[1]);
    CU_ASSERT_FATAL(prefill > 0);
    size_t L = line_len(LOG_INFO, "line 00");
    atomic_uint_fast64_t dropped;
    atomic_init(&dropped, 0);
    struct log *l = NULL;
    CU_ASSERT_FATAL(log_new(p[1], LOG_INFO, FIT * L + L / 2, &dropped, &l) == 0);
    for (int i = 0; i < TRIES; i++) {
        char msg[24];
        snprintf(msg, sizeof(msg), "line %02d", i);
        log_msg(l, LOG_INFO, msg);
    }
    CU_ASSERT_EQUAL(atomic_load(&dropped), TRIES - FIT);
    /* The reader comes back: what the pipe held, then the kept lines. */
    CU_ASSERT_FATAL(read_exactly(p[0], prefill));
    log_free(l);
    close(p[1]);
    size_t len;
    char *text = read_all(p[0], &len);
    close(p[0]);
    CU_ASSERT_EQUAL(len, FIT * L);
    struct lines ls;
    lines_parse(text, len, &ls);
    CU_ASSERT_EQUAL(ls.bad, 0);
    CU_ASSERT_EQUAL_FATAL(ls.n, FIT);
    for (int i = 0; i < FIT; i++) { /* the first ten, in order */
        char want[24];
        snprintf(want, sizeof(want), "line %02d", i);
        CU_ASSERT_STRING_EQUAL(sget(ls.line[i], "msg"), want);
    }
    lines_free(&ls);
    free(text);
}

/* A ring smaller than any line drops everything, counted or (without a counter) not. */
static void test_log_tiny_ring(void)
{
    int p[2];
    CU_ASSERT_FATAL(pipe(p) == 0);
    atomic_uint_fast64_t dropped;
    atomic_init(&dropped, 0);
    struct log *l = NULL;
    CU_ASSERT_FATAL(log_new(p[1], LOG_DEBUG, 16, &dropped, &l) == 0);
    log_msg(l, LOG_ERROR, "x");
    log_msg(l, LOG_ERROR, "y");
    CU_ASSERT_EQUAL(atomic_load(&dropped), 2);
    log_free(l);
    CU_ASSERT_FATAL(log_new(p[1], LOG_DEBUG, 16, NULL, &l) == 0);
    log_msg(l, LOG_ERROR, "z");
    log_free(l);
    close(p[1]);
    size_t len;
    char *text = read_all(p[0], &len);
    close(p[0]);
    CU_ASSERT_EQUAL(len, 0);
    free(text);
    log_free(NULL);
}

struct freeing {
    struct log *l;
    atomic_bool done;
};

static void *free_main(void *arg)
{
    struct freeing *f = arg;
    log_free(f->l);
    atomic_store(&f->done, true);
    return NULL;
}

static bool freed(void *arg)
{
    return atomic_load(&((struct freeing *)arg)->done);
}

/* log_free with lines queued and a reader that stopped reading: it returns (the rest dropped)
 * and writes nothing more. */
static void test_log_free_with_stopped_reader(void)
{
    int p[2];
    CU_ASSERT_FATAL(pipe(p) == 0);
    size_t prefill = fill_pipe(p[1]);
    struct log *l = NULL;
    CU_ASSERT_FATAL(log_new(p[1], LOG_INFO, 1 << 16, NULL, &l) == 0);
    for (int i = 0; i < 50; i++)
        log_msg(l, LOG_INFO, "queued behind a reader that stopped");
    struct freeing f = {.l = l};
    atomic_init(&f.done, false);
    pthread_t t;
    CU_ASSERT_FATAL(pthread_create(&t, NULL, free_main, &f) == 0);
    bool returned = test_wait_until(freed, &f, WAIT_MS);
    CU_ASSERT(returned);
    if (!returned) { /* let it finish so the test can end */
        size_t n;
        free(read_all(p[0], &n));
    }
    pthread_join(t, NULL);
    close(p[1]);
    size_t len;
    char *text = read_all(p[0], &len);
    close(p[0]);
    if (returned)
        CU_ASSERT_EQUAL(len, prefill); /* only what the test itself wrote */
    free(text);
}

/* ---------------------------------------------------------------- threads */

#define WRITERS 4
#define PER_WRITER 500

struct reader {
    int fd;
    char *text;
    size_t len;
};

static void *reader_main(void *arg)
{
    struct reader *r = arg;
    r->text = read_all(r->fd, &r->len);
    return NULL;
}

struct writer_arg {
    struct log *l;
    int id;
};

static void *writer_main(void *arg)
{
    struct writer_arg *w = arg;
    struct json_buf b;
    json_buf_init(&b);
    for (int i = 0; i < PER_WRITER; i++) {
        log_begin(&b, LOG_INFO, "concurrent");
        json_buf_printf(&b, ",\"w\":%d,\"i\":%d", w->id, i);
        log_end(w->l, &b);
    }
    json_buf_destroy(&b);
    return NULL;
}

/* Many threads log at once: every line is whole, each thread's lines keep their order, and the
 * lines written plus those dropped are all the lines. */
static void test_log_threads(void)
{
    int p[2];
    CU_ASSERT_FATAL(pipe(p) == 0);
    atomic_uint_fast64_t dropped;
    atomic_init(&dropped, 0);
    struct log *l = NULL;
    CU_ASSERT_FATAL(log_new(p[1], LOG_INFO, 8192, &dropped, &l) == 0);
    struct reader rd = {.fd = p[0]};
    pthread_t rt, wt[WRITERS];
    CU_ASSERT_FATAL(pthread_create(&rt, NULL, reader_main, &rd) == 0);
    struct writer_arg wa[WRITERS];
    for (int i = 0; i < WRITERS; i++) {
        wa[i] = (struct writer_arg){l, i};
        CU_ASSERT_FATAL(pthread_create(&wt[i], NULL, writer_main, &wa[i]) == 0);
    }
    for (int i = 0; i < WRITERS; i++)
        pthread_join(wt[i], NULL);
    log_free(l);
    close(p[1]);
    pthread_join(rt, NULL);
    close(p[0]);
    struct lines *ls = malloc(sizeof(*ls));
    CU_ASSERT_FATAL(ls != NULL);
    lines_parse(rd.text, rd.len, ls);
    CU_ASSERT_EQUAL(ls->bad, 0);
    CU_ASSERT_EQUAL((uint64_t)ls->n + atomic_load(&dropped), (uint64_t)WRITERS * PER_WRITER);
    int last[WRITERS], disorder = 0;
    for (int i = 0; i < WRITERS; i++)
        last[i] = -1;
    for (int i = 0; i < ls->n; i++) {
        const cJSON *w = cJSON_GetObjectItemCaseSensitive(ls->line[i], "w");
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(ls->line[i], "i");
        if (!cJSON_IsNumber(w) || !cJSON_IsNumber(k) || w->valueint < 0 ||
            w->valueint >= WRITERS) {
            disorder++;
            continue;
        }
        disorder += k->valueint <= last[w->valueint];
        last[w->valueint] = k->valueint;
    }
    CU_ASSERT_EQUAL(disorder, 0);
    lines_free(ls);
    free(ls);
    free(rd.text);
}

static CU_TestInfo log_tests[] = {
    {"lines: time, level, msg, then the caller's fields", test_log_lines_and_fields},
    {"levels: lines above the level are skipped", test_log_levels},
    {"a full ring drops and counts, never waits; the kept lines follow",
     test_log_full_ring_drops_and_counts},
    {"a ring smaller than a line drops every line", test_log_tiny_ring},
    {"log_free returns with a reader that stopped reading", test_log_free_with_stopped_reader},
    {"threads: whole lines in each thread's order, written plus dropped = all", test_log_threads},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(log, log_tests)
