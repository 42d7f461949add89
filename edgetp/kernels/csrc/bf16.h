/* bfloat16 <-> float32 for every kernel source: one definition, so that every op rounds alike
 * (decode_ops.c's int4 widening rounds the same way in vectors, for the finite values weights
 * have).
 *
 * A bfloat16 value is the top half of a float32's bits. Widening is exact; narrowing rounds to
 * nearest, ties to even, as torch's conversion does, and a NaN stays a NaN (torch's 0x7FC0):
 * rounding a NaN's bits like a number's can carry into the sign and give -0. The select keeps
 * the conversion branch-free, so loops over it still vectorize.
 */
#ifndef EDGETP_BF16_H
#define EDGETP_BF16_H

#include <stdint.h>
#include <string.h>

/* bfloat16 bits -> the float32 they stand for (exact). */
static inline float bf16_value(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &wide, sizeof f);
    return f;
}

/* float32 -> bfloat16 bits: nearest, ties to even; NaN -> 0x7FC0. */
static inline uint16_t bf16_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return (bits & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : rounded;
}

#endif
