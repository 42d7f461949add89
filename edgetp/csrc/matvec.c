/* Decode matrix-vector products for edgetp (one token: y[rows] = W[rows, cols] . x[cols]).
 *
 * At batch size 1 every weight is read once per token, so these loops only have to keep the
 * memory bus busy: rows go four at a time (one pass over x feeds four weight streams) and the
 * inner loops are written for the compiler's vectorizer (built with -O3 -march=native and
 * reassociation allowed, see edgetp/kernels.py). int8 has explicit AVX-512 and AVX2 loops.
 *
 * Every function is single-threaded (one thread per node) and allocation-free, except for one
 * growing thread-local scratch area holding x converted (float32 for bfloat16, int16 for int8).
 * All arrays are row-major and contiguous; bfloat16 travels as uint16_t.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define ROWS 4

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

int et_abi_version(void) { return 1; }

/* ---- float32 weights, float32 x -> float32 y ------------------------------------------------ */

#if defined(__AVX512F__)
#define F32_ROWS 12 /* weight streams per pass over x: 12 measured ~15% ahead of 4, 5% of 8 */
static int64_t f32_rows_avx512(const float *restrict w, const float *restrict x,
                               float *restrict y, int64_t rows, int64_t cols) {
    int64_t vec_cols = cols - cols % 16, r = 0;
    for (; r + F32_ROWS <= rows; r += F32_ROWS) {
        __m512 acc[F32_ROWS];
        for (int k = 0; k < F32_ROWS; k++) acc[k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < vec_cols; i += 16) {
            __m512 xv = _mm512_loadu_ps(x + i);
            for (int k = 0; k < F32_ROWS; k++)
                acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(w + (r + k) * cols + i), xv, acc[k]);
        }
        for (int k = 0; k < F32_ROWS; k++) {
            float a = _mm512_reduce_add_ps(acc[k]);
            for (int64_t i = vec_cols; i < cols; i++) a += w[(r + k) * cols + i] * x[i];
            y[r + k] = a;
        }
    }
    return r; /* rows done */
}
#endif

void et_matvec_f32(const float *restrict w, const float *restrict x, float *restrict y,
                   int64_t rows, int64_t cols) {
    int64_t r = 0;
#if defined(__AVX512F__)
    r = f32_rows_avx512(w, x, y, rows, cols);
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

/* ---- bfloat16 weights, bfloat16 x -> bfloat16 y (float32 accumulation, as torch) ------------- */

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* vdpbf16ps multiplies pairs of bfloat16 and adds them into float32: one instruction per 32
 * weights, where widening each weight to float32 first costs three. Rows go eight at a time. */
#define BF16_ROWS 8
static int64_t bf16_rows_avx512(const uint16_t *restrict w, const uint16_t *restrict x,
                                uint16_t *restrict y, int64_t rows, int64_t cols) {
    int64_t vec_cols = cols - cols % 32, r = 0;
    for (; r + BF16_ROWS <= rows; r += BF16_ROWS) {
        __m512 acc[BF16_ROWS];
        for (int k = 0; k < BF16_ROWS; k++) acc[k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < vec_cols; i += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
            for (int k = 0; k < BF16_ROWS; k++)
                acc[k] = _mm512_dpbf16_ps(
                    acc[k], (__m512bh)_mm512_loadu_si512(w + (r + k) * cols + i), xv);
        }
        for (int k = 0; k < BF16_ROWS; k++) {
            float a = _mm512_reduce_add_ps(acc[k]);
            for (int64_t i = vec_cols; i < cols; i++)
                a += bf16_to_f32(w[(r + k) * cols + i]) * bf16_to_f32(x[i]);
            y[r + k] = f32_to_bf16(a);
        }
    }
    return r; /* rows done */
}
#endif

int et_matvec_bf16(const uint16_t *restrict w, const uint16_t *restrict x, uint16_t *restrict y,
                   int64_t rows, int64_t cols) {
    int64_t r = 0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    r = bf16_rows_avx512(w, x, y, rows, cols);
    if (r == rows) return 0;
#endif
    float *restrict xf = scratch_bytes(cols * (int64_t)sizeof(float));
    if (xf == NULL) return -1;
    for (int64_t i = 0; i < cols; i++) xf[i] = bf16_to_f32(x[i]);
    for (; r + ROWS <= rows; r += ROWS) {
        const uint16_t *w0 = w + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        for (int64_t i = 0; i < cols; i++) {
            float xi = xf[i];
            a0 += bf16_to_f32(w0[i]) * xi;
            a1 += bf16_to_f32(w1[i]) * xi;
            a2 += bf16_to_f32(w2[i]) * xi;
            a3 += bf16_to_f32(w3[i]) * xi;
        }
        y[r] = f32_to_bf16(a0);
        y[r + 1] = f32_to_bf16(a1);
        y[r + 2] = f32_to_bf16(a2);
        y[r + 3] = f32_to_bf16(a3);
    }
    for (; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        float a = 0.f;
        for (int64_t i = 0; i < cols; i++) a += bf16_to_f32(wr[i]) * xf[i];
        y[r] = f32_to_bf16(a);
    }
    return 0;
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
        float scale = peak / QMAX, inverse = peak > 0.f ? QMAX / peak : 0.f;
        xs[b] = scale;
        for (int64_t i = from; i < to; i++) xq[i] = (int16_t)lrintf(x[i] * inverse);
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
static float i8_row(const int8_t *restrict w, const int16_t *restrict xq,
                    const float *restrict xs, int64_t full_blocks) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < full_blocks; b++) {
        __m512i bytes = _mm512_loadu_si512(w + b * QBLOCK);
        __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes));
        __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        __m512i x0 = _mm512_loadu_si512(xq + b * QBLOCK);
        __m512i x1 = _mm512_loadu_si512(xq + b * QBLOCK + 32);
#if defined(__AVX512VNNI__)
        __m512i dot = _mm512_dpwssd_epi32(_mm512_madd_epi16(lo, x0), hi, x1);
#else
        __m512i dot = _mm512_add_epi32(_mm512_madd_epi16(lo, x0), _mm512_madd_epi16(hi, x1));
#endif
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[b]), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#elif defined(__AVX2__) && defined(__FMA__)
static float i8_row(const int8_t *restrict w, const int16_t *restrict xq,
                    const float *restrict xs, int64_t full_blocks) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < full_blocks; b++) {
        __m256i dot = _mm256_setzero_si256();
        for (int k = 0; k < QBLOCK; k += 16) {
            __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + b * QBLOCK + k)));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QBLOCK + k));
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(wv, xv));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[b]), acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
static float i8_row(const int8_t *restrict w, const int16_t *restrict xq,
                    const float *restrict xs, int64_t full_blocks) {
    float acc = 0.f;
    for (int64_t b = 0; b < full_blocks; b++)
        acc += (float)block_dot_tail(w + b * QBLOCK, xq + b * QBLOCK, QBLOCK) * xs[b];
    return acc;
}
#endif

/* Returns 0, or -1 when out of memory (the caller falls back). */
int et_matvec_i8(const int8_t *restrict w, const uint16_t *restrict scale,
                 const float *restrict x, float *restrict y, int64_t rows, int64_t cols) {
    int64_t blocks = (cols + QBLOCK - 1) / QBLOCK, full = cols / QBLOCK, tail = cols - full * QBLOCK;
    char *area = scratch_bytes(blocks * QBLOCK * (int64_t)sizeof(int16_t)
                               + blocks * (int64_t)sizeof(float));
    if (area == NULL) return -1;
    int16_t *xq = (int16_t *)area;
    float *xs = (float *)(area + blocks * QBLOCK * sizeof(int16_t));
    if (quantize_x(x, cols, xq, xs) != 0) { /* inf or NaN in x: every output is NaN */
        for (int64_t r = 0; r < rows; r++) y[r] = NAN;
        return 0;
    }
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *wr = w + r * cols;
        float sum = i8_row(wr, xq, xs, full);
        if (tail) sum += (float)block_dot_tail(wr + full * QBLOCK, xq + full * QBLOCK, tail) * xs[full];
        y[r] = sum * bf16_to_f32(scale[r]);
    }
    return 0;
}
