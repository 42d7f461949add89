/* A persistent thread pool for the decode products (edgetp/kernels/native.py).
 *
 * A product's output rows are cut into chunks, and the chunks shared out among the calling
 * thread and the pool's threads: each chunk is the single-thread kernel of csrc/matvec.c on a
 * sub-range of rows, for every x row of a batched product (int8 and int4 x quantized once, by
 * the caller, for all chunks) (the weight, its scales and y offset to the chunk's first row), so every
 * row's sum is computed by one thread with the very code the one-thread call runs, and the
 * result is bitwise the same for any thread count. Chunks start at multiples of the kernel's
 * row block (SPLIT_*), so that a row falls in the same kind of block (e.g. the twelve-row
 * AVX-512 float32 pass, the four-row one, the single-row tail) as in one call.
 *
 * Threads claim chunks one at a time from a counter (CHUNKS_PER_THREAD per thread), the caller
 * too: a thread the OS has not scheduled yet (a busy machine, other processes on the cores)
 * finds the work done by the others instead of holding the product up. A pool thread spins for
 * SPIN_NS on the job counter after its chunks (decode calls products back to back), then sleeps
 * on a condition variable; the caller likewise spins, then sleeps, until every claimed chunk is
 * done. One product at a time: a caller that finds the pool busy (ranks as threads of one
 * process, in tests) computes its product alone, on its own thread. A forked child starts with
 * no pool threads (they do not survive fork).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* the single-thread kernels' parts (csrc/matvec.c): x [nx, cols] (int8 and int4: quantized
 * once per product by et_quantize_rows) against rows [from, to) -> those rows of y [nx, rows] */
#define ET_MAX_BATCH 8
void et_f32_part(const float *w, const float *x, float *y, int64_t rows, int64_t cols,
                 int64_t nx, int64_t from, int64_t to);
int et_bf16_part(const uint16_t *w, const uint16_t *x, void *y, int64_t rows, int64_t cols,
                 int64_t nx, int f32_out, int64_t from, int64_t to);
const void *et_quantize_rows(const float *x, int64_t nx, int64_t cols, int64_t group, int split);
int et_i8_part(const int8_t *w, const uint16_t *scale, const void *batch, float *y, int64_t rows,
               int64_t cols, int64_t from, int64_t to);
int et_i8b_part(const int8_t *w, const uint16_t *scale, const void *batch, float *y,
                int64_t rows, int64_t cols, int64_t from, int64_t to);
int et_i4_part(const uint8_t *w, const void *scale_zero, int f32, const void *batch, float *y,
               int64_t rows, int64_t cols, int64_t group, int64_t from, int64_t to);

#define MAX_THREADS 256
#define SPIN_NS 100000               /* how long an idle thread spins before it sleeps */
#define MIN_CHUNK_BYTES (64 << 10)   /* less weight than this per chunk is not worth sharing */
#define CHUNKS_PER_THREAD 4
#define MAX_CHUNKS 4096
/* Row blocks: a multiple of every block the kernels' paths take rows in (float32: 12 on
 * AVX-512, 4 elsewhere; bfloat16: 8 and 4; int8: one row at a time; int4: 64-row tiles). */
#define SPLIT_ROWS 48
#define SPLIT_I4 64

enum kind { F32, BF16, BF16_F32, I8, I8_B32, I4_BF16, I4_F32 };

struct product {
    enum kind kind;
    const void *w, *scale, *x; /* x: float32 or bfloat16 rows, or a quantized batch */
    void *y;
    int64_t rows, cols, group, nx;
};

/* The claim word: the job's number (low 32 bits) << 32 | its chunks << 16 | the next chunk. */
#define CLAIM(job, chunks, next) (((uint64_t)(uint32_t)(job) << 32) | ((uint64_t)(chunks) << 16) | (uint64_t)(next))

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    pthread_mutex_t busy;       /* held by the caller of a product for its whole run */
    pthread_t threads[MAX_THREADS];
    int n_threads;              /* pool threads (the caller is one more) */
    _Atomic uint64_t job;       /* incremented for each product (and to stop the threads) */
    uint64_t first_job;         /* the job counter when the threads were made */
    _Atomic uint64_t claim;     /* see CLAIM */
    _Atomic int finished;       /* chunks of the current job done */
    _Atomic int64_t splits;     /* products shared out so far */
    _Atomic int sleepers;       /* pool threads asleep on ``wake`` */
    _Atomic int caller_asleep;
    _Atomic int stopping;
    int64_t bounds[MAX_CHUNKS + 1];
    struct product product;
    _Atomic int status;         /* the first nonzero status of a chunk */
};

static struct pool pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
    .done = PTHREAD_COND_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER,
};
static pthread_mutex_t resize_lock = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* One part: the kernel on rows [from, to), for every x row. */
static int run_part(const struct product *p, int64_t from, int64_t to) {
    switch (p->kind) {
    case F32:
        et_f32_part(p->w, p->x, p->y, p->rows, p->cols, p->nx, from, to);
        return 0;
    case BF16:
    case BF16_F32:
        return et_bf16_part(p->w, p->x, p->y, p->rows, p->cols, p->nx, p->kind == BF16_F32, from,
                            to);
    case I8:
        return et_i8_part(p->w, p->scale, p->x, p->y, p->rows, p->cols, from, to);
    case I8_B32:
        return et_i8b_part(p->w, p->scale, p->x, p->y, p->rows, p->cols, from, to);
    case I4_BF16:
    case I4_F32:
        return et_i4_part(p->w, p->scale, p->kind == I4_F32, p->x, p->y, p->rows, p->cols,
                          p->group, from, to);
    }
    return -3;
}

static void record(int status) {
    int ok = 0;
    if (status != 0) atomic_compare_exchange_strong(&pool.status, &ok, status);
}

/* Claims and computes chunks of job ``job`` until none is left (or the job is over). */
static void work(uint64_t job) {
    for (;;) {
        uint64_t claim = atomic_load(&pool.claim);
        uint64_t chunks = (claim >> 16) & 0xffff, next = claim & 0xffff;
        if ((claim >> 32) != (uint32_t)job || next >= chunks) return;
        if (!atomic_compare_exchange_weak(&pool.claim, &claim, claim + 1)) continue;
        /* ours: the job cannot end (nor its description change) before this chunk is done */
        record(run_part(&pool.product, pool.bounds[next], pool.bounds[next + 1]));
        if (atomic_fetch_add(&pool.finished, 1) + 1 == (int)chunks
                && atomic_load(&pool.caller_asleep)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

/* Waits until ``job`` moves on from ``seen``: spins, then sleeps. */
static uint64_t next_job(uint64_t seen) {
    int64_t until = now_ns() + SPIN_NS;
    for (int i = 1;; i++) {
        uint64_t job = atomic_load(&pool.job);
        if (job != seen) return job;
        if (i % 64 == 0 && now_ns() > until) break;
        CPU_RELAX();
    }
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add(&pool.sleepers, 1);
    while (atomic_load(&pool.job) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.lock);
    return atomic_load(&pool.job);
}

static void *pool_thread(void *arg) {
    (void)arg;
    uint64_t seen = pool.first_job; /* not the counter now: a job may be out already */
    for (;;) {
        seen = next_job(seen);
        if (atomic_load(&pool.stopping)) return NULL;
        work(seen);
    }
}

static void wait_for_chunks(int chunks) {
    int64_t until = now_ns() + SPIN_NS;
    for (int i = 1; atomic_load(&pool.finished) < chunks; i++) {
        if (i % 64 == 0 && now_ns() > until) {
            pthread_mutex_lock(&pool.lock);
            atomic_store(&pool.caller_asleep, 1);
            while (atomic_load(&pool.finished) < chunks) pthread_cond_wait(&pool.done, &pool.lock);
            atomic_store(&pool.caller_asleep, 0);
            pthread_mutex_unlock(&pool.lock);
            return;
        }
        CPU_RELAX();
    }
}

static void stop_threads(void) {
    if (pool.n_threads == 0) return;
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.stopping, 1);
    atomic_fetch_add(&pool.job, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 0; i < pool.n_threads; i++) pthread_join(pool.threads[i], NULL);
    pool.n_threads = 0;
    atomic_store(&pool.stopping, 0);
}

static void forget_threads_after_fork(void) {
    /* the child has only the forking thread: no pool threads, fresh locks */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    pool.lock = fresh;
    pool.busy = fresh;
    resize_lock = fresh;
    pool.wake = fresh_cond;
    pool.done = fresh_cond;
    pool.n_threads = 0;
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.caller_asleep, 0);
}

static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, forget_threads_after_fork);
}

/* Threads a product runs on from now on (the caller included), 1..MAX_THREADS + 1. Returns the
 * number in force: fewer when the system refuses threads. */
int et_pool_set_threads(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    int wanted = threads < 1 ? 0 : (threads > MAX_THREADS + 1 ? MAX_THREADS : threads - 1);
    pthread_mutex_lock(&resize_lock);
    pthread_mutex_lock(&pool.busy);
    if (wanted != pool.n_threads) {
        stop_threads();
        pool.first_job = atomic_load(&pool.job);
        for (int i = 0; i < wanted; i++) {
            if (pthread_create(&pool.threads[i], NULL, pool_thread, NULL)) break;
            pool.n_threads = i + 1;
        }
    }
    int in_force = pool.n_threads + 1;
    pthread_mutex_unlock(&pool.busy);
    pthread_mutex_unlock(&resize_lock);
    return in_force;
}

int et_pool_threads(void) { return pool.n_threads + 1; }

/* Products the pool has shared out so far. */
int64_t et_pool_jobs(void) { return atomic_load(&pool.splits); }

/* The chunk boundaries of ``rows`` cut ``chunks`` ways at multiples of ``block``; returns the
 * number of chunks (fewer when rows are few). */
static int split(int64_t rows, int64_t block, int chunks, int64_t *bounds) {
    int64_t blocks = rows / block;
    if (blocks < chunks) chunks = blocks > 0 ? (int)blocks : 1;
    bounds[0] = 0;
    for (int i = 1; i < chunks; i++) bounds[i] = blocks * i / chunks * block;
    bounds[chunks] = rows;
    return chunks;
}

static int run(struct product p, int64_t weight_bytes) {
    int64_t block = p.kind == I4_BF16 || p.kind == I4_F32 ? SPLIT_I4 : SPLIT_ROWS;
    int64_t most = weight_bytes / MIN_CHUNK_BYTES; /* chunks worth sharing */
    if (most < 2 || pthread_mutex_trylock(&pool.busy) != 0)
        return run_part(&p, 0, p.rows); /* small, or the pool is taken */
    int64_t wanted = (int64_t)(pool.n_threads + 1) * CHUNKS_PER_THREAD;
    wanted = wanted < most ? wanted : most;
    int chunks = pool.n_threads == 0 ? 1
                 : split(p.rows, block, (int)(wanted < MAX_CHUNKS ? wanted : MAX_CHUNKS),
                         pool.bounds);
    if (chunks < 2) { /* one thread only, or too few rows */
        pthread_mutex_unlock(&pool.busy);
        return run_part(&p, 0, p.rows);
    }
    pool.product = p;
    atomic_fetch_add(&pool.splits, 1);
    atomic_store(&pool.status, 0);
    atomic_store(&pool.finished, 0);
    uint64_t job = atomic_load(&pool.job) + 1;
    atomic_store(&pool.claim, CLAIM(job, chunks, 0)); /* before the threads can see the job */
    atomic_store(&pool.job, job); /* seq_cst: a thread going to sleep sees it or is woken */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    work(job);
    wait_for_chunks(chunks);
    int status = atomic_load(&pool.status);
    pthread_mutex_unlock(&pool.busy);
    return status;
}

static int bad_nx(int64_t nx) { return nx < 1 || nx > ET_MAX_BATCH; }

/* The batched products (csrc/matvec.c's et_matvec_*_rows) over the pool: x [nx, cols],
 * 1 <= nx <= ET_MAX_BATCH, -> y [nx, rows]; the int8 and int4 ones quantize x once, on the
 * calling thread, for every part. The one-row et_par_* are their nx = 1 case. */
int et_par_matvec_f32_rows(const float *w, const float *x, float *y, int64_t rows, int64_t cols,
                           int64_t nx) {
    if (bad_nx(nx)) return -3;
    struct product p = {F32, w, NULL, x, y, rows, cols, 0, nx};
    return run(p, rows * cols * 4 * nx);
}

void et_par_matvec_f32(const float *w, const float *x, float *y, int64_t rows, int64_t cols) {
    et_par_matvec_f32_rows(w, x, y, rows, cols, 1);
}

static int par_bf16(const uint16_t *w, const uint16_t *x, void *y, int64_t rows, int64_t cols,
                    int64_t nx, enum kind kind) {
    if (bad_nx(nx)) return -3;
    struct product p = {kind, w, NULL, x, y, rows, cols, 0, nx};
    return run(p, rows * cols * 2 * nx);
}

int et_par_matvec_bf16_rows(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows,
                            int64_t cols, int64_t nx) {
    return par_bf16(w, x, y, rows, cols, nx, BF16);
}

int et_par_matvec_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows,
                       int64_t cols) {
    return par_bf16(w, x, y, rows, cols, 1, BF16);
}

int et_par_matvec_bf16_f32_rows(const uint16_t *w, const uint16_t *x, float *y, int64_t rows,
                                int64_t cols, int64_t nx) {
    return par_bf16(w, x, y, rows, cols, nx, BF16_F32);
}

int et_par_matvec_bf16_f32(const uint16_t *w, const uint16_t *x, float *y, int64_t rows,
                           int64_t cols) {
    return par_bf16(w, x, y, rows, cols, 1, BF16_F32);
}

static int par_i8(const int8_t *w, const uint16_t *scale, const float *x, float *y,
                  int64_t rows, int64_t cols, int64_t nx, enum kind kind) {
    if (bad_nx(nx) || (kind == I8_B32 && cols % 32)) return -3;
    const void *batch = et_quantize_rows(x, nx, cols, 0, 1);
    if (batch == NULL) return -1;
    struct product p = {kind, w, scale, batch, y, rows, cols, 0, nx};
    return run(p, rows * cols * nx);
}

int et_par_matvec_i8_rows(const int8_t *w, const uint16_t *scale, const float *x, float *y,
                          int64_t rows, int64_t cols, int64_t nx) {
    return par_i8(w, scale, x, y, rows, cols, nx, I8);
}

int et_par_matvec_i8(const int8_t *w, const uint16_t *scale, const float *x, float *y,
                     int64_t rows, int64_t cols) {
    return par_i8(w, scale, x, y, rows, cols, 1, I8);
}

int et_par_matvec_i8_b32_rows(const int8_t *w, const uint16_t *scale, const float *x, float *y,
                              int64_t rows, int64_t cols, int64_t nx) {
    return par_i8(w, scale, x, y, rows, cols, nx, I8_B32);
}

int et_par_matvec_i8_b32(const int8_t *w, const uint16_t *scale, const float *x, float *y,
                         int64_t rows, int64_t cols) {
    return par_i8(w, scale, x, y, rows, cols, 1, I8_B32);
}

static int par_i4(const uint8_t *w, const void *scale_zero, const float *x, float *y,
                  int64_t rows, int64_t cols, int64_t group, int64_t nx, enum kind kind) {
    if (bad_nx(nx) || rows % 16 || group % 32 || group <= 0 || cols % group) return -3;
    const void *batch = et_quantize_rows(x, nx, cols, group, 0);
    if (batch == NULL) return -1;
    struct product p = {kind, w, scale_zero, batch, y, rows, cols, group, nx};
    return run(p, rows * cols / 2 * nx);
}

int et_par_matvec_i4_rows(const uint8_t *w, const uint16_t *scale_zero, const float *x,
                          float *y, int64_t rows, int64_t cols, int64_t group, int64_t nx) {
    return par_i4(w, scale_zero, x, y, rows, cols, group, nx, I4_BF16);
}

int et_par_matvec_i4(const uint8_t *w, const uint16_t *scale_zero, const float *x, float *y,
                     int64_t rows, int64_t cols, int64_t group) {
    return par_i4(w, scale_zero, x, y, rows, cols, group, 1, I4_BF16);
}

int et_par_matvec_i4_f32_rows(const uint8_t *w, const float *scale_zero, const float *x,
                              float *y, int64_t rows, int64_t cols, int64_t group, int64_t nx) {
    return par_i4(w, scale_zero, x, y, rows, cols, group, nx, I4_F32);
}

int et_par_matvec_i4_f32(const uint8_t *w, const float *scale_zero, const float *x, float *y,
                         int64_t rows, int64_t cols, int64_t group) {
    return par_i4(w, scale_zero, x, y, rows, cols, group, 1, I4_F32);
}
