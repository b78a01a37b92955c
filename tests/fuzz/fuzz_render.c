/* Fuzz target: the response writer (server/batch/render.h). Any upstream bodies, any mix of results
 * and errors: the answer is strict JSON that round-trips the inputs: a body that is JSON is
 * spliced as the same value, any other body is a JSON string equal to it (when it is UTF-8 with
 * no NUL), and an error entry has a code and a message. A batch-level failure is an error
 * document naming the id.
 *
 * Input: byte 0 is a bit mask of which positions fail (bit 7: render a batch failure instead);
 * the rest is split at 0xFF bytes into up to 7 upstream bodies. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/fetch.h"
#include "server/batch/result.h"
#include "server/json.h"
#include "server/batch/render.h"

/* What the line writer wrote. */
struct lines_seen {
    size_t n;        /* lines */
    int seen[7];     /* lines per index */
    bool done, bad;  /* a done line came (last), something was wrong */
};

static void on_line(void *arg, const char *data, size_t len)
{
    struct lines_seen *ls = arg;
    if (!data || len == 0 || data[len - 1] != '\n' || memchr(data, '\n', len - 1) || ls->done) {
        ls->bad = true;
        return;
    }
    ls->n++;
    cJSON *j = cJSON_ParseWithLength(data, len - 1);
    const cJSON *idx = cJSON_GetObjectItemCaseSensitive(j, "index");
    if (!cJSON_IsObject(j)) {
        ls->bad = true;
    } else if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "done"))) {
        ls->done = true;
    } else if (!cJSON_IsNumber(idx) || idx->valuedouble < 0 || idx->valuedouble >= 7 ||
               !cJSON_GetObjectItemCaseSensitive(j, "id") ||
               (!cJSON_GetObjectItemCaseSensitive(j, "data") &&
                !cJSON_GetObjectItemCaseSensitive(j, "error"))) {
        ls->bad = true;
    } else {
        ls->seen[idx->valueint]++;
    }
    cJSON_Delete(j);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const int errs[] = {FETCH_ESTATUS, FETCH_EUNREACH, FETCH_ETOOBIG, -ETIMEDOUT,
                           CALL_ERESPONSE, -ESHUTDOWN, -ENOMEM};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t mask = data[0];
    struct call_result res[7];
    char echo[7][16];
    size_t k = 0, start = 1;
    for (size_t i = 1; i <= size && k < 7; i++) {
        if (i == size || data[i] == 0xFF) {
            struct call_result *r = &res[k];
            memset(r, 0, sizeof(*r));
            r->valid = -1;
            r->len = i - start;
            char *body = malloc(r->len + 1);
            if (!body)
                abort();
            memcpy(body, data + start, r->len);
            body[r->len] = '\0';
            r->body = body;
            r->status = 200;
            r->decided = true;
            if (mask & (1u << k)) {
                r->err = errs[(r->len + k) % (sizeof(errs) / sizeof(errs[0]))];
                r->status = r->err == FETCH_ESTATUS ? 404 : 0;
                r->detail = "detail \"quoted\"";
            }
            snprintf(echo[k], sizeof(echo[k]), "\"id%zu\"", k);
            k++;
            start = i + 1;
        }
    }
    struct render_limits lim = {1000, 1 << 20, 1 << 30};
    struct buf_writer bw;
    buf_writer_init(&bw, &lim);
    bool fail = mask & 0x80;
    if (fail) {
        bw.w.ops->fail(&bw.w, k ? echo[0] : NULL, &res[0]);
    } else {
        bw.w.ops->begin(&bw.w);
        for (size_t i = 0; i < k; i++)
            bw.w.ops->item(&bw.w, i, echo[i], &res[i]);
    }
    bw.w.ops->end(&bw.w);
    if (json_buf_failed(&bw.out) || !json_valid(bw.out.data, bw.out.len, NULL, NULL))
        abort();
    cJSON *doc = cJSON_ParseWithLength(bw.out.data, bw.out.len);
    if (!doc)
        abort();
    if (fail) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(doc, "error");
        if (!cJSON_IsString(cJSON_GetObjectItem(e, "code")) ||
            !cJSON_IsString(cJSON_GetObjectItem(e, "message")))
            abort();
    } else {
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(doc, "results");
        if (!cJSON_IsArray(a) || (size_t)cJSON_GetArraySize(a) != k)
            abort();
        for (size_t i = 0; i < k; i++) {
            const cJSON *it = cJSON_GetArrayItem(a, (int)i);
            const cJSON *id = cJSON_GetObjectItem(it, "id");
            char want[16];
            snprintf(want, sizeof(want), "id%zu", i);
            if (!cJSON_IsString(id) || strcmp(id->valuestring, want) != 0)
                abort();
            if (res[i].err) {
                const cJSON *e = cJSON_GetObjectItem(it, "error");
                if (!cJSON_IsString(cJSON_GetObjectItem(e, "code")) ||
                    !cJSON_IsString(cJSON_GetObjectItem(e, "message")))
                    abort();
                continue;
            }
            const cJSON *d = cJSON_GetObjectItem(it, "data");
            if (!d)
                abort();
            if (json_valid(res[i].body, res[i].len, NULL, NULL)) {
                /* The same value: compared as cJSON prints both (cJSON_Compare calls two
                 * infinities, as 1e999 parses, different). */
                cJSON *orig = cJSON_ParseWithLength(res[i].body, res[i].len);
                char *pa = orig ? cJSON_PrintUnformatted(orig) : NULL;
                char *pb = orig ? cJSON_PrintUnformatted(d) : NULL;
                if (orig && (!pa || !pb || strcmp(pa, pb) != 0))
                    abort();
                free(pa);
                free(pb);
                cJSON_Delete(orig);
            } else {
                if (!cJSON_IsString(d))
                    abort();
                if (json_utf8_valid(res[i].body, res[i].len) && !memchr(res[i].body, 0, res[i].len) &&
                    strcmp(d->valuestring, res[i].body) != 0)
                    abort();
            }
        }
    }
    cJSON_Delete(doc);
    buf_writer_destroy(&bw);

    /* The same results streamed (NDJSON): each line is one JSON object; a line per position
     * with its index and id, or the failure's lines; the done line last, with the counts. */
    struct lines_seen ls = {0};
    struct line_writer lw;
    line_writer_init(&lw, &lim, on_line, &ls);
    if (fail) {
        lw.w.fail_pos = 0;
        lw.w.ops->fail(&lw.w, k ? echo[0] : NULL, &res[0]);
    } else {
        lw.w.ops->begin(&lw.w);
        for (size_t i = k; i-- > 0;) /* any order: completion order */
            lw.w.ops->item(&lw.w, i, echo[i], &res[i]);
    }
    lw.w.ops->end(&lw.w);
    if (lw.oom || !ls.done || ls.bad || ls.n != (fail ? (k ? 2 : 1) : k + 1))
        abort();
    for (size_t i = 0; !fail && i < k; i++)
        if (ls.seen[i] != 1)
            abort();
    line_writer_destroy(&lw);
    for (size_t i = 0; i < k; i++) {
        free((void *)(uintptr_t)res[i].body);
    }
    return 0;
}
