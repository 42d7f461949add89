/* A streaming reader: how fast this CPU's memory delivers bytes to a well-written loop.
 *
 * The decode products only have to read their weights once per token, so the honest floor of a
 * token's time is its bytes over this rate (benchmarks/decode.py, `edgetp probe`). The loop
 * keeps ACCUMULATORS independent vector sums as wide as the build's target has (AVX-512, AVX2,
 * NEON, else the compiler's vectors over plain arrays), so neither the adds' latency nor a
 * narrow register limits it, and reads SEGMENTS parts of the buffer at once, so that one address
 * stream's misses do not limit it either (on the 2-vCPU EPYC: ~23 GB/s against ~15 for one
 * segment, where the float32 product, four rows at a time, reads ~21): only memory does. It sums the buffer as 32-bit integers (whatever
 * the bytes) and returns the sum, so the compiler cannot drop the reads.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define ACCUMULATORS 8

#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#define VECTOR_NAME "avx512"
typedef __m512i vec;
static inline vec vzero(void) { return _mm512_setzero_si512(); }
static inline vec vload(const uint8_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline vec vadd(vec a, vec b) { return _mm512_add_epi32(a, b); }
#elif defined(__AVX2__)
#define VECTOR_BYTES 32
#define VECTOR_NAME "avx2"
typedef __m256i vec;
static inline vec vzero(void) { return _mm256_setzero_si256(); }
static inline vec vload(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vec vadd(vec a, vec b) { return _mm256_add_epi32(a, b); }
#elif defined(__ARM_NEON)
#define VECTOR_BYTES 16
#define VECTOR_NAME "neon"
typedef uint32x4_t vec;
static inline vec vzero(void) { return vdupq_n_u32(0); }
static inline vec vload(const uint8_t *p) { return vld1q_u32((const uint32_t *)(const void *)p); }
static inline vec vadd(vec a, vec b) { return vaddq_u32(a, b); }
#else
#define VECTOR_BYTES 16
#define VECTOR_NAME "generic"
typedef struct { uint32_t lane[4]; } vec;
static inline vec vzero(void) { vec v = {{0, 0, 0, 0}}; return v; }
static inline vec vload(const uint8_t *p) { vec v; memcpy(v.lane, p, sizeof v.lane); return v; }
static inline vec vadd(vec a, vec b) {
    for (int k = 0; k < 4; k++) a.lane[k] += b.lane[k];
    return a;
}
#endif

static uint32_t lanes_sum(vec v) {
    uint32_t lane[VECTOR_BYTES / 4], sum = 0;
    memcpy(lane, &v, sizeof lane);
    for (int k = 0; k < VECTOR_BYTES / 4; k++) sum += lane[k];
    return sum;
}

/* Bytes per vector register of the loop below (64 AVX-512, 32 AVX2, 16 NEON/generic). */
int et_stream_vector_bytes(void) { return VECTOR_BYTES; }

const char *et_stream_path(void) { return VECTOR_NAME; }

/* Reads ``bytes`` from ``data`` once and returns the 32-bit sum of what it read. The buffer is
 * read as SEGMENTS equal parts at once, each by its own accumulators (several address streams
 * keep more cache misses in flight than one, as a product's rows do); a multiple of
 * ACCUMULATORS vectors is read with vectors, the rest bytewise. */
#define SEGMENTS 4
uint32_t et_stream_read(const uint8_t *data, int64_t bytes) {
    const int per = ACCUMULATORS / SEGMENTS;  /* vectors per segment and step */
    const int64_t step = per * VECTOR_BYTES;   /* bytes per segment and step */
    int64_t segment = bytes / SEGMENTS / step * step, whole = segment * SEGMENTS;
    vec acc[ACCUMULATORS];
    for (int k = 0; k < ACCUMULATORS; k++) acc[k] = vzero();
    for (int64_t i = 0; i < segment; i += step)
        for (int s = 0; s < SEGMENTS; s++)
            for (int k = 0; k < per; k++)
                acc[s * per + k] = vadd(acc[s * per + k],
                                        vload(data + s * segment + i + k * VECTOR_BYTES));
    uint32_t sum = 0;
    for (int k = 0; k < ACCUMULATORS; k++) sum += lanes_sum(acc[k]);
    for (int64_t i = whole; i < bytes; i++) sum += data[i];
    return sum;
}
