"""The allreduce's spinning wait (csrc/spinwait.c through edgetp.kernels.native and
edgetp.net.datalink.first_readable): finds bytes without sleeping, gives up on time, blocks
when asked, and stays out of the way when off."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
from helpers.links import data_link_pair

from edgetp.core import settings
from edgetp.core.errors import ConfigError
from edgetp.kernels import native
from edgetp.net import datalink
from edgetp.net.datalink import OP_PARTIAL

needs_native = pytest.mark.skipif(not native.available(), reason="no native kernels")


@needs_native
def test_the_wait_names_the_first_readable_socket() -> None:
    quiet, ready = socket.socketpair(), socket.socketpair()
    try:
        ready[1].send(b"x")
        fds = [quiet[0].fileno(), ready[0].fileno()]
        assert native.wait_readable(fds, spin_s=0.001) == 1
        assert native.wait_readable(fds, spin_s=0.0) == 1  # one check, no spin
    finally:
        for pair in (quiet, ready):
            for end in pair:
                end.close()


@needs_native
def test_the_wait_gives_up_after_its_spin_and_its_timeout() -> None:
    a, b = socket.socketpair()
    try:
        started = time.perf_counter()
        assert native.wait_readable([a.fileno()], spin_s=0.02) is None
        spun = time.perf_counter() - started
        assert 0.02 <= spun < 1.0
        started = time.perf_counter()
        assert native.wait_readable([a.fileno()], spin_s=0.0, timeout_s=0.05) is None
        assert 0.04 <= time.perf_counter() - started < 1.0
    finally:
        a.close()
        b.close()


@needs_native
def test_bytes_that_come_during_the_spin_end_it_early() -> None:
    a, b = socket.socketpair()
    try:
        timer = threading.Timer(0.05, b.send, args=(b"x",))
        started = time.perf_counter()
        timer.start()
        assert native.wait_readable([a.fileno()], spin_s=5.0) == 0
        assert time.perf_counter() - started < 2.0  # not the 5 s spin
        timer.join()
    finally:
        a.close()
        b.close()


@needs_native
def test_a_closed_peer_counts_as_readable_and_a_bad_descriptor_is_an_error() -> None:
    a, b = socket.socketpair()
    b.close()
    try:
        assert native.wait_readable([a.fileno()], spin_s=0.001) == 0  # the read says EOF
    finally:
        a.close()
    with pytest.raises(OSError):
        native.wait_readable(list(range(1000, 1070)), spin_s=0.0)  # more than the C side takes
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.close(read_end)  # a closed descriptor: poll flags it (POLLNVAL), the read then fails
    assert native.wait_readable([read_end], spin_s=0.0) == 0


def test_first_readable_finds_a_links_message_and_bytes_it_already_holds() -> None:
    master, worker = data_link_pair()
    try:
        assert datalink.first_readable([master], spin_s=0.0) is None
        worker.send(OP_PARTIAL, "f32", (1, 1, 0), [torch.ones(1, 8)])
        found = datalink.first_readable([master], spin_s=0.5)
        assert found == (0 if native.available() else None)
        master._carry += b"held"  # bytes read past a skipped message: no wait needed
        assert datalink.first_readable([master], spin_s=0.0) == 0
    finally:
        master.close()
        worker.close()


def test_more_links_than_one_wait_watches_go_to_the_poller_at_once() -> None:
    pairs = [data_link_pair() for _ in range(native.WAIT_MAX_FDS + 1)]
    try:
        masters = [master for master, _ in pairs]
        pairs[0][1].send(OP_PARTIAL, "f32", (1, 1, 0), [torch.ones(1, 8)])
        started = time.perf_counter()
        assert datalink.first_readable(masters, spin_s=1.0) is None  # no error, no spin
        assert time.perf_counter() - started < 0.5
    finally:
        for master, worker in pairs:
            master.close()
            worker.close()


def test_first_readable_without_the_native_library_leaves_the_wait_to_the_poller(
        monkeypatch: pytest.MonkeyPatch) -> None:
    master, worker = data_link_pair()
    try:
        worker.send(OP_PARTIAL, "f32", (1, 1, 0), [torch.ones(1, 8)])
        monkeypatch.setattr(native, "available", lambda: False)
        assert datalink.first_readable([master], spin_s=0.5) is None
    finally:
        master.close()
        worker.close()


def test_the_spin_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.ENV_SPIN, raising=False)
    assert settings.spin_seconds() == settings.DEFAULT_SPIN_US / 1e6
    monkeypatch.setenv(settings.ENV_SPIN, "0")
    assert settings.spin_seconds() == 0.0
    monkeypatch.setenv(settings.ENV_SPIN, " 250 ")
    assert settings.spin_seconds() == pytest.approx(250e-6)
    for bad in ("-1", "fast", "2e6", "nan"):
        monkeypatch.setenv(settings.ENV_SPIN, bad)
        with pytest.raises(ConfigError, match="EDGETP_SPIN_US=.* is not a number of micro"):
            settings.spin_seconds()
