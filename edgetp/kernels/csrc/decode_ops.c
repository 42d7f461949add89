/* A decode step's small operations, each one call instead of a handful of torch ops.
 *
 * One token through a layer is seven matrix-vector products (csrc/matvec.c) and, between them,
 * a norm, RoPE, the KV cache write and attention over the cached positions: small work whose
 * cost in torch is per operation, not per byte (each op a few microseconds of dispatch; 30-40
 * of them a layer, 0.3-0.6 ms a layer on the development machine). Here each is one loop, in
 * float32 or in the bfloat16 compute dtype (bfloat16 arrays, float32 arithmetic, rounded where
 * the model's bfloat16 torch ops round). Every function is deterministic: a row's result
 * depends on that row alone (a decode batch's rows, computed one by one, equal their one-row
 * steps bitwise).
 */
#include <math.h>
#include <string.h>
#include <stdint.h>
#include "bf16.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* 1 / sqrt(mean(x^2) + eps) over n values. */
static inline float rms_scale(const float *x, int64_t n, float eps) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    return 1.0f / sqrtf(sum / (float)n + eps);
}

/* Rotate-half RoPE of `heads` vectors of `hd` values in place; cos, sin: [hd] (their halves
 * repeat, so the first half's c, s serve both): x1' = x1 c - x2 s, x2' = x2 c + x1 s. */
static void rope(float *x, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *x1 = x + h * hd, *x2 = x1 + half;
        for (int64_t i = 0; i < half; i++) {
            float a = x1[i], b = x2[i];
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

/* n floats -> bfloat16 bits, rounded to nearest even: bf16_bits over a run, in a form the
 * compiler vectorizes. */
static inline void bf16_run(const float *restrict values, uint16_t *restrict out, int n) {
    for (int i = 0; i < n; i++) out[i] = bf16_bits(values[i]);
}

/* int4 weights of `rows` rows (a multiple of 64 from the tensor's start, or the tensor's
 * tail) -> bfloat16, TRANSPOSED: out [cols, rows], so that x [T, cols] @ out is the product a
 * prefill chunk needs, and the tiled layout's 64-row blocks unpack into contiguous runs.
 * value = (code - 8) * scale + zero, rounded once; scale_zero: bfloat16 (scale, zero)
 * pairs, [cols / group, rows, 2], `group_stride` values from one group's to the next's (a
 * slice of a taller tensor's rows; each group's pairs of a block are converted once, for all
 * its columns). Layouts (edgetp.shard.quant.pack_int4): tiled, each 64-row block as [cols, 32]
 * bytes (low nibble row i, high nibble row 32 + i), rows past the last whole block as [cols,
 * tail / 2] bytes (low nibble row 2p, high 2p + 1); or rows, [rows, cols / 2] bytes (low
 * nibble the even column). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 16 codes (0..15, bytes) -> (code - 8) * s + z as bfloat16 bits, rounded to nearest even:
 * bf16.h's rounding in vectors, without its NaN case (a weight's values are finite). */
static inline void dequant16(__m128i codes, const float *s, const float *z, uint16_t *o) {
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(codes),
                                                   _mm512_set1_epi32(8)));
    v = _mm512_fmadd_ps(v, _mm512_loadu_ps(s), _mm512_loadu_ps(z));
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)o, (__m256i)_mm512_cvtneps_pbh(v));
#else
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
#endif
}
#endif

static void dequant_block_column(const uint8_t *restrict b, const float *restrict s,
                                 const float *restrict z, uint16_t *restrict o) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m256i bytes = _mm256_loadu_si256((const __m256i *)b);
    __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
    __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
    dequant16(_mm256_castsi256_si128(low), s, z, o);
    dequant16(_mm256_extracti128_si256(low, 1), s + 16, z + 16, o + 16);
    dequant16(_mm256_castsi256_si128(high), s + 32, z + 32, o + 32);
    dequant16(_mm256_extracti128_si256(high, 1), s + 48, z + 48, o + 48);
#else
    float values[64]; /* plain loops the compiler vectorizes */
    for (int i = 0; i < 32; i++) {
        values[i] = (float)((int)(b[i] & 15) - 8) * s[i] + z[i];
        values[32 + i] = (float)((int)(b[i] >> 4) - 8) * s[32 + i] + z[32 + i];
    }
    bf16_run(values, o, 64);
#endif
}

/* RMSNorm of `rows` float32 rows of n values (a prefill chunk's; row r at x + r * x_stride)
 * into y [rows, n], with weights w [n]: each a float32 or, where its flag says so, bfloat16
 * bits (the bfloat16 compute dtype: the output rounded once to nearest even). A float32 row
 * gives exactly what a one-row step computes (et_rmsnorm_f32 is this for one row). One pass
 * over each row instead of torch's six operations and their four [rows, n] temporaries. */
void et_rmsnorm_rows(const float *x, int64_t x_stride, const void *w, int w_bf16, void *y,
                     int y_bf16, int64_t rows, int64_t n, float eps) {
    const float *wf = (const float *)w;
    const uint16_t *wb = (const uint16_t *)w;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * x_stride;
        float scale = rms_scale(row, n, eps);
        float *yf = (float *)y + r * n;
        uint16_t *yb = (uint16_t *)y + r * n;
        if (!w_bf16 && !y_bf16) {
            for (int64_t i = 0; i < n; i++) yf[i] = row[i] * scale * wf[i];
        } else if (!y_bf16) {
            for (int64_t i = 0; i < n; i++) yf[i] = row[i] * scale * bf16_value(wb[i]);
        } else if (w_bf16) {
            for (int64_t i = 0; i < n; i++) yb[i] = bf16_bits(row[i] * scale * bf16_value(wb[i]));
        } else {
            for (int64_t i = 0; i < n; i++) yb[i] = bf16_bits(row[i] * scale * wf[i]);
        }
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w over n float32 values (the model's RMSNorm of one row). */
void et_rmsnorm_f32(const float *x, const float *w, float *y, int64_t n, float eps) {
    et_rmsnorm_rows(x, n, w, 0, y, 0, 1, n, eps);
}

/* An element of a float32 (bf16 == 0) or bfloat16 (bf16 == 1) array, as float32. Called with
 * a constant flag from functions the compiler specializes, so each dtype gets its own loops. */
static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_value(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float value, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = bf16_bits(value);
    else
        ((float *)p)[i] = value;
}

/* A bfloat16 value's product with another, rounded to bfloat16 (torch's bfloat16 mul: the
 * float32 product of two bfloat16 values is exact, then one rounding). */
static inline float bf16_mul(float a, float b) { return bf16_value(bf16_bits(a * b)); }

/* Rotate-half RoPE of `heads` bfloat16 vectors of `hd` values in place, as the model's
 * apply_rope computes it in bfloat16 (x * cos + rotate_half(x) * sin, the tables rounded to
 * bfloat16, each product and the sum rounded): x1' = x1 c - x2 s, x2' = x2 c + x1 s. */
static void rope_bf16(uint16_t *x, int64_t heads, int64_t hd, const float *cos,
                      const float *sin) {
    int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        uint16_t *x1 = x + h * hd, *x2 = x1 + half;
        for (int64_t i = 0; i < half; i++) {
            float a = bf16_value(x1[i]), b = bf16_value(x2[i]);
            float c1 = bf16_value(bf16_bits(cos[i])), s1 = bf16_value(bf16_bits(sin[i]));
            float c2 = bf16_value(bf16_bits(cos[half + i]));
            float s2 = bf16_value(bf16_bits(sin[half + i]));
            x1[i] = bf16_bits(bf16_mul(a, c1) + bf16_mul(-b, s1));
            x2[i] = bf16_bits(bf16_mul(b, c2) + bf16_mul(a, s2));
        }
    }
}

/* Attention of one query position over positions 0..seen-1, grouped (query head h reads KV
 * head h / (heads / kv_heads)): softmax(q . keys * scale) . values into out [heads, hd], in
 * float32 whatever the arrays' dtype (bf16: q, the caches and out are bfloat16, out rounded
 * once). `scores` holds `seen` floats. */
static inline void attend_heads(const void *q, const void *k_cache, const void *v_cache,
                                int64_t heads, int64_t kv_heads, int64_t hd, int64_t seen,
                                int64_t capacity, float scale, float *scores, void *out,
                                int bf16) {
    int64_t group = heads / kv_heads;
    float query[hd], o[hd];
    for (int64_t h = 0; h < heads; h++) {
        int64_t kv = (h / group) * capacity * hd; /* the head's KV rows start here */
        float peak = -INFINITY, total = 0.0f;
        for (int64_t i = 0; i < hd; i++) query[i] = load(q, h * hd + i, bf16);
        for (int64_t t = 0; t < seen; t++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < hd; i++) sum += query[i] * load(k_cache, kv + t * hd + i, bf16);
            scores[t] = sum * scale;
            if (scores[t] > peak) peak = scores[t];
        }
        for (int64_t t = 0; t < seen; t++) {
            scores[t] = expf(scores[t] - peak);
            total += scores[t];
        }
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t t = 0; t < seen; t++) {
            float p = scores[t] / total;
            for (int64_t i = 0; i < hd; i++) o[i] += p * load(v_cache, kv + t * hd + i, bf16);
        }
        for (int64_t i = 0; i < hd; i++) store(out, h * hd + i, o[i], bf16);
    }
}

/* k and v [kv_heads, hd] into the caches [kv_heads, capacity, hd] at position `pos`
 * (`size` bytes a value). */
static void cache_write(const void *k, const void *v, void *k_cache, void *v_cache,
                        int64_t kv_heads, int64_t hd, int64_t pos, int64_t capacity,
                        size_t size) {
    for (int64_t g = 0; g < kv_heads; g++) {
        size_t row = (size_t)(g * capacity + pos) * hd * size, own = (size_t)g * hd * size;
        memcpy((char *)k_cache + row, (const char *)k + own, hd * size);
        memcpy((char *)v_cache + row, (const char *)v + own, hd * size);
    }
}

/* One query position's attention, grouped (query head h reads KV head h / (heads / kv_heads)):
 * RoPE on q [heads, hd] and k [kv_heads, hd] in place, k and v [kv_heads, hd] written to the
 * caches [kv_heads, capacity, hd] at position `pos`, then softmax(q . keys * scale) . values
 * over positions 0..pos into out [heads, hd]. `scores` holds pos + 1 floats. */
void et_attend_one_f32(float *q, float *k, const float *v, float *k_cache, float *v_cache,
                       const float *cos, const float *sin, int64_t heads, int64_t kv_heads,
                       int64_t hd, int64_t pos, int64_t capacity, float scale, float *scores,
                       float *out) {
    rope(q, heads, hd, cos, sin);
    rope(k, kv_heads, hd, cos, sin);
    cache_write(k, v, k_cache, v_cache, kv_heads, hd, pos, capacity, sizeof(float));
    attend_heads(q, k_cache, v_cache, heads, kv_heads, hd, pos + 1, capacity, scale, scores,
                 out, 0);
}

/* et_attend_one_f32 in the bfloat16 compute dtype: q, k, v, the caches and out bfloat16 (cos,
 * sin float32 tables); RoPE rounds as the model's bfloat16 apply_rope does, the attention
 * itself runs in float32 and out is rounded once. */
void et_attend_one_bf16(uint16_t *q, uint16_t *k, const uint16_t *v, uint16_t *k_cache,
                        uint16_t *v_cache, const float *cos, const float *sin, int64_t heads,
                        int64_t kv_heads, int64_t hd, int64_t pos, int64_t capacity,
                        float scale, float *scores, uint16_t *out) {
    rope_bf16(q, heads, hd, cos, sin);
    rope_bf16(k, kv_heads, hd, cos, sin);
    cache_write(k, v, k_cache, v_cache, kv_heads, hd, pos, capacity, sizeof(uint16_t));
    attend_heads(q, k_cache, v_cache, heads, kv_heads, hd, pos + 1, capacity, scale, scores,
                 out, 1);
}

void et_dequant_i4_bf16_t(const uint8_t *packed, const uint16_t *scale_zero,
                          int64_t group_stride, uint16_t *out, int64_t rows, int64_t cols,
                          int64_t group, int tiled) {
    int64_t full = tiled ? rows / 64 * 64 : 0;
    float s[64 * 64], z[64 * 64]; /* a group's scales and zeros, float32, 64 blocks at a time */
    for (int64_t first = 0; first < full; first += 64 * 64) {
        int64_t last = first + 64 * 64 < full ? first + 64 * 64 : full;
        for (int64_t c = 0; c < cols; c++) {
            if (c % group == 0) { /* a new group: its rows' (scale, zero) pairs */
                const uint16_t *pairs = scale_zero + (c / group) * group_stride + 2 * first;
                for (int64_t i = 0; i < last - first; i++) {
                    s[i] = bf16_value(pairs[2 * i]);
                    z[i] = bf16_value(pairs[2 * i + 1]);
                }
            }
            for (int64_t block = first; block < last; block += 64)  /* down the column */
                dequant_block_column(packed + block * (cols / 2) + c * 32, s + (block - first),
                                     z + (block - first), out + c * rows + block);
        }
    }
    int64_t tail = rows - full;
    if (tail == 0) return;
    const uint8_t *bytes = packed + full * (cols / 2);
    for (int64_t c = 0; c < cols; c++) {
        const uint16_t *pairs = scale_zero + (c / group) * group_stride;
        for (int64_t r = full; r < rows; r++) {
            uint8_t byte = tiled ? bytes[c * (tail / 2) + (r - full) / 2]
                                 : packed[r * (cols / 2) + c / 2];
            int odd = tiled ? (int)((r - full) & 1) : (int)(c & 1);
            int code = odd ? byte >> 4 : byte & 15;
            out[c * rows + r] = bf16_bits((float)(code - 8) * bf16_value(pairs[2 * r])
                                          + bf16_value(pairs[2 * r + 1]));
        }
    }
}

/* int8 weights in blocks of 32 columns -> bfloat16 [rows, cols], for a prefill chunk's
 * x @ W^T (edgetp.shard.quant.quantize_int8_blocks): value = (code + 128) * scale + low per
 * block, or code * scale where `low` is NULL (symmetric blocks, a GGUF's Q8_0); computed in
 * float32 and rounded once. scale and low: float32 [rows, cols / 32]. torch's elementwise
 * dequantization in bfloat16 took 40-50 ms for a [5632, 2048] weight, ten times the 128-row
 * matmul it feeds. */
void et_dequant_i8_blocks_bf16(const int8_t *restrict codes, const float *restrict scale,
                               const float *restrict low, uint16_t *restrict out, int64_t rows,
                               int64_t cols) {
    int64_t blocks = cols / 32;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            const int8_t *q = codes + r * cols + b * 32;
            uint16_t *o = out + r * cols + b * 32;
            float s = scale[r * blocks + b], z = low ? low[r * blocks + b] : 0.f;
            float offset = low ? 128.f : 0.f, values[32];
            for (int i = 0; i < 32; i++) values[i] = ((float)q[i] + offset) * s + z;
            bf16_run(values, o, 32);
        }
    }
}
