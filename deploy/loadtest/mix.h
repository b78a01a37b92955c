/* mix: the request mix of the load tool, i.e. what each POST /v1/batch body holds. A batch has a
 * fixed or a uniformly drawn number of ids; ids are "<prefix><n>" with n sequential, uniform over
 * 'keys', or Zipf-distributed over 'keys' (rank 1, the hottest, is n = 0); a fraction of ids is
 * replaced by the demo upstream's failing ("fail-<n>") or slow ("sleep<ms>-<n>") ids; the body
 * may carry timeout_ms and mode.
 *
 * A struct lt_mix is set up once and then read-only, shared by every thread; each thread draws
 * from its own struct lt_gen (its own seeded generator), so a run with a given seed repeats. */
#ifndef FANOUT_LT_MIX_H
#define FANOUT_LT_MIX_H

#include <stddef.h>
#include <stdint.h>

/* Largest key count for the Zipf table (8 bytes a key). */
#define LT_MIX_MAX_ZIPF_KEYS 10000000ULL
/* Longest id prefix. */
#define LT_MIX_MAX_PREFIX 64

enum lt_dist {
    LT_DIST_SEQ,     /* 0, 1, 2, ... wrapping at keys */
    LT_DIST_UNIFORM, /* uniform over [0, keys) */
    LT_DIST_ZIPF,    /* P(rank k) proportional to 1 / k^s over keys ranks */
};

struct lt_mix {
    int batch_min, batch_max;       /* ids per request, drawn uniformly from the range */
    enum lt_dist dist;              /* id distribution */
    uint64_t keys;                  /* distinct ids (>= 1) */
    double zipf_s;                  /* Zipf exponent (> 0) */
    double fail_frac;               /* fraction of ids replaced by failing ids */
    double slow_frac;               /* fraction of ids replaced by slow ids */
    int slow_ms;                    /* delay of a slow id */
    char prefix[LT_MIX_MAX_PREFIX]; /* id prefix: only A-Z a-z 0-9 - . _ ~ */
    int timeout_ms;                 /* sent as timeout_ms when > 0 */
    const char *mode;               /* sent as mode when not NULL (static string) */
    double *zipf_cdf;               /* Zipf: cumulative probabilities of ranks 1..keys (owned) */
};

/* Builds what the mix needs once (the Zipf table). Returns 0 or -ENOMEM. */
int lt_mix_prepare(struct lt_mix *m);

/* Frees what lt_mix_prepare() built. */
void lt_mix_destroy(struct lt_mix *m);

/* The largest body lt_gen_body() can write for m, terminating NUL included. */
size_t lt_mix_body_max(const struct lt_mix *m);

/* The 64-bit generator every draw uses (xorshift64*); *s must not be 0. */
uint64_t lt_rng_next(uint64_t *s);

/* A seed for stream 'stream' of 'seed' (splitmix64 of both; never 0). */
uint64_t lt_rng_seed(uint64_t seed, uint64_t stream);

/* One thread's draws from a mix. */
struct lt_gen {
    const struct lt_mix *mix; /* borrowed */
    uint64_t rng;             /* generator state */
    uint64_t seq;             /* next sequential id */
    uint64_t stride;          /* sequential ids advance by this (the thread count) */
};

/* Sets up g to draw from 'mix' with seed 'seed'; sequential ids start at 'first' and advance
 * by 'stride'. */
void lt_gen_init(struct lt_gen *g, const struct lt_mix *mix, uint64_t seed, uint64_t first,
                 uint64_t stride);

/* Writes the next JSON body into buf (at least lt_mix_body_max() bytes) and returns its length;
 * *nids is the number of ids in it. */
size_t lt_gen_body(struct lt_gen *g, char *buf, int *nids);

/* Writes the decimal digits of v at p (no NUL); returns the end. */
char *lt_put_u64(char *p, uint64_t v);

/* The next key a draw gives (without prefix or replacement), for tests. */
uint64_t lt_gen_key(struct lt_gen *g);

#endif
