"""What sealing the data link costs on this machine: microseconds per KiB, by cipher.

Run::

    .venv/bin/python benchmarks/cipher_cost.py [--json]

For each cipher the sealed data link can use (edgetp.net.linkkeys: AES-256-GCM,
ChaCha20-Poly1305) and each message size, one :class:`~edgetp.net.linkkeys.LinkCipher` seals
a float32 payload into a reused buffer and the other end's opens it, as the two ends of a
link do per message: the best of several rounds of the pair's time (on a loaded machine the
best round is the one least disturbed), and that time per KiB. It also says which cipher this
CPU prefers (AES instructions or not).

Then what sealing adds to a whole data-link message: a joined pair of data links on loopback
in this process, one end sending and the other receiving a ``[1, size/4]`` float32 message, plain
and sealed with each cipher, in this thread's CPU time (``time.thread_time``: what other
processes do to the wall clock of a loaded machine does not count). An allreduce of the star
sends two messages per worker. ``benchmarks/allreduce.py --secure`` prints the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgetp.net.linkkeys import (  # noqa: E402
    CIPHERS,
    TAG_BYTES,
    KeyOffer,
    LinkBinding,
    LinkCipher,
    cpu_has_aes,
    derive_keys,
    preferred_ciphers,
)

SIZES = (1024, 8 * 1024, 64 * 1024, 1024 * 1024)
ROUNDS = 5
LINK_SIZES = (1024, 8 * 1024, 64 * 1024)
BYTES_PER_ROUND = 8 << 20  # each round seals about this much


def cipher_pair(cipher: str) -> tuple[LinkCipher, LinkCipher]:
    """Both ends of one link's sealing, with keys from a real exchange."""
    master, worker = KeyOffer(), KeyOffer()
    binding = LinkBinding(cipher, "bench", "token", "M" * 40, "W" * 40, master.public_hex,
                          worker.public_hex)
    master_keys = derive_keys(master, worker.public_hex, binding)
    worker_keys = derive_keys(worker, master.public_hex, binding)
    return LinkCipher(master_keys, True, "worker"), LinkCipher(worker_keys, False, "master")


def seal_and_open_us(cipher: str, size: int) -> float:
    """Microseconds to seal one ``size``-byte message and open it (best round)."""
    sender, receiver = cipher_pair(cipher)
    payload = memoryview(os.urandom(size))
    sealed, opened = bytearray(size + TAG_BYTES), bytearray(size)
    header = bytes(32)
    count = max(20, BYTES_PER_ROUND // size)
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(count):
            counter = sender.sent
            sender.seal_into(counter, header, payload, sealed)
            receiver.open_into(counter, header, memoryview(sealed), memoryview(opened))
        best = min(best, (time.perf_counter() - started) / count)
    assert opened == payload
    return best * 1e6


def link_message_cpu_us(cipher: str | None, size: int, count: int = 200) -> float:
    """CPU microseconds of this thread to send one ``size``-byte message on a data link and
    receive it at the other end (best of :data:`ROUNDS`); ``cipher`` None: a plain link."""
    import torch

    from edgetp.net.datalink import OP_PARTIAL, DataListener, connect
    from edgetp.net.sealedlink import SealedDataLink

    listener = DataListener()
    sender = connect("127.0.0.1", listener.port, listener.token)
    receiver = listener.accept()
    listener.close()
    if cipher is not None:
        ends = cipher_pair(cipher)
        sender, receiver = (SealedDataLink.over(sender, ends[1]),
                            SealedDataLink.over(receiver, ends[0]))
    x = torch.randn(1, size // 4)  # [1, size/4]
    best = float("inf")
    try:
        for _ in range(ROUNDS):
            started = time.thread_time()
            for _ in range(count):
                sender.send(OP_PARTIAL, "f32", (1, 1, 0), [x])
                receiver.receive("f32", (1, size // 4), time.monotonic() + 10)
            best = min(best, (time.thread_time() - started) / count)
    finally:
        sender.close()
        receiver.close()
    return best * 1e6


def measure() -> dict[str, Any]:
    rows, links = [], []
    for cipher in CIPHERS:
        for size in SIZES:
            us = seal_and_open_us(cipher, size)
            rows.append({"cipher": cipher, "size_bytes": size, "seal_and_open_us": us,
                         "us_per_kib": us / (size / 1024)})
    for size in LINK_SIZES:
        plain = link_message_cpu_us(None, size)
        links.append({"size_bytes": size, "plain_cpu_us": plain,
                      **{f"{c}_extra_cpu_us": link_message_cpu_us(c, size) - plain
                         for c in CIPHERS}})
    return {"cpu_has_aes": cpu_has_aes(), "preferred": preferred_ciphers()[0], "results": rows,
            "link_messages": links}


def describe(report: dict[str, Any]) -> list[str]:
    lines = [f"sealing the data link (seal + open, best of {ROUNDS} rounds); this CPU "
             f"{'has' if report['cpu_has_aes'] else 'lacks'} AES instructions: "
             f"{report['preferred']} is its cipher"]
    for cipher in CIPHERS:
        rows = [r for r in report["results"] if r["cipher"] == cipher]
        cells = ", ".join(f"{r['size_bytes'] // 1024} KiB {r['seal_and_open_us']:.1f} us "
                          f"({r['us_per_kib']:.3f} us/KiB)" for r in rows)
        lines.append(f"  {cipher}: {cells}")
    lines.append("a data-link message (send + receive, CPU time of one thread): plain, and "
                 "what sealing adds")
    for row in report["link_messages"]:
        extra = ", ".join(f"{c} {row[f'{c}_extra_cpu_us']:+.1f} us" for c in CIPHERS)
        lines.append(f"  {row['size_bytes'] // 1024} KiB: plain {row['plain_cpu_us']:.1f} us; "
                     f"{extra}")
    return lines


def main() -> int:
    report = measure()
    if "--json" in sys.argv[1:]:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(describe(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
