"""With keys, the allreduce's own connections are encrypted too: a passive capture of the
loopback interface during a generation holds none of the activation bytes the master sent or
received on the data link (star) or on the ring, where the same capture without keys shows
them; and a master end that does not hold the link's agreed keys cannot use the data link."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.capture import LoopbackCapture
from helpers.deadline import wait_for

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.net import linkkeys
from edgetp.net.datalink import DataLink
from edgetp.net.ring import RingLink
from edgetp.net.sealedlink import SealedDataLink
from edgetp.net.transport.sockets import url_host_port
from edgetp.runtime.local import LocalCluster
from edgetp.runtime.master import Master, Prompt

NEEDLE_BYTES = 24


def answer(master: Master, prompt: str) -> str:
    return master.generate(Prompt(prompt), SamplingConfig(), GenerationConfig()).text.strip()


class Activations:
    """The payload bytes of every tensor the master's allreduce links sent or received."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def keep(self, tensors: Any) -> None:
        for tensor in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
            raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            if len(raw) >= NEEDLE_BYTES and len(set(raw)) > 8:  # not a constant run
                self.payloads.append(raw)

    def needles(self) -> list[bytes]:
        """A slice of each payload: its start and its middle."""
        out = []
        for raw in self.payloads:
            middle = len(raw) // 2
            out += [raw[:NEEDLE_BYTES], raw[middle:middle + NEEDLE_BYTES]]
        return out


@contextmanager
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[Activations]:
    """Record what the (in-process) master's data links and ring link carry, in clear."""
    seen = Activations()

    def wrap_send(cls: type) -> None:
        original = cls.send

        def send(self: Any, *args: Any) -> Any:
            seen.keep(args[-1])
            return original(self, *args)

        monkeypatch.setattr(cls, "send", send)

    def wrap_receive(cls: type, tensors_of: Any) -> None:
        original = cls.receive

        def receive(self: Any, *args: Any) -> Any:
            got = original(self, *args)
            if got is not None:
                seen.keep(tensors_of(got))
            return got

        monkeypatch.setattr(cls, "receive", receive)

    for cls in (DataLink, SealedDataLink):
        wrap_send(cls)
        wrap_receive(cls, lambda got: got.tensors)
    wrap_send(RingLink)
    wrap_receive(RingLink, lambda message: message.tensors)
    yield seen


def allreduce_ports(master: Master) -> set[int]:
    """The ports of the master's data links and of every ring listener."""
    transport = master.runner.transport  # type: ignore[attr-defined]
    ports = {link.sock.getpeername()[1] for link in transport.data_links.values()}
    ports |= {url_host_port(peer.ring_address)[1] for peer in transport.peers.values()
              if peer.ring_address}
    if transport.ring_port:
        ports.add(transport.ring_port)
    return ports


def captured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allreduce: str,
             secure: bool) -> tuple[bytes, list[bytes]]:
    """What a capture of the allreduce's connections saw during a generation, and the
    activation slices the master sent or received on them."""
    cluster = LocalCluster(DEMO_MODEL_DIR, 3, timeout_s=10.0, allreduce=allreduce,
                           secure=secure, split_dir=tmp_path / f"{allreduce}-{secure}")
    with cluster as master, recording(monkeypatch) as seen:
        ports = allreduce_ports(master)
        assert len(ports) == (2 if allreduce == "star" else 3)
        with LoopbackCapture(ports) as capture:
            assert answer(master, demo_prompt(5, 3)) == expected_text(5, 3)
    monkeypatch.undo()
    return capture.everything(), seen.needles()


@pytest.mark.parametrize("allreduce", ["star", "ring"])
def test_a_capture_of_the_allreduce_links_under_keys_holds_no_activations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allreduce: str) -> None:
    plain, plain_needles = captured(tmp_path, monkeypatch, allreduce, secure=False)
    assert len(plain_needles) > 20
    shown = sum(needle in plain for needle in plain_needles)
    assert shown > 0.9 * len(plain_needles)  # the control: without keys they are readable
    sealed, needles = captured(tmp_path, monkeypatch, allreduce, secure=True)
    assert len(needles) > 20
    assert len(sealed) > sum(len(n) for n in needles)  # the traffic was captured
    assert not [needle for needle in needles if needle in sealed]


def test_a_master_end_without_the_agreed_keys_cannot_use_the_data_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The master's end of the first link is sealed with keys from an exchange with someone
    else (what an end that did not hold the CURVE channel has): the worker's first partial
    fails authentication, the request fails naming the worker, the link is closed; the worker
    joins again, with keys agreed properly this time, and the cluster answers."""
    real, calls = linkkeys.master_link_keys, []

    def stranger_keys_once(hello: dict[str, Any], *args: Any) -> Any:
        calls.append(hello["data_key"])
        keys, fields = real(hello, *args)
        if len(calls) == 1:  # not the worker's offer: other keys
            keys, _ = real({**hello, "data_key": linkkeys.KeyOffer().public_hex}, *args)
        return keys, fields

    monkeypatch.setattr("edgetp.net.transport.master.master_link_keys", stranger_keys_once)
    cluster = LocalCluster(DEMO_MODEL_DIR, 2, timeout_s=5.0, secure=True,
                           split_dir=tmp_path / "split")
    with cluster as master:
        transport = master.runner.transport  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError, match="rank 1 .*failed authentication"):
            answer(master, demo_prompt(2, 9))
        wait_for(lambda: len(calls) == 2 and 1 in transport.data_links, 30.0,
                 "the worker joining again with a new data link")
        assert calls[0] != calls[1]  # a fresh key for the new connection
        assert answer(master, demo_prompt(2, 9)) == expected_text(2, 9)
        assert isinstance(transport.data_links[1], SealedDataLink)
