"""The allreduce's TCP data link in one process: framing, joining, bad input (a cluster that
uses it: tests/integration/test_data_link.py)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch
from helpers.links import data_link_pair

from edgetp.net import datalink as dataplane
from edgetp.net.codec import encode
from edgetp.net.datalink import (
    HEADER,
    MAGIC,
    OP_PARTIAL,
    OP_SUM,
    DataLinkError,
    DataListener,
)


def _soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


@pytest.mark.parametrize("wire", ["f32", "bf16", "int8"])
def test_a_message_arrives_whole_in_a_reused_buffer(wire):
    master, worker = data_link_pair()
    try:
        x = torch.randn(3, 64)
        frames = encode(x, wire)
        sent = worker.send(OP_PARTIAL, wire, (7, 9, 11), frames)
        got = master.receive(wire, (3, 64), _soon())
        assert (got.op, got.seq, got.step, got.index) == (OP_PARTIAL, 7, 9, 11)
        assert sent == HEADER.size + sum(t.numel() * t.element_size() for t in frames)
        for a, b in zip(got.tensors, frames, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        buffers = set()
        for _ in range(4):  # two buffers, used in turn: no allocation per message
            worker.send(OP_PARTIAL, wire, (7, 9, 12), frames)
            buffers.add(master.receive(wire, (3, 64), _soon()).tensors[0].data_ptr())
        assert len(buffers) == 2
    finally:
        master.close()
        worker.close()


def test_messages_of_every_length_share_two_buffers_of_the_largest():
    """A node sees a prefill chunk of every prompt length and one-row decode steps: the link
    holds two buffers of the largest message, not two per length (which grew a 70B master by
    2 x 7 links x rows x 32 KiB for every prompt length it ever saw)."""
    master, worker = data_link_pair()
    try:
        width, longest = 512, 24
        for rows in [*range(1, longest + 1), 1, 7, 1]:
            x = torch.randn(rows, width)
            worker.send(OP_PARTIAL, "f32", (1, rows, 0), [x])
            got = master.receive("f32", (rows, width), _soon())
            assert got.tensors[0].shape == (rows, width) and torch.equal(got.tensors[0], x)
        assert longest * width * 4 <= master.buffered_bytes <= 2 * longest * width * 4
    finally:
        master.close()
        worker.close()


@pytest.mark.parametrize("stale_rows", [1, 2, 9, 40])
def test_a_stale_message_of_another_size_is_skipped(stale_rows):
    """A partial of an abandoned step (a decode row, or a longer prefill chunk) left in the
    link before the current step's: read past, whether the read went beyond its end or not;
    a message of the current step with a wrong size is still an error."""
    master, worker = data_link_pair()
    try:
        width, rows = 96, 6
        for step in (4, 5):
            worker.send(OP_PARTIAL, "f32", (1, step, 0), [torch.randn(stale_rows, width)])
        x = torch.randn(rows, width)
        worker.send(OP_PARTIAL, "f32", (2, 1, 0), [x])
        got = master.receive("f32", (rows, width), _soon(), current=(2, 1))
        assert (got.seq, got.step) == (2, 1) and torch.equal(got.tensors[0], x)
        y = torch.randn(rows, width)
        worker.send(OP_PARTIAL, "f32", (2, 2, 0), [y])  # the link stays in step
        assert torch.equal(master.receive("f32", (rows, width), _soon(), (2, 2)).tensors[0], y)
        worker.send(OP_PARTIAL, "f32", (2, 3, 0), [torch.randn(1, width)])
        with pytest.raises(DataLinkError, match="a payload of 384 bytes"):
            master.receive("f32", (rows, width), _soon(), current=(2, 3))
    finally:
        master.close()
        worker.close()


def test_a_large_payload_is_sent_in_pieces():
    master, worker = data_link_pair()
    try:
        x = torch.randn(128, 8192)  # 4 MiB: more than one sendmsg / recv_into
        thread = threading.Thread(target=master.send, args=(OP_SUM, "f32", (1, 2, 3), [x]))
        thread.start()
        got = worker.receive("f32", (128, 8192), _soon(10))
        thread.join()
        assert torch.equal(got.tensors[0], x)
    finally:
        master.close()
        worker.close()


BAD_HEADERS = {
    "magic": (b"HTTP", OP_SUM, 1, 256, "not the data-link protocol"),
    "op": (MAGIC, 9, 1, 256, "not the data-link protocol"),
    "wire": (MAGIC, OP_SUM, 2, 256, "not the data-link protocol"),
    "size": (MAGIC, OP_SUM, 1, 255, "payload of 255 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_a_malformed_message_closes_the_link_with_a_clear_error(case):
    magic, op, code, size, message = BAD_HEADERS[case]
    master, worker = data_link_pair()
    try:
        worker.sock.sendall(struct.pack("<4sBBxxIIII", magic, op, code, 1, 2, 3, size))
        with pytest.raises(DataLinkError, match=message):
            master.receive("f32", (1, 64), _soon())
    finally:
        master.close()
        worker.close()


def test_a_truncated_message_or_a_closed_peer_is_an_error_not_a_hang():
    master, worker = data_link_pair()
    worker.sock.sendall(HEADER.pack(MAGIC, OP_SUM, 1, 1, 2, 3, 256) + b"\0" * 100)
    started = time.monotonic()
    with pytest.raises(DataLinkError, match="stalled"):
        master.receive("f32", (1, 64), _soon(0.3))
    assert time.monotonic() - started < 2
    worker.close()
    with pytest.raises(DataLinkError, match="closed"):
        master.receive("f32", (1, 64), _soon())
    master.close()


def test_only_the_token_opens_a_workers_listener():
    listener = DataListener()
    try:
        intruder = socket.create_connection(("127.0.0.1", listener.port))
        intruder.sendall(MAGIC + b"0" * 32)  # a wrong token: closed, the wait goes on
        master = dataplane.connect("127.0.0.1", listener.port, listener.token)
        link = listener.accept()
        master.send(OP_SUM, "f32", (1, 1, 1), [torch.ones(1, 8)])
        assert torch.equal(link.receive("f32", (1, 8), _soon()).tensors[0], torch.ones(1, 8))
        assert intruder.recv(1) == b""  # the listener hung up on it
        for end in (intruder, master, link):
            end.close()
        with pytest.raises(DataLinkError, match="did not open"):
            listener.accept(timeout_s=0.2)
    finally:
        listener.close()


def test_connections_made_first_do_not_hold_up_the_masters():
    """Silent connections, and one showing a wrong token, queued before the master's: the
    master's is taken at once, and every other one is closed."""
    listener = DataListener("127.0.0.1")
    try:
        silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(3)]
        wrong = socket.create_connection(("127.0.0.1", listener.port))
        wrong.sendall(MAGIC + b"1" * 16)  # half a wrong token: closed once it differs
        master = dataplane.connect("127.0.0.1", listener.port, listener.token)
        started = time.monotonic()
        link = listener.accept(timeout_s=5.0)
        assert time.monotonic() - started < dataplane.TOKEN_DEADLINE_S
        master.send(OP_SUM, "f32", (1, 1, 1), [torch.ones(1, 4)])
        assert torch.equal(link.receive("f32", (1, 4), _soon()).tensors[0], torch.ones(1, 4))
        for sock in [*silent, wrong]:
            sock.settimeout(2.0)
            assert sock.recv(1) == b""  # the listener hung up on it
            sock.close()
        master.close()
        link.close()
    finally:
        listener.close()


def test_a_silent_connection_is_dropped_after_the_token_deadline():
    listener = DataListener("127.0.0.1")
    try:
        silent = socket.create_connection(("127.0.0.1", listener.port))
        silent.settimeout(5.0)
        started = time.monotonic()
        with pytest.raises(DataLinkError, match="did not open"):
            listener.accept(timeout_s=3 * dataplane.TOKEN_DEADLINE_S)
        assert silent.recv(1) == b""
        assert time.monotonic() - started < 3 * dataplane.TOKEN_DEADLINE_S + 1
        silent.close()
    finally:
        listener.close()


def test_the_listener_is_on_the_interface_it_is_given_and_can_take_a_fixed_port():
    first = DataListener("127.0.0.1")
    port = first.port
    assert first.sock.getsockname() == ("127.0.0.1", port)
    first.close()
    again = DataListener("127.0.0.1", port)  # every join binds the fixed port again
    assert again.sock.getsockname() == ("127.0.0.1", port)
    with pytest.raises(OSError):
        DataListener("127.0.0.1", port)  # taken
    again.close()


def test_a_node_listens_where_it_reaches_its_master():
    from edgetp.net.transport.sockets import local_address_towards, url_host_port

    assert local_address_towards("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert local_address_towards("tcp://localhost:5555") == "127.0.0.1"
    assert url_host_port("tcp://[::1]:7") == ("::1", 7)
    with pytest.raises(OSError):
        local_address_towards("tcp://no-such-host.invalid:5555")


def test_a_fixed_data_port_that_is_taken_is_a_clear_error_at_start():
    from edgetp.net.transport import NodeIdentity, WorkerTransport

    taken = DataListener("127.0.0.1")
    try:
        with pytest.raises(DataLinkError, match=f"--data-port {taken.port}: cannot listen on "
                                                f"127.0.0.1:{taken.port}.*choose a free port"):
            WorkerTransport("tcp://127.0.0.1:5555", NodeIdentity(1, "f", "{}", "float32"),
                            data_port=taken.port)
    finally:
        taken.close()
