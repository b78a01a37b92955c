/* rng: xorshift64* per thread (see rng.h). */
#include "server/rng.h"

#include <time.h>

uint64_t rng_upto(uint64_t n)
{
    static _Thread_local uint64_t s;
    if (s == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        s = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)(uintptr_t)&s ^ 0x9E3779B97F4A7C15ull;
        s |= 1;
    }
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    uint64_t x = s * 0x2545F4914F6CDD1DULL;
    return n == UINT64_MAX ? x : x % (n + 1);
}
