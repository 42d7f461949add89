"""A worker that streams its weights (``--memory-budget`` at its minimum) and whose shard file
is overwritten after it loaded (same size, the old modification time put back): the next
request fails with an error naming the worker, the file and the block, and saying to restore
the file or split again, instead of answering with wrong tokens. Real processes: the master in
this process, the worker a process of its own.

The window's checks in process: tests/unit/parallel/test_window_checksums.py.
"""

from __future__ import annotations

import re

import pytest
from helpers.cluster import call_with_deadline, running_cluster
from helpers.files import flip_bytes

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.parallel.loader import shard_memory_needs
from edgetp.runtime.master import Master, Prompt
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import read_manifest
from edgetp.shard.split import split_checkpoint

DEADLINE_S = 60.0


def generate(master: Master) -> str:
    config = GenerationConfig(max_new_tokens=64)
    result = call_with_deadline(
        lambda: master.generate(Prompt(demo_prompt(3, 5)), SamplingConfig(), config),
        DEADLINE_S, "a generation")
    return result.text.strip()


def test_a_streamed_shard_changed_after_load_fails_the_request(tmp_path):
    worker_dir = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 2).rank_dirs[1]
    budget = shard_memory_needs(worker_dir).minimum()  # the worker streams every block
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path,
                         worker_args=["--memory-budget", str(budget)]) as cluster:
        assert cluster.master is not None
        assert generate(cluster.master) == expected_text(3, 5)
        manifest = read_manifest(worker_dir)
        for layer in range(manifest.model_config.num_hidden_layers):
            file = worker_dir / layer_file(layer)
            for entry in manifest.files[file.name].tensors.values():
                flip_bytes(file, entry.offsets[0], keep_mtime=True)
        with pytest.raises(RuntimeError) as info:
            generate(cluster.master)
    message = str(info.value)
    assert re.search(r"\brank 1\b", message), message
    assert re.search(rf"{re.escape(str(worker_dir))}/layer-\d+\.safetensors changed on disk",
                     message), message
    assert re.search(r"block layers\.\d+\.(self_attn|mlp)", message), message
    assert "restore the file or split the model again" in message
