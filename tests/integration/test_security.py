"""Only invited devices join, nobody can read the traffic, and random bytes cannot take a
node down (real processes, real sockets, real CURVE)."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
from helpers.relay import Relay

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.core.metrics import peak_rss_bytes
from edgetp.model.checkpoint import load_model
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.net import wire
from edgetp.net.security import KeyPair, create_keys
from edgetp.runtime.local import LocalCluster, free_port
from edgetp.runtime.master import Master, Prompt

PROMPT = demo_prompt(6, 4)


def answer(master: Master, prompt: str = PROMPT) -> str:
    return master.generate(Prompt(prompt), SamplingConfig(), GenerationConfig()).text.strip()


def hello_frames(rank: int = 1) -> list[bytes]:
    fields = {"rank": rank, "fingerprint": "x", "plan": "x", "dtype": "float32", "pid": 1,
              "host": "intruder", "version": "0", "time": time.time(), "data_port": 0,
              "data_token": "", "data_key": "", "data_ciphers": "", "kv_slots": 1}
    return [bytes(f) for f in wire.encode("hello", fields)]


def curve_client(address: str, keys: KeyPair, server_public: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 3000)  # a refused handshake can leave no pipe to queue on
    sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    sock.curve_serverkey = server_public
    sock.connect(address)
    return sock


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = LocalCluster(DEMO_MODEL_DIR, 2, timeout_s=5.0, secure=True,
                           split_dir=tmp_path_factory.mktemp("secure"))
    with cluster as master:
        yield cluster, master


def test_uninvited_key_cannot_join_but_a_listed_one_is_answered(secure_cluster, tmp_path):
    cluster, master = secure_cluster
    keys_dir = cluster.split_dir / "keys"
    server = KeyPair.load(keys_dir / "master.key").public
    create_keys(tmp_path, "intruder")
    intruder = curve_client(cluster.address, KeyPair.load(tmp_path / "intruder.key_secret"),
                            server)
    try:
        intruder.send_multipart(hello_frames())
    except zmq.Again:
        pass  # the master refused the handshake before the hello could even be queued
    else:
        assert not intruder.poll(2000), "an unlisted key got an answer"
    intruder.close()
    listed = curve_client(cluster.address, KeyPair.load(keys_dir / "worker-1.key_secret"),
                          server)
    listed.send_multipart(hello_frames())
    assert listed.poll(3000), "a listed key must at least get a refusal"
    assert wire.decode(listed.recv_multipart()).op == "refuse"  # wrong fingerprint
    listed.close()
    assert answer(master) == expected_text(6, 4)  # the real worker is still in


def test_plaintext_client_is_refused(secure_cluster) -> None:
    cluster, master = secure_cluster
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(cluster.address)
    plain.send_multipart(hello_frames())
    assert not plain.poll(2000)
    plain.close()
    assert sorted(master.runner.transport.peers) == [1]


def captured_traffic(tmp_path: Path, secure: bool) -> tuple[bytes, str]:
    cluster = LocalCluster(DEMO_MODEL_DIR, 2, timeout_s=5.0, secure=secure,
                           split_dir=tmp_path / ("secure" if secure else "plain"))
    port = free_port()
    cluster.address = f"tcp://127.0.0.1:{port}"
    relay = Relay(port)
    cluster.worker_address = f"tcp://127.0.0.1:{relay.port}"
    try:
        with _started(cluster, port) as master:
            text = answer(master)
    finally:
        relay.close()
    return bytes(relay.captured), text


class _started:
    """Start a LocalCluster on a fixed port (the relay forwards to it)."""

    def __init__(self, cluster: LocalCluster, port: int) -> None:
        self.cluster, self.port = cluster, port

    def __enter__(self) -> Master:
        import edgetp.runtime.local as module

        original = module.free_port
        module.free_port = lambda: self.port  # the master binds where the relay points
        try:
            return self.cluster.__enter__()
        finally:
            module.free_port = original

    def __exit__(self, *exc: object) -> None:
        self.cluster.__exit__(*exc)


def test_passive_capture_of_a_curve_link_shows_no_activations(tmp_path: Path) -> None:
    model = load_model(DEMO_MODEL_DIR)
    ids = Master.local(DEMO_MODEL_DIR).encode_prompt(Prompt(PROMPT))
    with torch.inference_mode():
        first_row = model.embed(torch.tensor(ids[:1]))[0].numpy().tobytes()  # sent in STEP
    plain, plain_text = captured_traffic(tmp_path, secure=False)
    assert plain_text == expected_text(6, 4)
    assert first_row in plain  # the control: without CURVE the activations are readable
    secure, secure_text = captured_traffic(tmp_path, secure=True)
    assert secure_text == expected_text(6, 4)
    assert len(secure) > 10_000  # the whole generation went through the relay
    assert first_row not in secure and first_row[:16] not in secure
    assert b"fingerprint" not in secure and b"partial" not in secure


def mutated(frames: list[bytes], rng: random.Random) -> list[bytes]:
    choice = rng.randrange(6)
    if choice == 0:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
    frames = [bytearray(f) for f in frames]
    target = frames[rng.randrange(len(frames))]
    if choice == 1 and target:
        target[rng.randrange(len(target))] ^= 1 << rng.randrange(8)
    elif choice == 2:
        del target[rng.randrange(len(target) + 1):]
    elif choice == 3:
        target += rng.randbytes(rng.randrange(1, 32))
    elif choice == 4:
        frames.append(bytearray(rng.randbytes(rng.randrange(0, 128))))
    else:
        frames = frames[: rng.randrange(len(frames) + 1)] or [bytearray()]
    return [bytes(f) for f in frames]


def valid_messages() -> list[list[bytes]]:
    h = torch.randn(1, 96)
    messages = [
        wire.encode("partial", {"seq": 1, "step": 1, "index": 0}, [h]),
        wire.encode("ping", {"time": 1.0}),
        wire.encode("stats", {"seq": 1, "stats": {"a": 1}},
                    [torch.zeros(1, 7, dtype=torch.float64)]),
        wire.encode("step", {"seq": 1, "step": 1, "slots": [0], "starts": [0]}, [h]),
        wire.encode("ring", {"seq": 1, "step": 1, "index": 0, "hop": 0}, [h]),
    ]
    return [[bytes(f) for f in m] for m in messages] + [hello_frames()]


def test_fuzz_ten_thousand_frames_at_a_live_master_and_workers(tmp_path: Path) -> None:
    """Random and mutated frames at the master's socket and at the workers' ring sockets:
    no crash, no hang, bounded memory, and the next generation is right."""
    rng = random.Random(1234)
    seeds = valid_messages()
    cluster = LocalCluster(DEMO_MODEL_DIR, 3, timeout_s=5.0, split_dir=tmp_path / "fuzz")
    with cluster as master:
        assert answer(master) == expected_text(6, 4)
        rss_before = peak_rss_bytes()
        transport = master.runner.transport
        targets = [cluster.address] + [p.ring_address for p in transport.peers.values()
                                       if p.ring_address]
        sockets = []
        for address in targets:
            kind = zmq.DEALER if address == cluster.address else zmq.PUSH
            sock = zmq.Context.instance().socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(address)
            sockets.append(sock)
        sent = 0
        for i in range(12_000):
            if i % 3:
                frames = mutated(rng.choice(seeds), rng)
            else:
                frames = [rng.randbytes(rng.randrange(1, 200))]
            sockets[i % len(sockets)].send_multipart(frames)
            sent += 1
        time.sleep(2.0)  # let the nodes chew through the queue
        assert all(proc.poll() is None for proc in cluster.workers.values()), "a worker died"
        assert answer(master, demo_prompt(2, 11)) == expected_text(2, 11)
        assert transport.traffic.dropped > 100
        assert peak_rss_bytes() - rss_before < 200 * 2**20
        for sock in sockets:
            sock.close()
    assert sent >= 10_000


@pytest.mark.slow
def test_kill_and_restart_a_worker_mid_request_ten_times(tmp_path: Path) -> None:
    """Each time: a clear error naming the node within the timeout, then success."""
    timeout_s = 3.0
    cluster = LocalCluster(DEMO_MODEL_DIR, 3, timeout_s=timeout_s, split_dir=tmp_path / "kill")
    with cluster as master:
        for attempt in range(10):
            victim = 1 + attempt % 2
            killer = threading.Timer(0.05, cluster.kill_worker, args=(victim,))
            started = time.monotonic()
            killer.start()
            with pytest.raises(RuntimeError, match=f"rank {victim}"):
                for _ in range(50):  # keep generating until the kill lands mid-request
                    master.generate(Prompt(demo_prompt(1, 0)), SamplingConfig(),
                                    GenerationConfig(max_new_tokens=100))
            assert time.monotonic() - started < timeout_s + 5
            killer.join()
            cluster.start_worker(victim)
            cluster.wait_until_joined()
            assert answer(master) == expected_text(6, 4)


def test_a_corrupted_shard_stops_its_worker_with_the_file_named(tmp_path: Path) -> None:
    cluster = LocalCluster(DEMO_MODEL_DIR, 2, timeout_s=3.0, split_dir=tmp_path / "bad")
    with cluster as master:
        assert answer(master) == expected_text(6, 4)
    layer = tmp_path / "bad" / "rank-1" / "layer-002.safetensors"
    data = bytearray(layer.read_bytes())
    data[-10] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="layer-002.safetensors"):
        with LocalCluster(DEMO_MODEL_DIR, 2, timeout_s=3.0, split_dir=tmp_path / "bad"):
            pass
