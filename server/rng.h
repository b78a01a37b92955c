/* rng: a fast per-thread pseudo-random number for jitter and sampling (never for secrets).
 *
 * xorshift64* with a state per thread, seeded from the clock and the state's address on first
 * use. Thread-safe by being per thread; no lock, no allocation. */
#ifndef FANOUT_RNG_H
#define FANOUT_RNG_H

#include <stdint.h>

/* A uniform number in [0, n] (n = UINT64_MAX: any 64-bit value). */
uint64_t rng_upto(uint64_t n);

#endif
