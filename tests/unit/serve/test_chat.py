"""The terminal chat's loop in this process: a reply streamed from ``edgetp serve`` piece by
piece, and a failed reply reported and left out of the history (the chat as a real process:
tests/integration/test_chat_cli.py).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.master import Master
from edgetp.serve.chat import ChatError, ChatOptions, RemoteChat, Reply, run_chat
from edgetp.serve.server import APIServer, ServerSettings

KEY = "sk-chat-test"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def local() -> Master:
    return Master.local(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def server(local: Master) -> Iterator[APIServer]:
    srv = APIServer(local, ServerSettings("demo", api_key=KEY), port=0).start()
    try:
        yield srv
    finally:
        srv.stop()


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s: str) -> int:
        self.pieces.append(s)
        return super().write(s)


def test_remote_chat_streams_pieces(server: APIServer) -> None:
    backend = RemoteChat(server.url, ChatOptions(max_tokens=MAX_TOKENS), api_key=KEY)
    assert backend.model == "demo"
    out, err = Recorder(), io.StringIO()
    failures = run_chat(backend, io.StringIO(demo_prompt(3, 5) + "\n"), out, err)
    assert failures == 0, err.getvalue()
    assert out.getvalue().strip() == expected_text(3, 5)
    assert len([p for p in out.pieces if p.strip()]) > 5, "the reply was not streamed"


class FlakyBackend:
    """Fails the second reply; records the conversations it was given."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, str]]] = []

    def reply(self, messages: list[dict[str, str]], on_text: Any) -> Reply:
        self.calls.append([dict(m) for m in messages])
        if len(self.calls) == 2:
            raise ChatError("the server answered 503: the cluster is incomplete")
        on_text("ok")
        return Reply("ok", "stop")


def test_a_failed_reply_is_reported_and_not_kept() -> None:
    backend, out, err = FlakyBackend(), io.StringIO(), io.StringIO()
    script = "hello\n\nagain\n/help\nthird\n"
    failures = run_chat(backend, io.StringIO(script), out, err, system="be brief")
    assert failures == 1
    assert out.getvalue().splitlines() == ["ok", "ok"]
    assert "error: the server answered 503" in err.getvalue()
    assert "/reset" in err.getvalue()  # /help lists the commands
    system = {"role": "system", "content": "be brief"}
    assert backend.calls[2] == [system, {"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "ok"},
                                {"role": "user", "content": "third"}]


def test_remote_chat_sends_its_options_through_the_openai_client(server: APIServer) -> None:
    options = ChatOptions(max_tokens=MAX_TOKENS, stop=(" 20",), top_k=1, seed=7,
                          repetition_penalty=1.0001, temperature=0.5)
    backend = RemoteChat(f"{server.url}/v1/", options, api_key=KEY)
    pieces: list[str] = []
    reply = backend.reply([{"role": "user", "content": demo_prompt(3, 5)}], pieces.append)
    assert reply.text == "".join(pieces) == "8 11 14 17"  # top_k=1: greedy, up to the stop
    assert reply.finish_reason == "stop" and reply.completion_tokens is not None
    record = list(server.records)[-1]
    assert record.stream and record.max_tokens == MAX_TOKENS


def test_remote_chat_says_when_the_server_cannot_be_reached() -> None:
    from edgetp.runtime.local import free_port

    with pytest.raises(ChatError, match="cannot reach the server at http://127.0.0.1"):
        RemoteChat(f"127.0.0.1:{free_port()}", ChatOptions(), timeout_s=5)
