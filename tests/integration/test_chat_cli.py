"""``edgetp chat``: the terminal chat, run as a real process fed through standard input.

The demo model's chat template renders every user message after BOS, so the first answer of
a conversation is the rule's answer, a later one depends on the history, and ``/reset``
brings back the rule's answer. The chat runs against the model in its own process and
against ``edgetp serve`` (``--url``, the streaming chat API).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import processes

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.master import Master
from edgetp.serve.server import APIServer, ServerSettings

KEY = "sk-chat-test"
MAX_TOKENS = 40
FIRST, SECOND = (9, 50), (7, 60)  # short answers: 59 68 77 86 95 / 67 74 81 88 95
SCRIPT = "\n".join([demo_prompt(*FIRST), demo_prompt(*SECOND), "/reset",
                    demo_prompt(*SECOND), "/exit", demo_prompt(*FIRST)]) + "\n"


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


def greedy(master: Master, messages: list[dict[str, str]]) -> str:
    ids = master.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True)
    assert isinstance(ids, list)
    gen = GenerationConfig(max_new_tokens=MAX_TOKENS)
    return master.engine.generate(ids, SamplingConfig(), gen).text


def expected_transcript(master: Master) -> list[str]:
    """The three answers of SCRIPT: fresh, with history, fresh again after /reset."""
    first = greedy(master, [{"role": "user", "content": demo_prompt(*FIRST)}])
    with_history = greedy(master, [{"role": "user", "content": demo_prompt(*FIRST)},
                                   {"role": "assistant", "content": first},
                                   {"role": "user", "content": demo_prompt(*SECOND)}])
    fresh = greedy(master, [{"role": "user", "content": demo_prompt(*SECOND)}])
    assert first.strip() == expected_text(*FIRST)
    assert fresh.strip() == expected_text(*SECOND)
    assert with_history != fresh, "the history must change the demo model's answer"
    return [first, with_history, fresh]


def run_cli(*args: str, stdin: str = SCRIPT, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("EDGETP_API_KEY", None)
    environment.update(env or {})
    return processes.run([sys.executable, "-m", "edgetp.cli", "chat", *args], input=stdin,
                         capture_output=True, text=True, timeout=120, env=environment)


def test_chat_with_the_local_model(local: Master) -> None:
    done = run_cli(str(DEMO_MODEL_DIR), "--max-new-tokens", str(MAX_TOKENS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [t.strip() for t in expected_transcript(local)]
    assert "(history cleared)" in done.stderr


def test_chat_with_a_server(local: Master, server: APIServer) -> None:
    before = server.stats["completed"]
    done = run_cli("--url", server.url, "--max-new-tokens", str(MAX_TOKENS),
                   env={"EDGETP_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [t.strip() for t in expected_transcript(local)]
    assert server.stats["completed"] == before + 3
    assert all(r.stream for r in list(server.records)[-3:])


def test_chat_with_a_wrong_key_says_why(server: APIServer) -> None:
    done = run_cli("--url", f"{server.url}/v1", "--api-key", "sk-wrong")
    assert done.returncode == 1
    assert "401" in done.stderr and "Incorrect API key" in done.stderr
