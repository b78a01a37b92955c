/* membudget: one byte budget for what all requests hold in memory together (--max-memory):
 * buffered request bodies, upstream bodies kept for the answer, and rendered answers.
 * An embedded object (init/destroy). Thread-safe: every call is a relaxed atomic or a
 * compare-and-swap loop, so any thread may take and give. */
#ifndef FANOUT_MEMBUDGET_H
#define FANOUT_MEMBUDGET_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

struct membudget {
    atomic_size_t _used; /* bytes held */
    size_t _max;         /* the budget */
};

/* Starts an empty budget of 'max' bytes. */
void membudget_init(struct membudget *m, size_t max);

/* Takes 'n' bytes if that keeps the total within the budget; false (nothing taken) if not.
 * A NULL budget always grants. */
bool membudget_take(struct membudget *m, size_t n);

/* Takes 'n' bytes even past the budget (memory that exists already). NULL: no-op. */
void membudget_force(struct membudget *m, size_t n);

/* Gives back 'n' bytes taken earlier. NULL: no-op. */
void membudget_give(struct membudget *m, size_t n);

/* True when 'n' more bytes would fit now besides the 'own' bytes the caller holds already (a
 * hint: others may take meanwhile). */
bool membudget_room(const struct membudget *m, size_t n, size_t own);

/* Bytes held now. */
size_t membudget_used(const struct membudget *m);

#endif
