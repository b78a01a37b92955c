/* mix: request bodies for the load tool (see mix.h). Zipf draws invert a precomputed cumulative
 * table by binary search, so a draw costs O(log keys) and the distribution is exact. Bodies are
 * written by hand (no printf) because one is built per request. */
#include "deploy/loadtest/mix.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t lt_rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

uint64_t lt_rng_seed(uint64_t seed, uint64_t stream)
{
    uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (stream + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z ? z : 0x9E3779B97F4A7C15ULL;
}

/* A uniform double in [0, 1). */
static double uniform01(uint64_t *s)
{
    return (double)(lt_rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

int lt_mix_prepare(struct lt_mix *m)
{
    m->zipf_cdf = NULL;
    if (m->dist != LT_DIST_ZIPF)
        return 0;
    double *cdf = malloc(m->keys * sizeof(*cdf));
    if (!cdf)
        return -ENOMEM;
    double sum = 0;
    for (uint64_t k = 0; k < m->keys; k++) {
        sum += 1.0 / pow((double)(k + 1), m->zipf_s);
        cdf[k] = sum;
    }
    for (uint64_t k = 0; k < m->keys; k++)
        cdf[k] /= sum;
    cdf[m->keys - 1] = 1.0;
    m->zipf_cdf = cdf;
    return 0;
}

void lt_mix_destroy(struct lt_mix *m)
{
    free(m->zipf_cdf);
    m->zipf_cdf = NULL;
}

size_t lt_mix_body_max(const struct lt_mix *m)
{
    /* per id: quotes, comma, prefix or "sleep<ms>-" (at most 16 + 10), 20 digits */
    size_t per = 2 + 1 + (strlen(m->prefix) > 32 ? strlen(m->prefix) : 32) + 20;
    return 64 + (size_t)m->batch_max * per + 64;
}

void lt_gen_init(struct lt_gen *g, const struct lt_mix *mix, uint64_t seed, uint64_t first,
                 uint64_t stride)
{
    g->mix = mix;
    g->rng = lt_rng_seed(seed, first);
    g->seq = first;
    g->stride = stride ? stride : 1;
}

uint64_t lt_gen_key(struct lt_gen *g)
{
    const struct lt_mix *m = g->mix;
    switch (m->dist) {
    case LT_DIST_SEQ: {
        uint64_t k = g->seq % m->keys;
        g->seq += g->stride;
        return k;
    }
    case LT_DIST_UNIFORM:
        return lt_rng_next(&g->rng) % m->keys;
    case LT_DIST_ZIPF: {
        double u = uniform01(&g->rng);
        uint64_t lo = 0, hi = m->keys - 1; /* first k with cdf[k] > u */
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo) / 2;
            if (m->zipf_cdf[mid] > u)
                hi = mid;
            else
                lo = mid + 1;
        }
        return lo;
    }
    }
    return 0;
}

static char *put_str(char *p, const char *s)
{
    size_t n = strlen(s);
    memcpy(p, s, n);
    return p + n;
}

char *lt_put_u64(char *p, uint64_t v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

size_t lt_gen_body(struct lt_gen *g, char *buf, int *nids)
{
    const struct lt_mix *m = g->mix;
    int n = m->batch_min;
    if (m->batch_max > m->batch_min)
        n += (int)(lt_rng_next(&g->rng) % (uint64_t)(m->batch_max - m->batch_min + 1));
    char *p = put_str(buf, "{\"ids\":[");
    for (int i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        *p++ = '"';
        uint64_t key = lt_gen_key(g);
        double u = m->fail_frac > 0 || m->slow_frac > 0 ? uniform01(&g->rng) : 1.0;
        if (u < m->fail_frac) {
            p = put_str(p, "fail-");
        } else if (u < m->fail_frac + m->slow_frac) {
            p = put_str(p, "sleep");
            p = lt_put_u64(p, (uint64_t)m->slow_ms);
            *p++ = '-';
        } else {
            p = put_str(p, m->prefix);
        }
        p = lt_put_u64(p, key);
        *p++ = '"';
    }
    *p++ = ']';
    if (m->timeout_ms > 0) {
        p = put_str(p, ",\"timeout_ms\":");
        p = lt_put_u64(p, (uint64_t)m->timeout_ms);
    }
    if (m->mode) {
        p = put_str(p, ",\"mode\":\"");
        p = put_str(p, m->mode);
        *p++ = '"';
    }
    *p++ = '}';
    *p = '\0';
    *nids = n;
    return (size_t)(p - buf);
}
