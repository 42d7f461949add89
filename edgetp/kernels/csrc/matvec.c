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

/* ---- bfloat16 weights, bfloat16 x -> bfloat16 or float32 y (float32 accumulation) ----------
 *
 * Rounding y to bfloat16 is what torch does for a bfloat16 product; logits keep the float32 sum
 * (et_matvec_bf16_f32): near logits of 16-20 a bfloat16 step is 0.06-0.125, enough to tie the
 * top tokens. */

static inline void put_row(void *restrict y, int64_t r, float a, int f32_out) {
    if (f32_out) ((float *)y)[r] = a;
    else ((uint16_t *)y)[r] = f32_to_bf16(a);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* vdpbf16ps multiplies pairs of bfloat16 and adds them into float32: one instruction per 32
 * weights, where widening each weight to float32 first costs three. Rows go eight at a time. */
#define BF16_ROWS 8
static int64_t bf16_rows_avx512(const uint16_t *restrict w, const uint16_t *restrict x,
                                void *restrict y, int64_t rows, int64_t cols, int f32_out) {
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
            put_row(y, r + k, a, f32_out);
        }
    }
    return r; /* rows done */
}
#endif

static int bf16_matvec(const uint16_t *restrict w, const uint16_t *restrict x, void *restrict y,
                       int64_t rows, int64_t cols, int f32_out) {
    int64_t r = 0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    r = bf16_rows_avx512(w, x, y, rows, cols, f32_out);
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
        put_row(y, r, a0, f32_out);
        put_row(y, r + 1, a1, f32_out);
        put_row(y, r + 2, a2, f32_out);
        put_row(y, r + 3, a3, f32_out);
    }
    for (; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        float a = 0.f;
        for (int64_t i = 0; i < cols; i++) a += bf16_to_f32(wr[i]) * xf[i];
        put_row(y, r, a, f32_out);
    }
    return 0;
}

int et_matvec_bf16(const uint16_t *restrict w, const uint16_t *restrict x, uint16_t *restrict y,
                   int64_t rows, int64_t cols) {
    return bf16_matvec(w, x, y, rows, cols, 0);
}

int et_matvec_bf16_f32(const uint16_t *restrict w, const uint16_t *restrict x,
                       float *restrict y, int64_t rows, int64_t cols) {
    return bf16_matvec(w, x, y, rows, cols, 1);
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

/* x quantized into the thread's scratch area: int16 codes (padded to whole blocks), a scale per
 * block, and ``extra`` more floats for the caller. Returns 0, -1 (no memory) or -2 (inf/NaN). */
static int quantized_x(const float *restrict x, int64_t cols, int64_t extra, int16_t **xq,
                       float **xs, float **more) {
    int64_t blocks = (cols + QBLOCK - 1) / QBLOCK;
    char *area = scratch_bytes(blocks * QBLOCK * (int64_t)sizeof(int16_t)
                               + (blocks + extra) * (int64_t)sizeof(float));
    if (area == NULL) return -1;
    *xq = (int16_t *)area;
    *xs = (float *)(area + blocks * QBLOCK * sizeof(int16_t));
    *more = *xs + blocks;
    return quantize_x(x, cols, *xq, *xs);
}

static void fill_nan(float *y, int64_t rows) {
    for (int64_t r = 0; r < rows; r++) y[r] = NAN;
}

/* Returns 0, or -1 when out of memory (the caller falls back). */
int et_matvec_i8(const int8_t *restrict w, const uint16_t *restrict scale,
                 const float *restrict x, float *restrict y, int64_t rows, int64_t cols) {
    int64_t full = cols / QBLOCK, tail = cols - full * QBLOCK;
    int16_t *xq;
    float *xs, *unused;
    int status = quantized_x(x, cols, 0, &xq, &xs, &unused);
    if (status == -1) return -1;
    if (status != 0) { /* inf or NaN in x: every output is NaN */
        fill_nan(y, rows);
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

/* ---- int8 weights with a float16 scale per 32 columns (a GGUF's Q8_0 blocks), float32 x ------
 *
 * As above, with x quantized to int16 per 64 columns; each 64-column block of a row holds two
 * weight blocks, whose 32 products are summed exactly in int32 apart and scaled by their own
 * weight scale. Columns must be a multiple of 32.
 */

#define WBLOCK 32

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
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

static float i8b_row(const int8_t *restrict w, const uint16_t *restrict scale,
                     const int16_t *restrict xq, const float *restrict xs, int64_t cols) {
    int64_t b = 0;
    float sum = 0.f;
#if defined(__AVX512BW__)
    __m512 acc = _mm512_setzero_ps();
    for (; b < cols / QBLOCK; b++) {
        __m512i bytes = _mm512_loadu_si512(w + b * QBLOCK);
        __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes));
        __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        __m512i d0 = _mm512_madd_epi16(lo, _mm512_loadu_si512(xq + b * QBLOCK));
        __m512i d1 = _mm512_madd_epi16(hi, _mm512_loadu_si512(xq + b * QBLOCK + 32));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0),
                              _mm512_set1_ps(xs[b] * f16_to_f32(scale[2 * b])), acc);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1),
                              _mm512_set1_ps(xs[b] * f16_to_f32(scale[2 * b + 1])), acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (int64_t k = 2 * b; k * WBLOCK < cols; k++) /* what is left, 32 columns at a time */
        sum += (float)block_dot_tail(w + k * WBLOCK, xq + k * WBLOCK, WBLOCK)
               * xs[k / 2] * f16_to_f32(scale[k]);
    return sum;
}

/* Returns 0; -1 when out of memory; -3 when the columns are not whole blocks. */
int et_matvec_i8_b32(const int8_t *restrict w, const uint16_t *restrict scale,
                     const float *restrict x, float *restrict y, int64_t rows, int64_t cols) {
    if (cols % WBLOCK) return -3;
    int16_t *xq;
    float *xs, *unused;
    int status = quantized_x(x, cols, 0, &xq, &xs, &unused);
    if (status == -1) return -1;
    if (status != 0) {
        fill_nan(y, rows);
        return 0;
    }
    for (int64_t r = 0; r < rows; r++)
        y[r] = i8b_row(w + r * cols, scale + r * (cols / WBLOCK), xq, xs, cols);
    return 0;
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
 * int8), in units of min(group, 64) columns. Only the AVX-512 (BW + VNNI) build has it: two
 * columns' bytes are interleaved so each 32-bit lane holds one row's two codes, and vpdpwssd
 * multiplies them by the two columns' x at once.
 */

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
int et_has_int4(void) { return 1; }

/* The (scale, zero) pairs come as bfloat16 (``f32`` 0) or float32 (1: scales kept from a GGUF's
 * float16 blocks, whose zero point m + 8 d bfloat16 would round). ``pair`` = g * rows + r. */
static inline float scale_of(const void *scale_zero, int f32, int64_t pair) {
    return f32 ? ((const float *)scale_zero)[pair * 2]
               : bf16_to_f32(((const uint16_t *)scale_zero)[pair * 2]);
}

static inline float offset_of(const void *scale_zero, int f32, int64_t pair) {
    /* zero - 8 * scale, the value of code 0 */
    float zero = f32 ? ((const float *)scale_zero)[pair * 2 + 1]
                     : bf16_to_f32(((const uint16_t *)scale_zero)[pair * 2 + 1]);
    return zero - 8.f * scale_of(scale_zero, f32, pair);
}

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

/* One block of 64 rows (bytes: cols x 32): y[0..63] = the block's products. */
static void i4_block(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                     const int16_t *restrict xq, const float *restrict xs,
                     const float *restrict xg, int64_t rows, int64_t row0, int64_t cols,
                     int64_t group, float *restrict y) {
    const __m512i low_nibble = _mm512_set1_epi16(0x0f);
    /* lanes of the unpacked accumulators -> rows in order (see below) */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    int64_t unit = group < QBLOCK ? group : QBLOCK;
    __m512 total[4];
    for (int k = 0; k < 4; k++) total[k] = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += unit) {
        /* acc[0]: rows 0-7,16-23; acc[1]: 8-15,24-31; acc[2], acc[3]: the same + 32 */
        __m512i acc[4];
        for (int k = 0; k < 4; k++) acc[k] = _mm512_setzero_si512();
        for (int64_t i = c; i < c + unit; i += 2) {
            __m256i b0 = _mm256_loadu_si256((const __m256i *)(w + i * 32));
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(w + (i + 1) * 32));
            int32_t pair;
            memcpy(&pair, xq + i, sizeof pair); /* x[i] low, x[i + 1] high */
            __m512i xv = _mm512_set1_epi32(pair);
            __m512i p = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(b0, b1));
            __m512i q = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(b0, b1));
            acc[0] = _mm512_dpwssd_epi32(acc[0], _mm512_and_si512(p, low_nibble), xv);
            acc[1] = _mm512_dpwssd_epi32(acc[1], _mm512_and_si512(q, low_nibble), xv);
            acc[2] = _mm512_dpwssd_epi32(acc[2], _mm512_srli_epi16(p, 4), xv);
            acc[3] = _mm512_dpwssd_epi32(acc[3], _mm512_srli_epi16(q, 4), xv);
        }
        int64_t g = c / group;
        __m512 block_scale = _mm512_set1_ps(xs[c / QBLOCK]);
        for (int half = 0; half < 2; half++) {
            __m512i lo = acc[2 * half], hi = acc[2 * half + 1];
            __m512i ordered[2] = {_mm512_permutex2var_epi32(lo, first, hi),
                                  _mm512_permutex2var_epi32(lo, second, hi)};
            for (int k = 0; k < 2; k++) {
                int64_t r = row0 + half * 32 + k * 16;
                __m512 scale, zero;
                load_pairs(scale_zero, f32, g * rows + r, &scale, &zero);
                __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(ordered[k]), block_scale);
                total[2 * half + k] = _mm512_fmadd_ps(sum, scale, total[2 * half + k]);
                if ((c + unit) % group == 0) { /* the group ends: its zero-point term */
                    __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero);
                    total[2 * half + k] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xg[g]),
                                                          total[2 * half + k]);
                }
            }
        }
    }
    for (int k = 0; k < 4; k++) _mm512_storeu_ps(y + k * 16, total[k]);
}

/* The last 16, 32 or 48 rows (bytes: cols x tail / 2, two adjacent rows per byte). */
static void i4_tail(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                    const int16_t *restrict xq, const float *restrict xs,
                    const float *restrict xg, int64_t rows, int64_t row0, int64_t tail,
                    int64_t cols, int64_t group, float *restrict y) {
    int64_t unit = group < QBLOCK ? group : QBLOCK;
    for (int64_t t = 0; t < tail; t++) {
        int64_t r = row0 + t;
        float total = 0.f;
        for (int64_t c = 0; c < cols; c += unit) {
            int32_t dot = 0;
            for (int64_t i = c; i < c + unit; i++) {
                uint8_t byte = w[i * (tail / 2) + t / 2];
                dot += (int32_t)((t & 1) ? byte >> 4 : byte & 15) * xq[i];
            }
            int64_t g = c / group;
            total += (float)dot * xs[c / QBLOCK] * scale_of(scale_zero, f32, g * rows + r);
            if ((c + unit) % group == 0) total += offset_of(scale_zero, f32, g * rows + r) * xg[g];
        }
        y[t] = total;
    }
}

static int matvec_i4(const uint8_t *restrict w, const void *restrict scale_zero, int f32,
                     const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                     int64_t group) {
    if (rows % 16 || group % 32 || cols % group) return -3;
    int64_t groups = cols / group, full = rows - rows % 64;
    int16_t *xq;
    float *xs, *xg;
    int status = quantized_x(x, cols, groups, &xq, &xs, &xg);
    if (status == -1) return -1;
    if (status != 0) {
        fill_nan(y, rows);
        return 0;
    }
    for (int64_t g = 0; g < groups; g++) { /* each group's plain sum of x */
        float sum = 0.f;
        for (int64_t i = g * group; i < (g + 1) * group; i++) sum += x[i];
        xg[g] = sum;
    }
    for (int64_t r = 0; r < full; r += 64)
        i4_block(w + r * cols / 2, scale_zero, f32, xq, xs, xg, rows, r, cols, group, y + r);
    if (rows > full)
        i4_tail(w + full * cols / 2, scale_zero, f32, xq, xs, xg, rows, full, rows - full, cols,
                group, y + full);
    return 0;
}

/* Returns 0; -1 when out of memory; -3 when the shape is not one this kernel takes. */
int et_matvec_i4(const uint8_t *restrict w, const uint16_t *restrict scale_zero,
                 const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                 int64_t group) {
    return matvec_i4(w, scale_zero, 0, x, y, rows, cols, group);
}

/* The same with float32 (scale, zero) pairs. */
int et_matvec_i4_f32(const uint8_t *restrict w, const float *restrict scale_zero,
                     const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                     int64_t group) {
    return matvec_i4(w, scale_zero, 1, x, y, rows, cols, group);
}
#else
int et_has_int4(void) { return 0; }

int et_matvec_i4(const uint8_t *restrict w, const uint16_t *restrict scale_zero,
                 const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                 int64_t group) {
    (void)w; (void)scale_zero; (void)x; (void)y; (void)rows; (void)cols; (void)group;
    return -3; /* torch's int4 kernel is as fast without AVX-512 VNNI */
}

int et_matvec_i4_f32(const uint8_t *restrict w, const float *restrict scale_zero,
                     const float *restrict x, float *restrict y, int64_t rows, int64_t cols,
                     int64_t group) {
    (void)w; (void)scale_zero; (void)x; (void)y; (void)rows; (void)cols; (void)group;
    return -3;
}
#endif

/* ---- which paths this build compiled in (for `edgetp probe` and the kernel test harness) -----
 *
 * One line of "product:path" words, e.g. "f32:avx512 bf16:avx512-bf16 i8:avx512-vnni ...".
 * "autovec" is the plain C loop as the compiler vectorized it for the build's target; "torch"
 * means the function returns -3 so the caller keeps torch's kernel. Kept in step with the #if
 * blocks above by hand: a new path adds its word here.
 */
const char *et_kernel_paths(void) {
    return
#if defined(__AVX512F__)
        "f32:avx512"
#else
        "f32:autovec"
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
        " bf16:avx512-bf16"
#else
        " bf16:autovec"
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        " i8:avx512-vnni"
#elif defined(__AVX512BW__)
        " i8:avx512bw"
#elif defined(__AVX2__) && defined(__FMA__)
        " i8:avx2"
#else
        " i8:autovec"
#endif
#if defined(__AVX512BW__)
        " i8_b32:avx512bw"
#else
        " i8_b32:autovec"
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        " i4:avx512-vnni"
#else
        " i4:torch"
#endif
        ;
}
