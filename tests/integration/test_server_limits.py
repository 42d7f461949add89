"""``edgetp serve`` under attack: one client cannot stall the others or grow the master.

A live 2-node cluster of the demo model behind the API (and, for chat templates, single-process
masters of demo-model copies whose template is hostile):

* an 8 MiB prompt is refused (400 ``context_length_exceeded``) in well under a second, without
  being tokenized, while another client's request is answered correctly;
* a body nested 100000 deep, lone UTF-16 surrogates, a seed or repetition penalty out of range,
  too many or too long stop strings: 400 in OpenAI's shape, never 500;
* a chat template that loops for ever, asks for ``'A' * 10**10`` or outputs hundreds of
  megabytes is refused with a clear message within a bound, and the server goes on serving;
* requests on connections beyond ``max_connections`` are answered 503 at once (by uvicorn);
* many requests leave the master's timing records within their window.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers.cluster import TrackedCluster, running_cluster, wait_for
from helpers.serving import DEMO_MODEL_NAME, openai_client
from helpers.serving import serving as serving_with

from edgetp.core.metrics import MAX_SPANS, RECORDER
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.master import Master
from edgetp.serve.app import MAX_BODY_BYTES
from edgetp.serve.server import APIServer

MODEL = DEMO_MODEL_NAME


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedCluster]:
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path_factory.mktemp("limits-cluster")) as c:
        yield c


def serving(master: Master, **settings: Any) -> contextlib.AbstractContextManager[APIServer]:
    """The shared server helper with this module's default of 64 new tokens."""
    return serving_with(master, **{"default_max_tokens": 64, **settings})


@pytest.fixture(scope="module")
def server(cluster: TrackedCluster) -> Iterator[APIServer]:
    with serving(cluster.master) as srv:
        yield srv


def client(server: APIServer, timeout_s: float = 60) -> openai.OpenAI:
    return openai_client(server, timeout_s)


def post(server: APIServer, path: str, body: bytes | dict[str, Any],
         timeout_s: float = 60) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def ask_chat(server: APIServer, step: int, start: int) -> str:
    with client(server) as c:
        reply = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": demo_prompt(step, start)}])
    return reply.choices[0].message.content or ""


# -- an oversized prompt ---------------------------------------------------------------------


def test_an_oversized_prompt_is_refused_quickly_while_others_are_served(
        server: APIServer) -> None:
    words = "count by 3 : 5 " * (MAX_BODY_BYTES // 15)
    body = json.dumps({"model": MODEL, "prompt": ""}).encode()
    huge = json.dumps({"model": MODEL, "prompt": words[:MAX_BODY_BYTES - len(body) - 16]})
    assert MAX_BODY_BYTES - 64 < len(huge) <= MAX_BODY_BYTES
    unavailable = server.stats["unavailable"]
    answers: dict[str, Any] = {}

    def oversized(name: str) -> None:
        started = time.monotonic()
        answers[name] = (*post(server, "/v1/completions", huge.encode()),
                         time.monotonic() - started)

    threads = [threading.Thread(target=oversized, args=(f"big-{i}",)) for i in range(2)]
    threads.append(threading.Thread(target=lambda: answers.update(chat=ask_chat(server, 3, 5))))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers["chat"].strip() == expected_text(3, 5)
    for name in ("big-0", "big-1"):
        status, reply, elapsed = answers[name]
        assert status == 400, reply
        assert reply["error"]["code"] == "context_length_exceeded"
        assert reply["error"]["message"].startswith("the prompt has at least 256 tokens")
        assert elapsed < 3.0, f"{name} took {elapsed:.1f} s to be refused"
    assert server.stats["unavailable"] == unavailable
    assert server.health()["status"] == "ok"


# -- malformed and out-of-range requests -----------------------------------------------------


def deep(depth: int) -> bytes:
    return b'{"model": "edgetp-demo", "messages": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/chat/completions", deep(100_000), None, "nested too deeply"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
     "nested too deeply"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.[0].content", "lone UTF-16 surrogate ('\\ud800') at character 1"),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.[0].content", "lone UTF-16 surrogate"),
    ("/v1/completions", b'{"prompt": "count by 3 : \\udc00"}', "prompt", "lone UTF-16"),
    ("/v1/completions", b'{"prompt": "count", "stop": ["\\ud83d"]}', "stop", "lone UTF-16"),
    ("/v1/completions", {"prompt": "count by 3 : 5", "seed": 2**70}, "seed",
     "seed must fit in 64 bits"),
    ("/v1/completions", {"prompt": "count by 3 : 5", "repetition_penalty": 1e300,
                         "temperature": 1}, "repetition_penalty",
     "repetition_penalty must be in [0.01, 100], got 1e+300"),
    ("/v1/completions", {"prompt": "count by 3 : 5", "stop": ["x"] * 1000}, "stop",
     "stop must have at most 16 strings, got 1000"),
    ("/v1/completions", {"prompt": "count by 3 : 5", "stop": "y" * 100_000}, "stop",
     "stop strings must be at most 256 characters long"),
])
def test_malformed_or_out_of_range_requests_get_400(server: APIServer, path: str,
                                                    body: bytes | dict[str, Any],
                                                    param: str | None, words: str) -> None:
    status, reply = post(server, path, body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    assert words in reply["error"]["message"]


def test_valid_escapes_still_work(server: APIServer) -> None:
    body = b'{"prompt": "count by 3 : 5", "max_tokens": 3, "stop": ["\\ud83d\\ude00"], ' \
           b'"seed": 18446744073709551615}'
    status, reply = post(server, "/v1/completions", body)
    assert status == 200, reply
    assert reply["choices"][0]["text"].split() == ["8", "11", "14"]


# -- hostile chat templates ------------------------------------------------------------------

TEMPLATES = {
    "endless_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                     "{% endfor %}{{ messages[0]['content'] }}",
    "ten_gigabytes": "{{ 'A' * 10**10 }}",
    "huge_output": "{% for i in range(20000) %}{{ messages[0]['content'] * 1000 }}{% endfor %}",
}
EXPECTED = {
    "endless_loops": "the chat template did not render in 10 s",
    "ten_gigabytes": "chat template failed to render: it needs more than 1024 MiB of memory",
    "huge_output": "the conversation is too long for this model's context of 256 tokens",
}


# an endless loop runs into the 10 s bound: run with the slow tests
HOSTILE = [pytest.param(n, marks=pytest.mark.slow) if n == "endless_loops" else n
           for n in sorted(TEMPLATES)]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_chat_template_is_refused_within_a_bound(name: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATES[name]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with serving(Master.local(model_dir)) as srv:
        started = time.monotonic()
        status, reply = post(srv, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": demo_prompt(3, 5)}]})
        elapsed = time.monotonic() - started
        assert status == 400, reply
        assert reply["error"]["message"].startswith(EXPECTED[name])
        assert reply["error"]["param"] == "messages"
        assert elapsed < 30, f"refused after {elapsed:.0f} s"
        with client(srv) as c:  # the server goes on serving
            answer = c.completions.create(model=MODEL, prompt=demo_prompt(3, 5))
        assert answer.choices[0].text.strip() == expected_text(3, 5)


# -- connections -----------------------------------------------------------------------------


def test_connections_beyond_the_limit_get_503(cluster: TrackedCluster) -> None:
    """uvicorn answers a request on a connection beyond --max-connections with its own 503
    (plain text, then it closes the connection), at once; metrics count the open ones."""
    with serving(cluster.master, max_connections=4) as srv, contextlib.ExitStack() as stack:
        idle = [stack.enter_context(socket.create_connection(("127.0.0.1", srv.port)))
                for _ in range(4)]
        wait_for(lambda: srv.open_connections() == 4, 10,
                 "the server to take the four connections")
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/health")
        response = conn.getresponse()
        reply = response.read()
        conn.close()
        assert response.status == 503 and reply == b"Service Unavailable"
        assert response.getheader("Connection") == "close"
        assert time.monotonic() - started < 5
        wait_for(lambda: "edgetp_http_connections 4.0" in srv.metrics.render().decode(), 10,
                 "the refused connection to close, and the metrics to count four")
        for sock in idle:
            sock.close()
        wait_for(lambda: srv.open_connections() == 0, 10, "the idle connections to close")
        with client(srv) as c:
            answer = c.completions.create(model=MODEL, prompt=demo_prompt(3, 5))
        assert answer.choices[0].text.strip() == expected_text(3, 5)


# -- the master's memory ---------------------------------------------------------------------

WINDOW = 4096  # spans: about four requests of 60 tokens


def test_many_requests_keep_the_masters_records_bounded(server: APIServer) -> None:
    """The workers' spans are collected here, before each snapshot, rather than by the server
    after a request: a collection in flight holds thousands of spans for a moment, which a
    snapshot taken meanwhile would count as growth."""
    requests, every_s = 40, server.metrics.collect_every_s
    RECORDER.resize(WINDOW)
    server.metrics.collect_every_s = float("inf")
    tracemalloc.start()
    try:
        with client(server) as c:
            for i in range(requests // 2):  # the window fills, then only turns
                c.completions.create(model=MODEL, prompt=demo_prompt(1, 1 + i % 3),
                                     max_tokens=60)
            server.metrics.collect_node_spans()
            half = tracemalloc.take_snapshot()
            for i in range(requests // 2):
                c.completions.create(model=MODEL, prompt=demo_prompt(1, 1 + i % 3),
                                     max_tokens=60)
            server.metrics.collect_node_spans()
            full = tracemalloc.take_snapshot()
        held, dropped = len(RECORDER), RECORDER.dropped
    finally:
        tracemalloc.stop()
        RECORDER.resize(MAX_SPANS)
        server.metrics.collect_every_s = every_s
    assert held == WINDOW and dropped > WINDOW  # the master recorded more than it keeps
    diff = full.compare_to(half, "lineno")
    per_request = sum(stat.size_diff for stat in diff) / (requests // 2)
    largest = "\n".join(str(stat) for stat in diff[:12])
    assert per_request < 4096, f"the master grew {per_request:.0f} bytes per request:\n{largest}"
