"""The allreduce's TCP data link in a real cluster: the same tokens as over ZeroMQ alone."""

from __future__ import annotations

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt
from edgetp.net import datalink as dataplane
from edgetp.runtime.local import LocalCluster
from edgetp.runtime.master import Prompt


def _generate(monkeypatch, tmp_path, link: str) -> tuple[list[int], dict[int, int]]:
    monkeypatch.setenv(dataplane.ENV_SWITCH, link)
    cluster = LocalCluster(DEMO_MODEL_DIR, 3, timeout_s=10.0, split_dir=tmp_path / "split")
    with cluster as master:
        result = master.generate(Prompt(demo_prompt(3, 11)), SamplingConfig(),
                                 GenerationConfig(max_new_tokens=10))
        transport = master.runner.transport  # type: ignore[attr-defined]
        links = {rank: link.bytes_received for rank, link in transport.data_links.items()}
        ops = dict(transport.traffic.received)
    assert ops.get("partial", 0) > 0
    return result.token_ids, links


def test_the_cluster_allreduce_runs_over_the_link_with_the_same_tokens(monkeypatch, tmp_path):
    tokens, links = _generate(monkeypatch, tmp_path, "1")
    assert sorted(links) == [1, 2] and all(n > 0 for n in links.values())
    zmq_tokens, zmq_links = _generate(monkeypatch, tmp_path, "0")  # EDGETP_DATA_LINK=0
    assert zmq_links == {}
    assert tokens == zmq_tokens
