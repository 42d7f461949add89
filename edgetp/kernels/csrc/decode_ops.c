/* A decode step's small float32 operations, each one call instead of a handful of torch ops.
 *
 * One token through a layer is seven matrix-vector products (csrc/matvec.c) and, between them,
 * a norm, RoPE, the KV cache write and attention over the cached positions: small work whose cost in torch is per operation, not per byte (each op a few microseconds of
 * dispatch; 30-40 of them a layer, 0.3-0.6 ms a layer on the development machine). Here each is
 * one loop. Every function is deterministic: a row's result depends on that row alone (a decode
 * batch's rows, computed one by one, equal their one-row steps bitwise).
 */
#include <math.h>
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
