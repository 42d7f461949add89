/* Decode matrix-vector products for edgetp (one token: y[rows] = W[rows, cols] . x[cols]).
 *
 * At batch size 1 every weight is read once per token, so these loops only have to keep the
 * memory bus busy: rows go four at a time (one pass over x feeds four weight streams) and the
 * inner loops are written for the compiler's vectorizer (built with -O3 -march=native and
 * reassociation allowed, see edgetp/kernels/native.py). Every product has hand-written loops
 * for AVX-512, AVX2 + FMA (AVX-VNNI where the target has it) and AArch64 NEON (the dot
 * product where the target has it), chosen at build time from the compiler's feature macros;
 * the plain C loops serve any other target.
 *
 * Every product also comes batched (et_matvec_*_rows: x [nx, cols], 1 <= nx <= ET_MAX_BATCH,
 * y [nx, rows]), reading the weight once for all x rows, and y[t] is bitwise the one-row
 * product of x[t] (what lets a continuously batched sequence decode the same tokens as alone):
 * either the weights widened once in registers feed every x row's accumulators with the
 * one-row call's steps (the one-row function is the nx = 1 instance), or the one-row code runs
 * for each x row on a cache-sized chunk of weight rows that starts at a multiple of the path's
 * row block (a row's sum depends only on the kind of pass it falls in, never on its neighbours).
 *
 * Every function is single-threaded (one thread per node) and allocation-free, except for
 * growing thread-local scratch areas holding x converted (float32 for bfloat16, int16 codes
 * for the integer products, and on AArch64 with the dot product those codes' bytes apart;
 * et_quantize_rows, once per call for every x row).
 * All arrays are row-major and contiguous; bfloat16 travels as uint16_t.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#include "bf16.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define ET_AVX2 1 /* x86-64-v3 and up: 256-bit integer and FMA paths */
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define ET_NEON 1 /* every AArch64 CPU; __ARM_FEATURE_DOTPROD / _MATMUL_INT8 add sdot / usdot */
#endif

#define ROWS 4
#define ET_MAX_BATCH 8 /* x rows a batched product takes (the *_rows functions) */
/* A batched product reads its weight in chunks of about this many bytes (a multiple of the
 * kernel's row block), and runs the one-row code for every x row on a chunk while it is in
 * the cache: each weight byte comes from memory once per product, whatever the x rows. */
#define BATCH_CHUNK_BYTES (64 << 10)

#if defined(ET_AVX2)
static inline float sum256(__m256 v) { /* the sum of a vector's eight floats */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

int et_abi_version(void) { return 7; }

/* ---- float32 weights, float32 x -> float32 y ------------------------------------------------ */

#if defined(__AVX512F__) || defined(ET_AVX2) || defined(ET_NEON)
#if defined(__AVX512F__)
#define F32_LANES 16
typedef __m512 f32_vec;
#define f32_zero() _mm512_setzero_ps()
#define f32_load(p) _mm512_loadu_ps(p)
#define f32_fma(a, b, acc) _mm512_fmadd_ps(a, b, acc)
#define f32_add(a, b) _mm512_add_ps(a, b)
#define f32_sum(v) _mm512_reduce_add_ps(v)
#elif defined(ET_AVX2)
#define F32_LANES 8
typedef __m256 f32_vec;
#define f32_zero() _mm256_setzero_ps()
#define f32_load(p) _mm256_loadu_ps(p)
#define f32_fma(a, b, acc) _mm256_fmadd_ps(a, b, acc)
#define f32_add(a, b) _mm256_add_ps(a, b)
#define f32_sum(v) sum256(v)
#else
#define F32_LANES 4
typedef float32x4_t f32_vec;
#define f32_zero() vdupq_n_f32(0.f)
#define f32_load(p) vld1q_f32(p)
#define f32_fma(a, b, acc) vfmaq_f32(acc, a, b)
#define f32_add(a, b) vaddq_f32(a, b)
#define f32_sum(v) vaddvq_f32(v)
#endif
/* Each row in one pass of four vector accumulators over consecutive vectors, so the weights
 * are read as one sequential stream, as the streaming reader reads them. Over weights in huge
 * pages (how edgetp.core.pages holds them) one EPYC core streamed 34 GB/s this way against 28
 * with twelve rows at a time (twelve streams, one accumulator each), the reader 32.6; over
 * 4 KiB pages the twelve streams led, 25 against 22.5 (docs/performance.md, item 24). */
#define F32_ACC 4
/* Rows whose x is longer than half an L1 data cache (an MLP's down projection: 5632 columns,
 * 22 KiB of x) lost x to the weights streaming through L1 and fetched it again from L2 for
 * every row: one EPYC core streamed 22 GB/s of such rows against 31 of 2048-column ones. They
 * go F32_LONG_ROWS rows a pass, each x vector loaded once for them all (28-30 GB/s),
 * each row with its own four accumulators. A chunk of rows starts at a multiple of F32_BLOCK,
 * itself a multiple of F32_LONG_ROWS, so a row takes the same kind of pass (and gets the same
 * bits) however the rows are split between threads or batches. */
#define F32_LONG_X_BYTES 16384
#define F32_LONG_ROWS 4 /* with AVX2's 16 registers too: 26 GB/s against 22 for two rows */

__attribute__((noinline)) static void f32_long_rows(const float *restrict w,
                                                    const float *restrict x,
                                                    float *restrict y, int64_t cols) {
    const int64_t wide = F32_ACC * F32_LANES;
    int64_t wide_cols = cols - cols % wide, vec_cols = cols - cols % F32_LANES;
    f32_vec acc[F32_LONG_ROWS][F32_ACC];
    for (int j = 0; j < F32_LONG_ROWS; j++)
        for (int k = 0; k < F32_ACC; k++) acc[j][k] = f32_zero();
    int64_t i = 0;
    for (; i < wide_cols; i += wide) {
        f32_vec xv[F32_ACC];
        for (int k = 0; k < F32_ACC; k++) xv[k] = f32_load(x + i + k * F32_LANES);
        for (int j = 0; j < F32_LONG_ROWS; j++) /* a row's 256 bytes at a time: four streams */
            for (int k = 0; k < F32_ACC; k++)
                acc[j][k] = f32_fma(f32_load(w + j * cols + i + k * F32_LANES), xv[k], acc[j][k]);
    }
    for (; i < vec_cols; i += F32_LANES) {
        f32_vec xv = f32_load(x + i);
        for (int j = 0; j < F32_LONG_ROWS; j++)
            acc[j][0] = f32_fma(f32_load(w + j * cols + i), xv, acc[j][0]);
    }
    for (int j = 0; j < F32_LONG_ROWS; j++) {
        const float *wr = w + j * cols;
        float a = f32_sum(f32_add(f32_add(acc[j][0], acc[j][1]), f32_add(acc[j][2], acc[j][3])));
        for (int64_t t = i; t < cols; t++) a += wr[t] * x[t];
        y[j] = a;
    }
}

/* The two passes are functions of their own (noinline): compiled into one, the one-row loop
 * streamed 4% slower. */
__attribute__((noinline)) static void f32_rows_one_by_one(const float *restrict w,
                                                          const float *restrict x,
                                                          float *restrict y, int64_t rows,
                                                          int64_t cols) {
    const int64_t wide = F32_ACC * F32_LANES;
    int64_t wide_cols = cols - cols % wide, vec_cols = cols - cols % F32_LANES;
    for (int64_t r = 0; r < rows; r++) {
        const float *wr = w + r * cols;
        f32_vec acc[F32_ACC];
        for (int k = 0; k < F32_ACC; k++) acc[k] = f32_zero();
        int64_t i = 0;
        for (; i < wide_cols; i += wide)
            for (int k = 0; k < F32_ACC; k++)
                acc[k] = f32_fma(f32_load(wr + i + k * F32_LANES), f32_load(x + i + k * F32_LANES),
                                 acc[k]);
        for (; i < vec_cols; i += F32_LANES) acc[0] = f32_fma(f32_load(wr + i), f32_load(x + i), acc[0]);
        float a = f32_sum(f32_add(f32_add(acc[0], acc[1]), f32_add(acc[2], acc[3])));
        for (; i < cols; i++) a += wr[i] * x[i];
        y[r] = a;
    }
}

static int64_t f32_rows_vec(const float *restrict w, const float *restrict x, float *restrict y,
                            int64_t rows, int64_t cols) {
    int64_t r = 0;
    if (cols * (int64_t)sizeof(float) > F32_LONG_X_BYTES)
        for (; r + F32_LONG_ROWS <= rows; r += F32_LONG_ROWS)
            f32_long_rows(w + r * cols, x, y + r, cols);
    f32_rows_one_by_one(w + r * cols, x, y + r, rows - r, cols);
    return rows;
}
#endif

/* Rows per chunk of a batched product over rows [from, to) of ``row_bytes`` each: a multiple
 * of ``block`` (the row block of the kernel's passes, so that a chunk starting at a multiple of
 * it puts every row in the same kind of pass as one call over all rows does), or the whole
 * span for one x row. */
static int64_t batch_step(int64_t nx, int64_t row_bytes, int64_t block, int64_t span) {
    if (nx <= 1) return span > 0 ? span : 1;
    int64_t n = BATCH_CHUNK_BYTES / (row_bytes > 0 ? row_bytes : 1) / block * block;
    return n < block ? block : n;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* One x row against rows [0, rows) of w. */
static void f32_span(const float *restrict w, const float *restrict x, float *restrict y,
                     int64_t rows, int64_t cols) {
    int64_t r = 0;
#if defined(__AVX512F__) || defined(ET_AVX2) || defined(ET_NEON)
    r = f32_rows_vec(w, x, y, rows, cols);
#endif
    for (; r + ROWS <= rows; r += ROWS) {
        const float *w0 = w + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        for (int64_t i = 0; i < cols; i++) {
            float xi = x[i];
            a0 += w0[i] * xi;
            a1 += w1[i] * xi;
            a2 += w2[i] * xi;
            a3 += w3[i] * xi;
        }
        y[r] = a0;
        y[r + 1] = a1;
        y[r + 2] = a2;
        y[r + 3] = a3;
    }
    for (; r < rows; r++) {
        const float *wr = w + r * cols;
        float a = 0.f;
        for (int64_t i = 0; i < cols; i++) a += wr[i] * x[i];
        y[r] = a;
    }
}

#if defined(F32_LANES)
#define F32_BLOCK 16 /* any split gives each row the same bits: a cache-friendly chunk */
_Static_assert(F32_BLOCK % F32_LONG_ROWS == 0, "a chunk starts a pass of long rows");
#else
#define F32_BLOCK ROWS
#endif

/* x [nx, cols] against rows [from, to) of w -> y [nx, rows] (those rows of each y row); the
 * thread pool's part (csrc/pool.c), ``from`` a multiple of F32_BLOCK. */
void et_f32_part(const float *restrict w, const float *restrict x, float *restrict y,
                 int64_t rows, int64_t cols, int64_t nx, int64_t from, int64_t to) {
    int64_t step = batch_step(nx, cols * (int64_t)sizeof(float), F32_BLOCK, to - from);
    for (int64_t r = from; r < to; r += step)
        for (int64_t t = 0; t < nx; t++)
            f32_span(w + r * cols, x + t * cols, y + t * rows + r, min64(step, to - r), cols);
}

void et_matvec_f32(const float *restrict w, const float *restrict x, float *restrict y,
                   int64_t rows, int64_t cols) {
    et_f32_part(w, x, y, rows, cols, 1, 0, rows);
}

/* x [nx, cols], 1 <= nx <= ET_MAX_BATCH, -> y [nx, rows]; y[t] is bitwise et_matvec_f32 of
 * x[t]. Returns 0, or -3 for another nx. */
int et_matvec_f32_rows(const float *restrict w, const float *restrict x, float *restrict y,
                       int64_t rows, int64_t cols, int64_t nx) {
    if (nx < 1 || nx > ET_MAX_BATCH) return -3;
    et_f32_part(w, x, y, rows, cols, nx, 0, rows);
    return 0;
}

/* One growing thread-local scratch area (x converted for a product), never freed. */
static void *scratch_bytes(int64_t n) {
    static __thread void *area = NULL;
    static __thread int64_t capacity = 0;
    if (n > capacity) {
        void *grown = realloc(area, (size_t)n);
        if (grown == NULL) return NULL;
        area = grown;
        capacity = n;
    }
    return area;
}

/* ---- bfloat16 weights, bfloat16 x -> bfloat16 or float32 y (float32 accumulation) ----------
 *
 * Rounding y to bfloat16 is what torch does for a bfloat16 product; logits keep the float32 sum
 * (et_matvec_bf16_f32): near logits of 16-20 a bfloat16 step is 0.06-0.125, enough to tie the
 * top tokens. */

static inline void put_row(void *restrict y, int64_t r, float a, int f32_out) {
    if (f32_out) ((float *)y)[r] = a;
    else ((uint16_t *)y)[r] = bf16_bits(a);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* vdpbf16ps multiplies pairs of bfloat16 and adds them into float32: one instruction per 32
 * weights, where widening each weight to float32 first costs three. Each row in one pass of
 * two accumulators over consecutive vectors (bf16_rows_one_by_one): one sequential stream. */
#define BF16_ONE_ROW 1
/* Rows of an x over 16 KiB (8192 columns: a 70B model's every product, its down projection's
 * 28672 columns most) four to a pass, as for float32 (F32_LONG_X_BYTES): one EPYC core
 * streamed such rows at 21 GB/s one by one against 27-31 for shorter ones. */
#define BF16_LONG_ROWS 4
#define BF16_LONG_X_BYTES F32_LONG_X_BYTES
__attribute__((noinline)) static void bf16_long_rows(const uint16_t *restrict w,
                                                     const uint16_t *restrict x,
                                                     void *restrict y, int64_t r0,
                                                     int64_t cols, int f32_out) {
    int64_t wide_cols = cols - cols % 128, vec_cols = cols - cols % 32;
    __m512 acc[BF16_LONG_ROWS][4];
    for (int j = 0; j < BF16_LONG_ROWS; j++)
        for (int k = 0; k < 4; k++) acc[j][k] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < wide_cols; i += 128) {
        __m512bh xv[4];
        for (int k = 0; k < 4; k++) xv[k] = (__m512bh)_mm512_loadu_si512(x + i + 32 * k);
        for (int j = 0; j < BF16_LONG_ROWS; j++) /* a row's 256 bytes at a time */
            for (int k = 0; k < 4; k++)
                acc[j][k] = _mm512_dpbf16_ps(
                    acc[j][k], (__m512bh)_mm512_loadu_si512(w + j * cols + i + 32 * k), xv[k]);
    }
    for (; i < vec_cols; i += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
        for (int j = 0; j < BF16_LONG_ROWS; j++)
            acc[j][0] = _mm512_dpbf16_ps(acc[j][0], (__m512bh)_mm512_loadu_si512(w + j * cols + i),
                                         xv);
    }
    for (int j = 0; j < BF16_LONG_ROWS; j++) {
        const uint16_t *wr = w + j * cols;
        float a = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]),
                                                     _mm512_add_ps(acc[j][2], acc[j][3])));
        for (int64_t t = i; t < cols; t++) a += bf16_value(wr[t]) * bf16_value(x[t]);
        put_row(y, r0 + j, a, f32_out);
    }
}

/* One row at a time with two accumulators (128 bytes of the row a step): on an EPYC core
 * 32.6-34.6 GB/s on 2048- and 5632-column rows where four (256 bytes a step) streamed 30.4-32.4
 * and eight 26-30. */
__attribute__((noinline)) static void bf16_rows_one_by_one(
    const uint16_t *restrict w, const uint16_t *restrict x, void *restrict y, int64_t from,
    int64_t rows, int64_t cols, int f32_out) {
    int64_t wide_cols = cols - cols % 64, vec_cols = cols - cols % 32;
    for (int64_t r = from; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t i = 0;
        for (; i < wide_cols; i += 64)
            for (int k = 0; k < 2; k++)
                acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_loadu_si512(wr + i + 32 * k),
                                          (__m512bh)_mm512_loadu_si512(x + i + 32 * k));
        for (; i < vec_cols; i += 32)
            acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(wr + i),
                                      (__m512bh)_mm512_loadu_si512(x + i));
        float a = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        for (; i < cols; i++) a += bf16_value(wr[i]) * bf16_value(x[i]);
        put_row(y, r, a, f32_out);
    }
}

#endif

#if !(defined(__AVX512BF16__) && defined(__AVX512BW__)) && (defined(ET_AVX2) || defined(ET_NEON))
/* A bfloat16 is the high half of a float32: widening is one shift (or mask) per vector. Each
 * row in one pass (one sequential stream), two pairs of float32 accumulators (the even and odd
 * columns on AVX2, the low and high four of eight on NEON) over consecutive vectors. */
#define BF16_ONE_ROW 1
#if defined(ET_AVX2)
#define BF16_STEP 16
typedef __m256 bf16_acc;
/* 16 bfloat16 -> their even and odd elements as two float32 vectors */
static inline void bf16_widen(const uint16_t *p, __m256 *even, __m256 *odd) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}
#define bf16_zero() _mm256_setzero_ps()
#define bf16_fma(a, b, acc) _mm256_fmadd_ps(a, b, acc)
#define bf16_add(a, b) _mm256_add_ps(a, b)
#define bf16_sum(a, b) sum256(_mm256_add_ps(a, b))
#else
#define BF16_STEP 8
typedef float32x4_t bf16_acc;
/* 8 bfloat16 -> the low and high four as two float32 vectors */
static inline void bf16_widen(const uint16_t *p, float32x4_t *even, float32x4_t *odd) {
    uint16x8_t v = vld1q_u16(p);
    *even = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
    *odd = vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
}
#define bf16_zero() vdupq_n_f32(0.f)
#define bf16_fma(a, b, acc) vfmaq_f32(acc, a, b)
#define bf16_add(a, b) vaddq_f32(a, b)
#define bf16_sum(a, b) vaddvq_f32(vaddq_f32(a, b))
#endif
/* Rows of an x of 16 KiB (8192 columns) and more go four to a pass (bf16_long_rows): on
 * an EPYC core the AVX2 build streamed 14 GB/s of a 70B down projection's rows (28672
 * columns) and 16-19 of 8192-column ones one by one, 23-26 and 20-22 four to a pass; shorter
 * rows keep the one-row pass (30 GB/s; four to a pass, their sixteen accumulators spilled out
 * of AVX2's sixteen registers: 19). */
#define BF16_LONG_X_BYTES 12288
/* acc[0..1] += the products of BF16_STEP weights at w and x (even/low, odd/high) */
static inline void bf16_step(const uint16_t *w, const uint16_t *x, bf16_acc *acc) {
    bf16_acc x_lo, x_hi, w_lo, w_hi;
    bf16_widen(x, &x_lo, &x_hi);
    bf16_widen(w, &w_lo, &w_hi);
    acc[0] = bf16_fma(w_lo, x_lo, acc[0]);
    acc[1] = bf16_fma(w_hi, x_hi, acc[1]);
}
/* Four rows of a long x in one pass, each x vector loaded and widened once for the four, each
 * row with its own four accumulators. A chunk of rows starts at a multiple of BF16_BLOCK, a
 * multiple of four, so a row takes the same pass (and gets the same bits) however the rows
 * are split. */
#define BF16_LONG_ROWS 4
__attribute__((noinline)) static void bf16_long_rows(const uint16_t *restrict w,
                                                     const uint16_t *restrict x,
                                                     void *restrict y, int64_t r0,
                                                     int64_t cols, int f32_out) {
    int64_t wide_cols = cols - cols % (2 * BF16_STEP), vec_cols = cols - cols % BF16_STEP;
    bf16_acc acc[BF16_LONG_ROWS][4], w_lo, w_hi;
    for (int j = 0; j < BF16_LONG_ROWS; j++)
        for (int k = 0; k < 4; k++) acc[j][k] = bf16_zero();
    int64_t i = 0;
    for (; i < wide_cols; i += 2 * BF16_STEP) {
        bf16_acc x_lo[2], x_hi[2]; /* two steps of x, each widened once for the four rows */
        bf16_widen(x + i, &x_lo[0], &x_hi[0]);
        bf16_widen(x + i + BF16_STEP, &x_lo[1], &x_hi[1]);
        for (int j = 0; j < BF16_LONG_ROWS; j++)
            for (int k = 0; k < 2; k++) {
                bf16_widen(w + j * cols + i + k * BF16_STEP, &w_lo, &w_hi);
                acc[j][2 * k] = bf16_fma(w_lo, x_lo[k], acc[j][2 * k]);
                acc[j][2 * k + 1] = bf16_fma(w_hi, x_hi[k], acc[j][2 * k + 1]);
            }
    }
    for (; i < vec_cols; i += BF16_STEP) {
        bf16_acc x_lo, x_hi;
        bf16_widen(x + i, &x_lo, &x_hi);
        for (int j = 0; j < BF16_LONG_ROWS; j++) {
            bf16_widen(w + j * cols + i, &w_lo, &w_hi);
            acc[j][0] = bf16_fma(w_lo, x_lo, acc[j][0]);
            acc[j][1] = bf16_fma(w_hi, x_hi, acc[j][1]);
        }
    }
    for (int j = 0; j < BF16_LONG_ROWS; j++) {
        const uint16_t *wr = w + j * cols;
        float a = bf16_sum(bf16_add(acc[j][0], acc[j][2]), bf16_add(acc[j][1], acc[j][3]));
        for (int64_t t = i; t < cols; t++) a += bf16_value(wr[t]) * bf16_value(x[t]);
        put_row(y, r0 + j, a, f32_out);
    }
}

__attribute__((noinline)) static void bf16_rows_one_by_one(const uint16_t *restrict w,
                                                           const uint16_t *restrict x,
                                                           void *restrict y, int64_t from,
                                                           int64_t rows, int64_t cols,
                                                           int f32_out) {
    int64_t wide_cols = cols - cols % (2 * BF16_STEP), vec_cols = cols - cols % BF16_STEP;
    for (int64_t r = from; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        bf16_acc acc[4];
        for (int k = 0; k < 4; k++) acc[k] = bf16_zero();
        int64_t i = 0;
        for (; i < wide_cols; i += 2 * BF16_STEP) {
            bf16_step(wr + i, x + i, acc);
            bf16_step(wr + i + BF16_STEP, x + i + BF16_STEP, acc + 2);
        }
        for (; i < vec_cols; i += BF16_STEP) bf16_step(wr + i, x + i, acc);
        float a = bf16_sum(bf16_add(acc[0], acc[2]), bf16_add(acc[1], acc[3]));
        for (; i < cols; i++) a += bf16_value(wr[i]) * bf16_value(x[i]);
        put_row(y, r, a, f32_out);
    }
}

#endif

#if defined(BF16_ONE_ROW)
/* Every row of a bfloat16 product, one by one or (a long x) BF16_LONG_ROWS to a pass. */
static int64_t bf16_rows(const uint16_t *restrict w, const uint16_t *restrict x,
                         void *restrict y, int64_t rows, int64_t cols, int f32_out) {
    int64_t r = 0;
    if (cols * (int64_t)sizeof(uint16_t) > BF16_LONG_X_BYTES)
        for (; r + BF16_LONG_ROWS <= rows; r += BF16_LONG_ROWS)
            bf16_long_rows(w + r * cols, x, y, r, cols, f32_out);
    bf16_rows_one_by_one(w, x, y, r, rows, cols, f32_out);
    return rows;
}
#endif

static int bf16_matvec(const uint16_t *restrict w, const uint16_t *restrict x, void *restrict y,
                       int64_t rows, int64_t cols, int f32_out) {
    int64_t r = 0;
#if defined(BF16_ONE_ROW)
    r = bf16_rows(w, x, y, rows, cols, f32_out);
    if (r == rows) return 0;
#endif
    float *restrict xf = scratch_bytes(cols * (int64_t)sizeof(float));
    if (xf == NULL) return -1;
    for (int64_t i = 0; i < cols; i++) xf[i] = bf16_value(x[i]);
    for (; r + ROWS <= rows; r += ROWS) {
        const uint16_t *w0 = w + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        for (int64_t i = 0; i < cols; i++) {
            float xi = xf[i];
            a0 += bf16_value(w0[i]) * xi;
            a1 += bf16_value(w1[i]) * xi;
            a2 += bf16_value(w2[i]) * xi;
            a3 += bf16_value(w3[i]) * xi;
        }
        put_row(y, r, a0, f32_out);
        put_row(y, r + 1, a1, f32_out);
        put_row(y, r + 2, a2, f32_out);
        put_row(y, r + 3, a3, f32_out);
    }
    for (; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        float a = 0.f;
        for (int64_t i = 0; i < cols; i++) a += bf16_value(wr[i]) * xf[i];
        put_row(y, r, a, f32_out);
    }
    return 0;
}

#if defined(BF16_ONE_ROW)
#define BF16_BLOCK 16 /* any split gives each row the same bits: a cache-friendly chunk */
#if defined(BF16_LONG_ROWS)
_Static_assert(BF16_BLOCK % BF16_LONG_ROWS == 0, "a chunk starts a pass of long rows");
#endif
#else
#define BF16_BLOCK ROWS
#endif

/* x [nx, cols] against rows [from, to) of w -> y [nx, rows], bfloat16 or (``f32_out``) float32;
 * the thread pool's part, ``from`` a multiple of BF16_BLOCK. Returns 0 or -1 (no memory). */
int et_bf16_part(const uint16_t *restrict w, const uint16_t *restrict x, void *restrict y,
                 int64_t rows, int64_t cols, int64_t nx, int f32_out, int64_t from, int64_t to) {
    int64_t step = batch_step(nx, cols * (int64_t)sizeof(uint16_t), BF16_BLOCK, to - from);
    size_t out = f32_out ? sizeof(float) : sizeof(uint16_t);
    for (int64_t r = from; r < to; r += step)
        for (int64_t t = 0; t < nx; t++) {
            char *yt = (char *)y + (size_t)(t * rows + r) * out;
            if (bf16_matvec(w + r * cols, x + t * cols, yt, min64(step, to - r), cols, f32_out))
                return -1;
        }
    return 0;
}

int et_matvec_bf16(const uint16_t *restrict w, const uint16_t *restrict x, uint16_t *restrict y,
                   int64_t rows, int64_t cols) {
    return et_bf16_part(w, x, y, rows, cols, 1, 0, 0, rows);
}

int et_matvec_bf16_f32(const uint16_t *restrict w, const uint16_t *restrict x,
                       float *restrict y, int64_t rows, int64_t cols) {
    return et_bf16_part(w, x, y, rows, cols, 1, 1, 0, rows);
}

/* x [nx, cols] -> y [nx, rows] (bfloat16, or float32 sums); y[t] is bitwise the one-row
 * product of x[t]. Returns 0, -1 (no memory) or -3 (nx not in 1..ET_MAX_BATCH). */
int et_matvec_bf16_rows(const uint16_t *restrict w, const uint16_t *restrict x,
                        uint16_t *restrict y, int64_t rows, int64_t cols, int64_t nx) {
    if (nx < 1 || nx > ET_MAX_BATCH) return -3;
    return et_bf16_part(w, x, y, rows, cols, nx, 0, 0, rows);
}

int et_matvec_bf16_f32_rows(const uint16_t *restrict w, const uint16_t *restrict x,
                            float *restrict y, int64_t rows, int64_t cols, int64_t nx) {
    if (nx < 1 || nx > ET_MAX_BATCH) return -3;
    return et_bf16_part(w, x, y, rows, cols, nx, 1, 0, rows);
}

/* ---- int8 weights with a bfloat16 scale per row, float32 x -> float32 y ----------------------
 *
 * Widening every int8 weight to float costs more instructions than the memory allows, so x is
 * quantized instead, to int16 with one float32 scale per block of 64 columns (error <= 2^-16 of
 * the block's largest |x|, far below the bfloat16 rounding torch's int8 kernel applies to x).
 * A block's 64 products are summed exactly in int32 (|127 * 32767| * 64 < 2^31), then scaled.
 * Blocks start at column 0, so a rank whose columns start at a multiple of 64 (the plan aligns
 * MLP and head splits) sees the same blocks as one device holding the whole row.
 */

#define QBLOCK 64
#define QMAX 32767.0f

static int quantize_x(const float *restrict x, int64_t cols, int16_t *restrict xq,
                      float *restrict xs) {
    for (int64_t b = 0; b * QBLOCK < cols; b++) {
        int64_t from = b * QBLOCK, to = from + QBLOCK < cols ? from + QBLOCK : cols;
        float peak = 0.f;
        for (int64_t i = from; i < to; i++) {
            float size = fabsf(x[i]);
            if (!(size <= FLT_MAX)) return -2; /* inf or NaN (a NaN fails every comparison) */
            peak = size > peak ? size : peak;
        }
        /* in double: for a block of subnormal x the inverse overflows a float */
        double inverse = peak > 0.f ? (double)QMAX / (double)peak : 0.0;
        xs[b] = (float)((double)peak / (double)QMAX);
        for (int64_t i = from; i < to; i++) xq[i] = (int16_t)lrint((double)x[i] * inverse);
        for (int64_t i = to; i < from + QBLOCK; i++) xq[i] = 0; /* pad the last block */
    }
    return 0;
}

static inline int32_t block_dot_tail(const int8_t *restrict w, const int16_t *restrict xq,
                                     int64_t n) {
    int32_t acc = 0;
    for (int64_t i = 0; i < n; i++) acc += (int32_t)w[i] * (int32_t)xq[i];
    return acc;
}

#if defined(__AVX512BW__)
#define ET_EVEN_ODD_X 1
#endif

/* x quantized: int16 codes per 64-column block and the blocks' scales; on AArch64 with the dot
 * product also each code's bytes apart (q = 256 hi + lo), for sdot / usdot; with AVX-512 also
 * the codes of each full block with its even columns first, then its odd (for the int8 block
 * product, which takes its weights' bytes apart by shifts). */
struct qx {
    const int16_t *q;
    const float *scale;
    const int8_t *hi, *lo; /* lo: 0..255 (usdot) or lo - 128 (sdot only); NULL elsewhere */
#if defined(ET_EVEN_ODD_X)
    const int16_t *q_eo; /* NULL unless quantized with ``split`` */
#endif
};

#if defined(ET_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define ET_SPLIT_X 1
/* The code bytes of x: hi = q >> 8 (-128..127) and the low byte, as 0..255 for usdot (int8
 * matrix multiply) or shifted to -128..127 for sdot. */
static void split_x(const int16_t *restrict xq, int64_t n, int8_t *restrict hi,
                    int8_t *restrict lo) {
    for (int64_t i = 0; i < n; i++) {
        hi[i] = (int8_t)(xq[i] >> 8);
#if defined(__ARM_FEATURE_MATMUL_INT8)
        lo[i] = (int8_t)(uint8_t)(xq[i] & 0xff);
#else
        lo[i] = (int8_t)((xq[i] & 0xff) - 128);
#endif
    }
}
#endif

#if defined(ET_EVEN_ODD_X)
/* The full 64-column blocks' codes of x, each block's even columns then its odd. */
static void even_odd_x(const int16_t *restrict xq, int64_t blocks, int16_t *restrict eo) {
    static const int16_t evens[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                      32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
    const __m512i even = _mm512_loadu_si512(evens);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t b = 0; b < blocks; b++) {
        __m512i x0 = _mm512_loadu_si512(xq + b * QBLOCK), x1 = _mm512_loadu_si512(xq + b * QBLOCK + 32);
        _mm512_storeu_si512(eo + b * QBLOCK, _mm512_permutex2var_epi16(x0, even, x1));
        _mm512_storeu_si512(eo + b * QBLOCK + 32, _mm512_permutex2var_epi16(x0, odd, x1));
    }
}
#endif

#if defined(ET_AVX2)
/* acc + pairwise products of 16 int16 lanes: vpdpwssd where the target has AVX-VNNI */
static inline __m256i madd_acc(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

/* Eight int32 lanes summing w[0..31] * xq[0..31] exactly. */
static inline __m256i dot32_avx2(const int8_t *restrict w, const int16_t *restrict xq) {
    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
    __m256i dot = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xq));
    return madd_acc(dot, w1, _mm256_loadu_si256((const __m256i *)(xq + 16)));
}
#endif

#if defined(ET_NEON)
#define NEON_ROWS 4 /* int8 rows per pass over x */
/* d[k] += four int32 lanes summing w[k * stride + 0..len-1] * x[at..at + len-1] exactly,
 * k < n; len 32 or 64 (|lane| <= 16 * 127 * 32767 < 2^31). */
static inline void dot_rows(const int8_t *restrict w, int64_t stride, int n, const struct qx *x,
                            int64_t at, int len, int32x4_t *d) {
#if defined(ET_SPLIT_X)
    int32x4_t hi[NEON_ROWS], lo[NEON_ROWS];
#if !defined(__ARM_FEATURE_MATMUL_INT8)
    int32x4_t sum[NEON_ROWS]; /* sums of w, for the -128 shift of lo */
#endif
    for (int k = 0; k < n; k++) {
        hi[k] = lo[k] = vdupq_n_s32(0);
#if !defined(__ARM_FEATURE_MATMUL_INT8)
        sum[k] = vdupq_n_s32(0);
#endif
    }
    for (int i = 0; i < len; i += 16) {
        int8x16_t xh = vld1q_s8(x->hi + at + i), xl = vld1q_s8(x->lo + at + i);
        for (int k = 0; k < n; k++) {
            int8x16_t wv = vld1q_s8(w + k * stride + i);
            hi[k] = vdotq_s32(hi[k], wv, xh);
#if defined(__ARM_FEATURE_MATMUL_INT8)
            lo[k] = vusdotq_s32(lo[k], vreinterpretq_u8_s8(xl), wv);
#else
            lo[k] = vdotq_s32(lo[k], wv, xl);
            sum[k] = vdotq_s32(sum[k], wv, vdupq_n_s8(1));
#endif
        }
    }
    for (int k = 0; k < n; k++) { /* d + 256 hi + lo (+ 128 sum) */
#if !defined(__ARM_FEATURE_MATMUL_INT8)
        lo[k] = vmlaq_n_s32(lo[k], sum[k], 128);
#endif
        d[k] = vmlaq_n_s32(vaddq_s32(d[k], lo[k]), hi[k], 256);
    }
#else
    for (int i = 0; i < len; i += 16) {
        int16x8_t x0 = vld1q_s16(x->q + at + i), x1 = vld1q_s16(x->q + at + i + 8);
        for (int k = 0; k < n; k++) {
            int8x16_t wv = vld1q_s8(w + k * stride + i);
            int16x8_t w0 = vmovl_s8(vget_low_s8(wv)), w1 = vmovl_high_s8(wv);
            d[k] = vmlal_s16(d[k], vget_low_s16(w0), vget_low_s16(x0));
            d[k] = vmlal_high_s16(d[k], w0, x0);
            d[k] = vmlal_s16(d[k], vget_low_s16(w1), vget_low_s16(x1));
            d[k] = vmlal_high_s16(d[k], w1, x1);
        }
    }
#endif
}

/* Four int32 lanes summing w[0..31] * x[at..at + 31] exactly. */
static inline int32x4_t dot32_neon(const int8_t *restrict w, const struct qx *x, int64_t at) {
    int32x4_t d = vdupq_n_s32(0);
    dot_rows(w, 0, 1, x, at, 32, &d);
    return d;
}

/* int8 rows four at a time (one pass over x feeds four weight streams); returns rows done. */
static int64_t i8_rows_neon(const int8_t *restrict w, const uint16_t *restrict scale,
                            const struct qx *x, float *restrict y, int64_t rows, int64_t cols) {
    int64_t full = cols / QBLOCK, tail = cols - full * QBLOCK, r = 0;
    for (; r + NEON_ROWS <= rows; r += NEON_ROWS) {
        const int8_t *wr = w + r * cols;
        float32x4_t acc[NEON_ROWS];
        for (int k = 0; k < NEON_ROWS; k++) acc[k] = vdupq_n_f32(0.f);
        for (int64_t b = 0; b < full; b++) {
            int32x4_t d[NEON_ROWS];
            for (int k = 0; k < NEON_ROWS; k++) d[k] = vdupq_n_s32(0);
            dot_rows(wr + b * QBLOCK, cols, NEON_ROWS, x, b * QBLOCK, QBLOCK, d);
            for (int k = 0; k < NEON_ROWS; k++)
                acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(d[k]), x->scale[b]);
        }
        for (int k = 0; k < NEON_ROWS; k++) {
            float sum = vaddvq_f32(acc[k]);
            if (tail)
                sum += (float)block_dot_tail(wr + k * cols + full * QBLOCK, x->q + full * QBLOCK,
                                             tail) * x->scale[full];
            y[r + k] = sum * bf16_value(scale[r + k]);
        }
    }
    return r;
}
#endif

#if defined(__AVX512BW__)
/* The full 64-column blocks of one weight row against ``nx`` x rows (a constant where it is
 * inlined): the weights are loaded and widened once, each x row's sum taken with the steps
 * of the one-row call (sums[n]). */
#define I8_MULTI ET_MAX_BATCH
static inline __attribute__((always_inline)) void i8_row_n(
        const int8_t *restrict w, const struct qx *const *x, int64_t full_blocks,
        float *restrict sums, const int nx) {
    __m512 acc[I8_MULTI];
    const int16_t *xq[I8_MULTI];
    const float *xs[I8_MULTI];
    for (int n = 0; n < nx; n++) {
        acc[n] = _mm512_setzero_ps();
        xq[n] = x[n]->q;
        xs[n] = x[n]->scale;
    }
    for (int64_t b = 0; b < full_blocks; b++) {
        __m512i bytes = _mm512_loadu_si512(w + b * QBLOCK);
        __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes));
        __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        for (int n = 0; n < nx; n++) {
            __m512i x0 = _mm512_loadu_si512(xq[n] + b * QBLOCK);
            __m512i x1 = _mm512_loadu_si512(xq[n] + b * QBLOCK + 32);
#if defined(__AVX512VNNI__)
            __m512i dot = _mm512_dpwssd_epi32(_mm512_madd_epi16(lo, x0), hi, x1);
#else
            __m512i dot = _mm512_add_epi32(_mm512_madd_epi16(lo, x0), _mm512_madd_epi16(hi, x1));
#endif
            acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[n][b]), acc[n]);
        }
    }
    for (int n = 0; n < nx; n++) sums[n] = _mm512_reduce_add_ps(acc[n]);
}

#elif defined(ET_AVX2)
/* The full 64-column blocks of one weight row against ``nx`` x rows (a constant where it is
 * inlined): the weights widened once, each x row's sum taken with the steps of the one-row
 * call (sums[n]). */
#define I8_MULTI ET_MAX_BATCH
static inline __attribute__((always_inline)) void i8_row_n(
        const int8_t *restrict w, const struct qx *const *x, int64_t full_blocks,
        float *restrict sums, const int nx) {
    __m256 acc[I8_MULTI];
    const int16_t *xq[I8_MULTI];
    const float *xs[I8_MULTI];
    for (int n = 0; n < nx; n++) {
        acc[n] = _mm256_setzero_ps();
        xq[n] = x[n]->q;
        xs[n] = x[n]->scale;
    }
    for (int64_t b = 0; b < full_blocks; b++) {
        const int8_t *wb = w + b * QBLOCK;
        __m256i wv[4];
        for (int k = 0; k < 4; k++)
            wv[k] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16 * k)));
        for (int n = 0; n < nx; n++) {
            const int16_t *xb = xq[n] + b * QBLOCK;
            __m256i dot = _mm256_madd_epi16(wv[0], _mm256_loadu_si256((const __m256i *)xb));
            for (int k = 1; k < 4; k++)
                dot = madd_acc(dot, wv[k], _mm256_loadu_si256((const __m256i *)(xb + 16 * k)));
            acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[n][b]), acc[n]);
        }
    }
    for (int n = 0; n < nx; n++) sums[n] = sum256(acc[n]);
}
#elif defined(ET_NEON)
static float i8_row(const int8_t *restrict w, const struct qx *x, int64_t full_blocks) {
    float32x4_t acc = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < full_blocks; b++) {
        int32x4_t dot = vdupq_n_s32(0);
        dot_rows(w + b * QBLOCK, 0, 1, x, b * QBLOCK, QBLOCK, &dot);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot), x->scale[b]);
    }
    return vaddvq_f32(acc);
}
#else
static float i8_row(const int8_t *restrict w, const struct qx *x, int64_t full_blocks) {
    float acc = 0.f;
    for (int64_t b = 0; b < full_blocks; b++)
        acc += (float)block_dot_tail(w + b * QBLOCK, x->q + b * QBLOCK, QBLOCK) * x->scale[b];
    return acc;
}
#endif

#if defined(I8_MULTI)
/* x rows taken together over a chunk of weight rows: four int16 rows of a 4096-wide x (32
 * KiB) stay in the L1 cache; more x rows go in further passes over the chunk (in L2). */
#define I8_GROUP 4
#define MULTI_CASES(call) \
    switch (nx) { \
    case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; \
    case 4: call(4); break; case 5: call(5); break; case 6: call(6); break; \
    case 7: call(7); break; default: call(8); break; \
    }

/* i8_row_n for 1..I8_MULTI x rows */
static void i8_rows_multi(const int8_t *restrict w, const struct qx *const *x,
                          int64_t full_blocks, float *restrict sums, int nx) {
#define I8_CALL(n) i8_row_n(w, x, full_blocks, sums, n)
    MULTI_CASES(I8_CALL)
#undef I8_CALL
}

static float i8_row(const int8_t *restrict w, const struct qx *x, int64_t full_blocks) {
    float sum;
    i8_rows_multi(w, &x, full_blocks, &sum, 1);
    return sum;
}
#endif

/* x rows quantized for one product (int8 and int4), each once per call: a row's codes, block
 * scales and (int4) its groups' plain sums are what the one-row product of that row uses. */
struct qbatch {
    int64_t nx;
    struct qx row[ET_MAX_BATCH];
    const float *group_sum[ET_MAX_BATCH]; /* int4: each group's plain sum of x; else NULL */
    int bad[ET_MAX_BATCH];                /* inf or NaN in the row: its outputs are NaN */
};

/* A second growing thread-local area (the quantized rows), apart from scratch_bytes' (which a
 * bfloat16 product may grow while a batch is in use), never freed; aligned to 64 bytes, so
 * that a 64-byte load of x codes never straddles two cache lines (malloc's 16-byte alignment
 * cost the AVX-512 int8 products up to a quarter of their time, depending on the address). */
static void *batch_bytes(int64_t n) {
    static __thread void *area = NULL;
    static __thread int64_t capacity = 0;
    if (n > capacity) {
        int64_t size = (n + 63) / 64 * 64;
        void *grown = aligned_alloc(64, (size_t)size); /* the old contents are not kept */
        if (grown == NULL) return NULL;
        free(area);
        area = grown;
        capacity = size;
    }
    return area;
}

static inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

/* x [nx, cols] quantized into the calling thread's batch area: per row int16 codes (padded to
 * whole blocks), a scale per block, with ``group`` > 0 each group's plain sum of x, and
 * (``split``: for the int8 products) the codes' bytes apart where the kernels use them
 * (AArch64 dot product), or with AVX-512 the codes' even and odd columns apart. The
 * batch stays valid until this thread quantizes again (the thread pool's threads only read
 * it). Returns NULL when out of memory. */
const void *et_quantize_rows(const float *restrict x, int64_t nx, int64_t cols, int64_t group,
                             int split) {
    int64_t blocks = (cols + QBLOCK - 1) / QBLOCK, groups = group > 0 ? cols / group : 0;
    int64_t codes = align64(blocks * QBLOCK * (int64_t)sizeof(int16_t));
    int64_t floats = align64((blocks + groups) * (int64_t)sizeof(float));
    int64_t bytes = 0;
#if defined(ET_SPLIT_X)
    if (split) bytes = align64(2 * blocks * QBLOCK);
#elif defined(ET_EVEN_ODD_X)
    if (split) bytes = codes;
#else
    (void)split;
#endif
    int64_t per_row = codes + floats + bytes;
    char *area = batch_bytes(align64((int64_t)sizeof(struct qbatch)) + nx * per_row);
    if (area == NULL) return NULL;
    struct qbatch *batch = (struct qbatch *)area;
    batch->nx = nx;
    for (int64_t t = 0; t < nx; t++) {
        char *at = area + align64((int64_t)sizeof(struct qbatch)) + t * per_row;
        int16_t *xq = (int16_t *)at;
        float *xs = (float *)(at + codes), *sums = xs + blocks;
        const float *xt = x + t * cols;
        batch->row[t] = (struct qx){xq, xs, NULL, NULL};
        batch->group_sum[t] = group > 0 ? sums : NULL;
        batch->bad[t] = quantize_x(xt, cols, xq, xs) != 0;
        if (batch->bad[t]) continue;
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0.f;
            for (int64_t i = g * group; i < (g + 1) * group; i++) sum += xt[i];
            sums[g] = sum;
        }
#if defined(ET_SPLIT_X)
        if (split) {
            int8_t *hi = (int8_t *)(at + codes + floats), *lo = hi + blocks * QBLOCK;
            split_x(xq, blocks * QBLOCK, hi, lo);
            batch->row[t].hi = hi;
            batch->row[t].lo = lo;
        }
#elif defined(ET_EVEN_ODD_X)
        if (split) {
            int16_t *eo = (int16_t *)(at + codes + floats);
            even_odd_x(xq, cols / QBLOCK, eo);
            batch->row[t].q_eo = eo;
        }
#endif
    }
    return batch;
}

static void fill_nan(float *y, int64_t rows) {
    for (int64_t r = 0; r < rows; r++) y[r] = NAN;
}

/* A row's output from its full blocks' ``sum``: the last partial block, then the row scale
 * (one compiled copy, whichever path took the sum). */
static __attribute__((noinline)) float i8_finish(const int8_t *restrict wr, uint16_t scale,
                                                 const struct qx *xb, int64_t cols, float sum) {
    int64_t full = cols / QBLOCK, tail = cols - full * QBLOCK;
    if (tail)
        sum += (float)block_dot_tail(wr + full * QBLOCK, xb->q + full * QBLOCK, tail)
               * xb->scale[full];
    return sum * bf16_value(scale);
}

/* One quantized x row against rows [0, rows) of w (scale: theirs). */
static void i8_span(const int8_t *restrict w, const uint16_t *restrict scale,
                    const struct qx *xb, float *restrict y, int64_t rows, int64_t cols) {
    int64_t r = 0;
#if defined(ET_NEON)
    r = i8_rows_neon(w, scale, xb, y, rows, cols);
#endif
    for (; r < rows; r++) {
        float sum = i8_row(w + r * cols, xb, cols / QBLOCK);
        y[r] = cols % QBLOCK ? i8_finish(w + r * cols, scale[r], xb, cols, sum)
                             : sum * bf16_value(scale[r]); /* one rounding: as i8_finish's */
    }
}

/* The good (finite) rows of a batch, NaN written for the others over rows [from, to). */
static int good_rows(const struct qbatch *b, float *restrict y, int64_t rows, int64_t from,
                     int64_t to, const struct qx **xs, float **ys, const float **sums) {
    int good = 0;
    for (int64_t t = 0; t < b->nx; t++) {
        if (b->bad[t]) {
            fill_nan(y + t * rows + from, to - from);
            continue;
        }
        xs[good] = &b->row[t];
        if (sums) sums[good] = b->group_sum[t];
        ys[good++] = y + t * rows;
    }
    return good;
}

#if defined(ET_NEON)
#define I8_BLOCK NEON_ROWS /* four-row passes */
#else
#define I8_BLOCK 1
#endif

/* A quantized batch (et_quantize_rows) against rows [from, to) -> y [nx, rows]; the thread
 * pool's part, ``from`` a multiple of I8_BLOCK. A row of x with inf or NaN gives NaN. */
int et_i8_part(const int8_t *restrict w, const uint16_t *restrict scale, const void *batch,
               float *restrict y, int64_t rows, int64_t cols, int64_t from, int64_t to) {
    const struct qbatch *b = batch;
#if defined(I8_MULTI)
    /* every weight row once against all the x rows, in registers */
    const struct qx *xs[ET_MAX_BATCH];
    float *ys[ET_MAX_BATCH], sums[ET_MAX_BATCH];
    int good = good_rows(b, y, rows, from, to, xs, ys, NULL);
    int64_t step = batch_step(good > I8_GROUP ? good : 1, cols, 1, to - from);
    for (int64_t r0 = from; r0 < to; r0 += step)
        for (int g = 0; g < good; g += I8_GROUP) {
            int nx = good - g < I8_GROUP ? good - g : I8_GROUP;
            for (int64_t r = r0; r < min64(r0 + step, to); r++) {
                i8_rows_multi(w + r * cols, xs + g, cols / QBLOCK, sums, nx);
                for (int n = 0; n < nx; n++)
                    ys[g + n][r] = cols % QBLOCK
                                   ? i8_finish(w + r * cols, scale[r], xs[g + n], cols, sums[n])
                                   : sums[n] * bf16_value(scale[r]);
            }
        }
#else
    int64_t step = batch_step(b->nx, cols, I8_BLOCK, to - from);
    for (int64_t r = from; r < to; r += step)
        for (int64_t t = 0; t < b->nx; t++) {
            float *yt = y + t * rows + r;
            if (b->bad[t]) fill_nan(yt, min64(step, to - r));
            else i8_span(w + r * cols, scale + r, &b->row[t], yt, min64(step, to - r), cols);
        }
#endif
    return 0;
}

/* x [nx, cols] float32, 1 <= nx <= ET_MAX_BATCH -> y [nx, rows]; y[t] is bitwise the one-row
 * product of x[t]. Returns 0; -1 when out of memory (the caller falls back); -3 for another
 * nx. */
int et_matvec_i8_rows(const int8_t *restrict w, const uint16_t *restrict scale,
                      const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                      int64_t nx) {
    if (nx < 1 || nx > ET_MAX_BATCH) return -3;
    const void *batch = et_quantize_rows(x, nx, cols, 0, 1);
    if (batch == NULL) return -1;
    return et_i8_part(w, scale, batch, y, rows, cols, 0, rows);
}

/* Returns 0, or -1 when out of memory (the caller falls back). */
int et_matvec_i8(const int8_t *restrict w, const uint16_t *restrict scale,
                 const float *restrict x, float *restrict y, int64_t rows, int64_t cols) {
    return et_matvec_i8_rows(w, scale, x, y, rows, cols, 1);
}

/* ---- int8 weights with a float16 scale per 32 columns (a GGUF's Q8_0 blocks), float32 x ------
 *
 * As above, with x quantized to int16 per 64 columns; each 64-column block of a row holds two
 * weight blocks, whose 32 products are summed exactly in int32 apart and scaled by their own
 * weight scale. Columns must be a multiple of 32. On AVX-512 and AVX2 (with F16C) the exact
 * sums of 16 or 8 weight blocks are gathered into one vector by a tree of shuffles and adds,
 * converted to float once and scaled by their scales in one multiply-add (per-block converts
 * and broadcasts cost more than the sums); AVX-512 reads x's codes reordered, even columns
 * then odd per block (et_quantize_rows), so that shifts alone widen the weights.
 */

#define WBLOCK 32

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 half;
    memcpy(&half, &h, sizeof half);
    return (float)half;
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf or NaN */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else { /* zero or subnormal: mantissa * 2^-24 */
        float value = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &value, sizeof bits);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

#if defined(__AVX512BW__)
/* a + b lanes taken in pairs (a's, b's) by an unpack pair: within each 128-bit lane
 * (a0 + a2, b0 + b2, a1 + a3, b1 + b3) for 32 bits, (a01 + a23, b01 + b23) for 64. */
static inline __m512i sum_pairs32(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
static inline __m512i sum_pairs64(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
/* a's and b's 128-bit lanes summed in pairs: (a0 + a1, a2 + a3, b0 + b1, b2 + b3) */
static inline __m512i sum_lanes128(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* d[j] holds weight block 2j's partial sums in lanes 0-7 and block 2j + 1's in lanes 8-15;
 * the 16 blocks' sums, block ORDER16[k] in lane k, by a transpose-and-add tree. */
static inline __m512i sum8x2(const __m512i *d) {
    __m512i p[4], q[2];
    for (int j = 0; j < 4; j++) p[j] = sum_pairs32(d[2 * j], d[2 * j + 1]);
    /* q[k], per 128-bit lane: d[4k..4k+3]'s partial sums, lanes 0-1 of their first block */
    for (int k = 0; k < 2; k++) q[k] = sum_pairs64(p[2 * k], p[2 * k + 1]);
    return sum_lanes128(q[0], q[1]);
}
static const int32_t ORDER16[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};

/* ``blocks`` (8 or 4, a constant) x blocks from x block b on of one weight row against ``nx``
 * x rows, into acc[n]: each block's 64 weight bytes split by shifts into even and odd
 * columns' int16 (against x's codes in that order, q_eo), so that an int32 lane sums four
 * adjacent columns (lanes 0-7 the first weight block, 8-15 the second); per x row the blocks'
 * exact sums gathered into one vector by a transpose-and-add tree (zeros for missing blocks),
 * converted once, and scaled by their scales (widened together) times their x blocks' scales,
 * in one multiply-add. */
static inline __attribute__((always_inline)) void i8b_round(
        const int8_t *restrict w, const uint16_t *restrict scale, const int16_t *const *xeo,
        const float *const *xs, int64_t b, __m512 *acc, const int nx, const int blocks) {
    const __m512i order = _mm512_loadu_si512(ORDER16);
    const __m512i x_order = _mm512_srli_epi32(order, 1); /* each weight block's x block */
    __m512i even[8], odd[8]; /* x block j's weights in even and odd columns, int16 */
    for (int j = 0; j < blocks; j++) {
        /* two rounds ahead: without it one x row took 25% longer (the hardware's prefetch
         * alone kept fewer lines in flight) */
        _mm_prefetch((const char *)(w + (b + j) * QBLOCK + 1024), _MM_HINT_T0);
        __m512i bytes = _mm512_loadu_si512(w + (b + j) * QBLOCK);
        even[j] = _mm512_srai_epi16(_mm512_slli_epi16(bytes, 8), 8);
        odd[j] = _mm512_srai_epi16(bytes, 8);
    }
    __mmask32 weight_blocks = blocks == 8 ? 0xffff : 0xff;
    __m512i halves = _mm512_maskz_loadu_epi16(weight_blocks, scale + 2 * b);
    __m512 scales = _mm512_permutexvar_ps(order, _mm512_cvtph_ps(_mm512_castsi512_si256(halves)));
    for (int n = 0; n < nx; n++) {
        const int16_t *xb = xeo[n] + b * QBLOCK;
        __m512i d[8];
        for (int j = 0; j < 8; j++) {
            if (j >= blocks) {
                d[j] = _mm512_setzero_si512();
                continue;
            }
            __m512i x_even = _mm512_loadu_si512(xb + j * QBLOCK);
            __m512i x_odd = _mm512_loadu_si512(xb + j * QBLOCK + 32);
#if defined(__AVX512VNNI__)
            d[j] = _mm512_dpwssd_epi32(_mm512_madd_epi16(even[j], x_even), odd[j], x_odd);
#else
            d[j] = _mm512_add_epi32(_mm512_madd_epi16(even[j], x_even),
                                    _mm512_madd_epi16(odd[j], x_odd));
#endif
        }
        __m512 x_scales = _mm512_permutexvar_ps(
            x_order, _mm512_maskz_loadu_ps((__mmask16)((1u << blocks) - 1), xs[n] + b));
        acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum8x2(d)), _mm512_mul_ps(scales, x_scales), acc[n]);
    }
}

/* The full 64-column blocks of one weight row against ``nx`` x rows (a constant where it is
 * inlined), each x row's sum taken with the steps of the one-row call (sums[n]): eight x
 * blocks at a time (i8b_round), then four, then the last one at a time. */
static inline __attribute__((always_inline)) void i8b_row_n(
        const int8_t *restrict w, const uint16_t *restrict scale, const struct qx *const *x,
        int64_t cols, float *restrict sums, const int nx) {
    __m512 acc[I8_MULTI];
    const int16_t *xq[I8_MULTI], *xeo[I8_MULTI];
    const float *xs[I8_MULTI];
    for (int n = 0; n < nx; n++) {
        acc[n] = _mm512_setzero_ps();
        xq[n] = x[n]->q;
        xeo[n] = x[n]->q_eo;
        xs[n] = x[n]->scale;
    }
    int64_t b = 0;
    for (; b + 8 <= cols / QBLOCK; b += 8) i8b_round(w, scale, xeo, xs, b, acc, nx, 8);
    if (b + 4 <= cols / QBLOCK) {
        i8b_round(w, scale, xeo, xs, b, acc, nx, 4);
        b += 4;
    }
    for (; b < cols / QBLOCK; b++) { /* the block's two weight blocks, each scaled apart */
        __m512i bytes = _mm512_loadu_si512(w + b * QBLOCK);
        __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes));
        __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        float s0 = f16_to_f32(scale[2 * b]), s1 = f16_to_f32(scale[2 * b + 1]);
        for (int n = 0; n < nx; n++) {
            const int16_t *xb = xq[n] + b * QBLOCK;
            float x_scale = xs[n][b];
            __m512i d0 = _mm512_madd_epi16(lo, _mm512_loadu_si512(xb));
            __m512i d1 = _mm512_madd_epi16(hi, _mm512_loadu_si512(xb + 32));
            acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(x_scale * s0), acc[n]);
            acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(x_scale * s1), acc[n]);
        }
    }
    for (int n = 0; n < nx; n++) sums[n] = _mm512_reduce_add_ps(acc[n]);
}

#elif defined(ET_AVX2) && defined(__F16C__)
/* On AVX2: eight weight blocks (four x blocks) at a time, widened once; per x row
 * their exact int32 sums gathered into one vector by a tree of horizontal adds, converted
 * once, and scaled by their eight scales (widened together) times their x blocks' scales, in
 * one multiply-add. */
static inline __attribute__((always_inline)) void i8b_row_n(
        const int8_t *restrict w, const uint16_t *restrict scale, const struct qx *const *x,
        int64_t cols, float *restrict sums, const int nx) {
    const __m256i pairs = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    __m256 acc[I8_MULTI];
    const int16_t *xq[I8_MULTI];
    const float *xs[I8_MULTI];
    for (int n = 0; n < nx; n++) {
        acc[n] = _mm256_setzero_ps();
        xq[n] = x[n]->q;
        xs[n] = x[n]->scale;
    }
    int64_t b = 0;
    for (; b + 4 <= cols / QBLOCK; b += 4) {
        __m256i wv[16]; /* 16 weights each, int16 */
        for (int j = 0; j < 16; j++)
            wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + b * QBLOCK + 16 * j)));
        __m256 scales = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + 2 * b)));
        for (int n = 0; n < nx; n++) {
            const int16_t *xb = xq[n] + b * QBLOCK;
            __m256i d[8];
            for (int j = 0; j < 8; j++) /* as dot32_avx2 */
                d[j] = madd_acc(_mm256_madd_epi16(wv[2 * j], _mm256_loadu_si256((const __m256i *)(xb + 32 * j))),
                                wv[2 * j + 1], _mm256_loadu_si256((const __m256i *)(xb + 32 * j + 16)));
            __m256i h01 = _mm256_hadd_epi32(d[0], d[1]), h23 = _mm256_hadd_epi32(d[2], d[3]);
            __m256i h45 = _mm256_hadd_epi32(d[4], d[5]), h67 = _mm256_hadd_epi32(d[6], d[7]);
            __m256i h03 = _mm256_hadd_epi32(h01, h23), h47 = _mm256_hadd_epi32(h45, h67);
            /* h03: blocks 0-3 over the low 128 bits, then over the high: add the halves */
            __m128i s03 = _mm_add_epi32(_mm256_castsi256_si128(h03), _mm256_extracti128_si256(h03, 1));
            __m128i s47 = _mm_add_epi32(_mm256_castsi256_si128(h47), _mm256_extracti128_si256(h47, 1));
            __m256 block_sums = _mm256_cvtepi32_ps(_mm256_set_m128i(s47, s03)); /* blocks 0..7 */
            __m256 x_scales = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_loadu_ps(xs[n] + b)), pairs);
            acc[n] = _mm256_fmadd_ps(block_sums, _mm256_mul_ps(scales, x_scales), acc[n]);
        }
    }
    for (; b < cols / QBLOCK; b++) { /* the block's two weight blocks, each scaled apart */
        float s0 = f16_to_f32(scale[2 * b]), s1 = f16_to_f32(scale[2 * b + 1]);
        for (int n = 0; n < nx; n++) {
            const int16_t *xb = xq[n] + b * QBLOCK;
            __m256i d0 = dot32_avx2(w + b * QBLOCK, xb);
            __m256i d1 = dot32_avx2(w + b * QBLOCK + WBLOCK, xb + WBLOCK);
            acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(xs[n][b] * s0), acc[n]);
            acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(xs[n][b] * s1), acc[n]);
        }
    }
    for (int n = 0; n < nx; n++) sums[n] = sum256(acc[n]);
}
#endif

#if defined(__AVX512BW__) || (defined(ET_AVX2) && defined(__F16C__))
#define I8B_MULTI I8_MULTI
/* i8b_row_n for 1..I8_MULTI x rows */
static void i8b_rows_multi(const int8_t *restrict w, const uint16_t *restrict scale,
                           const struct qx *const *x, int64_t cols, float *restrict sums,
                           int nx) {
#define I8B_CALL(n) i8b_row_n(w, scale, x, cols, sums, n)
    MULTI_CASES(I8B_CALL)
#undef I8B_CALL
}
#endif

/* A row's output from ``sum`` over its first ``b`` 64-column blocks: what is left, 32
 * columns at a time (one compiled copy, whichever path took the sum). */
static __attribute__((noinline)) float i8b_finish(const int8_t *restrict w,
                                                  const uint16_t *restrict scale,
                                                  const struct qx *x, int64_t cols, int64_t b,
                                                  float sum) {
    for (int64_t k = 2 * b; k * WBLOCK < cols; k++)
        sum += (float)block_dot_tail(w + k * WBLOCK, x->q + k * WBLOCK, WBLOCK)
               * x->scale[k / 2] * f16_to_f32(scale[k]);
    return sum;
}

static float i8b_row(const int8_t *restrict w, const uint16_t *restrict scale,
                     const struct qx *x, int64_t cols) {
    int64_t b = 0;
    float sum = 0.f;
#if defined(I8B_MULTI)
    i8b_rows_multi(w, scale, &x, cols, &sum, 1);
    b = cols / QBLOCK;
#elif defined(ET_AVX2) /* without F16C */
    const int16_t *xq = x->q;
    const float *xs = x->scale;
    __m256 acc = _mm256_setzero_ps();
    for (; b < cols / QBLOCK; b++) { /* the block's two weight blocks, each scaled apart */
        __m256i d0 = dot32_avx2(w + b * QBLOCK, xq + b * QBLOCK);
        __m256i d1 = dot32_avx2(w + b * QBLOCK + WBLOCK, xq + b * QBLOCK + WBLOCK);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0),
                              _mm256_set1_ps(xs[b] * f16_to_f32(scale[2 * b])), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1),
                              _mm256_set1_ps(xs[b] * f16_to_f32(scale[2 * b + 1])), acc);
    }
    sum = sum256(acc);
#elif defined(ET_NEON)
    float32x4_t acc = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < cols / WBLOCK; k++) /* every weight block, a last odd one too */
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot32_neon(w + k * WBLOCK, x, k * WBLOCK)),
                          x->scale[k / 2] * f16_to_f32(scale[k]));
    sum = vaddvq_f32(acc);
    b = (cols / WBLOCK + 1) / 2; /* nothing left */
#endif
    return 2 * b * WBLOCK < cols ? i8b_finish(w, scale, x, cols, b, sum) : sum;
}

#if defined(ET_NEON)
/* Four rows per pass over x, each 32-column weight block scaled by its own scale. */
static int64_t i8b_rows_neon(const int8_t *restrict w, const uint16_t *restrict scale,
                             const struct qx *x, float *restrict y, int64_t rows, int64_t cols) {
    int64_t blocks = cols / WBLOCK, r = 0;
    for (; r + NEON_ROWS <= rows; r += NEON_ROWS) {
        float32x4_t acc[NEON_ROWS];
        for (int k = 0; k < NEON_ROWS; k++) acc[k] = vdupq_n_f32(0.f);
        for (int64_t b = 0; b < blocks; b++) {
            int32x4_t d[NEON_ROWS];
            for (int k = 0; k < NEON_ROWS; k++) d[k] = vdupq_n_s32(0);
            dot_rows(w + r * cols + b * WBLOCK, cols, NEON_ROWS, x, b * WBLOCK, WBLOCK, d);
            for (int k = 0; k < NEON_ROWS; k++)
                acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(d[k]),
                                     x->scale[b / 2] * f16_to_f32(scale[(r + k) * blocks + b]));
        }
        for (int k = 0; k < NEON_ROWS; k++) y[r + k] = vaddvq_f32(acc[k]);
    }
    return r;
}
#endif

/* One quantized x row against rows [0, rows) of w (scale: theirs, [rows, cols / 32]). */
static void i8b_span(const int8_t *restrict w, const uint16_t *restrict scale,
                     const struct qx *xb, float *restrict y, int64_t rows, int64_t cols) {
    int64_t r = 0;
#if defined(ET_NEON)
    r = i8b_rows_neon(w, scale, xb, y, rows, cols);
#endif
    for (; r < rows; r++)
        y[r] = i8b_row(w + r * cols, scale + r * (cols / WBLOCK), xb, cols);
}

/* et_i8_part for 32-column weight blocks (columns a multiple of 32). */
int et_i8b_part(const int8_t *restrict w, const uint16_t *restrict scale, const void *batch,
                float *restrict y, int64_t rows, int64_t cols, int64_t from, int64_t to) {
    const struct qbatch *b = batch;
#if defined(I8B_MULTI)
    /* every weight row once against all the x rows, in registers */
    const struct qx *xs[ET_MAX_BATCH];
    float *ys[ET_MAX_BATCH], sums[ET_MAX_BATCH];
    int good = good_rows(b, y, rows, from, to, xs, ys, NULL);
    int64_t step = batch_step(good > I8_GROUP ? good : 1, cols, 1, to - from);
    for (int64_t r0 = from; r0 < to; r0 += step)
        for (int g = 0; g < good; g += I8_GROUP) {
            int nx = good - g < I8_GROUP ? good - g : I8_GROUP;
            for (int64_t r = r0; r < min64(r0 + step, to); r++) {
                const int8_t *wr = w + r * cols;
                const uint16_t *sr = scale + r * (cols / WBLOCK);
                i8b_rows_multi(wr, sr, xs + g, cols, sums, nx);
                for (int n = 0; n < nx; n++) /* a last 32-column block: the one-row code's */
                    ys[g + n][r] = cols % QBLOCK
                                   ? i8b_finish(wr, sr, xs[g + n], cols, cols / QBLOCK, sums[n])
                                   : sums[n];
            }
        }
#else
    int64_t step = batch_step(b->nx, cols, I8_BLOCK, to - from);
    for (int64_t r = from; r < to; r += step)
        for (int64_t t = 0; t < b->nx; t++) {
            float *yt = y + t * rows + r;
            if (b->bad[t]) fill_nan(yt, min64(step, to - r));
            else i8b_span(w + r * cols, scale + r * (cols / WBLOCK), &b->row[t], yt,
                          min64(step, to - r), cols);
        }
#endif
    return 0;
}

/* x [nx, cols] -> y [nx, rows], y[t] bitwise the one-row product of x[t]. Returns 0; -1 when
 * out of memory; -3 when the columns are not whole blocks or nx is not in 1..ET_MAX_BATCH. */
int et_matvec_i8_b32_rows(const int8_t *restrict w, const uint16_t *restrict scale,
                          const float *restrict x, float *restrict y, int64_t rows,
                          int64_t cols, int64_t nx) {
    if (cols % WBLOCK || nx < 1 || nx > ET_MAX_BATCH) return -3;
    const void *batch = et_quantize_rows(x, nx, cols, 0, 1);
    if (batch == NULL) return -1;
    return et_i8b_part(w, scale, batch, y, rows, cols, 0, rows);
}

/* Returns 0; -1 when out of memory; -3 when the columns are not whole blocks. */
int et_matvec_i8_b32(const int8_t *restrict w, const uint16_t *restrict scale,
                     const float *restrict x, float *restrict y, int64_t rows, int64_t cols) {
    return et_matvec_i8_b32_rows(w, scale, x, y, rows, cols, 1);
}

/* ---- the low ends of int8 with a scale and a low end per 32 columns ---------------------------
 *
 * w = (q + 128) * scale + low per row and block (edgetp.shard.quant), so
 *     sum_i w_i x_i = sum_b scale_b * sum(q x)_b + (low_b + 128 * scale_b) * sum(x)_b:
 * et_matvec_i8_b32 over the scales gives the first sum; this adds the second, from float16
 * scale and low planes [rows, nb] and x's block sums. 1/32 of the product's work. */
static float block_lows_row(const uint16_t *restrict s, const uint16_t *restrict l,
                            const float *restrict sums, int64_t nb) {
    int64_t k = 0;
    float acc = 0.f;
#if defined(__F16C__) && defined(ET_AVX2)
    __m256 vacc = _mm256_setzero_ps(), k128 = _mm256_set1_ps(128.f);
    for (; k + 8 <= nb; k += 8) {
        __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + k)));
        __m256 lv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(l + k)));
        vacc = _mm256_fmadd_ps(_mm256_fmadd_ps(sv, k128, lv), _mm256_loadu_ps(sums + k), vacc);
    }
    acc = sum256(vacc);
#elif defined(ET_NEON)
    float32x4_t vacc = vdupq_n_f32(0.f);
    for (; k + 4 <= nb; k += 4) {
        float32x4_t sv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + k)));
        float32x4_t lv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(l + k)));
        vacc = vfmaq_f32(vacc, vfmaq_n_f32(lv, sv, 128.f), vld1q_f32(sums + k));
    }
    acc = vaddvq_f32(vacc);
#endif
    for (; k < nb; k++)
        acc += (f16_to_f32(l[k]) + 128.f * f16_to_f32(s[k])) * sums[k];
    return acc;
}

/* The same for x [nx, nb * 32] float32 (its block sums taken here, in order, once per call;
 * torch's sum over [nx, nb, 32] costs ~1000x the one-row [nb, 32] one): y [nx, rows], the
 * planes read in cache-sized chunks once for all x rows; y[t] gets bitwise what the one-row
 * call adds. Returns 0, or -1 when out of memory (y untouched). */
int et_add_block_lows_rows(const uint16_t *restrict scale, const uint16_t *restrict low,
                           const float *restrict x, float *restrict y, int64_t rows, int64_t nb,
                           int64_t nx) {
    float *sums = scratch_bytes(nx * nb * (int64_t)sizeof(float));
    if (sums == NULL) return -1;
    for (int64_t k = 0; k < nx * nb; k++) {
        float sum = 0.f;
        for (int i = 0; i < WBLOCK; i++) sum += x[k * WBLOCK + i];
        sums[k] = sum;
    }
    int64_t step = batch_step(nx, 4 * nb, 1, rows);
    for (int64_t from = 0; from < rows; from += step)
        for (int64_t t = 0; t < nx; t++)
            for (int64_t r = from; r < min64(from + step, rows); r++)
                y[t * rows + r] += block_lows_row(scale + r * nb, low + r * nb, sums + t * nb, nb);
    return 0;
}

int et_add_block_lows(const uint16_t *restrict scale, const uint16_t *restrict low,
                      const float *restrict x, float *restrict y, int64_t rows, int64_t nb) {
    return et_add_block_lows_rows(scale, low, x, y, rows, nb, 1);
}

/* ---- int4 weights in the tiled layout (edgetp.quant), float32 x -> float32 y ----------------
 *
 * Codes q in 0..15 with a (scale, zero) pair (bfloat16, or float32 for scales kept from a GGUF)
 * per row and group of ``group`` columns:
 * w = (q - 8) * scale + zero. Rows come in blocks of 64: per input column 32 bytes, byte j =
 * row j | row j + 32 << 4; a last block of 16, 32 or 48 rows stores per column one byte per
 * two adjacent rows. So per row and group
 *     sum_i w_i x_i = scale * sum_i q_i x_i + (zero - 8 * scale) * sum_i x_i,
 * with sum_i q_i x_i taken exactly in int32 against x quantized to int16 per 64 columns (as for
 * int8), in units of min(group, 64) columns. One layout for every target:
 *   AVX-512 BW + VNNI: two columns' bytes interleaved so each 32-bit lane holds one row's two
 *     codes, and vpdpwssd multiplies them by the two columns' x at once (64 rows per pass);
 *   AVX2: the same interleaving in 256-bit registers, vpmaddwd (vpdpwssd with AVX-VNNI);
 *   NEON: each column's 64 codes widened to int16 and multiplied by that column's x with
 *     smlal (by lane), 64 rows in sixteen int32x4 accumulators;
 *   otherwise plain C over the 64 rows of a block, for the compiler to vectorize.
 */

int et_has_int4(void) { return 1; }

/* The (scale, zero) pairs come as bfloat16 (``f32`` 0) or float32 (1: scales kept from a GGUF's
 * float16 blocks, whose zero point m + 8 d bfloat16 would round). ``pair`` = g * rows + r. */
static inline float scale_of(const void *scale_zero, int f32, int64_t pair) {
    return f32 ? ((const float *)scale_zero)[pair * 2]
               : bf16_value(((const uint16_t *)scale_zero)[pair * 2]);
}

static inline float offset_of(const void *scale_zero, int f32, int64_t pair) {
    /* zero - 8 * scale, the value of code 0 */
    float zero = f32 ? ((const float *)scale_zero)[pair * 2 + 1]
                     : bf16_value(((const uint16_t *)scale_zero)[pair * 2 + 1]);
    return zero - 8.f * scale_of(scale_zero, f32, pair);
}

/* One unit's exact int32 sums of 64 rows (in order) into the rows' float totals: scaled by x's
 * block scale and each row's group scale, plus the group's zero-point term when it ends. */
static inline void i4_unit_totals(const int32_t *restrict dot, const void *restrict scale_zero,
                                  int f32, float x_scale, const float *restrict xg,
                                  int64_t rows, int64_t row0, int64_t c, int64_t unit,
                                  int64_t group, int64_t n, float *restrict total) {
    int64_t g = c / group;
    int ends = (c + unit) % group == 0;
    for (int64_t t = 0; t < n; t++) {
        int64_t pair = g * rows + row0 + t;
        total[t] += (float)dot[t] * x_scale * scale_of(scale_zero, f32, pair);
        if (ends) total[t] += offset_of(scale_zero, f32, pair) * xg[g];
    }
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* 16 consecutive rows' (scale, zero) pairs from ``pair`` on, as two vectors. */
static inline void load_pairs(const void *scale_zero, int f32, int64_t pair, __m512 *scale,
                              __m512 *zero) {
    if (f32) {
        const float *p = (const float *)scale_zero + pair * 2;
        __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        *scale = _mm512_permutex2var_ps(a, even, b);
        *zero = _mm512_permutex2var_ps(a, odd, b);
        return;
    }
    /* 16 (scale, zero) bfloat16 pairs: scale in each lane's low half */
    __m512i sz = _mm512_loadu_si512((const uint16_t *)scale_zero + pair * 2);
    *scale = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
    *zero = _mm512_castsi512_ps(_mm512_and_si512(sz, _mm512_set1_epi32((int)0xffff0000u)));
}

/* AVX-512 BW + VNNI: one block of 64 rows (bytes: cols x 32) against ``nx`` (1, 2 or 4, a
 * constant where it is inlined) quantized x rows: y[n][0..63] = the block's products with x[n].
 * The codes are loaded and widened once for all x rows; each x row's int32 sums are exact and
 * its float steps those of the one-row call, so each y[n] is bitwise its one-row product. */
#define I4_MULTI 4 /* x rows one pass over a block takes at most */
static inline __attribute__((always_inline)) void i4_block_n(
        const uint8_t *restrict w, const void *restrict scale_zero, int f32,
        const struct qx *const *x, const float *const *xg, int64_t rows, int64_t row0,
        int64_t cols, int64_t group, float *const *y, const int nx) {
    const __m512i low_nibble = _mm512_set1_epi16(0x0f);
    /* lanes of the unpacked accumulators -> rows in order (see below) */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    int64_t unit = group < QBLOCK ? group : QBLOCK;
    const int16_t *xq[I4_MULTI];
    const float *xs[I4_MULTI];
    __m512 total[I4_MULTI][4];
    for (int n = 0; n < nx; n++) {
        xq[n] = x[n]->q;
        xs[n] = x[n]->scale;
        for (int k = 0; k < 4; k++) total[n][k] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < cols; c += unit) {
        /* acc[n][0]: rows 0-7,16-23; [1]: 8-15,24-31; [2], [3]: the same + 32 */
        __m512i acc[I4_MULTI][4];
        for (int n = 0; n < nx; n++)
            for (int k = 0; k < 4; k++) acc[n][k] = _mm512_setzero_si512();
        for (int64_t i = c; i < c + unit; i += 2) {
            __m256i b0 = _mm256_loadu_si256((const __m256i *)(w + i * 32));
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(w + (i + 1) * 32));
            __m512i p = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(b0, b1));
            __m512i q = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(b0, b1));
            __m512i codes[4] = {_mm512_and_si512(p, low_nibble), _mm512_and_si512(q, low_nibble),
                                _mm512_srli_epi16(p, 4), _mm512_srli_epi16(q, 4)};
            for (int n = 0; n < nx; n++) {
                int32_t pair;
                memcpy(&pair, xq[n] + i, sizeof pair); /* x[i] low, x[i + 1] high */
                __m512i xv = _mm512_set1_epi32(pair);
                for (int k = 0; k < 4; k++) acc[n][k] = _mm512_dpwssd_epi32(acc[n][k], codes[k], xv);
            }
        }
        int64_t g = c / group;
        int ends = (c + unit) % group == 0;
        __m512 block_scale[I4_MULTI];
        for (int n = 0; n < nx; n++) block_scale[n] = _mm512_set1_ps(xs[n][c / QBLOCK]);
        for (int half = 0; half < 2; half++) {
            __m512i ordered[I4_MULTI][2];
            for (int n = 0; n < nx; n++) {
                __m512i lo = acc[n][2 * half], hi = acc[n][2 * half + 1];
                ordered[n][0] = _mm512_permutex2var_epi32(lo, first, hi);
                ordered[n][1] = _mm512_permutex2var_epi32(lo, second, hi);
            }
            for (int k = 0; k < 2; k++) {
                int64_t r = row0 + half * 32 + k * 16;
                __m512 scale, zero;
                load_pairs(scale_zero, f32, g * rows + r, &scale, &zero);
                __m512 offset = ends ? _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero)
                                     : scale;
                for (int n = 0; n < nx; n++) {
                    __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(ordered[n][k]), block_scale[n]);
                    total[n][2 * half + k] = _mm512_fmadd_ps(sum, scale, total[n][2 * half + k]);
                    if (ends) /* the group ends: its zero-point term */
                        total[n][2 * half + k] = _mm512_fmadd_ps(
                            offset, _mm512_set1_ps(xg[n][g]), total[n][2 * half + k]);
                }
            }
        }
    }
    for (int n = 0; n < nx; n++)
        for (int k = 0; k < 4; k++) _mm512_storeu_ps(y[n] + k * 16, total[n][k]);
}

static __attribute__((noinline)) void i4_block(
        const uint8_t *restrict w, const void *restrict scale_zero, int f32, const struct qx *x,
        const float *restrict xg, int64_t rows, int64_t row0, int64_t cols, int64_t group,
        float *restrict y) {
    const float *sums = xg;
    float *out = y;
    i4_block_n(w, scale_zero, f32, &x, &sums, rows, row0, cols, group, &out, 1);
}

/* The same block against several x rows at once (``nx`` <= I4_MULTI), one pass over it. */
static void i4_blocks(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                      const struct qx *const *x, const float *const *xg, int64_t rows,
                      int64_t row0, int64_t cols, int64_t group, float *const *y, int nx) {
    if (nx == 4) i4_block_n(w, scale_zero, f32, x, xg, rows, row0, cols, group, y, 4);
    else if (nx == 2) i4_block_n(w, scale_zero, f32, x, xg, rows, row0, cols, group, y, 2);
    else for (int n = 0; n < nx; n++)
        i4_block(w, scale_zero, f32, x[n], xg[n], rows, row0, cols, group, y[n]);
}

#elif defined(ET_AVX2)
/* 8 consecutive rows' (scale, zero) pairs from ``pair`` on, as two vectors. */
static inline void load_pairs8(const void *scale_zero, int f32, int64_t pair, __m256 *scale,
                               __m256 *zero) {
    if (f32) {
        const float *p = (const float *)scale_zero + pair * 2;
        __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8); /* s0 z0 s1 z1 | s2 ... */
        __m256 s = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)); /* s0 s1 s4 s5 | s2 s3 s6 s7 */
        __m256 z = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
        *scale = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xd8));
        *zero = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(z), 0xd8));
        return;
    }
    __m256i sz = _mm256_loadu_si256((const __m256i *)((const uint16_t *)scale_zero + pair * 2));
    *scale = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
    *zero = _mm256_castsi256_ps(_mm256_and_si256(sz, _mm256_set1_epi32((int)0xffff0000u)));
}

/* AVX2: one block of 64 rows (bytes: cols x 32): y[0..63] = the block's products. Two columns'
 * bytes interleaved and widened to int16 put one row's two codes in each 32-bit lane (low
 * nibble: rows 0-31, high nibble: rows 32-63); vpmaddwd against the two columns' x. */
static void i4_block(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                     const struct qx *x, const float *restrict xg, int64_t rows, int64_t row0,
                     int64_t cols, int64_t group, float *restrict y) {
    const __m256i low_nibble = _mm256_set1_epi16(0x0f);
    int64_t unit = group < QBLOCK ? group : QBLOCK;
    __m256 total[8]; /* rows 0-7, 8-15, ..., 56-63 */
    for (int k = 0; k < 8; k++) total[k] = _mm256_setzero_ps();
    for (int64_t c = 0; c < cols; c += unit) {
        /* acc[k], k < 4: rows 4k..4k+3 and 16+4k..16+4k+3; acc[4 + k]: the same + 32 */
        __m256i acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_si256();
        for (int64_t i = c; i < c + unit; i += 2) {
            __m256i b0 = _mm256_loadu_si256((const __m256i *)(w + i * 32));
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(w + (i + 1) * 32));
            int32_t pair;
            memcpy(&pair, x->q + i, sizeof pair); /* x[i] low, x[i + 1] high */
            __m256i xv = _mm256_set1_epi32(pair), zero = _mm256_setzero_si256();
            __m256i p = _mm256_unpacklo_epi8(b0, b1), q = _mm256_unpackhi_epi8(b0, b1);
            __m256i v[4] = {_mm256_unpacklo_epi8(p, zero), _mm256_unpackhi_epi8(p, zero),
                            _mm256_unpacklo_epi8(q, zero), _mm256_unpackhi_epi8(q, zero)};
            for (int k = 0; k < 4; k++) {
                acc[k] = madd_acc(acc[k], _mm256_and_si256(v[k], low_nibble), xv);
                acc[4 + k] = madd_acc(acc[4 + k], _mm256_srli_epi16(v[k], 4), xv);
            }
        }
        int64_t g = c / group;
        int ends = (c + unit) % group == 0;
        __m256 block_scale = _mm256_set1_ps(x->scale[c / QBLOCK]);
        for (int half = 0; half < 2; half++) {
            const __m256i *h = acc + 4 * half;
            __m256i ordered[4] = {_mm256_permute2x128_si256(h[0], h[1], 0x20),  /* rows 0-7 */
                                  _mm256_permute2x128_si256(h[2], h[3], 0x20),  /* 8-15 */
                                  _mm256_permute2x128_si256(h[0], h[1], 0x31),  /* 16-23 */
                                  _mm256_permute2x128_si256(h[2], h[3], 0x31)}; /* 24-31 */
            for (int k = 0; k < 4; k++) {
                int t = 4 * half + k;
                __m256 scale, zero;
                load_pairs8(scale_zero, f32, g * rows + row0 + 8 * t, &scale, &zero);
                __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(ordered[k]), block_scale);
                total[t] = _mm256_fmadd_ps(sum, scale, total[t]);
                if (ends) { /* the group ends: its zero-point term */
                    __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);
                    total[t] = _mm256_fmadd_ps(offset, _mm256_set1_ps(xg[g]), total[t]);
                }
            }
        }
    }
    for (int k = 0; k < 8; k++) _mm256_storeu_ps(y + 8 * k, total[k]);
}
#elif defined(ET_NEON)
/* NEON: one block of 64 rows. Per column, 32 bytes: low nibbles rows 0-31, high rows 32-63;
 * each widened to int16 and multiplied by the column's x into int32 (smlal), so a row's sum
 * over a unit is exact. */
static void i4_block(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                     const struct qx *x, const float *restrict xg, int64_t rows, int64_t row0,
                     int64_t cols, int64_t group, float *restrict y) {
    const uint8x16_t low_nibble = vdupq_n_u8(0x0f);
    int64_t unit = group < QBLOCK ? group : QBLOCK;
    float total[64] = {0};
    for (int64_t c = 0; c < cols; c += unit) {
        int32x4_t acc[16]; /* rows 4k..4k+3 */
        for (int k = 0; k < 16; k++) acc[k] = vdupq_n_s32(0);
        for (int64_t i = c; i < c + unit; i++) {
            uint8x16_t b[2] = {vld1q_u8(w + i * 32), vld1q_u8(w + i * 32 + 16)};
            int16_t xi = x->q[i];
            for (int h = 0; h < 2; h++) { /* bytes 16h..16h+15: rows 16h.. and 32 + 16h.. */
                uint8x16_t codes[2] = {vandq_u8(b[h], low_nibble), vshrq_n_u8(b[h], 4)};
                for (int n = 0; n < 2; n++) {
                    int16x8_t lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(codes[n])));
                    int16x8_t hi = vreinterpretq_s16_u16(vmovl_high_u8(codes[n]));
                    int a = 8 * n + 4 * h; /* the accumulator of row 32n + 16h */
                    acc[a] = vmlal_n_s16(acc[a], vget_low_s16(lo), xi);
                    acc[a + 1] = vmlal_high_n_s16(acc[a + 1], lo, xi);
                    acc[a + 2] = vmlal_n_s16(acc[a + 2], vget_low_s16(hi), xi);
                    acc[a + 3] = vmlal_high_n_s16(acc[a + 3], hi, xi);
                }
            }
        }
        int32_t dot[64];
        for (int k = 0; k < 16; k++) vst1q_s32(dot + 4 * k, acc[k]);
        i4_unit_totals(dot, scale_zero, f32, x->scale[c / QBLOCK], xg, rows, row0, c, unit,
                       group, 64, total);
    }
    memcpy(y, total, sizeof total);
}
#else
/* Plain C: one block of 64 rows, each unit's exact sums over the block's rows for the
 * compiler to vectorize. */
static void i4_block(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                     const struct qx *x, const float *restrict xg, int64_t rows, int64_t row0,
                     int64_t cols, int64_t group, float *restrict y) {
    int64_t unit = group < QBLOCK ? group : QBLOCK;
    float total[64] = {0};
    for (int64_t c = 0; c < cols; c += unit) {
        int32_t dot[64] = {0};
        for (int64_t i = c; i < c + unit; i++) {
            int32_t xi = x->q[i];
            for (int j = 0; j < 32; j++) {
                int32_t byte = w[i * 32 + j];
                dot[j] += (byte & 15) * xi;
                dot[j + 32] += (byte >> 4) * xi;
            }
        }
        i4_unit_totals(dot, scale_zero, f32, x->scale[c / QBLOCK], xg, rows, row0, c, unit,
                       group, 64, total);
    }
    memcpy(y, total, sizeof total);
}
#endif

/* The last 16, 32 or 48 rows (bytes: cols x tail / 2, two adjacent rows per byte). */
static void i4_tail(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                    const struct qx *x, const float *restrict xg, int64_t rows, int64_t row0,
                    int64_t tail, int64_t cols, int64_t group, float *restrict y) {
    int64_t unit = group < QBLOCK ? group : QBLOCK, half = tail / 2;
    float total[48] = {0};
    for (int64_t c = 0; c < cols; c += unit) {
        int32_t dot[48] = {0};
        for (int64_t i = c; i < c + unit; i++) {
            int32_t xi = x->q[i];
            for (int64_t j = 0; j < half; j++) {
                int32_t byte = w[i * half + j];
                dot[2 * j] += (byte & 15) * xi;
                dot[2 * j + 1] += (byte >> 4) * xi;
            }
        }
        i4_unit_totals(dot, scale_zero, f32, x->scale[c / QBLOCK], xg, rows, row0, c, unit,
                       group, tail, total);
    }
    memcpy(y, total, (size_t)tail * sizeof(float));
}

static int i4_shape_ok(int64_t rows, int64_t cols, int64_t group) {
    return !(rows % 16 || group % 32 || group <= 0 || cols % group);
}

/* A quantized batch (et_quantize_rows with ``group``) against rows [from, to) -> y [nx, rows],
 * one 64-row block (in the cache) for every x row in turn; ``from`` a multiple of 64 and ``to``
 * one too or ``rows`` (the thread pool's part); ``f32`` says the (scale, zero) pairs' dtype.
 * Returns 0, or -3 for a shape the tiled layout does not have. */
int et_i4_part(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
               const void *batch, float *restrict y, int64_t rows, int64_t cols, int64_t group,
               int64_t from, int64_t to) {
    const struct qbatch *b = batch;
    if (!i4_shape_ok(rows, cols, group) || from < 0 || from > to || to > rows || from % 64
        || (to % 64 && to != rows))
        return -3;
    int64_t full = rows - rows % 64;
    for (int64_t r = from; r < full && r < to; r += 64) {
#if defined(I4_MULTI)
        /* the rows of x without inf or NaN, up to I4_MULTI per pass over the block */
        const struct qx *xs[ET_MAX_BATCH];
        const float *sums[ET_MAX_BATCH];
        float *ys[ET_MAX_BATCH];
        int good = 0;
        for (int64_t t = 0; t < b->nx; t++) {
            if (b->bad[t]) {
                fill_nan(y + t * rows + r, 64);
                continue;
            }
            xs[good] = &b->row[t];
            sums[good] = b->group_sum[t];
            ys[good++] = y + t * rows + r;
        }
        for (int n = 0; n < good; n += I4_MULTI)
            i4_blocks(w + r * cols / 2, scale_zero, f32, xs + n, sums + n, rows, r, cols, group,
                      ys + n, good - n < I4_MULTI ? good - n : I4_MULTI);
#else
        for (int64_t t = 0; t < b->nx; t++) {
            if (b->bad[t]) fill_nan(y + t * rows + r, 64);
            else i4_block(w + r * cols / 2, scale_zero, f32, &b->row[t], b->group_sum[t], rows,
                          r, cols, group, y + t * rows + r);
        }
#endif
    }
    if (to > full)
        for (int64_t t = 0; t < b->nx; t++) {
            if (b->bad[t]) fill_nan(y + t * rows + full, rows - full);
            else i4_tail(w + full * cols / 2, scale_zero, f32, &b->row[t], b->group_sum[t],
                         rows, full, rows - full, cols, group, y + t * rows + full);
        }
    return 0;
}

static int matvec_i4_rows(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                          const float *restrict x, float *restrict y, int64_t rows,
                          int64_t cols, int64_t group, int64_t nx) {
    if (!i4_shape_ok(rows, cols, group) || nx < 1 || nx > ET_MAX_BATCH) return -3;
    const void *batch = et_quantize_rows(x, nx, cols, group, 0);
    if (batch == NULL) return -1;
    return et_i4_part(w, scale_zero, f32, batch, y, rows, cols, group, 0, rows);
}

/* Returns 0; -1 when out of memory; -3 when the shape is not one this kernel takes. */
int et_matvec_i4(const uint8_t *restrict w, const uint16_t *restrict scale_zero,
                 const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                 int64_t group) {
    return matvec_i4_rows(w, scale_zero, 0, x, y, rows, cols, group, 1);
}

/* The same with float32 (scale, zero) pairs. */
int et_matvec_i4_f32(const uint8_t *restrict w, const float *restrict scale_zero,
                     const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                     int64_t group) {
    return matvec_i4_rows(w, scale_zero, 1, x, y, rows, cols, group, 1);
}

/* x [nx, cols], 1 <= nx <= ET_MAX_BATCH -> y [nx, rows], y[t] bitwise the one-row product of
 * x[t]; -3 also for another nx. */
int et_matvec_i4_rows(const uint8_t *restrict w, const uint16_t *restrict scale_zero,
                      const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                      int64_t group, int64_t nx) {
    return matvec_i4_rows(w, scale_zero, 0, x, y, rows, cols, group, nx);
}

int et_matvec_i4_f32_rows(const uint8_t *restrict w, const float *restrict scale_zero,
                          const float *restrict x, float *restrict y, int64_t rows,
                          int64_t cols, int64_t group, int64_t nx) {
    return matvec_i4_rows(w, scale_zero, 1, x, y, rows, cols, group, nx);
}

/* ---- which paths this build compiled in (for `edgetp probe` and the kernel test harness) -----
 *
 * One line of "product:path" words, e.g. "f32:avx512 bf16:avx512-bf16 i8:avx512-vnni ...".
 * "autovec" is the plain C loop as the compiler vectorized it for the build's target; "torch"
 * means the function returns -3 so the caller keeps torch's kernel. Kept in step with the #if
 * blocks above by hand: a new path adds its word here.
 */
#if defined(__AVXVNNI__)
#define AVX2_INT "avx-vnni" /* vpdpwssd on 256 bits */
#else
#define AVX2_INT "avx2"
#endif
#if defined(__ARM_FEATURE_MATMUL_INT8) && defined(ET_SPLIT_X)
#define NEON_INT8 "neon-i8mm" /* sdot + usdot on x's code bytes */
#elif defined(ET_SPLIT_X)
#define NEON_INT8 "neon-dotprod" /* sdot on x's code bytes */
#else
#define NEON_INT8 "neon" /* smlal on int16 */
#endif

const char *et_kernel_paths(void) {
    return
#if defined(__AVX512F__)
        "f32:avx512"
#elif defined(ET_AVX2)
        "f32:avx2"
#elif defined(ET_NEON)
        "f32:neon"
#else
        "f32:autovec"
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
        " bf16:avx512-bf16"
#elif defined(ET_AVX2)
        " bf16:avx2"
#elif defined(ET_NEON)
        " bf16:neon"
#else
        " bf16:autovec"
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        " i8:avx512-vnni"
#elif defined(__AVX512BW__)
        " i8:avx512bw"
#elif defined(ET_AVX2)
        " i8:" AVX2_INT
#elif defined(ET_NEON)
        " i8:" NEON_INT8
#else
        " i8:autovec"
#endif
#if defined(__AVX512BW__)
        " i8_b32:avx512bw"
#elif defined(ET_AVX2)
        " i8_b32:" AVX2_INT
#elif defined(ET_NEON)
        " i8_b32:" NEON_INT8
#else
        " i8_b32:autovec"
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        " i4:avx512-vnni"
#elif defined(ET_AVX2)
        " i4:" AVX2_INT
#elif defined(ET_NEON)
        " i4:neon"
#else
        " i4:autovec"
#endif
        ;
}
