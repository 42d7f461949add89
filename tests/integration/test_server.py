"""``edgetp serve``: the OpenAI-compatible API on a live 2-node cluster of the demo model.

The official ``openai`` client talks to the server; greedy answers must equal the
single-process ``Master.local`` generation and the demo's rule. Also: the request queue (FIFO,
429 when full, nothing lost), clients that disconnect mid-stream or while queued, 503 while a
worker is missing and recovery once it is back, OpenAI's error shape and the API key.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from helpers.cluster import (
    JOIN_TIMEOUT_S,
    TrackedCluster,
    call_with_deadline,
    running_cluster,
    wait_for,
)

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.engine import GenerationResult
from edgetp.runtime.master import Master, Prompt
from edgetp.serve.server import APIServer, RequestRecord, ServerSettings

MODEL = "edgetp-demo"
KEY = "sk-test-0123456789"
MAX_TOKENS = 128
LONG = (1, 1)  # "count by 1 : 1" -> 2 3 ... 99: the longest answer of the demo model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedCluster]:
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path_factory.mktemp("server-cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def server(cluster: TrackedCluster) -> Iterator[APIServer]:
    settings = ServerSettings(MODEL, api_key=KEY, default_max_tokens=MAX_TOKENS)
    srv = APIServer(cluster.master, settings, port=0).start()
    try:
        yield srv
    finally:
        call_with_deadline(srv.stop, 30, "stopping the server")


@pytest.fixture(scope="module")
def local() -> Master:
    return Master.local(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def reference(local: Master) -> Callable[..., GenerationResult]:
    """``reference(step, start, max_tokens)``: the single-process greedy generation (cached)."""
    cache: dict[tuple[int, int, int], GenerationResult] = {}

    def get(step: int, start: int, max_tokens: int = MAX_TOKENS) -> GenerationResult:
        key = (step, start, max_tokens)
        if key not in cache:
            cache[key] = local.generate(Prompt(demo_prompt(step, start)), SamplingConfig(),
                                        GenerationConfig(max_new_tokens=max_tokens))
        return cache[key]

    return get


@pytest.fixture
def client(server: APIServer) -> Iterator[openai.OpenAI]:
    with make_client(server) as c:
        yield c


def make_client(server: APIServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def chat_messages(step: int, start: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": demo_prompt(step, start)}]


def raw_request(server: APIServer, method: str, path: str, body: Any = None,
                key: str | None = KEY) -> tuple[int, Any]:
    """A request without the openai client: (status, decoded JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def assert_error_shape(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@contextlib.contextmanager
def slow_generation(master: Any, delay_s: float) -> Iterator[None]:
    """Pace the master's steps to ``delay_s`` each (to hold the cluster busy): every step that
    yields tokens, a decode batch's or a prompt's last chunk, alone or batched."""
    runner = master.runner
    originals = {name: getattr(runner, name) for name in ("logits", "batch_logits")}

    def paced(step: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            time.sleep(delay_s)
            return step(*args, **kwargs)
        return call

    for name, step in originals.items():
        setattr(runner, name, paced(step))
    try:
        yield
    finally:
        for name in originals:
            delattr(runner, name)


def records_of(server: APIServer, ids: set[str]) -> list[RequestRecord]:
    return [r for r in list(server.records) if r.id in ids]


def record_of(server: APIServer, request_id: str) -> RequestRecord:
    (record,) = records_of(server, {request_id})
    return record


# -- answers ----------------------------------------------------------------------------------


def test_chat_completion_equals_single_process(client: openai.OpenAI,
                                               reference: Callable[..., GenerationResult]
                                               ) -> None:
    ref = reference(3, 5)
    response = client.chat.completions.create(model=MODEL, messages=chat_messages(3, 5),
                                              temperature=0, max_tokens=MAX_TOKENS)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.message.content.strip() == expected_text(3, 5)
    assert choice.finish_reason == "stop"
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.usage is not None
    assert response.usage.prompt_tokens == ref.prompt_tokens
    assert response.usage.completion_tokens == len(ref.token_ids)
    assert response.usage.total_tokens == ref.prompt_tokens + len(ref.token_ids)


def test_streamed_chat_completion(client: openai.OpenAI,
                                  reference: Callable[..., GenerationResult]) -> None:
    ref = reference(4, 10)
    stream = client.chat.completions.create(model=MODEL, messages=chat_messages(4, 10),
                                            max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the answer came in one piece: not streamed"
    assert "".join(pieces) == ref.text
    assert ref.text.strip() == expected_text(4, 10)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and not any(reasons[:-1])
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completion_and_streamed_completion(client: openai.OpenAI,
                                            reference: Callable[..., GenerationResult]) -> None:
    ref = reference(6, 20)
    response = client.completions.create(model=MODEL, prompt=demo_prompt(6, 20),
                                         max_tokens=MAX_TOKENS)
    assert response.object == "text_completion"
    assert response.choices[0].text == ref.text
    assert ref.text.strip() == expected_text(6, 20)
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.prompt_tokens == ref.prompt_tokens

    short = reference(6, 20, 3)
    stream = client.completions.create(model=MODEL, prompt=demo_prompt(6, 20), max_tokens=3,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == short.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_token_id_prompts(client: openai.OpenAI, local: Master,
                                           reference: Callable[..., GenerationResult]) -> None:
    ref = reference(3, 5)
    cut = ref.text.index(" 20")
    response = client.completions.create(model=MODEL, prompt=demo_prompt(3, 5), stop=[" 20"],
                                         max_tokens=MAX_TOKENS)
    assert response.choices[0].text == ref.text[:cut]
    assert response.choices[0].finish_reason == "stop"
    ids = local.tokenizer.encode(demo_prompt(3, 5))
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS)
    assert response.choices[0].text == ref.text


def test_models_and_health(client: openai.OpenAI, server: APIServer) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, health = raw_request(server, "GET", "/health")
    assert status == 200
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["nodes"] == {"expected": 2, "joined": 2, "missing": []}
    assert health["queue"] == {"length": 0, "capacity": 16, "full": False}
    assert health["busy"] is False
    assert health["batch"] == {"sequences": 0, "kv_slots": server.master.batch_slots,
                               "waiting_for_a_slot": False}


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in Prometheus's text format (0 if it
    has not appeared yet)."""
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines()
              if line.startswith(name + " ")]
    assert len(values) <= 1, values
    return float(values[0]) if values else 0.0


def test_metrics_count_requests_tokens_and_every_nodes_time(
        client: openai.OpenAI, server: APIServer,
        reference: Callable[..., GenerationResult]) -> None:
    status, _ = raw_request(server, "GET", "/metrics", key=None)
    assert status == 401
    server.metrics.collect_every_s = 0.0  # the workers' spans after every request
    before = server.metrics.render().decode()
    client.completions.create(model=MODEL, prompt=demo_prompt(6, 20), max_tokens=MAX_TOKENS)
    ref = reference(6, 20)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    after = response.read().decode()
    conn.close()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")

    def grew(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert grew('edgetp_requests_total{outcome="completed"}') == 1
    assert grew("edgetp_generated_tokens_total") == len(ref.token_ids)
    assert grew("edgetp_prompt_tokens_total") == ref.prompt_tokens
    assert grew("edgetp_time_to_first_token_seconds_count") == 1
    assert grew("edgetp_time_per_output_token_seconds_count") == len(ref.decode_ms)
    assert grew('edgetp_http_responses_total{status="200"}') >= 1
    assert grew('edgetp_node_span_seconds_total{kind="layer",rank="0"}') > 0
    worker_layers = 'edgetp_node_span_seconds_total{kind="layer",rank="1"}'
    wait_for(lambda: metric(server.metrics.render().decode(), worker_layers)  # collected
             > metric(before, worker_layers), 10, "the worker's spans")  # after the answer
    steps = grew('edgetp_node_spans_total{kind="step",rank="0"}')
    assert steps == 1 + len(ref.decode_ms)  # the prompt's step, then one per decode step
    settled = server.metrics.render().decode()  # the generation thread is done with it
    assert metric(settled, "edgetp_queue_length") == 0
    assert metric(settled, "edgetp_active_sequences") == 0
    assert metric(settled, "edgetp_kv_slots") == 1
    assert metric(settled, "edgetp_nodes_joined") == metric(settled, "edgetp_nodes_expected") \
        == 2


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "words"), [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"n": 2}, "n must be 1"),
    ({"temperature": 5}, "temperature must be in [0, 2]"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"max_tokens": "ten"}, "max_tokens must be an integer"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"stop": [1, 2]}, "stop must be a string or a list of strings"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": "count " * 300}]}, "context"),
])
def test_bad_requests_get_400_in_openai_shape(client: openai.OpenAI, fields: dict[str, Any],
                                              words: str) -> None:
    request: dict[str, Any] = {"model": MODEL, "messages": chat_messages(3, 5), **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert words in info.value.message
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "invalid_request_error"
    assert words in info.value.body["message"]


@pytest.mark.parametrize(("path", "fields", "param", "message"), [
    ("/v1/chat/completions", {"temperature": "hot"}, "temperature",
     "temperature must be a number, got 'hot'"),
    ("/v1/chat/completions", {"top_p": 2}, "top_p", "top_p must be in (0, 1], got 2"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]},
     "messages.[0].role", "messages[0].role must be one of 'system', 'developer', 'user', "
     "'assistant' or 'tool', got 'wizard'"),
    ("/v1/chat/completions", {"messages": None}, "messages",
     "messages must be a list, got None"),
    ("/v1/completions", {"stop": {"at": "."}}, "stop",
     "stop must be a string or a list of strings"),
    ("/v1/completions", {"max_tokens": 1.5}, "max_tokens",
     "max_tokens must be an integer, got 1.5"),
])
def test_validation_errors_name_the_field_over_http(server: APIServer, path: str,
                                                    fields: dict[str, Any], param: str,
                                                    message: str) -> None:
    body = {"model": MODEL, "messages": chat_messages(3, 5), "prompt": demo_prompt(3, 5),
            **fields}
    status, answer = raw_request(server, "POST", path, body)
    assert status == 400
    assert assert_error_shape(answer) == {"message": message, "type": "invalid_request_error",
                                          "param": param, "code": None}


def test_malformed_requests(server: APIServer, client: openai.OpenAI) -> None:
    status, body = raw_request(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in assert_error_shape(body)["message"]
    status, body = raw_request(server, "POST", "/v1/chat/completions", [1, 2])
    assert status == 400 and "JSON object" in assert_error_shape(body)["message"]
    status, body = raw_request(server, "POST", "/v1/chat/completions", {"model": MODEL})
    error = assert_error_shape(body)
    assert status == 400 and error["param"] == "messages"
    status, body = raw_request(server, "POST", "/v1/completions", {"model": MODEL})
    assert status == 400 and assert_error_shape(body)["param"] == "prompt"
    status, body = raw_request(server, "GET", "/v2/engines")
    assert status == 404 and assert_error_shape(body)["code"] == "unknown_url"
    status, body = raw_request(server, "GET", "/v1/chat/completions")
    assert status == 405
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=chat_messages(3, 5))
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_api_key_is_required(server: APIServer) -> None:
    with make_client(server, key="sk-wrong") as wrong, pytest.raises(
            openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=MODEL, messages=chat_messages(3, 5))
    assert "Incorrect API key" in info.value.message
    for path in ("/v1/models", "/v1/chat/completions"):
        status, body = raw_request(server, "GET", path, key=None)
        assert status == 401, path
        assert assert_error_shape(body)["code"] == "invalid_api_key"
    status, _ = raw_request(server, "GET", "/v1/models", key=KEY)
    assert status == 200
    # /health tells a probe without the key only whether the server can answer
    assert raw_request(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    assert raw_request(server, "GET", "/health", key="sk-wrong") == (200, {"status": "ok"})


# -- the queue --------------------------------------------------------------------------------


def run_threads(fns: list[Callable[[], Any]], timeout_s: float = 120) -> list[Any]:
    """Run each fn in its own thread, released together; results (or exceptions) in order."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return results


def test_concurrent_clients_are_served_one_at_a_time_in_order(
        server: APIServer, cluster: TrackedCluster,
        reference: Callable[..., GenerationResult]) -> None:
    cases = [(9, 50), (7, 60), (5, 70), (8, 30), (6, 55)]
    before = server.stats["completed"]

    def ask(step: int, start: int) -> Any:
        with make_client(server) as c:
            return c.chat.completions.create(model=MODEL, messages=chat_messages(step, start))

    with slow_generation(cluster.master, 0.02):
        results = run_threads([lambda s=s, a=a: ask(s, a) for s, a in cases])
    for (step, start), result in zip(cases, results, strict=True):
        assert not isinstance(result, Exception), result
        assert result.choices[0].message.content == reference(step, start).text
        assert result.choices[0].message.content.strip() == expected_text(step, start)
    assert server.stats["completed"] == before + len(cases)
    records = sorted(records_of(server, {r.id for r in results}), key=lambda r: r.queued_at)
    assert len(records) == len(cases)
    for earlier, later in zip(records, records[1:], strict=False):
        assert earlier.started_at is not None and later.started_at is not None
        assert earlier.finished_at is not None
        assert earlier.started_at < later.started_at, "not served in arrival order"
        assert earlier.finished_at <= later.started_at, "two generations overlapped"
    assert any(later.queued_at < earlier.finished_at  # type: ignore[operator]
               for earlier, later in zip(records, records[1:], strict=False)), \
        "no request ever waited: the test did not exercise the queue"


def test_full_queue_answers_429_and_loses_nothing(cluster: TrackedCluster,
                                                  reference: Callable[..., GenerationResult]
                                                  ) -> None:
    burst = 6
    settings = ServerSettings(MODEL, queue_size=1, default_max_tokens=20)
    with APIServer(cluster.master, settings, port=0) as small, \
            slow_generation(cluster.master, 0.03):
        clients = [make_client(small, key="unused") for _ in range(burst)]
        try:
            results = run_threads([
                lambda c=c, a=a: c.completions.create(model=MODEL, prompt=demo_prompt(1, a))
                for c, a in zip(clients, range(1, burst + 1), strict=True)])
        finally:
            for c in clients:
                c.close()
        stats = dict(small.stats)
    ok = [(a, r) for a, r in zip(range(1, burst + 1), results, strict=True)
          if not isinstance(r, Exception)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) + len(limited) == burst, [r for r in results if isinstance(r, Exception)]
    assert limited, "a burst into a queue of one got no 429"
    assert len(ok) >= 2, "the running request and the queued one must both succeed"
    for start, response in ok:
        assert response.choices[0].text == reference(1, start, 20).text
    assert "queue" in limited[0].message
    assert limited[0].body["code"] == "queue_full"  # type: ignore[index]
    assert stats.get("accepted") == len(ok) == stats.get("completed")
    assert stats.get("rejected") == len(limited)


def stream_request(server: APIServer, body: dict[str, Any]
                   ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    return conn, conn.getresponse()


def read_events(response: http.client.HTTPResponse, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while len(events) < count:
        line = response.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_client_disconnecting_mid_stream_stops_its_generation(
        server: APIServer, cluster: TrackedCluster, client: openai.OpenAI,
        reference: Callable[..., GenerationResult]) -> None:
    full = len(reference(*LONG, 200).token_ids)
    before = server.stats["cancelled"]
    with slow_generation(cluster.master, 0.02):
        conn, response = stream_request(server, {
            "model": MODEL, "messages": chat_messages(*LONG), "stream": True, "max_tokens": 200})
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        events = read_events(response, 4)  # the role chunk and three pieces
        request_id = events[0]["id"]
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        response.close()
        conn.close()
        closed_at = time.monotonic()
        record = record_of(server, request_id)
        wait_for(lambda: record.finished_at is not None, 10, "the generation to stop")
    assert record.outcome == "cancelled"
    assert record.finished_at is not None and record.finished_at - closed_at < 5
    assert 3 <= record.completion_tokens < full, record
    assert server.stats["cancelled"] == before + 1
    # the cluster is free for the next request, which is answered correctly
    started = time.monotonic()
    result = client.chat.completions.create(model=MODEL, messages=chat_messages(9, 50))
    assert result.choices[0].message.content == reference(9, 50).text
    assert time.monotonic() - started < 10


def test_client_disconnecting_while_queued_is_skipped(
        server: APIServer, cluster: TrackedCluster,
        reference: Callable[..., GenerationResult]) -> None:
    with slow_generation(cluster.master, 0.02):
        with make_client(server) as c:
            first: dict[str, Any] = {}
            runner = threading.Thread(target=lambda: first.update(r=c.chat.completions.create(
                model=MODEL, messages=chat_messages(*LONG))), daemon=True)
            runner.start()
            wait_for(lambda: server.health()["busy"], 30, "the first request to start")
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps(
                {"model": MODEL, "prompt": demo_prompt(2, 40)}).encode(),
                {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            wait_for(lambda: server.health()["queue"]["length"] == 1, 10, "it to be queued")
            (queued,) = [r for r in list(server.records) if r.outcome == "queued"]
            conn.close()
            wait_for(lambda: queued.outcome == "skipped", 10, "the queued request to be dropped")
            assert server.health()["queue"]["length"] == 0
            runner.join(60)
    assert queued.started_at is None and queued.completion_tokens == 0
    assert first["r"].choices[0].message.content == reference(*LONG).text


# -- a missing worker -------------------------------------------------------------------------


def test_503_while_a_worker_is_missing_then_recovery(
        server: APIServer, cluster: TrackedCluster, client: openai.OpenAI,
        reference: Callable[..., GenerationResult]) -> None:
    # a worker dying mid-stream: the stream ends with an error event, not silence
    with slow_generation(cluster.master, 0.02):
        stream = client.chat.completions.create(model=MODEL, messages=chat_messages(*LONG),
                                                stream=True, max_tokens=200)
        with pytest.raises(openai.APIError) as info:
            for i, _chunk in enumerate(stream):
                if i == 3:
                    cluster.kill_worker(1)
    assert "cluster" in info.value.message
    # requests while the worker is missing: 503 (the master notices within its heartbeats)
    with pytest.raises(openai.InternalServerError) as failure:
        client.chat.completions.create(model=MODEL, messages=chat_messages(3, 5))
    assert failure.value.status_code == 503
    wait_for(lambda: server.missing_ranks() == [1], 15, "the master to drop the dead worker")
    with pytest.raises(openai.InternalServerError) as failure:
        client.chat.completions.create(model=MODEL, messages=chat_messages(3, 5))
    assert failure.value.status_code == 503
    assert "incomplete" in failure.value.message
    assert failure.value.body["code"] == "cluster_unavailable"  # type: ignore[index]
    status, health = raw_request(server, "GET", "/health")
    assert status == 503 and health["status"] == "unavailable"
    assert health["nodes"] == {"expected": 2, "joined": 1, "missing": [1]}
    # the worker comes back: requests succeed again
    cluster.start_worker(1)
    call_with_deadline(lambda: cluster.wait_until_joined(JOIN_TIMEOUT_S), JOIN_TIMEOUT_S + 5,
                       "rank 1 rejoining")
    result = client.chat.completions.create(model=MODEL, messages=chat_messages(3, 5))
    assert result.choices[0].message.content == reference(3, 5).text
    assert raw_request(server, "GET", "/health")[0] == 200
