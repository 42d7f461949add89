/* A decode step's layer half in one call: a short program of operations.
 *
 * Between the allreduces a layer's one-token step is a fixed sequence: the attention half is
 * norm, the q, k and v products, RoPE + cache write + attention, the o product; the MLP half
 * is norm, the gate and up products, the activation, the down product. Called op by op from
 * Python each costs its checks and its call (tens of microseconds a layer, and about twice as
 * much with another node streaming weights through the same caches). Here the Python side
 * describes each half once, as an array of et_step_op whose pointers are kept buffers and
 * weights, and runs it with one call per step (edgetp/kernels/step.py). Every operation is the
 * very function the op-by-op path calls (same products, same norm, same attention; the bias
 * and residual additions are plain float adds, torch.add's bits), so a program's results are
 * bitwise the op-by-op ones.
 */
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include "bf16.h"

/* csrc/pool.c, csrc/matvec.c and csrc/decode_ops.c */
int et_par_matvec_f32_rows(const float *w, const float *x, float *y, int64_t rows, int64_t cols,
                           int64_t nx);
int et_par_matvec_i8_rows(const int8_t *w, const uint16_t *scale, const float *x, float *y,
                          int64_t rows, int64_t cols, int64_t nx);
int et_par_matvec_i8_b32_rows(const int8_t *w, const uint16_t *scale, const float *x, float *y,
                              int64_t rows, int64_t cols, int64_t nx);
int et_add_block_lows_rows(const uint16_t *scale, const uint16_t *low, const float *x, float *y,
                           int64_t rows, int64_t nb, int64_t nx);
int et_par_matvec_i4_rows(const uint8_t *w, const uint16_t *scale_zero, const float *x,
                          float *y, int64_t rows, int64_t cols, int64_t group, int64_t nx);
int et_par_matvec_i4_f32_rows(const uint8_t *w, const float *scale_zero, const float *x,
                              float *y, int64_t rows, int64_t cols, int64_t group, int64_t nx);
int et_par_matvec_bf16_rows(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows,
                            int64_t cols, int64_t nx);
void et_rmsnorm_rows(const float *x, int64_t x_stride, const void *w, int w_bf16, void *y,
                     int y_bf16, int64_t rows, int64_t n, float eps);
void et_attend_one_f32(float *q, float *k, const float *v, float *k_cache, float *v_cache,
                       const float *cos, const float *sin, int64_t heads, int64_t kv_heads,
                       int64_t hd, int64_t pos, int64_t capacity, float scale, float *scores,
                       float *out);
void et_attend_one_bf16(uint16_t *q, uint16_t *k, const uint16_t *v, uint16_t *k_cache,
                        uint16_t *v_cache, const float *cos, const float *sin, int64_t heads,
                        int64_t kv_heads, int64_t hd, int64_t pos, int64_t capacity,
                        float scale, float *scores, uint16_t *out);

enum step_code { STEP_NORM = 1, STEP_PRODUCT = 2, STEP_ATTEND = 3, STEP_SILU_MUL = 4, STEP_ADD = 5 };
/* a product's weight format: edgetp/kernels/step.py's ProductKind */
enum step_kind { W_F32 = 0, W_I8 = 1, W_I8_B32 = 2, W_I8_LOWS = 3, W_I4_BF16 = 4, W_I4_F32 = 5,
                 W_BF16 = 6 };
/* the kind of a NORM, ATTEND, SILU_MUL or ADD over bfloat16 arrays (step.py's BF16_KIND) */
#define BF16_KIND 1

#define STEP_POINTERS 9
#define STEP_SIZES 6

/* One operation. A NULL first pointer is the run's input row (read in the op's input dtype:
 * a layer's programs start with a norm or an addition, whose x is float32); an ADD's NULL
 * second pointer its second input. Every array is float32, or bfloat16 where the kind says so
 * (the bfloat16 compute dtype: BF16_KIND, or a product's W_BF16). Fields by code:
 *   NORM      p0 x [n0] (float32), p1 weight [n0], p2 y [n0]; f eps; BF16_KIND: weight and y
 *             bfloat16
 *   PRODUCT   p0 x [n1], p1 weight, p2 scale (or scale_zero), p3 low, p4 y [n0], p5 bias or
 *             NULL; n0 rows, n1 cols, n2 group; kind the weight's format (W_BF16: x, y and
 *             bias bfloat16, every other float32)
 *   ATTEND    p0 q [n0 * n2], p1 k [n1 * n2], p2 v, p3 scores [n3] (float32), p4 out
 *             [n0 * n2]; n0 heads, n1 kv heads, n2 head dim, n3 cache capacity, n4 positions
 *             it takes (the run is refused beyond); f scale. The caches, cos and sin (float32)
 *             come with the run. BF16_KIND: q, k, v, out and the caches bfloat16
 *   SILU_MUL  p0 gate [n0] (overwritten with silu(gate) * up), p1 up [n0]; BF16_KIND: bfloat16
 *   ADD       p0 a [n0], p1 b [n0], p2 y [n0]: y = a + b; BF16_KIND: b bfloat16 (a, y float32) */
typedef struct {
    int64_t code;
    int64_t kind;
    void *p[STEP_POINTERS];
    int64_t n[STEP_SIZES];
    double f;
} et_step_op;

/* A loop the compiler must not vectorize: GCC takes a function attribute, clang a loop pragma
 * (it ignores GCC's attribute, with a warning). */
#if defined(__clang__)
#define SCALAR_FUNCTION
#define SCALAR_LOOP _Pragma("clang loop vectorize(disable) interleave(disable)")
#elif defined(__GNUC__)
#define SCALAR_FUNCTION __attribute__((optimize("no-tree-vectorize")))
#define SCALAR_LOOP
#else
#define SCALAR_FUNCTION
#define SCALAR_LOOP
#endif

/* gate[i] = silu(gate[i]) * up[i], each element by the same scalar code (so a value's result
 * never depends on where it sits in the row: a decode batch's rows equal their one-row steps). */
SCALAR_FUNCTION
void et_silu_mul_f32(float *gate, const float *up, int64_t n) {
    SCALAR_LOOP
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* y = a + b over n floats (torch.add's bits: one rounding per element). */
void et_add_f32(const float *a, const float *b, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

/* et_silu_mul_f32 over bfloat16 values, rounded as torch's bfloat16 ops round: silu in
 * float32, rounded; the product rounded. */
SCALAR_FUNCTION
void et_silu_mul_bf16(uint16_t *gate, const uint16_t *up, int64_t n) {
    SCALAR_LOOP
    for (int64_t i = 0; i < n; i++) {
        float g = bf16_value(gate[i]);
        float silu = bf16_value(bf16_bits(g / (1.0f + expf(-g))));
        gate[i] = bf16_bits(silu * bf16_value(up[i]));
    }
}

/* y = a + b over n values, a and y float32, b bfloat16 (torch.add's bits for a float32 and a
 * bfloat16 tensor: one float32 rounding). */
void et_add_f32_bf16(const float *a, const uint16_t *b, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = a[i] + bf16_value(b[i]);
}

/* A bfloat16 product (x, y and the bias bfloat16): the bias added as torch adds two bfloat16
 * tensors (in float32, rounded). */
static int bf16_product(const et_step_op *op, const uint16_t *x) {
    uint16_t *y = op->p[4];
    const uint16_t *bias = op->p[5];
    int64_t rows = op->n[0];
    int status = et_par_matvec_bf16_rows(op->p[1], x, y, rows, op->n[1], 1);
    if (status == 0 && bias != NULL)
        for (int64_t i = 0; i < rows; i++) y[i] = bf16_bits(bf16_value(y[i]) + bf16_value(bias[i]));
    return status;
}

static int product(const et_step_op *op, const void *x) {
    const void *w = op->p[1], *scale = op->p[2];
    float *y = op->p[4];
    int64_t rows = op->n[0], cols = op->n[1], group = op->n[2];
    int status;
    switch (op->kind) {
    case W_F32: status = et_par_matvec_f32_rows(w, x, y, rows, cols, 1); break;
    case W_I8: status = et_par_matvec_i8_rows(w, scale, x, y, rows, cols, 1); break;
    case W_I8_B32: status = et_par_matvec_i8_b32_rows(w, scale, x, y, rows, cols, 1); break;
    case W_I8_LOWS:
        status = et_par_matvec_i8_b32_rows(w, scale, x, y, rows, cols, 1);
        if (status == 0) status = et_add_block_lows_rows(scale, op->p[3], x, y, rows, cols / 32, 1);
        break;
    case W_I4_BF16: status = et_par_matvec_i4_rows(w, scale, x, y, rows, cols, group, 1); break;
    case W_I4_F32: status = et_par_matvec_i4_f32_rows(w, scale, x, y, rows, cols, group, 1); break;
    case W_BF16: return bf16_product(op, (const uint16_t *)x);
    default: return -3;
    }
    const float *bias = op->p[5];
    if (status == 0 && bias != NULL)
        for (int64_t i = 0; i < rows; i++) y[i] = y[i] + bias[i];
    return status;
}

static void attend(const et_step_op *op, int64_t position, void *k_cache, void *v_cache,
                   const float *cos, const float *sin) {
    if (op->kind == BF16_KIND)
        et_attend_one_bf16(op->p[0], op->p[1], op->p[2], k_cache, v_cache, cos, sin, op->n[0],
                           op->n[1], op->n[2], position, op->n[3], (float)op->f, op->p[3],
                           op->p[4]);
    else
        et_attend_one_f32(op->p[0], op->p[1], op->p[2], k_cache, v_cache, cos, sin, op->n[0],
                          op->n[1], op->n[2], position, op->n[3], (float)op->f, op->p[3],
                          op->p[4]);
}

static int run_op(const et_step_op *op, const float *input, const void *second,
                  int64_t position, void *k_cache, void *v_cache, const float *cos,
                  const float *sin) {
    const void *x = op->p[0] != NULL ? op->p[0] : input;
    const void *b = op->p[1] != NULL ? op->p[1] : second;
    switch (op->code) {
    case STEP_ADD:
        if (op->kind == BF16_KIND)
            et_add_f32_bf16(x, b, op->p[2], op->n[0]);
        else
            et_add_f32(x, b, op->p[2], op->n[0]);
        return 0;
    case STEP_NORM:
        et_rmsnorm_rows(x, op->n[0], op->p[1], op->kind == BF16_KIND, op->p[2],
                        op->kind == BF16_KIND, 1, op->n[0], (float)op->f);
        return 0;
    case STEP_PRODUCT:
        return product(op, x);
    case STEP_ATTEND:
        attend(op, position, k_cache, v_cache, cos, sin);
        return 0;
    case STEP_SILU_MUL:
        if (op->kind == BF16_KIND)
            et_silu_mul_bf16(op->p[0], op->p[1], op->n[0]);
        else
            et_silu_mul_f32(op->p[0], op->p[1], op->n[0]);
        return 0;
    default:
        return -3;
    }
}

/* Run `count` ops on the input rows `input` and `second` at `position` (an attention op's
 * caches, cos and sin rows given here: they change with the sequence and the position).
 * Returns 0; -1 with nothing done when an attention op does not take `position` or an input
 * an op reads was not given (NULL); i + 1 when
 * op i failed (a product without memory for its quantized input): the caller computes the half
 * its usual way, which writes everything this run wrote. */
int64_t et_step_run(const et_step_op *ops, int64_t count, const float *input,
                    const void *second, int64_t position, void *k_cache, void *v_cache,
                    const float *cos, const float *sin) {
    for (int64_t i = 0; i < count; i++) {
        const et_step_op *op = &ops[i];
        if ((op->p[0] == NULL && input == NULL)
            || (op->code == STEP_ADD && op->p[1] == NULL && second == NULL))
            return -1; /* an input the run did not give */
        if (op->code == STEP_ATTEND
            && (position < 0 || position >= op->n[4] || k_cache == NULL || v_cache == NULL
                || cos == NULL || sin == NULL))
            return -1;
    }
    for (int64_t i = 0; i < count; i++)
        if (run_op(&ops[i], input, second, position, k_cache, v_cache, cos, sin) != 0)
            return i + 1;
    return 0;
}
