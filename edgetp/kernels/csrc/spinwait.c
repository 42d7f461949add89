/* Waiting for a peer's message without giving up the core: spin, then block.
 *
 * A decode token makes two allreduces per layer; each one ends with a node waiting for bytes
 * that usually arrive within tens or hundreds of microseconds. Blocking in poll(2) then costs
 * a sleep and a wake-up (the scheduler, on a VM the hypervisor too): 100-200 us per round trip
 * on the development machine, against ~50 us when both ends watch their sockets
 * (benchmarks/allreduce.py). So a wait first checks the sockets without blocking, with a
 * pause between checks (the x86 `pause`, ARM's `yield`: a spinning core leaves the memory bus
 * and a hyperthread sibling alone), for at most `spin_ns`; only then does it sleep in poll(2).
 * Called through ctypes, which drops the GIL for the call.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <time.h>

#define SPIN_FDS_MAX 64    /* sockets one wait watches (a star's master: one per worker) */
#define PAUSES_PER_CHECK 64 /* pause instructions between two non-blocking checks */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Which of `fds[0..n)` is readable first: spins up to `spin_ns`, then blocks in poll(2) up to
 * `timeout_ms` more (0: not at all). Returns the first readable fd's index (a hang-up or an
 * error counts as readable: the caller's read reports it), -1 when none became readable in
 * time or a signal came (the caller checks its deadline and its signals, and waits again), or
 * -2 - errno when poll itself failed. */
int et_wait_readable(const int *fds, int n, int64_t spin_ns, int timeout_ms) {
    struct pollfd set[SPIN_FDS_MAX];
    if (n < 1 || n > SPIN_FDS_MAX) return -2 - EINVAL;
    for (int i = 0; i < n; i++) {
        set[i].fd = fds[i];
        set[i].events = POLLIN;
    }
    int64_t end = spin_ns > 0 ? now_ns() + spin_ns : 0;
    for (;;) {
        int spinning = end != 0 && now_ns() < end;
        int ready = poll(set, (nfds_t)n, spinning ? 0 : timeout_ms);
        if (ready < 0) return errno == EINTR ? -1 : -2 - errno;
        for (int i = 0; ready > 0 && i < n; i++)
            if (set[i].revents) return i;
        if (!spinning) return -1;
        for (int k = 0; k < PAUSES_PER_CHECK; k++) cpu_relax();
    }
}
