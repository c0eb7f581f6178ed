/* kfac_rng.h - small, fast, reproducible random numbers for the library
 * (shuffling, augmentation, weight init).
 *
 * The generator is xoshiro256** (Blackman & Vigna), seeded through
 * splitmix64 so that every 64-bit seed, 0 included, gives a well-mixed
 * state.  A kfac_rng is plain data: copying it forks the stream.
 *
 * To stay independent of thread count and call order, derive streams rather
 * than share one: combine a base seed with indices through kfac_mix64 and
 * seed a fresh generator, e.g.
 *     kfac_rng_seed(&rng, kfac_mix64(kfac_mix64(seed, epoch), sample));
 *
 * Header-only (static inline); the normal sampler needs libm.
 */
#ifndef KFAC_RNG_H
#define KFAC_RNG_H

#include <math.h>
#include <stdint.h>

typedef struct kfac_rng {
    uint64_t s[4];
} kfac_rng;

#define KFAC_RNG_GOLDEN 0x9e3779b97f4a7c15ULL /* 2^64 / golden ratio, odd */

/* splitmix64's output function: a bijective 64-bit avalanche mixer. */
static inline uint64_t kfac_fmix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* One splitmix64 step: advances *state and returns the next output. */
static inline uint64_t kfac_splitmix64(uint64_t *state)
{
    *state += KFAC_RNG_GOLDEN;
    return kfac_fmix64(*state);
}

/* Combines seed `a` with value `b` into a new seed.  Not symmetric in a and
 * b; for a fixed `a` it is a bijection of `b`, so distinct indices under the
 * same seed never collide. */
static inline uint64_t kfac_mix64(uint64_t a, uint64_t b)
{
    return kfac_fmix64(kfac_fmix64(a + KFAC_RNG_GOLDEN) + b);
}

static inline void kfac_rng_seed(kfac_rng *rng, uint64_t seed)
{
    /* Four consecutive splitmix64 outputs are distinct (fmix64 is a
     * bijection), so the state can never be all zero. */
    for (int i = 0; i < 4; i++) rng->s[i] = kfac_splitmix64(&seed);
}

static inline uint64_t kfac_rng__rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

/* The next 64 uniformly distributed bits (xoshiro256**). */
static inline uint64_t kfac_rng_next_u64(kfac_rng *rng)
{
    uint64_t *s = rng->s;
    uint64_t result = kfac_rng__rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = kfac_rng__rotl(s[3], 45);
    return result;
}

/* Uniform double in [0, 1) with 53 random bits. */
static inline double kfac_rng_uniform(kfac_rng *rng)
{
    return (double)(kfac_rng_next_u64(rng) >> 11) * 0x1.0p-53;
}

/* Uniform float in [0, 1) with 24 random bits. */
static inline float kfac_rng_uniformf(kfac_rng *rng)
{
    return (float)(kfac_rng_next_u64(rng) >> 40) * 0x1.0p-24f;
}

/* Uniform integer in [0, n), without modulo bias; 0 when n == 0. */
static inline uint64_t kfac_rng_below(kfac_rng *rng, uint64_t n)
{
    if (n == 0) return 0;
    /* Reject the lowest 2^64 mod n values: what remains is a whole number
     * of copies of [0, n).  Rejection is rare (probability < n / 2^64). */
    uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t r = kfac_rng_next_u64(rng);
        if (r >= threshold) return r % n;
    }
}

/* Standard normal sample (Box-Muller).  The second value of the pair is
 * dropped so that a kfac_rng stays plain state with no cached spare. */
static inline double kfac_rng_normal(kfac_rng *rng)
{
    double u1 = 1.0 - kfac_rng_uniform(rng); /* (0, 1]: log(u1) is finite */
    double u2 = kfac_rng_uniform(rng);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925 * u2);
}

#endif
