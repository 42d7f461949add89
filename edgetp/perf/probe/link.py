"""What a message costs: software per message over ZeroMQ and over the data link (loopback, to
an echo that decodes and answers as a worker would), and the link to another machine.

Link figures need a peer: ``edgetp probe --serve-echo PORT`` (:func:`serve_echo`) on the
master's machine, ``edgetp probe --master tcp://MASTER:PORT`` (:func:`measure_link`) on each
device.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from edgetp.config.device import profile_figure
from edgetp.core.errors import ClusterError

ECHO_ROW = (1, 1024)  # [1, 1024] float32: one row, as a decode step's allreduce sends
LARGE_ROWS = 256  # a [256, 1024] message: what the link's bandwidth adds


def serve_echo(port: int, max_messages: int | None = None, host: str = "0.0.0.0") -> None:
    """Echo every message back (the peer of ``edgetp probe --master``); runs until stopped."""
    import zmq

    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)  # the last echo still leaves after the loop ends
    sock.bind(f"tcp://{host}:{port}")
    try:
        _echo_loop(sock, None, max_messages)
    finally:
        sock.close()


def _echo_loop(sock: Any, stop: threading.Event | None, max_messages: int | None) -> None:
    """Answer each message as a worker would: decode it, encode the reply (a ``sum``)."""
    import zmq

    from edgetp.net import wire

    served = 0
    while (stop is None or not stop.is_set()) and (max_messages is None or served < max_messages):
        if sock.poll(100, zmq.POLLIN):
            identity, *frames = sock.recv_multipart(copy=False)
            message = wire.decode(frames)
            sock.send_multipart([identity, *wire.encode("sum", message.fields, message.tensors)],
                                copy=False)
            served += 1


def _round_trips(address: str, rows: int, count: int, timeout_s: float = 3.0) -> list[float]:
    """Seconds per round trip of a ``partial`` message of ``rows`` x 1024 float32."""
    import torch
    import zmq

    from edgetp.net import wire

    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    tensor = torch.full((rows, ECHO_ROW[1]), 0.5)  # [rows, 1024]
    times = []
    try:
        for index in range(count + 2):
            started = time.perf_counter()
            sock.send_multipart(wire.encode("partial", {"seq": 1, "step": 1, "index": index},
                                            [tensor]), copy=False)
            if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                raise ClusterError(f"no echo from {address} within {timeout_s:g} s; run "
                                   "`edgetp probe --serve-echo PORT` on that machine first")
            wire.decode(sock.recv_multipart(copy=False))
            times.append(time.perf_counter() - started)
    finally:
        sock.close(0)
    return times[2:]


def measure_loopback(count: int) -> float:
    """Microseconds of software per message: half a loopback round trip of one row."""
    import zmq

    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    thread = threading.Thread(target=_echo_loop, args=(sock, stop, None), daemon=True)
    thread.start()
    try:
        times = _round_trips(f"tcp://127.0.0.1:{port}", 1, count)
    finally:
        stop.set()
        thread.join(timeout=2)
        sock.close(0)
    return statistics.median(times) / 2 * 1e6


def measure_data_link(count: int) -> float:
    """Microseconds of software per allreduce message over the data link: half a loopback
    round trip of one row to another process that receives it and answers with a sum, as a
    worker does (a thread of this process would share its interpreter lock and wake-ups, and
    read less than half the real cost)."""
    import multiprocessing

    import torch

    from edgetp.net import datalink as dataplane

    listener = dataplane.DataListener()
    child = multiprocessing.get_context("spawn").Process(
        target=_data_echo, args=(listener.port, listener.token, count + 2), daemon=True)
    child.start()
    try:
        link = listener.accept(timeout_s=60.0)  # the child imports torch first
        row, times = torch.full(ECHO_ROW, 0.5), []  # [1, 1024]
        for index in range(count + 2):
            started = time.perf_counter()
            link.send(dataplane.OP_PARTIAL, "f32", (1, 1, index), [row])
            link.receive("f32", ECHO_ROW, time.monotonic() + 5.0)
            times.append(time.perf_counter() - started)
        link.close()
    finally:
        listener.close()
        child.join(timeout=5)
        if child.is_alive():
            child.terminate()
    return statistics.median(times[2:]) / 2 * 1e6


def _data_echo(port: int, token: str, count: int) -> None:
    """The other process of :func:`measure_data_link`."""
    from edgetp.net import datalink as dataplane

    link = dataplane.connect("127.0.0.1", port, token)
    try:
        for _ in range(count):
            got = link.receive("f32", ECHO_ROW, time.monotonic() + 10.0)
            link.send(dataplane.OP_SUM, "f32", (got.seq, got.step, got.index), got.tensors)
    finally:
        link.close()


def measure_link(address: str, count: int) -> dict[str, float]:
    """Round trip, one-way latency and bandwidth to an echo peer (``--serve-echo``)."""
    small = statistics.median(_round_trips(address, 1, count))
    large = statistics.median(_round_trips(address, LARGE_ROWS, max(3, count // 5)))
    extra_bytes = 2 * (LARGE_ROWS - 1) * ECHO_ROW[1] * 4  # both directions
    bandwidth = extra_bytes * 8 / max(large - small, 1e-9) / 1e6
    return {"rtt_ms": profile_figure(small * 1e3), "latency_ms": profile_figure(small * 1e3 / 2),
            "bandwidth_mbit": profile_figure(bandwidth)}
