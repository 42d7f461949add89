"""The ring allreduce inside one process: ring links on loopback, each rank a thread (over
real processes: tests/integration/test_ring.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import zmq
from helpers.relay import Relay
from helpers.ring import ring_sums

from edgetp.net import wire
from edgetp.net.ring import RING_MAX_FRAME_BYTES, RING_QUEUE, RingLink, RingPeer
from edgetp.net.security import KeyPair, make_client, present_token


def test_ring_allreduce_sums_chunks_over_threads() -> None:
    """Three ring links in one process: every rank gets the same sum, for odd widths too."""
    inputs = [torch.randn(2, 11, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    outputs = ring_sums(inputs)
    expected = inputs[0] + inputs[1] + inputs[2]
    for rank in range(3):
        assert torch.allclose(outputs[rank], expected, atol=1e-6)
        assert torch.equal(outputs[rank], outputs[0])  # bitwise identical on every rank


def key_pairs(n: int) -> list[KeyPair]:
    return [KeyPair(*zmq.curve_keypair()) for _ in range(n)]


def test_ring_allreduce_over_curve_links_gives_the_same_sums() -> None:
    inputs = [torch.randn(3, 16, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    plain, curve = ring_sums(inputs), ring_sums(inputs, keys=key_pairs(3))
    assert sorted(curve) == [0, 1, 2]
    for rank in range(3):
        assert torch.equal(curve[rank], plain[rank])


def outsider(address: str, setup: Callable[[zmq.Socket], None]) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    setup(sock)
    sock.connect(address)
    return sock


def ring_message(hop: int) -> list[bytes]:
    fields = {"seq": 1, "step": 1, "index": 0, "hop": hop}
    return [bytes(f) for f in wire.encode("ring", fields, [torch.ones(1, 4)])]


@pytest.mark.parametrize("with_keys", [False, True])
def test_a_ring_listener_admits_its_cluster_only(with_keys: bool) -> None:
    """Without the token (or, with keys, without a key pair of the cluster) a peer queues
    nothing on a ring listener, whatever it sends; the predecessor's messages arrive."""
    own, predecessor, stranger = key_pairs(3) if with_keys else (None, None, None)
    members = frozenset(pair.public for pair in (own, predecessor) if pair is not None)
    listener = RingLink("127.0.0.1", own, members)
    sender = RingLink("127.0.0.1", predecessor, members)
    address = f"tcp://127.0.0.1:{listener.port}"
    try:
        assert listener.pull.getsockopt_string(zmq.LAST_ENDPOINT) == address  # not 0.0.0.0
        assert listener.pull.getsockopt(zmq.RCVHWM) == RING_QUEUE
        assert listener.pull.getsockopt(zmq.MAXMSGSIZE) == RING_MAX_FRAME_BYTES
        server_key = listener.public_key.encode()
        attempts = [outsider(address, lambda s: None),  # no mechanism at all
                    outsider(address, lambda s: present_token(s, "0" * 32))]  # a wrong token
        if with_keys:
            assert stranger is not None
            attempts.append(outsider(address, lambda s: make_client(s, stranger, server_key)))
        for sock in attempts:
            for hop in range(20):
                with contextlib.suppress(zmq.Again):  # refused already: nowhere to queue
                    sock.send_multipart(ring_message(hop), zmq.NOBLOCK)
        assert listener.receive(1.0) is None
        peer = RingPeer(address, listener.public_key, listener.token)
        sender.connect(peer)
        sender.send({"seq": 1, "step": 1, "index": 0, "hop": 99}, [torch.ones(1, 4)])
        got = listener.receive(5.0)
        assert got is not None and got.fields["hop"] == 99
        assert listener.receive(0.5) is None  # nothing of the outsiders' was queued
        for sock in attempts:
            sock.close()
    finally:
        listener.close()
        sender.close()


class OnceAfterHandshake:
    """Changes the first chunk the ring's sender writes once :attr:`armed` (after the CURVE
    handshake and a first message went through): ``flip`` a bit in it, or send it twice."""

    def __init__(self, how: str) -> None:
        self.how, self.armed, self.done = how, False, False

    def __call__(self, chunk: bytes) -> bytes:
        if not self.armed or self.done:
            return chunk
        self.done = True
        if self.how == "replay":
            return chunk + chunk
        return chunk[:-5] + bytes([chunk[-5] ^ 0x10]) + chunk[-4:]


@pytest.mark.parametrize("how", ["flip", "replay"])
def test_a_curve_ring_link_delivers_no_altered_or_replayed_message(how: str) -> None:
    """A man in the middle of a keyed ring link alters a message, or sends it twice: the
    listener delivers nothing altered and nothing twice (CURVE's tag and nonce counter)."""
    own, predecessor = key_pairs(2)
    members = frozenset({own.public, predecessor.public})
    listener = RingLink("127.0.0.1", own, members)
    sender = RingLink("127.0.0.1", predecessor, members)
    tamper = OnceAfterHandshake(how)
    relay = Relay(listener.port, tamper)
    try:
        sender.connect(RingPeer(f"tcp://127.0.0.1:{relay.port}", listener.public_key))
        sender.send({"seq": 1, "step": 1, "index": 0, "hop": 1}, [torch.full((1, 64), 1.0)])
        first = listener.receive(5.0)
        assert first is not None and first.fields["hop"] == 1
        tamper.armed = True
        sender.send({"seq": 1, "step": 1, "index": 0, "hop": 2}, [torch.full((1, 64), 2.0)])
        got = []
        while (message := listener.receive(1.5)) is not None:
            got.append(message)
        assert tamper.done
        if how == "flip":
            assert got == []  # the altered message is dropped with its connection
        else:
            assert [m.fields["hop"] for m in got] in ([], [2])  # never twice
            assert all(torch.equal(m.tensors[0], torch.full((1, 64), 2.0)) for m in got)
    finally:
        relay.close()
        listener.close()
        sender.close()
