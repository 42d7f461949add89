"""The default context fits the node's memory, not the model's maximum (``edgetp.model.context``).

The demo model is copied with ``max_position_embeddings`` 1e8 (its KV cache and RoPE tables
would take 176 GB); the memory a node has is pinned to 64 MiB, so a quarter of it, 16 MiB,
holds 8192 positions of the whole model (1760 bytes each in float32) or 16384 of a rank that
holds half the heads. ``--max-seq-len`` still decides when it is given.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from edgetp.model import context
from edgetp.model.checkpoint import load_model
from edgetp.model.demo import DEMO_MODEL_DIR
from edgetp.parallel.loader import rank_context, shard_memory_needs
from edgetp.shard.manifest import read_manifest
from edgetp.shard.split import split_checkpoint

HUGE = 100_000_000
MEMORY = 64 << 20
# 4 layers of K and V rows (4 KV heads of 12) and 8 scores, float32; cos and sin rows of 12
WHOLE_MODEL_POSITION = 4 * (2 * 4 * 12 + 8) * 4 + 2 * 4 * 12


@pytest.fixture(scope="module")
def huge_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("huge-context") / "model"
    shutil.copytree(DEMO_MODEL_DIR, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1e8}))
    return model_dir


@pytest.fixture
def small_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "available_memory_bytes", lambda: MEMORY)


@pytest.mark.usefixtures("small_node")
def test_the_default_context_fits_the_node_and_says_so(huge_context_model: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert 8192 * WHOLE_MODEL_POSITION <= MEMORY // 4 < 16384 * WHOLE_MODEL_POSITION
    with caplog.at_level(logging.INFO, logger="edgetp.model.context"):
        model = load_model(huge_context_model)
    assert model.max_seq_len == 8192
    assert model.cache_bytes() + model.rope_cos.nbytes + model.rope_sin.nbytes \
        <= MEMORY // 4
    (record,) = [r for r in caplog.records if r.name == "edgetp.model.context"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "context: 8192 positions of the model's 100000000 (all of them would take 163.91 GiB "
        "for the KV cache of this node, more than a quarter of its 64.00 MiB available); set "
        "--max-seq-len to choose")
    logits = model(torch.tensor([1, 5, 6]), 0)
    assert torch.isfinite(logits).all()


@pytest.mark.usefixtures("small_node")
def test_max_seq_len_still_decides(huge_context_model: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edgetp.model.context"):
        model = load_model(huge_context_model, max_seq_len=300)
    assert model.max_seq_len == 300
    assert not [r for r in caplog.records if r.name == "edgetp.model.context"]


@pytest.mark.usefixtures("small_node")
def test_a_rank_fits_its_own_share(huge_context_model: Path, tmp_path: Path) -> None:
    split = split_checkpoint(huge_context_model, tmp_path / "split", 2)
    for rank_dir in split.rank_dirs:
        manifest = read_manifest(rank_dir)
        assert rank_context(manifest, torch.float32, None) == 16384  # half the KV heads
        assert rank_context(manifest, torch.bfloat16, None) == 32768
        assert rank_context(manifest, torch.float32, 77) == 77
    # what the loader plans for is what it will allocate
    assert shard_memory_needs(split.rank_dirs[1]) == shard_memory_needs(split.rank_dirs[1],
                                                                        max_seq_len=16384)


def test_a_model_that_fits_keeps_its_maximum(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edgetp.model.context"):
        model = load_model(DEMO_MODEL_DIR)
    assert model.max_seq_len == 256
    (record,) = [r for r in caplog.records if r.name == "edgetp.model.context"]
    assert record.levelno == logging.INFO and "the model's 256 positions" in record.getMessage()


def test_the_policy_rounds_down_to_a_power_of_two_and_keeps_a_floor() -> None:
    config = load_model(DEMO_MODEL_DIR, max_seq_len=8).config
    big = type(config)(**{**config.__dict__, "max_position_embeddings": HUGE})
    assert context.default_context(big, 1000, available=4 * 1000 * 5000) == 4096
    assert context.default_context(big, 1000, available=4 * 1000 * 4096) == 4096
    assert context.default_context(big, 1000, available=1000) == context.MIN_CONTEXT
    assert context.default_context(config, 1000, available=1000) == context.MIN_CONTEXT == 256
    assert context.default_context(big, 1000, available=None) <= HUGE
