/* The decode kernels' test harness: runs every case file named on the command line against
 * edgetp/kernels/csrc/matvec.c as built for one target, and checks each output element
 * against the reference and tolerance Python wrote (tests/kernels/kernel_cases.py).
 *
 * Built and run by tests/kernels/run_harness.py (make test-kernels), which writes the cases and
 * kernel_table.h (one KERNEL(name, kind, path word) line per exported product). Inputs are
 * placed 4 bytes past an allocation's start (no kernel may assume aligned arrays), and the
 * output is followed by guard bytes no kernel may touch. A product this build leaves to torch
 * (its word in et_kernel_paths() is ":torch", the call returns -3) is reported as skipped.
 * Exit status: 0 when every case passes or is skipped, 1 otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "matvec.c" /* the kernels themselves, built with the target's flags (-I their csrc) */

#define NAME_BYTES 64
#define GUARD 64
#define MAX_INPUTS 4
#define MAX_INTS 4
#define NOT_BUILT -3

struct call {
    void *in[MAX_INPUTS];
    void *out;
    int64_t ints[MAX_INTS];
};

/* One thunk per call shape, calling the kernel through its own prototype. */
#define KIND_WXY_VOID(fn) { fn(c->in[0], c->in[1], c->out, c->ints[0], c->ints[1]); return 0; }
#define KIND_WXY(fn) { return fn(c->in[0], c->in[1], c->out, c->ints[0], c->ints[1]); }
#define KIND_WSXY(fn) { return fn(c->in[0], c->in[1], c->in[2], c->out, c->ints[0], c->ints[1]); }
#define KIND_WSXY_GROUP(fn) \
    { return fn(c->in[0], c->in[1], c->in[2], c->out, c->ints[0], c->ints[1], c->ints[2]); }
/* the batched products: the one-row arguments and nx (x [nx, cols], y [nx, rows]) */
#define KIND_WXY_N(fn) { return fn(c->in[0], c->in[1], c->out, c->ints[0], c->ints[1], c->ints[2]); }
#define KIND_WSXY_N(fn) \
    { return fn(c->in[0], c->in[1], c->in[2], c->out, c->ints[0], c->ints[1], c->ints[2]); }
#define KIND_WSXY_GROUP_N(fn) \
    { return fn(c->in[0], c->in[1], c->in[2], c->out, c->ints[0], c->ints[1], c->ints[2], \
                c->ints[3]); }

#define KERNEL(fn, kind, word) \
    static int call_##fn(const struct call *c) KIND_##kind(fn)
#include "kernel_table.h"
#undef KERNEL

struct kernel {
    const char *name, *word;
    int (*call)(const struct call *);
};

static const struct kernel KERNELS[] = {
#define KERNEL(fn, kind, word) {#fn, word, call_##fn},
#include "kernel_table.h"
#undef KERNEL
};

struct test_case {
    char kernel[NAME_BYTES], label[NAME_BYTES];
    int64_t n_inputs, n_ints, status, out_kind, n_out;
    int64_t ints[MAX_INTS];
    int64_t input_bytes[MAX_INPUTS];
    unsigned char *inputs[MAX_INPUTS]; /* each allocation; the data start 4 bytes in */
    double *expected, *tolerance;
};

static int read_exact(FILE *file, void *into, size_t n) { return fread(into, 1, n, file) == n; }

static int read_case(const char *path, struct test_case *t) {
    FILE *file = fopen(path, "rb");
    char magic[8];
    int ok = file != NULL && read_exact(file, magic, 8) && memcmp(magic, "ETKCASE1", 8) == 0
             && read_exact(file, t->kernel, NAME_BYTES) && read_exact(file, t->label, NAME_BYTES)
             && read_exact(file, &t->n_inputs, 5 * sizeof(int64_t))
             && t->n_inputs <= MAX_INPUTS && t->n_ints <= MAX_INTS
             && read_exact(file, t->ints, (size_t)t->n_ints * sizeof(int64_t));
    for (int64_t i = 0; ok && i < t->n_inputs; i++) {
        int64_t nbytes;
        ok = read_exact(file, &nbytes, sizeof nbytes) && (t->inputs[i] = malloc(nbytes + 4))
             && (t->input_bytes[i] = nbytes) >= 0
             && read_exact(file, t->inputs[i] + 4, (size_t)nbytes);
    }
    size_t doubles = (size_t)t->n_out * sizeof(double);
    ok = ok && (t->expected = malloc(doubles)) && (t->tolerance = malloc(doubles))
         && read_exact(file, t->expected, doubles) && read_exact(file, t->tolerance, doubles);
    if (file) fclose(file);
    return ok;
}

static double output_value(const void *out, int64_t kind, int64_t i) {
    if (kind == 1) { /* bfloat16 */
        uint32_t bits = (uint32_t)((const uint16_t *)out)[i] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return ((const float *)out)[i];
}

static int word_is_torch(const char *word) {
    char wanted[NAME_BYTES + 8];
    snprintf(wanted, sizeof wanted, "%s:torch", word);
    const char *paths = et_kernel_paths(), *at = strstr(paths, wanted);
    return at != NULL && (at == paths || at[-1] == ' ');
}

static const struct kernel *kernel_named(const char *name);

/* A batched product (name ending in "_rows"; x its last input, nx its last integer): each of
 * its output rows must be bitwise what the one-row product (the name without "_rows") gives
 * for that x row alone. Returns 1 when they are, 0 otherwise. */
static int rows_match_one_row(const struct kernel *k, const struct test_case *t,
                              const unsigned char *out, size_t out_size) {
    char one_name[NAME_BYTES];
    size_t n = strlen(k->name);
    if (n < 6 || strcmp(k->name + n - 5, "_rows") != 0) return 1; /* not a batched product */
    snprintf(one_name, sizeof one_name, "%.*s", (int)(n - 5), k->name);
    const struct kernel *one = kernel_named(one_name);
    int64_t nx = t->ints[t->n_ints - 1], rows = t->ints[0], cols = t->ints[1];
    int64_t xi = t->n_inputs - 1, x_size = t->input_bytes[xi] / (nx * cols);
    if (one == NULL) {
        printf("  FAIL %s [%s]: no one-row kernel %s\n", k->name, t->label, one_name);
        return 0;
    }
    unsigned char *y = malloc((size_t)rows * out_size + 1);
    int same = 1;
    for (int64_t r = 0; same && r < nx; r++) {
        struct call c = {{0}, y, {0}};
        for (int64_t i = 0; i < t->n_inputs; i++) c.in[i] = t->inputs[i] + 4;
        c.in[xi] = t->inputs[xi] + 4 + r * cols * x_size;
        memcpy(c.ints, t->ints, sizeof c.ints);
        c.ints[t->n_ints - 1] = 0;
        same = one->call(&c) == 0
               && memcmp(y, out + (size_t)(r * rows) * out_size, (size_t)rows * out_size) == 0;
        if (!same)
            printf("  FAIL %s [%s]: row %lld is not bitwise %s of that row\n", k->name,
                   t->label, (long long)r, one_name);
    }
    free(y);
    return same;
}

/* Runs one case: 1 passed, 0 failed, -1 skipped (left to torch by this build). */
static int run_case(const struct kernel *k, struct test_case *t, double *worst) {
    size_t out_bytes = (size_t)t->n_out * (t->out_kind == 1 ? 2 : 4);
    unsigned char *out = malloc(out_bytes + GUARD);
    memset(out, 0xa5, out_bytes + GUARD);
    struct call c = {{0}, out, {0}};
    for (int64_t i = 0; i < t->n_inputs; i++) c.in[i] = t->inputs[i] + 4;
    memcpy(c.ints, t->ints, sizeof c.ints);
    int status = k->call(&c), passed = 1;
    for (int g = 0; g < GUARD; g++) passed &= out[out_bytes + g] == 0xa5;
    if (!passed) printf("  FAIL %s [%s]: wrote past its output\n", k->name, t->label);
    if (status == NOT_BUILT && t->status == 0 && word_is_torch(k->word)) {
        free(out);
        return -1;
    }
    if (status != t->status) {
        printf("  FAIL %s [%s]: status %d, expected %d\n", k->name, t->label, status,
               (int)t->status);
        passed = 0;
    }
    for (int64_t i = 0; passed && status == 0 && i < t->n_out; i++) {
        double y = output_value(out, t->out_kind, i), want = t->expected[i];
        double error = fabs(y - want), allowed = t->tolerance[i];
        int good = isnan(want) ? isnan(y) : error <= allowed;
        if (!good) {
            printf("  FAIL %s [%s]: y[%lld] = %.9g, expected %.9g (+- %.3g)\n", k->name,
                   t->label, (long long)i, y, want, allowed);
            passed = 0;
        } else if (allowed > 0 && error / allowed > *worst) {
            *worst = error / allowed;
        }
    }
    if (passed && status == 0) passed = rows_match_one_row(k, t, out, t->out_kind == 1 ? 2 : 4);
    free(out);
    return passed;
}

static const struct kernel *kernel_named(const char *name) {
    for (size_t k = 0; k < sizeof KERNELS / sizeof KERNELS[0]; k++)
        if (strcmp(KERNELS[k].name, name) == 0) return &KERNELS[k];
    return NULL;
}

int main(int argc, char **argv) {
    size_t n_kernels = sizeof KERNELS / sizeof KERNELS[0];
    int counts[sizeof KERNELS / sizeof KERNELS[0]][3] = {{0}}; /* passed, failed, skipped */
    double worst[sizeof KERNELS / sizeof KERNELS[0]] = {0};
    int failed = 0;
    printf("paths: %s\n", et_kernel_paths());
    for (int a = 1; a < argc; a++) {
        struct test_case t = {0};
        if (!read_case(argv[a], &t)) {
            printf("  FAIL %s: unreadable case file\n", argv[a]);
            failed = 1;
            continue;
        }
        size_t k = 0;
        while (k < n_kernels && strcmp(KERNELS[k].name, t.kernel) != 0) k++;
        if (k == n_kernels) {
            printf("  FAIL %s: kernel %s is not in the table\n", argv[a], t.kernel);
            failed = 1;
        } else {
            int result = run_case(&KERNELS[k], &t, &worst[k]);
            counts[k][result == 1 ? 0 : result == 0 ? 1 : 2]++;
            failed |= result == 0;
        }
        for (int64_t i = 0; i < t.n_inputs; i++) free(t.inputs[i]);
        free(t.expected);
        free(t.tolerance);
    }
    for (size_t k = 0; k < n_kernels; k++)
        printf("%-20s %3d passed %3d failed %3d skipped (left to torch)  worst error %.3f of "
               "its tolerance\n", KERNELS[k].name, counts[k][0], counts[k][1], counts[k][2],
               worst[k]);
    return failed;
}
