"""The two-rank exchange in one native call (csrc/spinwait.c through DataLink.exchange): both
ends get the pair_sum bits; anything but the peer's partial of the same allreduce (nothing in
time, part of it, a stale or other message) is left, read or not, for receive(); a closed
peer is a DataLinkError."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from helpers.links import data_link_pair

from edgetp.kernels import native
from edgetp.net import datalink
from edgetp.net.codec import pair_sum
from edgetp.net.datalink import HEADER, OP_PARTIAL, OP_SUM, DataLink, DataLinkError
from edgetp.net.sealedlink import SealedDataLink

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels")
SPIN_S = 2.0  # generous: a loaded CI machine may be slow to schedule the peer
DEADLINE_S = 5.0


@pytest.fixture
def links() -> Iterator[tuple[DataLink, DataLink]]:
    master, worker = data_link_pair()
    try:
        yield master, worker
    finally:
        master.close()
        worker.close()


def partial(seed: int, rows: int = 1, width: int = 2048) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator) * 10 ** torch.randn(
        rows, width, generator=generator)  # [rows, width], magnitudes over decades


def exchange_both(links: tuple[DataLink, DataLink], mine: torch.Tensor, theirs: torch.Tensor,
                  position: tuple[int, int, int] = (3, 4, 5)
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both ends exchange at once (the worker's end in a thread)."""
    master, worker = links
    results: dict[str, torch.Tensor | None] = {}
    thread = threading.Thread(target=lambda: results.setdefault(
        "worker", worker.exchange(position, theirs, SPIN_S)))
    thread.start()
    results["master"] = master.exchange(position, mine, SPIN_S)
    thread.join(DEADLINE_S)
    return results["master"], results["worker"]


@pytest.mark.parametrize("rows", [1, 8])
def test_both_ends_get_the_pair_sum_bits(links: tuple[DataLink, DataLink], rows: int) -> None:
    mine, theirs = partial(1, rows), partial(2, rows)
    expected = pair_sum([mine], [theirs], "f32")
    at_master, at_worker = exchange_both(links, mine.clone(), theirs.clone())
    assert at_master is not None and at_worker is not None
    assert torch.equal(at_master, expected) and torch.equal(at_worker, expected)
    assert at_master.shape == (rows, 2048)
    for link in links:
        assert link.bytes_sent == link.bytes_received == HEADER.size + mine.numel() * 4


def test_a_result_stays_valid_through_the_next_exchange(
        links: tuple[DataLink, DataLink]) -> None:
    first, _ = exchange_both(links, partial(1), partial(2), (1, 1, 0))
    kept = first.clone() if first is not None else None
    second, _ = exchange_both(links, partial(3), partial(4), (1, 1, 1))
    assert first is not None and second is not None and torch.equal(first, kept)
    assert first.data_ptr() != second.data_ptr()


def test_nothing_in_time_leaves_the_message_to_receive(links: tuple[DataLink, DataLink]
                                                       ) -> None:
    master, worker = links
    mine, theirs = partial(1), partial(2)
    started = time.perf_counter()
    assert master.exchange((0, 0, 0), mine, 0.01) is None  # the worker has sent nothing yet
    assert time.perf_counter() - started < 1.0
    worker.send(OP_PARTIAL, "f32", (0, 0, 0), [theirs])
    got = master.receive("f32", mine.shape, time.monotonic() + DEADLINE_S)
    assert (got.op, got.seq, got.step, got.index) == (OP_PARTIAL, 0, 0, 0)
    assert torch.equal(got.tensors[0], theirs)
    sent = worker.receive("f32", mine.shape, time.monotonic() + DEADLINE_S)
    assert torch.equal(sent.tensors[0], mine)  # what the master's exchange sent


def test_part_of_the_message_is_kept_for_receive(links: tuple[DataLink, DataLink]) -> None:
    master, worker = links
    theirs = partial(2)
    payload = theirs.numpy().tobytes()
    message = HEADER.pack(datalink.MAGIC, OP_PARTIAL, 1, 0, 0, 0, len(payload)) + payload
    worker.sock.sendall(message[:1000])  # the header and some of the payload
    assert master.exchange((0, 0, 0), partial(1), 0.01) is None
    assert master.holds_bytes
    worker.sock.sendall(message[1000:])
    got = master.receive("f32", theirs.shape, time.monotonic() + DEADLINE_S)
    assert torch.equal(got.tensors[0], theirs)


def test_a_stale_message_is_not_summed_and_the_right_one_follows(
        links: tuple[DataLink, DataLink]) -> None:
    """A partial of an abandoned step (same size) comes first: the exchange reads it, does not
    use it, and receive() gets it and then this allreduce's partial, unchanged."""
    master, worker = links
    stale, theirs = partial(7), partial(2)
    worker.send(OP_PARTIAL, "f32", (0, 9, 3), [stale])
    worker.send(OP_PARTIAL, "f32", (1, 0, 0), [theirs])
    time.sleep(0.05)
    assert master.exchange((1, 0, 0), partial(1), 0.5) is None
    first = master.receive("f32", theirs.shape, time.monotonic() + DEADLINE_S, (1, 0))
    assert (first.seq, first.step, first.index) == (0, 9, 3)
    assert torch.equal(first.tensors[0], stale)
    second = master.receive("f32", theirs.shape, time.monotonic() + DEADLINE_S, (1, 0))
    assert (second.seq, second.step, second.index) == (1, 0, 0)
    assert torch.equal(second.tensors[0], theirs)


def test_a_sum_where_a_partial_was_expected_is_left_unsummed(
        links: tuple[DataLink, DataLink]) -> None:
    master, worker = links
    total = partial(5)
    master.send(OP_SUM, "f32", (2, 2, 2), [total])
    time.sleep(0.05)
    assert worker.exchange((2, 2, 2), partial(1), 0.5) is None
    got = worker.receive("f32", total.shape, time.monotonic() + DEADLINE_S)
    assert got.op == OP_SUM and torch.equal(got.tensors[0], total)


def test_a_closed_peer_is_a_data_link_error(links: tuple[DataLink, DataLink]) -> None:
    master, worker = links
    worker.close()
    with pytest.raises(DataLinkError, match="broke"):
        for _ in range(3):  # the first send may still be taken by the kernel
            master.exchange((0, 0, 0), partial(1), 0.5)


def test_only_plain_decode_sized_float32_partials_go_natively() -> None:
    assert datalink.fits_native_exchange(torch.zeros(8, 2048))
    assert not datalink.fits_native_exchange(torch.zeros(128, 2048))  # a prefill chunk's
    assert not datalink.fits_native_exchange(torch.zeros(1, 2048, dtype=torch.bfloat16))
    assert not datalink.fits_native_exchange(torch.zeros(2048, 2).T)  # not contiguous
    assert not SealedDataLink.exchanges_natively.fget(None)  # type: ignore[attr-defined]
