/* A decode step's small float32 operations, each one call instead of a handful of torch ops.
 *
 * One token through a layer is seven matrix-vector products (csrc/matvec.c) and, between them,
 * a norm, RoPE, the KV cache write and attention over the cached positions: small work whose
 * cost in torch is per operation, not per byte (each op a few microseconds of dispatch; 30-40
 * of them a layer, 0.3-0.6 ms a layer on the development machine). Here each is one loop. Every function is deterministic: a row's result depends on that row alone (a decode
 * batch's rows, computed one by one, equal their one-row steps bitwise).
 */
#include <math.h>
#include <string.h>
#include <stdint.h>

/* y = x / sqrt(mean(x^2) + eps) * w over n values (the model's RMSNorm of one row). */
void et_rmsnorm_f32(const float *x, const float *w, float *y, int64_t n, float eps) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    float scale = 1.0f / sqrtf(sum / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
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

static float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
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
    for (int64_t g = 0; g < kv_heads; g++)
        for (int64_t i = 0; i < hd; i++) {
            k_cache[(g * capacity + pos) * hd + i] = k[g * hd + i];
            v_cache[(g * capacity + pos) * hd + i] = v[g * hd + i];
        }
    int64_t group = heads / kv_heads, seen = pos + 1;
    for (int64_t h = 0; h < heads; h++) {
        const float *query = q + h * hd;
        const float *keys = k_cache + (h / group) * capacity * hd;
        const float *values = v_cache + (h / group) * capacity * hd;
        float peak = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < seen; t++) {
            scores[t] = dot(query, keys + t * hd, hd) * scale;
            if (scores[t] > peak) peak = scores[t];
        }
        for (int64_t t = 0; t < seen; t++) {
            scores[t] = expf(scores[t] - peak);
            total += scores[t];
        }
        float *o = out + h * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t t = 0; t < seen; t++) {
            float p = scores[t] / total;
            for (int64_t i = 0; i < hd; i++) o[i] += p * values[t * hd + i];
        }
    }
}

/* float -> bfloat16 bits, rounded to nearest even (as torch's conversion; finite values). */
static inline uint16_t bf16_bits(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* int4 weights of `rows` rows (a multiple of 64 from the tensor's start, or the tensor's
 * tail) -> bfloat16, TRANSPOSED: out [cols, rows], so that x [T, cols] @ out is the product a
 * prefill chunk needs, and the tiled layout's 64-row blocks unpack into contiguous runs.
 * value = (code - 8) * scale + zero, rounded once; scale and zero: float32 [cols / group,
 * rows]. Layouts (edgetp.shard.quant.pack_int4): tiled, each 64-row block as [cols, 32] bytes
 * (low nibble row i, high nibble row 32 + i), rows past the last whole block as [cols,
 * tail / 2] bytes (low nibble row 2p, high 2p + 1); or rows, [rows, cols / 2] bytes (low
 * nibble the even column). */
static void dequant_block_column(const uint8_t *restrict b, const float *restrict s,
                                 const float *restrict z, uint16_t *restrict o) {
    for (int64_t i = 0; i < 32; i++) {
        o[i] = bf16_bits((float)((int)(b[i] & 15) - 8) * s[i] + z[i]);
        o[32 + i] = bf16_bits((float)((int)(b[i] >> 4) - 8) * s[32 + i] + z[32 + i]);
    }
}

void et_dequant_i4_bf16_t(const uint8_t *packed, const float *scale, const float *zero,
                          uint16_t *out, int64_t rows, int64_t cols, int64_t group, int tiled) {
    int64_t full = tiled ? rows / 64 * 64 : 0;
    for (int64_t block = 0; block < full; block += 64) {
        const uint8_t *bytes = packed + block * (cols / 2);  /* [cols, 32] */
        for (int64_t c = 0; c < cols; c++) {
            int64_t at = (c / group) * rows + block;
            dequant_block_column(bytes + c * 32, scale + at, zero + at, out + c * rows + block);
        }
    }
    int64_t tail = rows - full;
    if (tail == 0) return;
    const uint8_t *bytes = packed + full * (cols / 2);
    for (int64_t c = 0; c < cols; c++) {
        const float *s = scale + (c / group) * rows, *z = zero + (c / group) * rows;
        for (int64_t r = full; r < rows; r++) {
            uint8_t byte = tiled ? bytes[c * (tail / 2) + (r - full) / 2]
                                 : packed[r * (cols / 2) + c / 2];
            int odd = tiled ? (int)((r - full) & 1) : (int)(c & 1);
            int code = odd ? byte >> 4 : byte & 15;
            out[c * rows + r] = bf16_bits((float)(code - 8) * s[r] + z[r]);
        }
    }
}
