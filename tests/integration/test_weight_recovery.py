"""A worker whose streamed weight file fails to read, then comes back (real processes).

A 2-node cluster of the demo model, every weight streamed (each node at its minimum budget),
behind the API server's ``/health``. A layer file of the worker is moved away:

* the request that needs it fails, naming the file; once the file is back, the next request
  reads it again and answers by the rule, with no restart;
* meanwhile ``/health`` is ``unavailable`` (503) with the worker's rank and the reason, and
  without any request the idle worker tries the file again by itself: ``/health`` turns
  ``ok`` within seconds of the file coming back.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.cluster import TrackedCluster, call_with_deadline, running_cluster, wait_for

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.net.transport import ClusterError
from edgetp.parallel.loader import shard_memory_needs
from edgetp.runtime.master import Master, Prompt
from edgetp.serve.server import APIServer, ServerSettings
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import read_manifest
from edgetp.shard.split import split_checkpoint

GENERATE_DEADLINE_S = 60.0
HEALTH_DEADLINE_S = 15.0  # the worker reports within a step; an idle retry every 2 s


def answer(master: Master) -> str:
    gen = GenerationConfig(max_new_tokens=64)
    result = call_with_deadline(
        lambda: master.generate(Prompt(demo_prompt(4, 1)), SamplingConfig(), gen),
        GENERATE_DEADLINE_S, "a generation")
    return result.text.strip()


def health(server: APIServer) -> tuple[int, dict[str, Any]]:
    """``GET /health`` over HTTP: the status code and the body."""
    try:
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def streaming_cluster(tmp_path: Path) -> Iterator[TrackedCluster]:
    """The demo model on 2 nodes, each at its minimum budget: every block streams."""
    probe = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "probe", 2)
    budget = max(shard_memory_needs(d).minimum() for d in probe.rank_dirs)
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path / "cluster", memory_budget=budget) as c:
        yield c


def test_a_restored_weight_file_is_served_again_and_health_says_why_meanwhile(
        streaming_cluster: TrackedCluster, tmp_path: Path) -> None:
    cluster = streaming_cluster
    assert cluster.master is not None
    master = cluster.master
    server = APIServer(master, ServerSettings("demo"), port=0).start()
    rank_dir = cluster.rank_dir(1)
    victim = rank_dir / layer_file(read_manifest(rank_dir).plan.num_layers - 1)
    kept = tmp_path / "kept.safetensors"
    try:
        assert answer(master) == expected_text(4, 1)
        assert health(server)[0] == 200

        victim.rename(kept)
        with pytest.raises(ClusterError, match="rank 1") as info:
            answer(master)
        assert str(victim) in str(info.value)
        kept.rename(victim)  # back: the next request reads it again, no restart
        assert answer(master) == expected_text(4, 1)
        wait_for(lambda: health(server)[0] == 200, HEALTH_DEADLINE_S, "/health to be ok")

        victim.rename(kept)  # again: /health says why, then recovers with no request at all
        with pytest.raises(ClusterError, match="rank 1"):
            answer(master)
        wait_for(lambda: health(server)[0] == 503, HEALTH_DEADLINE_S,
                 "/health to report rank 1's weights")
        status, body = health(server)
        assert body["status"] == "unavailable"
        assert body["nodes"] == {"expected": 2, "joined": 2, "missing": []}
        [failing] = body["failing"]
        assert failing["rank"] == 1 and str(victim) in failing["reason"]
        kept.rename(victim)
        wait_for(lambda: health(server)[0] == 200, HEALTH_DEADLINE_S,
                 "the idle worker to read its file again")
        assert health(server)[1]["failing"] == []
        assert answer(master) == expected_text(4, 1)
    finally:
        if kept.exists():
            kept.rename(victim)
        call_with_deadline(server.stop, 30, "stopping the server")
