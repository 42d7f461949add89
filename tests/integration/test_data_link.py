"""The allreduce's TCP data link in a real cluster: the same tokens as over ZeroMQ alone; it
listens on the cluster's interface only; a connection made before the master's (silent, or
showing the wrong token) cannot keep the master out; ``--data-port`` fixes its port."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from helpers.cluster import (
    JOIN_TIMEOUT_S,
    TIMEOUT_S,
    FakeMaster,
    start_worker_process,
    wait_for,
    worker_command,
)
from helpers.processes import spawn

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.net import datalink as dataplane
from edgetp.net import wire
from edgetp.runtime.local import LocalCluster, free_port
from edgetp.runtime.master import Master, Prompt
from edgetp.shard.split import split_checkpoint


def _generate(monkeypatch, tmp_path, link: str) -> tuple[list[int], dict[int, int]]:
    monkeypatch.setenv(dataplane.ENV_SWITCH, link)
    cluster = LocalCluster(DEMO_MODEL_DIR, 3, timeout_s=10.0, split_dir=tmp_path / "split")
    with cluster as master:
        result = master.generate(Prompt(demo_prompt(3, 11)), SamplingConfig(),
                                 GenerationConfig(max_new_tokens=10))
        transport = master.runner.transport  # type: ignore[attr-defined]
        links = {rank: link.bytes_received for rank, link in transport.data_links.items()}
        ops = dict(transport.traffic.received)
    assert ops.get("partial", 0) > 0
    return result.token_ids, links


def test_the_cluster_allreduce_runs_over_the_link_with_the_same_tokens(monkeypatch, tmp_path):
    tokens, links = _generate(monkeypatch, tmp_path, "1")
    assert sorted(links) == [1, 2] and all(n > 0 for n in links.values())
    zmq_tokens, zmq_links = _generate(monkeypatch, tmp_path, "0")  # EDGETP_DATA_LINK=0
    assert zmq_links == {}
    assert tokens == zmq_tokens


def test_two_nodes_exchange_partials_and_give_the_tokens_of_one(tmp_path):
    """With one worker the master sends its own partial instead of the sum (both add the two
    themselves): no sum crosses the data link, and greedy tokens and logits are those of the
    whole model in one process, in float32 and through the int8 wire format's rounding."""
    prompt = Prompt(demo_prompt(4, 7))
    reference = Master.local(DEMO_MODEL_DIR)
    expected = reference.generate(prompt, SamplingConfig(), GenerationConfig(max_new_tokens=12))
    ids = torch.tensor(reference.encode_prompt(prompt))
    for wire_dtype in ("f32", "int8"):
        cluster = LocalCluster(DEMO_MODEL_DIR, 2, timeout_s=10.0, wire_dtype=wire_dtype,
                               split_dir=tmp_path / "split")
        with cluster as master:
            result = master.generate(prompt, SamplingConfig(),
                                     GenerationConfig(max_new_tokens=12))
            logits = master.runner.logits(ids, 0)
            traffic = master.runner.transport.traffic  # type: ignore[attr-defined]
            sent, received = dict(traffic.sent), dict(traffic.received)
        assert sent.get("partial", 0) > 0 and sent.get("sum", 0) == 0, sent
        assert received.get("partial", 0) > 0
        if wire_dtype == "f32":
            assert result.token_ids == expected.token_ids
            torch.testing.assert_close(logits, reference.runner.logits(ids, 0), rtol=1e-4,
                                       atol=1e-4)
        else:  # the wire's rounding: the same text, not necessarily the same logits
            assert result.text == expected.text


def listening(pid: int) -> list[tuple[str, int]]:
    """The (address, port) of every TCP socket process ``pid`` listens on."""
    return sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN)


def welcome_with_link(fake: FakeMaster, identity: bytes) -> None:
    """The fake master's welcome, saying the data link is open."""
    fields = {name: kind() for name, kind in wire.SCHEMAS["welcome"].items()}
    fields.update(session="fake", wire_dtype="f32", time=time.time(), allreduce="star",
                  data=True)
    fake.send(identity, "welcome", fields)


def still_open(sock: socket.socket) -> bool:
    """Whether the peer has neither closed nor reset ``sock`` (nothing is read)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_connections_made_first_cannot_keep_the_master_out(tmp_path: Path) -> None:
    """A real worker: while it joins, a silent connection and one with a wrong token reach its
    data port before the master's. The worker still takes the master's link at once (no second
    hello), and it listens on loopback, the interface it reaches this master from."""
    split = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 2)
    fake = FakeMaster()
    proc = start_worker_process(split.rank_dirs[1], fake.address, tmp_path / "worker.log")
    intruders: list[socket.socket] = []
    try:
        identity, hello = fake.recv(JOIN_TIMEOUT_S, ("hello",))
        port, token = hello.fields["data_port"], hello.fields["data_token"]
        assert port and token
        assert listening(proc.pid) == [("127.0.0.1", port)]  # not 0.0.0.0; nothing else
        intruders = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        intruders[1].sendall(dataplane.MAGIC + b"0" * len(token))  # shows a wrong token
        time.sleep(0.2)  # they are queued first
        link = dataplane.connect("127.0.0.1", port, token)
        welcome_with_link(fake, identity)
        fake.recv(5.0, ("ping",))  # the clock sync: the worker has joined
        joined = time.monotonic()
        while time.monotonic() - joined < 2 * dataplane.JOIN_TIMEOUT_S:
            frames = fake.recv_raw(0.2)
            if frames is not None:
                message = wire.decode(frames[1:])
                assert message.op != "hello", "the worker gave up on the master's data link"
                if message.op == "ping":
                    fake.send(frames[0], "pong", {"time": time.time(),
                                                  "echo": message.fields["time"]})
        assert still_open(link.sock), "the worker closed the master's data link"
        assert not any(still_open(s) for s in intruders), "an intruder's connection stayed open"
        assert listening(proc.pid) == []  # closed once the link is up (no ring: the star)
        link.close()
    finally:
        for sock in intruders:
            sock.close()
        proc.kill()
        proc.wait(timeout=10)
        fake.close()


@contextmanager
def silent_connections(port: int) -> Iterator[list[int]]:
    """Keep one silent connection open to ``port`` whenever something listens there (another
    as soon as the last one is closed); yields the count of connections made."""
    made, stop = [0], threading.Event()

    def keep_one() -> None:
        while not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=1)
            except OSError:
                time.sleep(0.005)
                continue
            sock.settimeout(None)  # still_open() peeks without waiting
            made[0] += 1
            with sock:
                while not stop.is_set() and still_open(sock):
                    time.sleep(0.005)

    thread = threading.Thread(target=keep_one, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        stop.set()
        thread.join(timeout=5)


def test_a_fixed_data_port_joins_despite_a_silent_connection(tmp_path: Path) -> None:
    """``edgetp worker --data-port P``, started before its master: a silent connection is
    queued at P before the master's every time the worker listens there. The master's data
    link still goes to P at the first join (no second hello), and the cluster answers right."""
    split = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 2)
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    command = worker_command(split.rank_dirs[1], address, TIMEOUT_S, "--data-port", str(port))
    with silent_connections(port) as made, (tmp_path / "worker.log").open("ab") as log:
        proc = spawn(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: made[0] >= 1, JOIN_TIMEOUT_S, "the worker listening on its data port")
        time.sleep(0.2)  # the silent connection is queued before the master's
        master = Master.cluster(split.rank_dirs[0], address, timeout_s=TIMEOUT_S)
        try:
            master.wait_for_workers(JOIN_TIMEOUT_S)
            transport = master.runner.transport  # type: ignore[attr-defined]
            hellos = transport.traffic.received["hello"]
            time.sleep(1.5 * dataplane.JOIN_TIMEOUT_S)  # a worker that gave up would say hello
            text = master.generate(Prompt(demo_prompt(4, 3)), SamplingConfig(),
                                   GenerationConfig(max_new_tokens=40)).text
            assert text.strip() == expected_text(4, 3)
            assert transport.traffic.received["hello"] == hellos, "the worker joined again"
            assert transport.data_links[1].sock.getpeername() == ("127.0.0.1", port)
        finally:
            master.close(shutdown_workers=True)
            proc.wait(timeout=30)

