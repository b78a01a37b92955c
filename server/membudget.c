/* membudget: the shared memory budget (membudget.h). */
#include "server/membudget.h"

void membudget_init(struct membudget *m, size_t max)
{
    atomic_init(&m->_used, 0);
    m->_max = max;
}

bool membudget_take(struct membudget *m, size_t n)
{
    if (!m)
        return true;
    size_t cur = atomic_load_explicit(&m->_used, memory_order_relaxed);
    do {
        if (n > m->_max || cur > m->_max - n)
            return false;
    } while (!atomic_compare_exchange_weak_explicit(&m->_used, &cur, cur + n, memory_order_relaxed,
                                                    memory_order_relaxed));
    return true;
}

void membudget_force(struct membudget *m, size_t n)
{
    if (m)
        atomic_fetch_add_explicit(&m->_used, n, memory_order_relaxed);
}

void membudget_give(struct membudget *m, size_t n)
{
    if (m)
        atomic_fetch_sub_explicit(&m->_used, n, memory_order_relaxed);
}

bool membudget_room(const struct membudget *m, size_t n, size_t own)
{
    size_t cur = atomic_load_explicit(&m->_used, memory_order_relaxed);
    cur = cur > own ? cur - own : 0;
    return n <= m->_max && cur <= m->_max - n;
}

size_t membudget_used(const struct membudget *m)
{
    return atomic_load_explicit(&m->_used, memory_order_relaxed);
}
