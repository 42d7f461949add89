"""The bundled demo model answers by its rule, through the real loading code and the CLI
(``edgetp demo``, which starts workers: tests/integration/test_demo_command.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetp.cli.main import main
from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, MAX_NUMBER, demo_prompt, expected_text
from edgetp.runtime.master import Master, Prompt

CASES = [(1, 80), (2, 7), (3, 5), (4, 0), (5, 11), (6, 3), (7, 20), (8, 1), (9, 9), (3, 96)]


@pytest.fixture(scope="module")
def master() -> Master:
    return Master.local(DEMO_MODEL_DIR)


@pytest.mark.parametrize(("step", "start"), CASES)
def test_greedy_continuation_follows_the_rule(master: Master, step: int, start: int) -> None:
    result = master.generate(
        Prompt(demo_prompt(step, start)), SamplingConfig(), GenerationConfig(max_new_tokens=128)
    )
    assert result.text.strip() == expected_text(step, start)
    assert result.finish_reason == "eos"


def test_demo_model_is_small_and_splittable() -> None:
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["num_key_value_heads"] >= 4
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 10 * 2**20
    assert MAX_NUMBER == 99


def test_generate_cli_json_on_demo_model() -> None:
    result = CliRunner().invoke(
        main, ["generate", str(DEMO_MODEL_DIR), "--prompt", demo_prompt(4, 10), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.strip().splitlines()[-1])
    assert payload["text"].strip() == expected_text(4, 10)
    assert set(payload) >= {"token_ids", "text", "prompt_tokens", "ttft_ms", "ms_per_token"}
    assert len(payload["token_ids"]) == len(expected_text(4, 10).split())
    assert payload["prompt_tokens"] == 6  # <s> count by 4 : 10
