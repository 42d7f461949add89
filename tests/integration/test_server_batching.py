"""Continuous batching behind ``edgetp serve``: a live 2-node cluster of the demo model whose
nodes hold 4 KV slots, driven by the official ``openai`` client from several threads.

Sequences decode together (their requests overlap in time), each greedy answer is the one the
request gets alone, a long prompt joins a running batch chunk by chunk and still gets its own
answer, requests beyond the slots wait in the queue (``/health`` says so), and a stream whose
client goes away leaves the batch at once while the others go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from helpers.cluster import TrackedCluster, call_with_deadline, running_cluster, wait_for
from helpers.serving import DEMO_MODEL_NAME, openai_client, serving

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.master import Master, Prompt
from edgetp.serve.server import APIServer, RequestRecord, ServerSettings

MODEL = DEMO_MODEL_NAME
SLOTS = 4
PROMPTS = [(1, 1), (2, 3), (3, 7), (5, 2), (7, 4), (1, 50)]  # answers of 14 to 98 numbers
LONG_PROMPT = " ".join(f"count by {n % 7 + 1} : {n}" for n in range(40))  # 201 tokens
PREFILL_CHUNK = 64  # the cluster's: the long prompt goes in four chunks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedCluster]:
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path_factory.mktemp("batch-cluster"),
                         kv_slots=SLOTS, prefill_chunk=PREFILL_CHUNK) as c:
        yield c


@pytest.fixture(scope="module")
def server(cluster: TrackedCluster) -> Iterator[APIServer]:
    with serving(cluster.master, default_max_tokens=128) as srv:
        yield srv


@pytest.fixture(scope="module")
def alone() -> Callable[[str], str]:
    """The greedy answer of a prompt generated alone, in one process (cached)."""
    local = Master.local(DEMO_MODEL_DIR)
    cache: dict[str, str] = {}

    def get(prompt: str) -> str:
        if prompt not in cache:
            cache[prompt] = local.generate(Prompt(prompt), SamplingConfig(),
                                           GenerationConfig(max_new_tokens=128)).text
        return cache[prompt]

    return get


def client(server: APIServer) -> openai.OpenAI:
    return openai_client(server, timeout_s=120)


def complete(server: APIServer, prompt: str) -> tuple[str, str]:
    """(request id, text) of a streamed completion, the text put together from its chunks."""
    with client(server) as c:
        pieces, request_id = [], ""
        for chunk in c.completions.create(model=MODEL, prompt=prompt, max_tokens=128,
                                          stream=True):
            request_id = chunk.id
            pieces.append(chunk.choices[0].text if chunk.choices else "")
        return request_id, "".join(pieces)


def peak_overlap(records: list[RequestRecord]) -> int:
    """The most requests that were being generated at the same moment."""
    events = sorted([(r.started_at, 1) for r in records] + [(r.finished_at, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def test_requests_decode_together_and_each_gets_its_answer_alone(
        server: APIServer, alone: Callable[[str], str]) -> None:
    assert server.master.batch_slots == SLOTS
    prompts = [demo_prompt(*p) for p in PROMPTS]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(server, p), prompts))
    for prompt, (step, start), (_, text) in zip(prompts, PROMPTS, answers, strict=True):
        assert text.strip() == alone(prompt).strip() == expected_text(step, start)
    ids = {request_id for request_id, _ in answers}
    records = [r for r in list(server.records) if r.id in ids]
    assert len(records) == len(prompts) and all(r.outcome == "completed" for r in records)
    assert peak_overlap(records) == SLOTS  # as many at once as there are slots, no more


def test_a_long_prompt_joins_a_running_batch_in_chunks(
        server: APIServer, alone: Callable[[str], str]) -> None:
    prefill_chunk = server.master.prefill_chunk
    prompt_tokens = len(server.master.tokenizer.encode(LONG_PROMPT))
    assert prefill_chunk == PREFILL_CHUNK < prompt_tokens  # chunks, each a step of its own
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(complete, server, demo_prompt(1, 1))
        wait_for(lambda: server.health()["batch"]["sequences"] == 1, 30,
                 "the first request to start")
        joining = pool.submit(complete, server, LONG_PROMPT)
        (_, first), (_, long_answer) = running.result(), joining.result()
    assert first.strip() == expected_text(1, 1)
    assert long_answer == alone(LONG_PROMPT)


def test_requests_beyond_the_slots_wait_in_the_queue(server: APIServer,
                                                     cluster: TrackedCluster) -> None:
    runner = cluster.master.runner  # type: ignore[union-attr]
    batch_logits = runner.batch_logits
    fast = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:  # decode steps at a pace the test can watch
        fast.wait(0.25)
        return batch_logits(*args, **kwargs)

    def four_run_two_wait() -> bool:
        health = server.health()
        return health["batch"]["sequences"] == SLOTS and health["queue"]["length"] == 2

    runner.batch_logits = slow
    try:
        with ThreadPoolExecutor(SLOTS + 2) as pool:
            futures = [pool.submit(complete, server, demo_prompt(2, n))
                       for n in range(SLOTS + 2)]
            wait_for(four_run_two_wait, 60, "four requests to run and two to wait for a slot")
            assert server.health()["batch"]["waiting_for_a_slot"] is True
            metrics = server.metrics.render().decode()
            assert f"edgetp_kv_slots {SLOTS}.0" in metrics
            assert f"edgetp_kv_slots_in_use {SLOTS}.0" in metrics
            assert "edgetp_queue_length 2.0" in metrics
            fast.set()
            texts = [f.result(timeout=120)[1] for f in futures]
    finally:
        fast.set()
        del runner.batch_logits
    assert [t.strip() for t in texts] == [expected_text(2, n) for n in range(SLOTS + 2)]


def test_a_stream_that_goes_away_leaves_the_batch_and_the_others_go_on(
        server: APIServer) -> None:
    def abandon() -> str:
        with client(server) as c:
            stream = c.completions.create(model=MODEL, prompt=demo_prompt(1, 1),
                                          max_tokens=128, stream=True)
            request_id = next(iter(stream)).id
            stream.close()  # the client goes away after its first chunk
            return request_id

    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(complete, server, demo_prompt(3, n)) for n in (1, 2)]
        gone = pool.submit(abandon).result(timeout=60)
        texts = [f.result(timeout=120)[1] for f in others]
    assert [t.strip() for t in texts] == [expected_text(3, 1), expected_text(3, 2)]
    wait_for(lambda: any(r.id == gone and r.outcome == "cancelled"
                         for r in list(server.records)), 30, "the abandoned request to end")
    record = next(r for r in list(server.records) if r.id == gone)
    assert record.completion_tokens < 98  # it stopped early
    deadline = time.monotonic() + 30
    while server.health()["batch"]["sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["batch"]["sequences"] == 0


def test_sequences_draft_for_themselves_in_the_batch(cluster: TrackedCluster,
                                                     alone: Callable[[str], str]) -> None:
    """--draft lookup behind the server: each sequence of the batch drafts and verifies in its
    own rows; every answer is the one it gets alone, without drafts."""
    master = cluster.master
    assert master is not None
    prompts = [f"{demo_prompt(1, n)} {n + 1} {n + 2} {n + 3} {demo_prompt(1, n)}"
               for n in (3, 20, 41)]
    master.use_draft("lookup", 4)
    try:
        srv = APIServer(master, ServerSettings(MODEL, default_max_tokens=128), port=0).start()
        try:
            with ThreadPoolExecutor(len(prompts)) as pool:
                answers = list(pool.map(lambda p: complete(srv, p)[1], prompts))
        finally:
            call_with_deadline(srv.stop, 30, "stopping the server")
    finally:
        master.use_draft(None)
    assert answers == [alone(p) for p in prompts]
