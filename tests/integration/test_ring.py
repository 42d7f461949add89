"""The ring allreduce gives the same generations as the star, over real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.local import LocalCluster
from edgetp.runtime.master import Master, Prompt


def generate(master: Master, prompt: str, tokens: int = 32) -> list[int]:
    gen = GenerationConfig(max_new_tokens=tokens, stop_on_eos=False)
    return master.generate(Prompt(prompt), SamplingConfig(), gen).token_ids


@pytest.mark.parametrize("nodes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ring_and_star_give_identical_generations(tmp_path: Path, nodes: int) -> None:
    prompts = [demo_prompt(3, 5), demo_prompt(7, 1)]
    results = {}
    for allreduce in ("star", "ring"):
        cluster = LocalCluster(DEMO_MODEL_DIR, nodes, timeout_s=10.0, split_dir=tmp_path / "s",
                               allreduce=allreduce)
        with cluster as master:
            results[allreduce] = [generate(master, p) for p in prompts]
            text = master.generate(Prompt(prompts[0]), SamplingConfig(),
                                   GenerationConfig(max_new_tokens=64)).text
        assert text.strip() == expected_text(3, 5)
    assert results["ring"] == results["star"]


def test_the_ring_runs_encrypted_with_the_clusters_keys(tmp_path: Path) -> None:
    """With CURVE keys the ring works (it was refused before) and gives the star's tokens."""
    prompt = demo_prompt(2, 9)
    results = {}
    for allreduce in ("star", "ring"):
        cluster = LocalCluster(DEMO_MODEL_DIR, 3, timeout_s=10.0, split_dir=tmp_path / "s",
                               allreduce=allreduce, secure=True)
        with cluster as master:
            results[allreduce] = generate(master, prompt)
            if allreduce == "ring":
                transport = master.runner.transport  # type: ignore[attr-defined]
                keys = {rank: peer.public_key for rank, peer in transport.peers.items()}
                assert all(len(key) == 40 for key in keys.values())  # as ZAP verified them
    assert results["ring"] == results["star"]
