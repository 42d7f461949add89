"""The sealed data link in one process: keys agreed per connection, and every message that is
replayed, reordered, altered, cut short or sealed with another key refused, the link closed
and nothing of it used (a cluster that uses it: tests/integration/test_sealed_links.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from helpers.links import data_link_pair

from edgetp.net.codec import encode
from edgetp.net.datalink import OP_PARTIAL, OP_SUM, DataLinkError
from edgetp.net.linkkeys import (
    AES_GCM,
    CHACHA20,
    TAG_BYTES,
    KeyOffer,
    LinkBinding,
    LinkCipher,
    LinkKeyError,
    choose_cipher,
    cpu_has_aes,
    derive_keys,
    master_link_keys,
    preferred_ciphers,
    worker_link_keys,
)
from edgetp.net.sealedlink import SEALED_HEADER, SealedDataLink

MASTER_KEY, WORKER_KEY = "M" * 40, "W" * 40  # long-term CURVE public keys (z85)
SHAPE = (2, 64)


def _keys(cipher: str = AES_GCM, token: str = "t0ken"):
    """Both ends' keys, by the hello/welcome exchange the transport runs."""
    offer = KeyOffer()
    hello = {"data_key": offer.public_hex, "data_ciphers": cipher, "data_token": token}
    master_keys, welcome = master_link_keys(hello, MASTER_KEY, WORKER_KEY, "session")
    worker_keys = worker_link_keys(offer, {**welcome, "session": "session"}, MASTER_KEY,
                                   WORKER_KEY, token)
    return master_keys, worker_keys


def _sealed_pair(cipher: str = AES_GCM) -> tuple[SealedDataLink, SealedDataLink]:
    master_keys, worker_keys = _keys(cipher)
    master, worker = data_link_pair()
    return (SealedDataLink.over(master, LinkCipher(master_keys, True, "rank 1 (node-1)")),
            SealedDataLink.over(worker, LinkCipher(worker_keys, False, "the master")))


def _soon() -> float:
    return time.monotonic() + 2.0


@pytest.mark.parametrize("cipher", [AES_GCM, CHACHA20])
@pytest.mark.parametrize("wire", ["f32", "bf16", "int8"])
def test_sealed_messages_arrive_whole_both_ways(cipher: str, wire: str) -> None:
    master, worker = _sealed_pair(cipher)
    try:
        for counter in range(3):
            frames = encode(torch.randn(*SHAPE), wire)
            sent = worker.send(OP_PARTIAL, wire, (4, 5, counter), frames)
            got = master.receive(wire, SHAPE, _soon())
            assert (got.op, got.seq, got.step, got.index) == (OP_PARTIAL, 4, 5, counter)
            assert all(torch.equal(a, b) for a, b in zip(got.tensors, frames, strict=True))
            payload = sum(t.numel() * t.element_size() for t in frames)
            assert sent == got.nbytes == SEALED_HEADER.size + payload + TAG_BYTES
            master.send(OP_SUM, wire, (4, 5, counter), frames)
            back = worker.receive(wire, SHAPE, _soon())
            assert all(torch.equal(a, b) for a, b in zip(back.tensors, frames, strict=True))
        assert (master.cipher.sent, master.cipher.received) == (3, 3)
    finally:
        master.close()
        worker.close()


class Wire:
    """A worker end whose sealed messages are caught on the way, and a raw socket that
    delivers bytes to the master end: a man in the middle of one sealed link."""

    def __init__(self) -> None:
        master_keys, worker_keys = _keys()
        self.master_link, self.into_master = data_link_pair()
        worker_link, self.out_of_worker = data_link_pair()
        self.master = SealedDataLink.over(self.master_link,
                                          LinkCipher(master_keys, True, "rank 1 (node-1)"))
        self.worker = SealedDataLink.over(worker_link,
                                          LinkCipher(worker_keys, False, "the master"))
        self.x = torch.randn(*SHAPE)

    def sealed_message(self, index: int = 0) -> bytearray:
        """The bytes of the worker's next partial as they leave it."""
        sent = self.worker.send(OP_PARTIAL, "f32", (1, 1, index), [self.x])
        raw = bytearray()
        while len(raw) < sent:
            raw += self.out_of_worker.sock.recv(sent - len(raw))
        return raw

    def deliver(self, *messages: bytes) -> None:
        for message in messages:
            self.into_master.sock.sendall(message)

    def master_receives(self):
        return self.master.receive("f32", SHAPE, time.monotonic() + 0.5)

    def refused(self, match: str) -> None:
        """The master end refuses what came, names the peer, closes and forgets its keys."""
        with pytest.raises(DataLinkError, match=match) as caught:
            self.master_receives()
        assert self.master.sock.fileno() == -1
        with pytest.raises(LinkKeyError, match="closed"):  # its keys are gone
            self.master.cipher.open_into(0, b"", memoryview(b""), memoryview(bytearray()))
        self.message = str(caught.value)

    def close(self) -> None:
        for link in (self.master, self.worker, self.into_master, self.out_of_worker):
            link.close()


@pytest.fixture
def wire():
    middle = Wire()
    yield middle
    middle.close()


def test_the_wire_carries_no_plaintext(wire: Wire) -> None:
    message = wire.sealed_message()
    plain = wire.x.numpy().tobytes()
    assert plain[:16] not in message and plain[-16:] not in message
    wire.deliver(message)
    assert torch.equal(wire.master_receives().tensors[0], wire.x)


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_an_altered_message_is_refused(wire: Wire, where: str) -> None:
    message = wire.sealed_message()
    at = {"header": 12, "payload": SEALED_HEADER.size + 5, "tag": len(message) - 3}[where]
    message[at] ^= 0x01  # header byte 12: the step (still a valid header)
    wire.deliver(message)
    wire.refused("failed authentication")
    assert "rank 1 (node-1)" in wire.message


def test_a_replayed_message_is_refused(wire: Wire) -> None:
    message = wire.sealed_message()
    wire.deliver(message, message)
    assert torch.equal(wire.master_receives().tensors[0], wire.x)
    wire.refused("replayed")
    assert "rank 1 (node-1)" in wire.message


def test_reordered_and_dropped_messages_are_refused(wire: Wire) -> None:
    first, second = wire.sealed_message(0), wire.sealed_message(1)
    wire.deliver(second, first)
    wire.refused("message 1 from rank 1 .* where 0 was due .*missing or reordered")


def test_a_counter_rewritten_to_hide_a_drop_fails_authentication(wire: Wire) -> None:
    wire.sealed_message(0)  # dropped on the way
    second = wire.sealed_message(1)
    second[SEALED_HEADER.size - 8:SEALED_HEADER.size] = (0).to_bytes(8, "little")
    wire.deliver(second)
    wire.refused("failed authentication")


def test_a_truncated_message_is_refused(wire: Wire) -> None:
    message = wire.sealed_message()
    short = bytearray(message[:-TAG_BYTES])  # the tag cut off, the length field made to fit
    short[20:24] = (len(short) - SEALED_HEADER.size).to_bytes(4, "little")
    wire.deliver(short)
    wire.refused("a payload of")


def test_a_message_cut_short_by_a_closed_connection_is_refused(wire: Wire) -> None:
    message = wire.sealed_message()
    wire.deliver(message[:-7])
    wire.into_master.close()
    wire.refused("closed the data link")


def test_a_plain_message_is_not_taken_on_a_sealed_link(wire: Wire) -> None:
    plain_end, sink = data_link_pair()
    plain_end.send(OP_PARTIAL, "f32", (1, 1, 0), [wire.x])
    raw = sink.sock.recv(65536)
    plain_end.close()
    sink.close()
    wire.deliver(raw + bytes(64))
    wire.refused("not the data-link protocol")


def test_a_peer_with_other_keys_cannot_speak_on_the_link() -> None:
    """An end whose keys come from another exchange (it did not hold the CURVE channel the
    real keys were agreed over) is refused at its first message."""
    master_keys, _ = _keys()
    _, stranger_keys = _keys()
    master, stranger = data_link_pair()
    sealed_master = SealedDataLink.over(master, LinkCipher(master_keys, True, "rank 2"))
    sealed_stranger = SealedDataLink.over(stranger, LinkCipher(stranger_keys, False, "m"))
    try:
        sealed_stranger.send(OP_PARTIAL, "f32", (1, 1, 0), [torch.ones(*SHAPE)])
        with pytest.raises(DataLinkError, match="rank 2 failed authentication"):
            sealed_master.receive("f32", SHAPE, _soon())
    finally:
        sealed_master.close()
        sealed_stranger.close()


def _binding(**changes: str) -> LinkBinding:
    base = LinkBinding(AES_GCM, "s", "tok", MASTER_KEY, WORKER_KEY, "", "")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("field", ["cipher", "session", "token", "master_key", "worker_key"])
def test_the_keys_are_bound_to_both_nodes_and_the_connection(field: str) -> None:
    """Both sides derive the same keys from one exchange; changing any bound field (the other
    node's long-term key, the session, the link's token, the cipher) changes them."""
    master, worker = KeyOffer(), KeyOffer()
    offers = {"master_offer": master.public_hex, "worker_offer": worker.public_hex}
    agreed = derive_keys(master, worker.public_hex, _binding(**offers))
    assert derive_keys(worker, master.public_hex, _binding(**offers)) == agreed
    assert agreed.master_to_worker != agreed.worker_to_master
    master, worker = KeyOffer(), KeyOffer()
    offers = {"master_offer": master.public_hex, "worker_offer": worker.public_hex}
    changed = CHACHA20 if field == "cipher" else "other"
    one = derive_keys(master, worker.public_hex, _binding(**offers))
    other = derive_keys(worker, master.public_hex, _binding(**offers, **{field: changed}))
    assert one.master_to_worker != other.master_to_worker


def test_a_key_offer_serves_one_exchange_and_bad_keys_are_refused() -> None:
    offer, peer = KeyOffer(), KeyOffer()
    derive_keys(offer, peer.public_hex, _binding())
    with pytest.raises(LinkKeyError, match="used already"):
        derive_keys(offer, peer.public_hex, _binding())
    with pytest.raises(LinkKeyError, match="hex digits"):
        derive_keys(KeyOffer(), "ab", _binding())
    with pytest.raises(LinkKeyError, match="not an X25519 key"):
        derive_keys(KeyOffer(), "zz" * 32, _binding())
    with pytest.raises(LinkKeyError, match="not an X25519 key"):
        derive_keys(KeyOffer(), "00" * 32, _binding())  # a low-order point: no shared secret
    with pytest.raises(LinkKeyError, match="unknown data-link cipher"):
        derive_keys(KeyOffer(), peer.public_hex, _binding(cipher="rot13"))
    with pytest.raises(LinkKeyError, match="long-term key is unknown"):
        master_link_keys({"data_key": peer.public_hex, "data_ciphers": AES_GCM,
                          "data_token": "t"}, MASTER_KEY, "", "s")


def test_the_cipher_follows_both_cpus(tmp_path: Path) -> None:
    x86, arm, bare = tmp_path / "x86", tmp_path / "arm", tmp_path / "bare"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n")  # no crypto ext.
    bare.write_text("processor\t: 0\n")
    assert cpu_has_aes(x86) and not cpu_has_aes(arm)
    assert cpu_has_aes(bare) == cpu_has_aes(tmp_path / "missing")  # the platform's guess
    assert preferred_ciphers(True) == [AES_GCM, CHACHA20]
    assert preferred_ciphers(False) == [CHACHA20, AES_GCM]
    both_aes = choose_cipher(" ".join(preferred_ciphers(True)), preferred_ciphers(True))
    assert both_aes == AES_GCM
    assert choose_cipher(" ".join(preferred_ciphers(False)), preferred_ciphers(True)) == CHACHA20
    assert choose_cipher(" ".join(preferred_ciphers(True)), preferred_ciphers(False)) == CHACHA20
    assert choose_cipher(AES_GCM, preferred_ciphers(False)) == AES_GCM  # all it runs
    with pytest.raises(LinkKeyError, match="no cipher"):
        choose_cipher("des rc4")
