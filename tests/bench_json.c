/* Micro-benchmark for server/json: json_valid() and json_append_string() throughput on a typical
 * ~200-byte upstream body and on a ~100 KB one, with cJSON's parse + delete (the alternative way
 * to decide whether to splice a body) for scale. Each measurement runs for about half a second;
 * the whole program takes about 4 s. Prints MB/s (10^6 bytes per second) and ns per call. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/json.h"

#define RUN_NS 500000000LL /* per measurement */

static volatile size_t sink; /* keeps results alive */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

enum op { OP_VALID, OP_ESCAPE, OP_CJSON };

static size_t run_once(enum op op, const char *s, size_t len, struct json_buf *b)
{
    switch (op) {
    case OP_VALID: {
        size_t start = 0, end = 0;
        return json_valid(s, len, &start, &end) ? end - start : 0;
    }
    case OP_ESCAPE:
        json_buf_clear(b);
        json_append_string(b, s, len);
        return b->len;
    case OP_CJSON: {
        cJSON *j = cJSON_ParseWithLengthOpts(s, len, NULL, 0);
        size_t ok = j != NULL;
        cJSON_Delete(j);
        return ok;
    }
    }
    return 0;
}

static void measure(const char *name, enum op op, const char *s, size_t len)
{
    struct json_buf b;
    json_buf_init(&b);
    size_t check = run_once(op, s, len, &b); /* warm up, and a sanity value to print */
    long iters = 0;
    int64_t t0 = now_ns(), t;
    long batch = len < 1000 ? 10000 : 20;
    do {
        for (long i = 0; i < batch; i++)
            sink += run_once(op, s, len, &b);
        iters += batch;
        t = now_ns();
    } while (t - t0 < RUN_NS);
    double secs = (double)(t - t0) / 1e9;
    printf("%-34s %7zu B  %9.1f MB/s  %10.1f ns/call  (result %zu)\n", name, len,
           (double)len * (double)iters / secs / 1e6, (double)(t - t0) / (double)iters, check);
    json_buf_destroy(&b);
}

/* A typical small upstream document, about 200 bytes. */
static const char small_doc[] =
    "{\"id\":\"item-12345\",\"name\":\"Widget \\u00e9 Deluxe \xE2\x84\xA2\",\"price\":12.99,"
    "\"tags\":[\"blue\",\"large\",\"sale\"],\"stock\":{\"warehouse\":\"eu-west-1\",\"count\":42},"
    "\"active\":true,\"rating\":4.5e0,\"updated\":\"2024-05-01T12:00:00Z\"}";

/* Appends copies of a record to b until it holds about 'size' bytes, as one JSON array. */
static void make_big_doc(struct json_buf *b, size_t size)
{
    json_buf_append_char(b, '[');
    for (int i = 0; b->len < size; i++) {
        if (i)
            json_buf_append_char(b, ',');
        json_buf_printf(b,
                        "{\"id\":%d,\"sku\":\"SKU-%06d\",\"title\":\"Caf\xC3\xA9 n\xC2\xB0%d "
                        "\\\"special\\\" \xE6\x97\xA5\xE6\x9C\xAC\",\"price\":%d.%02d,"
                        "\"dims\":[%d,%d,%d],\"ok\":%s,\"note\":null}",
                        i, i * 7, i, i % 100, i % 97, i % 10, i % 20, i % 30,
                        i % 2 ? "true" : "false");
    }
    json_buf_append_char(b, ']');
}

/* Mostly-ASCII prose with an occasional quote, newline and non-ASCII word, about 'size' bytes. */
static void make_text(struct json_buf *b, size_t size)
{
    static const char *words[] = {"the",          "upstream",    "returned", "a",          "plain",
                                  "text",         "body",        "with",     "\"quotes\"", "and",
                                  "na\xC3\xAFve", "caf\xC3\xA9", "lines\n",  "of",         "log",
                                  "output",       "tab\there"};
    for (int i = 0; b->len < size; i++) {
        json_buf_append_str(b, words[(i * 7 + i / 3) % (sizeof(words) / sizeof(words[0]))]);
        json_buf_append_char(b, ' ');
    }
}

int main(void)
{
    struct json_buf big, text, small_text;
    json_buf_init(&big);
    json_buf_init(&text);
    json_buf_init(&small_text);
    make_big_doc(&big, 100 * 1000);
    make_text(&text, 100 * 1000);
    make_text(&small_text, 200);
    if (json_buf_failed(&big) || json_buf_failed(&text) || json_buf_failed(&small_text)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    size_t small_len = sizeof(small_doc) - 1;
    if (!json_valid(small_doc, small_len, NULL, NULL) ||
        !json_valid(big.data, big.len, NULL, NULL)) {
        fprintf(stderr, "benchmark documents are not valid JSON\n");
        return 1;
    }
    measure("json_valid small doc", OP_VALID, small_doc, small_len);
    measure("json_valid 100KB doc", OP_VALID, big.data, big.len);
    measure("cJSON parse+delete small doc", OP_CJSON, small_doc, small_len);
    measure("cJSON parse+delete 100KB doc", OP_CJSON, big.data, big.len);
    measure("json_append_string small doc", OP_ESCAPE, small_doc, small_len);
    measure("json_append_string 100KB doc", OP_ESCAPE, big.data, big.len);
    measure("json_append_string 200B text", OP_ESCAPE, small_text.data, small_text.len);
    measure("json_append_string 100KB text", OP_ESCAPE, text.data, text.len);
    json_buf_destroy(&big);
    json_buf_destroy(&text);
    json_buf_destroy(&small_text);
    return 0;
}
