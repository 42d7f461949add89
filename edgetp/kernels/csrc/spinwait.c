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
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
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

/* ---- A two-rank allreduce's exchange on a data link, in one call without the GIL.
 *
 * With two nodes an allreduce is one message each way: each end sends its float32 partial and
 * adds the other's to its own. Done in Python that is a dozen small steps (frame the header,
 * send, watch the socket, read, check, view the payload, add), each a few microseconds, and
 * they run with cold caches: the product before them has just streamed megabytes of weights
 * through every cache level. Under 2-node decode the framing, send and sum took ~170 us per
 * allreduce on each node (encode ~30, send ~90, sum ~50), against ~45 us for the whole round
 * trip when nothing else runs (benchmarks/allreduce.py).
 *
 * Here: send the message (header and payload), then read the peer's message for at most
 * `spin_ns`, checking the socket without blocking with a pause between checks (as the wait
 * above does). When the whole message came and its header is byte for byte the expected one
 * (magic, op, wire format, seq, step, index, payload length: the peer's message of the same
 * allreduce), `own` is added to the received payload in place: the float32 sum is one
 * addition per value, the same on both ends whichever order (IEEE addition commutes). Anything
 * else (nothing yet, part of a message, another message) is left to the caller: it keeps the
 * bytes read so far as the start of the link's next message and reads on in its usual path.
 */

/* Send `header` (header_len bytes) and `payload` (payload_len bytes) whole; 0 or -errno. */
static int64_t send_message(int fd, const void *header, int64_t header_len, const void *payload,
                            int64_t payload_len) {
    struct iovec parts[2] = {{(void *)header, (size_t)header_len},
                             {(void *)payload, (size_t)payload_len}};
    struct iovec *left = parts;
    int count = 2;
    while (count > 0) {
        struct msghdr message;
        memset(&message, 0, sizeof message);
        message.msg_iov = left;
        message.msg_iovlen = (size_t)count;
        ssize_t sent = sendmsg(fd, &message, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        while (count > 0 && (size_t)sent >= left->iov_len) {
            sent -= (ssize_t)left->iov_len;
            left++;
            count--;
        }
        if (count > 0) {
            left->iov_base = (char *)left->iov_base + sent;
            left->iov_len -= (size_t)sent;
        }
    }
    return 0;
}

/* Send our message (`header`, then `own` as the payload: `n` float32 values), then read the
 * peer's into `in` (header_len + 4 * n bytes) for up to `spin_ns`. Returns the bytes read into
 * `in` (0 .. header_len + 4n), or -errno when sending or reading failed (-ECONNRESET when the
 * peer closed the link). `*summed` is 1 when the peer's whole message came with a header equal
 * to `header` and `in`'s payload now holds the peer's values plus `own`'s, else 0. */
int64_t et_exchange_f32(int fd, const void *header, int64_t header_len, const float *own,
                        int64_t n, void *in, int64_t spin_ns, int *summed) {
    *summed = 0;
    int64_t payload_len = 4 * n, total = header_len + payload_len;
    int64_t sent = send_message(fd, header, header_len, own, payload_len);
    if (sent < 0) return sent;
    char *into = (char *)in;
    int64_t got = 0, want = header_len;
    int64_t end = now_ns() + (spin_ns > 0 ? spin_ns : 0);
    for (;;) {
        ssize_t n_read = recv(fd, into + got, (size_t)(want - got), MSG_DONTWAIT);
        if (n_read > 0) {
            got += n_read;
            if (got == header_len && want == header_len) {
                if (memcmp(into, header, (size_t)header_len) != 0) return got; /* not ours */
                want = total;
            }
            if (got == total) break;
            continue;
        }
        if (n_read == 0) return -ECONNRESET;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -errno;
        if (now_ns() >= end) return got; /* the caller reads on */
        for (int k = 0; k < PAUSES_PER_CHECK; k++) cpu_relax();
    }
    float *values = (float *)(into + header_len);
    for (int64_t i = 0; i < n; i++) values[i] += own[i];
    *summed = 1;
    return got;
}
