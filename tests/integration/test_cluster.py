"""Real clusters: worker processes, ZeroMQ on loopback, the master in this process.

* N nodes (1-4, uneven shares, private layers) generate exactly what one device does, and the
  cluster's logits equal the local model's within 1e-5.
* Each step costs exactly the messages the star allreduce needs.
* A killed worker fails the request quickly with an error naming it; the master stays usable
  and a restarted worker is taken back.
* Malformed frames, to the master or to a worker, are dropped and the node keeps serving.
* A worker with a shard of another split is refused and exits saying why.
* Workers notice a master that went away and rejoin the next one by themselves.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
from helpers.cluster import (
    JOIN_TIMEOUT_S,
    TIMEOUT_S,
    FakeMaster,
    TrackedCluster,
    call_with_deadline,
    running_cluster,
    start_worker_process,
    wait_for,
)
from helpers.hf_models import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.checkpoint import load_model
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.net import wire
from edgetp.net.codec import BF16_CARRY_MIN_VALUES
from edgetp.net.datalink import HEADER
from edgetp.net.transport import ClusterError
from edgetp.net.wire import PROTOCOL_VERSION as V
from edgetp.runtime.engine import GenerationResult, LocalRunner
from edgetp.runtime.master import Master, Prompt
from edgetp.shard.split import split_checkpoint

ATOL = 1e-5
DECODE_STEPS = 32
GREEDY = SamplingConfig()
TINY_PROMPT = [1, 17, 42, 99, 5, 64, 23, 7, 88, 120, 3, 56]  # token ids (< VOCAB)
TINY_LAYERS = 4
DEMO = (3, 5)  # "count by 3 : 5"
GENERATE_DEADLINE_S = 60.0

# name -> (nodes, shares, private_layers)
TINY_CLUSTERS: dict[str, tuple[int, tuple[float, ...] | None, int]] = {
    "1node": (1, None, 0),
    "2nodes-3:1": (2, (3.0, 1.0), 0),
    "3nodes-2:1:1-private1": (3, (2.0, 1.0, 1.0), 1),
    "4nodes": (4, None, 0),
}


# -- models -----------------------------------------------------------------------------------


def write_wordlevel_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer ``<pad> <s> </s> <unk> w4 ... w{V-1}``."""
    names = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(names[:4])
    tokenizer.save(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer llama3-family model (8 heads, 2 KV heads) with a tokenizer."""
    source, _ = tiny_model_dir("llama3", num_hidden_layers=TINY_LAYERS)
    model_dir = tmp_path_factory.mktemp("tiny") / "llama3"
    shutil.copytree(source, model_dir)
    write_wordlevel_tokenizer(model_dir, VOCAB)
    return model_dir


def generate_ids(master: Master, prompt_ids: list[int], max_new_tokens: int,
                 stop_on_eos: bool = False) -> GenerationResult:
    gen = GenerationConfig(max_new_tokens=max_new_tokens, stop_on_eos=stop_on_eos)
    return call_with_deadline(lambda: master.engine.generate(prompt_ids, GREEDY, gen),
                              GENERATE_DEADLINE_S, "a generation")


def generate_demo(master: Master, step: int = DEMO[0], start: int = DEMO[1],
                  **kwargs: Any) -> GenerationResult:
    gen = GenerationConfig(max_new_tokens=kwargs.pop("max_new_tokens", 128), **kwargs)
    return call_with_deadline(
        lambda: master.generate(Prompt(demo_prompt(step, start)), GREEDY, gen),
        GENERATE_DEADLINE_S, "a generation")


def assert_demo_answer(master: Master, step: int = DEMO[0], start: int = DEMO[1]) -> None:
    result = generate_demo(master, step, start)
    assert result.text.strip() == expected_text(step, start)
    assert result.finish_reason == "eos"


@pytest.fixture(scope="module")
def tiny_reference(tiny_model: Path) -> GenerationResult:
    """The single-device answer: 1 prefill + 32 decode steps, whatever the tokens."""
    return generate_ids(Master.local(tiny_model), TINY_PROMPT, DECODE_STEPS + 1)


@pytest.fixture(scope="module")
def demo_reference() -> GenerationResult:
    return generate_demo(Master.local(DEMO_MODEL_DIR))


# -- clusters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(TINY_CLUSTERS))
def tiny_cluster(request: pytest.FixtureRequest, tiny_model: Path,
                 tmp_path_factory: pytest.TempPathFactory):
    nodes, shares, private = TINY_CLUSTERS[request.param]
    root = tmp_path_factory.mktemp(f"cluster-{request.param}")
    with running_cluster(tiny_model, nodes, root, shares=shares,
                         private_layers=private) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def demo_cluster(tmp_path_factory: pytest.TempPathFactory):
    with running_cluster(DEMO_MODEL_DIR, 4, tmp_path_factory.mktemp("demo-cluster")) as cluster:
        yield cluster


def master_of(cluster: TrackedCluster) -> Master:
    assert cluster.master is not None
    return cluster.master


# -- equivalence with one device --------------------------------------------------------------


def test_tiny_cluster_greedy_equals_single_device(tiny_cluster: TrackedCluster,
                                                  tiny_reference: GenerationResult) -> None:
    result = generate_ids(master_of(tiny_cluster), TINY_PROMPT, DECODE_STEPS + 1)
    assert len(result.decode_ms) == DECODE_STEPS
    assert result.token_ids == tiny_reference.token_ids
    # and again: the second request reuses the workers' caches from position 0
    again = generate_ids(master_of(tiny_cluster), TINY_PROMPT[:5], DECODE_STEPS + 1)
    local = generate_ids(Master.local(tiny_cluster.model_dir), TINY_PROMPT[:5], DECODE_STEPS + 1)
    assert again.token_ids == local.token_ids


def compare_logits(master: Master, model_dir: Path, prompt: list[int], steps: int = 4) -> None:
    """Prompt logits, then a few decode steps fed the same tokens, within ATOL of one device."""
    local = LocalRunner(load_model(model_dir))
    runner = master.runner
    tokens = torch.tensor(prompt, dtype=torch.int64)
    position = 0
    runner.reset()
    for step in range(steps + 1):
        got = call_with_deadline(lambda t=tokens, p=position: runner.logits(t, p),
                                 GENERATE_DEADLINE_S, "ClusterRunner.logits")
        want = local.logits(tokens, position)
        assert got.shape == want.shape and got.dtype == torch.float32
        diff = (got - want).abs().max().item()
        assert diff <= ATOL, f"step {step}: max |cluster - local| = {diff:.3g}"
        position += tokens.numel()
        tokens = want.argmax().reshape(1)


def test_tiny_cluster_logits_equal_local_runner(tiny_cluster: TrackedCluster) -> None:
    compare_logits(master_of(tiny_cluster), tiny_cluster.model_dir, TINY_PROMPT)


def test_demo_cluster_answers_by_the_rule(demo_cluster: TrackedCluster,
                                          demo_reference: GenerationResult) -> None:
    master = master_of(demo_cluster)
    result = generate_demo(master)
    assert result.text.strip() == expected_text(*DEMO)
    assert result.token_ids == demo_reference.token_ids
    assert_demo_answer(master, 7, 20)


def test_demo_cluster_logits_equal_local_runner(demo_cluster: TrackedCluster) -> None:
    master = master_of(demo_cluster)
    prompt = master.encode_prompt(Prompt(demo_prompt(*DEMO)))
    compare_logits(master, DEMO_MODEL_DIR, prompt)


# -- message counts ---------------------------------------------------------------------------


def traffic_snapshot(cluster: TrackedCluster) -> tuple[Counter[str], Counter[str]]:
    traffic = cluster.transport.traffic
    return Counter(traffic.sent), Counter(traffic.received)


def traffic_since(cluster: TrackedCluster, before: tuple[Counter[str], Counter[str]]
                  ) -> tuple[Counter[str], Counter[str]]:
    sent, received = traffic_snapshot(cluster)
    sent.subtract(before[0])
    received.subtract(before[1])
    for counter in (sent, received):  # heartbeats come and go with the clock: ignore them
        for op in ("ping", "pong"):
            counter.pop(op, None)
    return +sent, +received  # unary plus drops zero counts


def expected_traffic(cluster: TrackedCluster, steps: int) -> tuple[Counter[str], Counter[str]]:
    """Per step and worker: 1 step + (2L-1) sums out, 2L partials in (L shared layers); with
    one worker on a data link the master sends its own (2L-1) partials instead of the sums."""
    workers = cluster.n_nodes - 1
    layers = len(master_of(cluster).runner.plan.shared_layers)  # type: ignore[attr-defined]
    exchange = workers == 1 and bool(master_of(cluster).runner.transport.data_links)  # type: ignore[attr-defined]
    sent = Counter({"step": workers * steps,
                    "partial" if exchange else "sum": workers * steps * (2 * layers - 1)})
    received = Counter({"partial": workers * steps * 2 * layers})
    return +sent, +received


def check_message_counts(cluster: TrackedCluster, prompt: list[int]) -> None:
    master = master_of(cluster)
    runner = master.runner
    # One decode step, driven by hand.
    runner.reset()
    call_with_deadline(lambda: runner.logits(torch.tensor(prompt), 0), GENERATE_DEADLINE_S)
    before = traffic_snapshot(cluster)
    call_with_deadline(lambda: runner.logits(torch.tensor([5]), len(prompt)), GENERATE_DEADLINE_S)
    assert traffic_since(cluster, before) == expected_traffic(cluster, 1)
    # A whole generation: 1 prefill step (one chunk) + (G - 1) decode steps.
    new_tokens = 9
    before = traffic_snapshot(cluster)
    generate_ids(master, prompt, new_tokens)
    assert traffic_since(cluster, before) == expected_traffic(cluster, new_tokens)


def test_tiny_cluster_message_counts(tiny_cluster: TrackedCluster) -> None:
    check_message_counts(tiny_cluster, TINY_PROMPT)


def test_demo_cluster_message_counts(demo_cluster: TrackedCluster) -> None:
    master = master_of(demo_cluster)
    check_message_counts(demo_cluster, master.encode_prompt(Prompt(demo_prompt(*DEMO))))
    assert len(master.runner.plan.shared_layers) == 4  # type: ignore[attr-defined]


# -- dead workers -----------------------------------------------------------------------------


def names_rank(message: str, rank: int) -> bool:
    return re.search(rf"\brank(?:\(s\))? \[?{rank}\b", message) is not None


def expect_cluster_failure(fn: Any, rank: int, since: float) -> None:
    """``fn()`` must fail with an error naming ``rank`` within the timeout (+2 s) of ``since``."""
    with pytest.raises(RuntimeError) as info:
        call_with_deadline(fn, GENERATE_DEADLINE_S, "a request to a broken cluster")
    elapsed = time.monotonic() - since
    assert isinstance(info.value, ClusterError | RuntimeError)
    assert names_rank(str(info.value), rank), f"the error does not name rank {rank}: {info.value}"
    assert elapsed < TIMEOUT_S + 2, f"the failure took {elapsed:.1f} s"


def restart(cluster: TrackedCluster, rank: int) -> None:
    cluster.start_worker(rank)
    call_with_deadline(lambda: cluster.wait_until_joined(JOIN_TIMEOUT_S), JOIN_TIMEOUT_S + 5,
                       f"rank {rank} rejoining")


def kill_during_generation(cluster: TrackedCluster, rank: int) -> None:
    """Kill ``rank`` from another thread once the first tokens are out; the request fails."""
    master = master_of(cluster)
    first_tokens = threading.Event()
    killed_at: list[float] = []
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) >= 3:
            first_tokens.set()

    def kill() -> None:
        if first_tokens.wait(GENERATE_DEADLINE_S):
            killed_at.append(time.monotonic())
            cluster.kill_worker(rank)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    gen = GenerationConfig(max_new_tokens=200, stop_on_eos=False)  # ~3 s of decoding
    prompt = Prompt(demo_prompt(*DEMO))
    try:
        with pytest.raises(RuntimeError) as info:
            call_with_deadline(lambda: master.generate(prompt, GREEDY, gen, on_text),
                               GENERATE_DEADLINE_S, "the interrupted generation")
    finally:
        first_tokens.set()
        killer.join(10)
    assert killed_at, "the generation ended before the worker was killed"
    assert len(pieces) < 200
    elapsed = time.monotonic() - killed_at[0]
    assert names_rank(str(info.value), rank), f"error does not name rank {rank}: {info.value}"
    assert elapsed < TIMEOUT_S + 2, f"the failure took {elapsed:.1f} s after the kill"


def kill_between_requests(cluster: TrackedCluster, rank: int) -> None:
    cluster.kill_worker(rank)
    expect_cluster_failure(lambda: generate_demo(master_of(cluster)), rank, time.monotonic())


@pytest.mark.parametrize("rounds", [[(kill_during_generation, 2), (kill_between_requests, 1),
                                     (kill_during_generation, 3)]], ids=["3-rounds"])
def test_killed_worker_fails_the_request_and_rejoins(demo_cluster: TrackedCluster,
                                                      rounds: list[tuple[Any, int]]) -> None:
    """Three times in a row: kill, a quick clear error, restart, the right answer again."""
    master = master_of(demo_cluster)
    for kill, rank in rounds:
        kill(demo_cluster, rank)
        assert rank not in demo_cluster.workers
        restart(demo_cluster, rank)
        assert_demo_answer(master)


def test_worker_restarted_right_after_a_kill(demo_cluster: TrackedCluster) -> None:
    """No failed request in between: the master must still not mistake the dead one for it."""
    master = master_of(demo_cluster)
    demo_cluster.kill_worker(3)
    restart(demo_cluster, 3)
    assert demo_cluster.transport.peers[3].pid == demo_cluster.workers[3].pid
    assert_demo_answer(master, 4, 10)


# -- malformed frames -------------------------------------------------------------------------


def malformed_messages(hidden: int) -> list[list[bytes]]:
    step = {"seq": 1, "step": 1, "index": 0}
    good_partial = wire.encode("partial", step, [torch.zeros(1, hidden)])
    return [
        [b"\xff\x00garbage"],
        [b""],
        [msgpack.packb({"v": V + 1, "op": "partial", "tensors": [["f32", [1, hidden]]], **step}),
         bytes(good_partial[1])],  # wrong version
        [bytes(good_partial[0]), bytes(good_partial[1])[:10]],  # truncated tensor
        [bytes(good_partial[0])],  # tensor frame missing
        [bytes(good_partial[0]), bytes(good_partial[1]), b"extra"],
        [msgpack.packb({"v": V, "op": "partial", "tensors": [["f32", [2**30, 2**30]]], **step}),
         b"\x00" * 16],  # huge declared tensor
        [msgpack.packb({"v": V, "op": "launch", "tensors": []})],  # unknown op
        [msgpack.packb({"v": V, "op": "error", "tensors": [], "message": "x" * 70_000})],
        [msgpack.packb({"v": V, "op": "hello", "tensors": [], "rank": "1"})],  # bad hello
    ]


def test_master_drops_malformed_frames(demo_cluster: TrackedCluster) -> None:
    master = master_of(demo_cluster)
    hidden = master.runner.model.config.hidden_size  # type: ignore[attr-defined]
    dropped = demo_cluster.transport.traffic.dropped
    bad = malformed_messages(hidden)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(demo_cluster.address)
        for frames in bad:
            sock.send_multipart(frames)
        # a valid-looking partial from a stranger is not counted; the stranger is told to rejoin
        sock.send_multipart(wire.encode("partial", {"seq": 1, "step": 1, "index": 0},
                                        [torch.zeros(1, hidden)]))
        assert sock.poll(5000), "no answer to a partial from an unknown peer"
        assert wire.decode(sock.recv_multipart()).op == "rejoin"
        wait_for(lambda: demo_cluster.transport.traffic.dropped >= dropped + len(bad), 5,
                 "the master to drop the malformed messages")
        assert sorted(demo_cluster.transport.peers) == [1, 2, 3]
        assert_demo_answer(master)
    finally:
        sock.close(linger=0)


def test_master_survives_malformed_frames_during_a_generation(
        demo_cluster: TrackedCluster) -> None:
    """Strangers sending junk (and vanishing at once) while a request runs do not break it."""
    master = master_of(demo_cluster)
    hidden = master.runner.model.config.hidden_size  # type: ignore[attr-defined]
    dropped = demo_cluster.transport.traffic.dropped
    stop = threading.Event()
    sent = Counter[str]()

    def pester() -> None:
        ctx = zmq.Context.instance()
        seq = master.runner.seq  # type: ignore[attr-defined]
        while not stop.is_set():
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(demo_cluster.address)
            for frames in malformed_messages(hidden):
                sock.send_multipart(frames)
                sent["bad"] += 1
            for step in range(1, 4):  # partials that look like the running request's
                sock.send_multipart(wire.encode(
                    "partial", {"seq": seq + 1, "step": step, "index": 0},
                    [torch.full((1, hidden), 1e3)]))
            sock.send_multipart(wire.encode("ping", {"time": time.time()}))
            time.sleep(0.01)
            sock.close(linger=0)  # gone before the master can answer
            sent["rounds"] += 1

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        for step, start in ((3, 5), (9, 9)):
            assert_demo_answer(master, step, start)
    finally:
        stop.set()
        thread.join(10)
    assert sent["rounds"] > 0
    assert demo_cluster.transport.traffic.dropped > dropped
    assert_demo_answer(master)


def test_worker_drops_malformed_frames_and_keeps_serving(demo_cluster: TrackedCluster,
                                                         tmp_path: Path) -> None:
    config = master_of(demo_cluster).runner.model.config  # type: ignore[attr-defined]
    hidden, layers = config.hidden_size, config.num_hidden_layers
    fake = FakeMaster()
    proc = start_worker_process(demo_cluster.rank_dir(1), fake.address, tmp_path / "worker.log")
    try:
        identity, hello = fake.recv(JOIN_TIMEOUT_S, ("hello",))
        assert hello.fields["rank"] == 1 and hello.fields["pid"] == proc.pid
        fake.welcome(identity)
        step = {"seq": 1, "step": 1, "slots": [0], "starts": [0]}
        good = wire.encode("step", step, [torch.randn(2, hidden)])
        for frames in [
            [b"\xff\x00garbage"],
            [b""],
            [msgpack.packb({"v": V + 1, **step, "op": "step",
                            "tensors": [["f32", [2, hidden]]]}), bytes(good[1])],
            [bytes(good[0]), bytes(good[1])[:-4]],  # truncated tensor
            [bytes(good[0])],  # tensor frame missing
            [msgpack.packb({"v": V, "op": "step", "tensors": [["f32", [2**20, 2**20]]],
                            **step}), b"\x00" * 8],
            [msgpack.packb({"v": V, "op": "step", "tensors": [], "seq": -1, "step": 1,
                            "slots": [0], "starts": [0]})],
            [msgpack.packb({"v": V, "op": "step", "tensors": [["f32", [2, hidden]]],
                            "seq": 1, "step": 1, "slots": [0.5], "starts": [0]}),
             bytes(good[1])],  # a slot that is not an integer
            [msgpack.packb({"v": V, "op": "shutdown", "tensors": [], "now": True})],
            [msgpack.packb({"v": V, "op": "sum", "tensors": [["f32", [2, hidden]]],
                            "seq": 1, "step": 1, "index": 0})],  # frame missing
        ]:
            fake.send_raw(identity, frames)
        # A well-formed step of the wrong width: rejected with an error, not a crash.
        fake.send(identity, "step", step, [torch.randn(2, hidden + 1)])
        _, error = fake.recv(10, ("error",))
        assert "rank 1" in error.fields["message"]
        # A valid step: the worker computes and sends its first partial, then one per
        # allreduce as the sums come back (2 per layer; the last is not answered).
        h = torch.randn(3, hidden)
        fake.send(identity, "step", {"seq": 2, "step": 1, "slots": [0], "starts": [0]}, [h])
        for index in range(2 * layers):
            _, partial = fake.recv(10, ("partial",))
            assert partial.fields == {"seq": 2, "step": 1, "index": index}
            (tensor,) = partial.tensors
            assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, hidden)
            assert torch.isfinite(tensor).all()
            if index < 2 * layers - 1:
                fake.send(identity, "sum", partial.fields, [tensor * 2])
        assert fake.hellos == 1, "the worker reconnected instead of dropping the junk"
        assert proc.poll() is None
        fake.send(identity, "shutdown", {})
        assert proc.wait(timeout=15) == 0
    finally:
        fake.close()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "dropped a malformed message" in log


# -- handshake ----------------------------------------------------------------------------------


def test_workers_of_another_split_are_refused(demo_cluster: TrackedCluster, tiny_model: Path,
                                              tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgetp.net.transport")
    cases = {  # shard -> what the refusal must say
        split_checkpoint(tiny_model, tmp_path / "other-model", 4).rank_dirs[1]:
            "different model",
        split_checkpoint(DEMO_MODEL_DIR, tmp_path / "other-plan", 2).rank_dirs[1]:
            "different plan",
        split_checkpoint(DEMO_MODEL_DIR, tmp_path / "other-dtype", 4,
                         dtype="bfloat16").rank_dirs[2]: "stored as bfloat16",
    }
    procs = [(start_worker_process(shard, demo_cluster.address, tmp_path / f"w{i}.log"), reason,
              tmp_path / f"w{i}.log") for i, (shard, reason) in enumerate(cases.items())]
    try:
        for proc, reason, log_path in procs:
            status = proc.wait(timeout=JOIN_TIMEOUT_S)
            output = log_path.read_text(errors="replace")
            assert status != 0, output
            assert "refused" in output and reason in output, output
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for reason in cases.values():
        assert any(reason in r.getMessage() for r in caplog.records), reason
    assert sorted(demo_cluster.transport.peers) == [1, 2, 3]
    assert_demo_answer(master_of(demo_cluster))


# -- the master goes away ---------------------------------------------------------------------


def test_workers_rejoin_a_restarted_master(demo_cluster: TrackedCluster) -> None:
    old = master_of(demo_cluster)
    pids = {rank: proc.pid for rank, proc in demo_cluster.workers.items()}
    old.close(shutdown_workers=False)
    demo_cluster.master = None

    def new_master() -> Master:
        deadline = time.monotonic() + 10
        while True:  # the old socket's port is released asynchronously
            try:
                return Master.cluster(demo_cluster.rank_dir(0), demo_cluster.address,
                                      timeout_s=TIMEOUT_S)
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    master = call_with_deadline(new_master, 30, "starting a new master")
    demo_cluster.master = master
    started = time.monotonic()
    transport = master.runner.transport  # type: ignore[attr-defined]
    call_with_deadline(lambda: transport.wait_for_workers(30), 35, "the workers rejoining")
    assert time.monotonic() - started < 3 * TIMEOUT_S + 5
    assert {rank: peer.pid for rank, peer in transport.peers.items()} == pids
    assert all(proc.poll() is None for proc in demo_cluster.workers.values())
    assert_demo_answer(master)


def test_bfloat16_prefill_partials_travel_as_bfloat16(tiny_model_dir, tmp_path: Path) -> None:
    """bfloat16 compute on the default f32 wire: a prefill chunk's partials cross the data link
    as their own bfloat16 values (half the bytes), a decode step's as float32 (the native
    exchange's), and the answer is one device's (the sums are added in float32 and rounded
    once, as the f32 wire's)."""
    source, _ = tiny_model_dir("llama3", hidden_size=256, intermediate_size=384)
    model_dir = tmp_path / "wide"
    shutil.copytree(source, model_dir)
    write_wordlevel_tokenizer(model_dir, VOCAB)
    rows = BF16_CARRY_MIN_VALUES // 256  # the shortest prompt whose partials go as bf16
    prompt = [int(t) for t in torch.randint(4, VOCAB, (rows,),
                                            generator=torch.Generator().manual_seed(2))]
    steps = 4
    local = generate_ids(Master.local(model_dir, dtype="bfloat16", max_seq_len=120), prompt,
                         steps + 1)
    with running_cluster(model_dir, 2, tmp_path / "c", dtype="bfloat16",
                         max_seq_len=120) as cluster:
        master = master_of(cluster)
        assert master.prefill_chunk >= rows
        link = master.runner.transport.data_links[1]  # type: ignore[attr-defined]
        before = link.bytes_received
        result = generate_ids(master, prompt, steps + 1)
        received = link.bytes_received - before
    assert result.token_ids == local.token_ids
    layers = len(master.runner.plan.shared_layers)  # type: ignore[attr-defined]
    prefill, decode = HEADER.size + 2 * 256 * rows, HEADER.size + 4 * 256
    assert received == 2 * layers * (prefill + steps * decode)
