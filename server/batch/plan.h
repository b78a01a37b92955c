/* plan: a parsed request's positions mapped to calls, one call per distinct key.
 *
 * A key is the id's encoding (url_encode_key(): percent-encoded bytes; a number's decimal
 * text), the same for every upstream, so "7" and 7 are one call and duplicate ids are fetched
 * once and reported at each of their positions. Pure code; read-only once built. */
#ifndef FANOUT_PLAN_H
#define FANOUT_PLAN_H

#include <stddef.h>
#include <stdint.h>

struct request;

struct plan_call {
    uint32_t key_off, key_len; /* the key, in the plan's arena */
    uint32_t first_pos;        /* first position naming it (error reports use its echo) */
    uint32_t mult;             /* positions naming it */
};

struct plan {
    size_t npos;             /* positions (the request's n) */
    uint32_t *pos_call;      /* position -> call index */
    size_t ncalls;           /* distinct keys */
    struct plan_call *calls; /* ncalls of them, in order of first appearance */
    char *keys;              /* every key's bytes */
};

static inline const char *plan_key(const struct plan *p, size_t c)
{
    return p->keys + p->calls[c].key_off;
}

/* Builds the plan of 'r'. Returns 0, or -ENOMEM with *p empty. */
int plan_build(const struct request *r, struct plan *p);

void plan_free(struct plan *p);

#endif
