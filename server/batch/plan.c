/* plan: keys and deduplication (see plan.h). An open-addressing table of call indices, sized to
 * twice the positions, finds a key's call in one probe on average. */
#include "server/batch/plan.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/url.h"
#include "server/batch/request.h"

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

void plan_free(struct plan *p)
{
    free(p->pos_call);
    free(p->calls);
    free(p->keys);
    memset(p, 0, sizeof(*p));
}

int plan_build(const struct request *r, struct plan *p)
{
    memset(p, 0, sizeof(*p));
    size_t n = r->n, keybytes = 0;
    for (size_t i = 0; i < n; i++)
        keybytes += URL_ENCODED_MAX((size_t)r->items[i].id_len);
    size_t tcap = 16;
    while (tcap < 2 * n)
        tcap *= 2;
    p->pos_call = malloc((n ? n : 1) * sizeof(*p->pos_call));
    p->calls = malloc((n ? n : 1) * sizeof(*p->calls));
    p->keys = malloc(keybytes ? keybytes : 1);
    int32_t *table = malloc(tcap * sizeof(*table)); /* call index, or -1 */
    if (!p->pos_call || !p->calls || !p->keys || !table || keybytes > UINT32_MAX) {
        free(table);
        plan_free(p);
        return -ENOMEM;
    }
    memset(table, 0xff, tcap * sizeof(*table));
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        char *key = p->keys + used;
        size_t klen = url_encode_key(request_id(r, i), r->items[i].id_len, key);
        size_t h = hash_bytes(key, klen) & (tcap - 1);
        while (table[h] >= 0) {
            const struct plan_call *c = &p->calls[table[h]];
            if (c->key_len == klen && !memcmp(p->keys + c->key_off, key, klen))
                break;
            h = (h + 1) & (tcap - 1);
        }
        if (table[h] < 0) {
            table[h] = (int32_t)p->ncalls;
            p->calls[p->ncalls++] =
                (struct plan_call){(uint32_t)used, (uint32_t)klen, (uint32_t)i, 0};
            used += klen; /* a duplicate's bytes are simply overwritten by the next key */
        }
        p->pos_call[i] = (uint32_t)table[h];
        p->calls[table[h]].mult++;
    }
    free(table);
    p->npos = n;
    return 0;
}
