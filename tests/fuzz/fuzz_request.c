/* Fuzz target: the request parser and the planner (server/batch/request.h, server/batch/plan.h).
 *
 * Input: byte 0 picks the limits and whether an X-Request-Timeout-Ms header is given (its text is
 * the bytes after the first NUL, if any); the rest is the body. Properties checked on success:
 * every position's echo is one strict JSON value and a string id is valid UTF-8 of 1..256 bytes
 * with no NUL; the deadline is within [1, max]; the plan maps every position to a call whose key
 * is the id's encoding, and no two calls share a key. On failure: a 4xx/500 status, a code and a
 * message. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/url.h"
#include "server/json.h"
#include "server/batch/plan.h"
#include "server/batch/request.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t mode = data[0];
    struct request_limits lim = {.max_batch = (mode & 1) ? 3 : 1000,
                                 .default_timeout_ms = 5000,
                                 .max_timeout_ms = (mode & 2) ? 100 : 30000};
    const char *body = (const char *)data + 1;
    size_t blen = size - 1;
    char hdr[64];
    const char *header = NULL;
    if (mode & 4) { /* a header: the text after the first NUL, the body before it */
        const char *nul = memchr(body, 0, blen);
        if (nul) {
            size_t hl = blen - (size_t)(nul + 1 - body);
            if (hl >= sizeof(hdr))
                hl = sizeof(hdr) - 1;
            memcpy(hdr, nul + 1, hl);
            hdr[hl] = '\0';
            header = hdr;
            blen = (size_t)(nul - body);
        }
    }
    char *copy = malloc(blen + 1);
    if (!copy)
        return 0;
    memcpy(copy, body, blen);
    copy[blen] = '\0';
    struct request rq;
    struct request_error e;
    int rc = request_parse(&lim, copy, blen, header, &rq, &e);
    free(copy);
    if (rc != 0) {
        if (!(e.status == 400 || e.status == 413 || e.status == 500) || !e.code || !e.message[0])
            abort();
        return 0;
    }
    if (rq.n > lim.max_batch || rq.timeout_ms < 1 || rq.timeout_ms > lim.max_timeout_ms)
        abort();
    for (size_t i = 0; i < rq.n; i++) {
        const char *echo = request_echo(&rq, i);
        size_t el = rq.items[i].echo_len;
        if (!json_valid(echo, el, NULL, NULL))
            abort();
        size_t il = rq.items[i].id_len;
        const char *id = request_id(&rq, i);
        if (il == 0 || il > REQUEST_ID_MAX_BYTES || memchr(id, 0, il) || !json_utf8_valid(id, il))
            abort();
    }
    struct plan p;
    if (plan_build(&rq, &p) == 0) {
        char key[3 * REQUEST_ID_MAX_BYTES];
        for (size_t i = 0; i < rq.n; i++) {
            size_t kl = url_encode_key(request_id(&rq, i), rq.items[i].id_len, key);
            const struct plan_call *c = &p.calls[p.pos_call[i]];
            if (c->key_len != kl || memcmp(plan_key(&p, p.pos_call[i]), key, kl) != 0)
                abort();
        }
        for (size_t a = 0; a < p.ncalls && p.ncalls < 64; a++)
            for (size_t b = a + 1; b < p.ncalls; b++)
                if (p.calls[a].key_len == p.calls[b].key_len &&
                    !memcmp(plan_key(&p, a), plan_key(&p, b), p.calls[a].key_len))
                    abort();
        plan_free(&p);
    }
    request_free(&rq);
    return 0;
}
